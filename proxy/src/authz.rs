//! Authorization of inbound peers by SPIFFE id against intentions: the first rule matching the
//! source decides (deny rules are checked before allow rules, so a deny always wins); otherwise the
//! configured default.

use trellis_core::SpiffeId;

use crate::config::{Decision, Intentions};

/// Decides whether `peer` may call this service. `None` (no verified identity) is always denied.
pub fn authorize(intentions: &Intentions, peer: Option<&SpiffeId>) -> Decision {
    let Some(peer) = peer else {
        return Decision::Deny;
    };
    let matches = |r: &&crate::config::IntentionRule| {
        (r.source == "*" || r.source == peer.service().as_str())
            && r.namespace.as_ref().is_none_or(|ns| ns == peer.namespace())
    };
    if intentions
        .rules
        .iter()
        .filter(|r| r.action == Decision::Deny)
        .any(|r| matches(&r))
    {
        return Decision::Deny;
    }
    if intentions
        .rules
        .iter()
        .filter(|r| r.action == Decision::Allow)
        .any(|r| matches(&r))
    {
        return Decision::Allow;
    }
    intentions.default
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IntentionRule;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn rule(source: &str, action: Decision) -> IntentionRule {
        IntentionRule {
            source: source.into(),
            namespace: None,
            action,
        }
    }

    #[test]
    fn rules_then_default() {
        let frontend = id("spiffe://trellis.local/ns/my-app.local/svc/frontend");
        let batch = id("spiffe://trellis.local/ns/my-app.local/svc/batch");
        let i = Intentions {
            default: Decision::Deny,
            rules: vec![rule("frontend", Decision::Allow)],
        };
        assert_eq!(authorize(&i, Some(&frontend)), Decision::Allow);
        assert_eq!(authorize(&i, Some(&batch)), Decision::Deny);
        assert_eq!(authorize(&i, None), Decision::Deny);

        let i = Intentions {
            default: Decision::Allow,
            rules: vec![rule("*", Decision::Allow), rule("batch", Decision::Deny)],
        };
        assert_eq!(authorize(&i, Some(&frontend)), Decision::Allow);
        assert_eq!(
            authorize(&i, Some(&batch)),
            Decision::Deny,
            "deny wins over a wildcard allow"
        );
    }

    #[test]
    fn namespace_scoped_rule() {
        let other = id("spiffe://trellis.local/ns/other.local/svc/frontend");
        let i = Intentions {
            default: Decision::Deny,
            rules: vec![IntentionRule {
                source: "frontend".into(),
                namespace: Some("my-app.local".parse().unwrap()),
                action: Decision::Allow,
            }],
        };
        assert_eq!(authorize(&i, Some(&other)), Decision::Deny);
    }
}
