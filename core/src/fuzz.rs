//! Entry points for the `fuzz/` targets and the corpus-replay tests: each takes arbitrary bytes,
//! must never panic, and checks the parser's properties (round trips) with `assert!`.

use std::str::FromStr;

use crate::{NamespaceName, ServiceName, SpiffeId, TrustDomain};

/// SPIFFE ids: parse → to_string → parse gives the same id, and the URI form parses back too.
pub fn spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::from_str(text) {
        let again = SpiffeId::from_str(&id.to_string());
        assert_eq!(
            again.as_ref().ok(),
            Some(&id),
            "display round trip of {text:?}"
        );
        assert_eq!(SpiffeId::from_str(&id.to_uri()).ok(), Some(id));
    }
}

/// Service, namespace and trust-domain names: a parsed name prints to a string that parses to
/// the same name, and a parsed name is never empty.
pub fn names(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    round_trip::<ServiceName>(text);
    round_trip::<NamespaceName>(text);
    round_trip::<TrustDomain>(text);
}

fn round_trip<T>(text: &str)
where
    T: FromStr + ToString + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = T::from_str(text) {
        let printed = v.to_string();
        assert!(!printed.is_empty(), "{text:?} parsed to an empty name");
        assert_eq!(
            T::from_str(&printed).ok(),
            Some(v),
            "round trip of {text:?}"
        );
    }
}
