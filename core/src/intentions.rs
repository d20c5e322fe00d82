//! Intentions pushed from the control plane as Cloud Map service tags, as Consul keeps intentions
//! centrally: the tags are set with the real `aws servicediscovery tag-resource` on the
//! destination service, the control plane validates them when they arrive and sends them with the
//! service's endpoint set, and the service's sidecars apply them to new inbound connections.
//!
//! | tag key                      | value                                             |
//! |------------------------------|---------------------------------------------------|
//! | `trellis:intentions-default` | `allow` or `deny` (`deny` when absent)            |
//! | `trellis:intentions-allow`   | sources: `web, other-ns/api, other-ns/*, *`       |
//! | `trellis:intentions-deny`    | sources, same syntax; a deny wins over an allow   |
//!
//! A source is `service` (any namespace), `namespace/service`, `namespace/*` or `*`. While a service
//! carries any of these tags they replace its sidecars' configured intentions; when all are
//! removed, the configured ones apply again.

use crate::name::{NamespaceName, ServiceName};

pub const TAG_DEFAULT: &str = "trellis:intentions-default";
pub const TAG_ALLOW: &str = "trellis:intentions-allow";
pub const TAG_DENY: &str = "trellis:intentions-deny";

/// One source of an intention; `None` parts match anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub namespace: Option<NamespaceName>,
    pub service: Option<ServiceName>,
}

/// Intentions as the tags state them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagIntentions {
    /// Whether sources no rule names are allowed.
    pub default_allow: bool,
    pub allow: Vec<Source>,
    pub deny: Vec<Source>,
}

/// Whether `key` is one of the intention tags.
pub fn is_intention_tag(key: &str) -> bool {
    matches!(key, TAG_DEFAULT | TAG_ALLOW | TAG_DENY)
}

/// The intentions `tags` state; `None` when no intention tag is among them. The error names the
/// tag and the bad part.
pub fn from_tags<'a>(
    tags: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Option<TagIntentions>, String> {
    let mut out = TagIntentions {
        default_allow: false,
        allow: Vec::new(),
        deny: Vec::new(),
    };
    let mut any = false;
    for (key, value) in tags {
        match key {
            TAG_DEFAULT => {
                out.default_allow = match value.trim() {
                    "allow" => true,
                    "deny" => false,
                    other => return Err(format!("{key}: `{other}` is not allow or deny")),
                };
            }
            TAG_ALLOW => out.allow = sources(key, value)?,
            TAG_DENY => out.deny = sources(key, value)?,
            _ => continue,
        }
        any = true;
    }
    Ok(any.then_some(out))
}

fn sources(key: &str, value: &str) -> Result<Vec<Source>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| source(s).map_err(|e| format!("{key}: `{s}`: {e}")))
        .collect()
}

fn source(s: &str) -> Result<Source, String> {
    let (ns, svc) = match s.split_once('/') {
        Some((ns, svc)) => (Some(ns), svc),
        None => (None, s),
    };
    let namespace = match ns {
        None | Some("*") => None,
        Some(ns) => Some(ns.parse::<NamespaceName>().map_err(|e| e.to_string())?),
    };
    let service = match svc {
        "*" => None,
        svc => Some(svc.parse::<ServiceName>().map_err(|e| e.to_string())?),
    };
    Ok(Source { namespace, service })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_state_intentions() {
        assert_eq!(from_tags([("team", "payments")]).unwrap(), None);
        let got = from_tags([
            (TAG_DEFAULT, "deny"),
            (TAG_ALLOW, "web, other.local/api, batch.local/*"),
            (TAG_DENY, "*/legacy"),
        ])
        .unwrap()
        .unwrap();
        assert!(!got.default_allow);
        assert_eq!(got.allow.len(), 3);
        assert_eq!(got.allow[0].namespace, None);
        assert_eq!(got.allow[0].service.as_ref().unwrap().as_str(), "web");
        assert_eq!(
            got.allow[1].namespace.as_ref().unwrap().as_str(),
            "other.local"
        );
        assert_eq!(got.allow[2].service, None);
        assert_eq!(got.deny[0].namespace, None);
        assert_eq!(got.deny[0].service.as_ref().unwrap().as_str(), "legacy");
        // An empty allow list with a default of allow: everyone.
        let open = from_tags([(TAG_DEFAULT, "allow"), (TAG_ALLOW, "")])
            .unwrap()
            .unwrap();
        assert!(open.default_allow && open.allow.is_empty());
    }

    #[test]
    fn bad_tags_name_the_key_and_the_part() {
        for (key, value, part) in [
            (TAG_DEFAULT, "maybe", "maybe"),
            (TAG_ALLOW, "web, bad name", "bad name"),
            (TAG_DENY, "ns/", "ns/"),
        ] {
            let e = from_tags([(key, value)]).unwrap_err();
            assert!(e.contains(key) && e.contains(part), "{e}");
        }
    }
}
