//! The intentions the inbound listener applies: the configured ones (file, environment, reloads)
//! unless the control plane pushes some as tags of this sidecar's own service
//! ([`trellis_core::intentions`]); those win while the service carries them. The inbound path only
//! loads the effective set (an `ArcSwap`, no lock); the two writers (reload, watch) take a mutex.

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use parking_lot::Mutex;
use trellis_core::EndpointSet;
use trellis_core::intentions::{Source, TagIntentions, from_tags};

use crate::config::{Decision, IntentionRule, Intentions};
use crate::watch::WatchSink;

/// Configured and pushed intentions, and the effective set.
#[derive(Debug)]
pub struct LiveIntentions {
    effective: ArcSwap<Intentions>,
    /// (configured, pushed): written under the lock so both writers agree on `effective`.
    sources: Mutex<(Arc<Intentions>, Option<Arc<Intentions>>)>,
}

impl LiveIntentions {
    pub fn new(configured: Intentions) -> Arc<Self> {
        let configured = Arc::new(configured);
        Arc::new(Self {
            effective: ArcSwap::new(Arc::clone(&configured)),
            sources: Mutex::new((configured, None)),
        })
    }

    /// What a new inbound connection is checked against.
    pub fn load(&self) -> Guard<Arc<Intentions>> {
        self.effective.load()
    }

    /// A reload's intentions; they apply unless the control plane's are in force.
    pub fn set_configured(&self, configured: Intentions) {
        let mut s = self.sources.lock();
        s.0 = Arc::new(configured);
        let effective = s.1.clone().unwrap_or_else(|| Arc::clone(&s.0));
        self.effective.store(effective);
    }

    /// The control plane's intentions (`None`: it states none, the configured ones apply).
    pub fn set_pushed(&self, pushed: Option<Intentions>) {
        let mut s = self.sources.lock();
        let was = s.1.is_some();
        s.1 = pushed.map(Arc::new);
        let effective = s.1.clone().unwrap_or_else(|| Arc::clone(&s.0));
        match (was, s.1.is_some()) {
            (false, true) => tracing::info!("intentions from the control plane now apply"),
            (true, false) => tracing::info!(
                "the control plane states no intentions: the configured ones apply again"
            ),
            _ => {}
        }
        self.effective.store(effective);
    }
}

/// The sidecar's config form of tag-stated intentions.
fn to_config(t: TagIntentions) -> Intentions {
    let rule = |s: Source, action| IntentionRule {
        source: s
            .service
            .map_or_else(|| "*".to_owned(), |s| s.as_str().to_owned()),
        namespace: s.namespace,
        action,
    };
    let mut rules: Vec<IntentionRule> = t
        .deny
        .into_iter()
        .map(|s| rule(s, Decision::Deny))
        .collect();
    rules.extend(t.allow.into_iter().map(|s| rule(s, Decision::Allow)));
    Intentions {
        default: if t.default_allow {
            Decision::Allow
        } else {
            Decision::Deny
        },
        rules,
    }
}

/// Feeds [`LiveIntentions`] from the watch of this sidecar's own service.
pub struct OwnServiceSink(pub Arc<LiveIntentions>);

impl WatchSink for OwnServiceSink {
    fn apply(&self, set: &EndpointSet) {
        match from_tags(set.tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
            Ok(pushed) => self.0.set_pushed(pushed.map(to_config)),
            // The control plane validates tags when they arrive; an older one may not have.
            Err(e) => {
                tracing::warn!(error = %e, "intentions from the control plane not applied; the previous ones stay")
            }
        }
    }
    fn is_loaded(&self) -> bool {
        true
    }
    fn unknown(&self) {
        // Not registered (yet): nothing is pushed.
        self.0.set_pushed(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::authorize;

    fn id(s: &str) -> trellis_core::SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn pushed_intentions_win_until_withdrawn() {
        let live = LiveIntentions::new(Intentions {
            default: Decision::Deny,
            rules: vec![IntentionRule {
                source: "web".into(),
                namespace: None,
                action: Decision::Allow,
            }],
        });
        let web = id("spiffe://mesh.local/ns/my-app.local/svc/web");
        let lb = id("spiffe://mesh.local/ns/my-app.local/svc/lb");
        assert_eq!(authorize(&live.load(), Some(&web)), Decision::Allow);
        assert_eq!(authorize(&live.load(), Some(&lb)), Decision::Deny);

        let mut set = EndpointSet {
            namespace: "my-app.local".into(),
            service: "api".into(),
            revision: 1,
            endpoints: vec![],
            tags: [(
                trellis_core::intentions::TAG_ALLOW.to_owned(),
                "lb".to_owned(),
            )]
            .into(),
            attributes: Default::default(),
        };
        let sink = OwnServiceSink(Arc::clone(&live));
        sink.apply(&set);
        assert_eq!(authorize(&live.load(), Some(&web)), Decision::Deny);
        assert_eq!(authorize(&live.load(), Some(&lb)), Decision::Allow);
        // A reload meanwhile changes the configured set, not the effective one.
        live.set_configured(Intentions {
            default: Decision::Allow,
            rules: vec![],
        });
        assert_eq!(authorize(&live.load(), Some(&lb)), Decision::Allow);
        assert_eq!(authorize(&live.load(), Some(&web)), Decision::Deny);
        // Tags removed: the (reloaded) configured intentions apply.
        set.tags.clear();
        sink.apply(&set);
        assert_eq!(authorize(&live.load(), Some(&web)), Decision::Allow);
    }
}
