//! The outbound routes in effect: the configured `[[outbound.routes]]`, except for upstreams whose
//! service carries routes pushed from the control plane (`trellis:route:<name>` service
//! attributes, see [`trellis_core::route_spec`]). Those replace the configured routes of that
//! upstream while they are present; when the last one is deleted, the configured ones apply again.
//!
//! Changes come from two sides, a reload and an upstream's watch, and are rare: they meet under a
//! mutex here, compile, and are swapped into the [`Router`] whole, which the request path only
//! loads. A push this sidecar cannot apply (a target that is not one of its upstreams, an
//! attribute subset it has no cluster for) is refused with a warning and counted; the routes
//! before it stay.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use trellis_core::EndpointSet;
use trellis_core::route_spec::{ROUTE_ATTRIBUTE_PREFIX, pushed_routes};

use crate::cluster::Cluster;
use crate::config::{OutboundConfig, RouteConfig};
use crate::error::ConfigError;
use crate::metrics::Metrics;
use crate::outbound::{Router, Subset, compile_with};
use crate::watch::WatchSink;

pub struct LiveRoutes {
    state: Mutex<State>,
    router: Arc<Router>,
    metrics: Metrics,
    /// What the admin's `/routes` shows: the routes in effect, by upstream.
    view: Arc<ArcSwap<String>>,
}

impl std::fmt::Debug for LiveRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state.lock();
        f.debug_struct("LiveRoutes")
            .field("pushed", &st.pushed)
            .finish_non_exhaustive()
    }
}

struct State {
    /// As configured (the latest reload).
    configured: OutboundConfig,
    /// By upstream position: the routes its service pushes, if any.
    pushed: Vec<Option<Vec<RouteConfig>>>,
    /// By upstream position: the route attributes last heard (applied or refused), so that a
    /// watch answer for other reasons (endpoints) does not redo or re-report them.
    heard: Vec<BTreeMap<String, String>>,
    /// The target slots made at start (their clusters exist).
    subsets: Vec<Subset>,
}

impl State {
    /// The configured routes of upstreams without pushes, then the pushed ones.
    fn effective(&self) -> OutboundConfig {
        let pushed_for = |name: &str| {
            self.configured
                .upstreams
                .iter()
                .position(|u| u.service.as_str() == name)
                .and_then(|u| self.pushed.get(u))
                .is_some_and(Option::is_some)
        };
        let mut out = self.configured.clone();
        out.routes.retain(|r| !pushed_for(r.upstream.as_str()));
        out.routes
            .extend(self.pushed.iter().flatten().flatten().cloned());
        out
    }

    fn compile_into(&self, router: &Router, view: &ArcSwap<String>) -> Result<(), ConfigError> {
        let effective = self.effective();
        let tables = compile_with(&effective, Some(&self.subsets))?;
        router.swap(tables);
        view.store(Arc::new(self.view_json(&effective)));
        Ok(())
    }

    /// `{"api": {"source": "pushed", "routes": [...]}, ...}`, in upstream order.
    fn view_json(&self, effective: &OutboundConfig) -> String {
        let by_upstream: serde_json::Map<String, serde_json::Value> = effective
            .upstreams
            .iter()
            .enumerate()
            .map(|(u, up)| {
                let pushed = self.pushed.get(u).is_some_and(Option::is_some);
                let routes: Vec<&RouteConfig> = effective
                    .routes
                    .iter()
                    .filter(|r| r.upstream == up.service)
                    .collect();
                (
                    up.service.to_string(),
                    serde_json::json!({
                        "source": if pushed { "pushed" } else { "configured" },
                        "routes": routes,
                    }),
                )
            })
            .collect();
        serde_json::to_string_pretty(&by_upstream).unwrap_or_default()
    }
}

impl LiveRoutes {
    /// `subsets` are the ones `router`'s target slots were made for.
    pub fn new(
        configured: OutboundConfig,
        subsets: Vec<Subset>,
        router: Arc<Router>,
        metrics: Metrics,
        view: Arc<ArcSwap<String>>,
    ) -> Self {
        let pushed = vec![None; configured.upstreams.len()];
        let heard = vec![BTreeMap::new(); configured.upstreams.len()];
        let state = State {
            configured,
            pushed,
            heard,
            subsets,
        };
        view.store(Arc::new(state.view_json(&state.effective())));
        Self {
            state: Mutex::new(state),
            router,
            metrics,
            view,
        }
    }

    /// A reload's routes (same upstreams, else they are kept: the listeners and clusters are made
    /// at start). Pushed routes keep their upstreams.
    pub fn set_configured(&self, outbound: &OutboundConfig) -> Result<(), String> {
        let mut st = self.state.lock();
        let same_upstreams = outbound.upstreams.iter().map(|u| &u.service).eq(st
            .configured
            .upstreams
            .iter()
            .map(|u| &u.service));
        if !same_upstreams {
            return Err("outbound.upstreams changed: routes kept; restart to apply".into());
        }
        let before = std::mem::replace(&mut st.configured, outbound.clone());
        if let Err(e) = st.compile_into(&self.router, &self.view) {
            st.configured = before;
            return Err(e.to_string());
        }
        Ok(())
    }

    /// What upstream `u`'s service pushes now (its endpoint set's attributes).
    pub fn set_pushed(&self, u: usize, attributes: &BTreeMap<String, String>) {
        let mut st = self.state.lock();
        let Some(upstream) = st.configured.upstreams.get(u).map(|c| c.service.clone()) else {
            return;
        };
        let heard: BTreeMap<String, String> = attributes
            .iter()
            .filter(|(k, _)| k.starts_with(ROUTE_ATTRIBUTE_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match st.heard.get_mut(u) {
            Some(h) if *h == heard => return,
            Some(h) => *h = heard,
            None => return,
        }
        let routes = match pushed_routes(attributes.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
            Ok(r) => r.map(|routes| {
                routes
                    .into_iter()
                    .map(|(name, r)| RouteConfig {
                        upstream: upstream.clone(),
                        name: Some(format!("{ROUTE_ATTRIBUTE_PREFIX}{name}")),
                        priority: r.priority,
                        matches: r.matches,
                        targets: r.targets,
                    })
                    .collect::<Vec<_>>()
            }),
            // The control plane checks routes when they are set; an older one may not have.
            Err(e) => {
                self.refuse(upstream.as_str(), &e);
                return;
            }
        };
        if st.pushed.get(u) == Some(&routes) {
            return;
        }
        let before = std::mem::replace(&mut st.pushed[u], routes);
        match st.compile_into(&self.router, &self.view) {
            Ok(()) => {
                let n = st.pushed.iter().flatten().map(Vec::len).sum::<usize>();
                self.metrics.pushed_routes.set(n as i64);
                match &st.pushed[u] {
                    Some(r) => tracing::info!(%upstream, routes = r.len(), "pushed routes applied"),
                    None => {
                        tracing::info!(%upstream, "pushed routes withdrawn: configured routes apply")
                    }
                }
            }
            Err(e) => {
                st.pushed[u] = before;
                self.refuse(upstream.as_str(), &e.to_string());
            }
        }
    }

    fn refuse(&self, upstream: &str, problem: &str) {
        self.metrics.pushed_routes_rejected.inc();
        tracing::warn!(%upstream, %problem, "pushed routes refused; the routes before them stay");
    }
}

/// An upstream's watch: endpoints to its cluster, pushed routes to the live routes.
pub struct UpstreamSink {
    pub cluster: Arc<Cluster>,
    pub routes: Arc<LiveRoutes>,
    pub upstream: usize,
}

impl WatchSink for UpstreamSink {
    fn apply(&self, set: &EndpointSet) {
        self.cluster.apply(set);
        self.routes.set_pushed(self.upstream, &set.attributes);
    }
    fn is_loaded(&self) -> bool {
        WatchSink::is_loaded(&*self.cluster)
    }
    fn unknown(&self) {
        self.cluster.unknown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn outbound(routes: &str) -> OutboundConfig {
        let toml = format!(
            "[identity]\nnamespace = \"my-app.local\"\nservice = \"web\"\n\n[outbound]\nupstreams = [{{ service = \"api\", danger_plaintext = true }}, {{ service = \"api-v2\", danger_plaintext = true }}, {{ service = \"users\", danger_plaintext = true }}]\n{routes}\n[control_plane]\naddress = \"127.0.0.1:9400\"\n"
        );
        Config::from_toml(&toml).unwrap().outbound
    }

    #[test]
    fn pushed_routes_replace_the_configured_ones_of_their_upstream_only() {
        let configured = outbound(
            "[[outbound.routes]]\nupstream = \"api\"\nmatch = { prefix = \"/old\" }\ntargets = [{ cluster = \"api-v2\" }]\n\n[[outbound.routes]]\nupstream = \"users\"\nmatch = { prefix = \"/u\" }\ntargets = [{ cluster = \"api\" }]\n",
        );
        let pushed = pushed_routes([(
            "trellis:route:v2",
            r#"{"match":{"prefix":"/v2"},"targets":[{"cluster":"api-v2"}]}"#,
        )])
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|(name, r)| RouteConfig {
            upstream: "api".parse().unwrap(),
            name: Some(format!("{ROUTE_ATTRIBUTE_PREFIX}{name}")),
            priority: r.priority,
            matches: r.matches,
            targets: r.targets,
        })
        .collect();
        let st = State {
            configured,
            pushed: vec![Some(pushed), None, None],
            heard: vec![BTreeMap::new(); 3],
            subsets: vec![],
        };
        let eff = st.effective();
        let got: Vec<(&str, Option<&str>)> = eff
            .routes
            .iter()
            .map(|r| (r.upstream.as_str(), r.matches.prefix.as_deref()))
            .collect();
        assert_eq!(got, [("users", Some("/u")), ("api", Some("/v2"))]);
        assert!(compile_with(&eff, Some(&[])).is_ok());

        // A push naming a target this sidecar lacks names the attribute.
        let mut bad = eff.clone();
        bad.routes[1].targets[0].cluster = "billing".parse().unwrap();
        let err = compile_with(&bad, Some(&[])).unwrap_err().to_string();
        assert!(err.contains("trellis:route:v2.targets[0].cluster"), "{err}");
        // So does one needing an attribute subset the sidecar has no cluster for.
        let mut sub = eff;
        sub.routes[1].targets[0]
            .attributes
            .insert("version".into(), "v3".into());
        let err = compile_with(&sub, Some(&[])).unwrap_err().to_string();
        assert!(
            err.contains("api-v2[version=v3]") && err.contains("restart"),
            "{err}"
        );
    }
}
