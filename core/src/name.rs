//! Validated names: DNS-label service names, dotted namespace names and SPIFFE trust domains.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a name was rejected. The message names the offending value and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} {value:?} is too long ({len} > {max} characters)")]
    TooLong {
        kind: &'static str,
        value: String,
        len: usize,
        max: usize,
    },
    #[error("{kind} {value:?} has an invalid character {ch:?} (allowed: {allowed})")]
    InvalidChar {
        kind: &'static str,
        value: String,
        ch: char,
        allowed: &'static str,
    },
    #[error("{kind} {value:?}: {reason}")]
    Malformed {
        kind: &'static str,
        value: String,
        reason: &'static str,
    },
}

const MAX_LABEL: usize = 63;
const MAX_DOTTED: usize = 253;

fn check_label(kind: &'static str, whole: &str, label: &str) -> Result<(), NameError> {
    if label.is_empty() {
        return Err(NameError::Malformed {
            kind,
            value: whole.to_owned(),
            reason: "empty label (two dots in a row, or a leading/trailing dot)",
        });
    }
    if label.len() > MAX_LABEL {
        return Err(NameError::TooLong {
            kind,
            value: whole.to_owned(),
            len: label.len(),
            max: MAX_LABEL,
        });
    }
    if let Some(ch) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(NameError::InvalidChar {
            kind,
            value: whole.to_owned(),
            ch,
            allowed: "ASCII letters, digits, '-' and '_'",
        });
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(NameError::Malformed {
            kind,
            value: whole.to_owned(),
            reason: "a label must not start or end with '-'",
        });
    }
    Ok(())
}

fn check_dotted(kind: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if value.len() > MAX_DOTTED {
        return Err(NameError::TooLong {
            kind,
            value: value.to_owned(),
            len: value.len(),
            max: MAX_DOTTED,
        });
    }
    value
        .split('.')
        .try_for_each(|label| check_label(kind, value, label))
}

macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                s.parse()
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A service name: one DNS label (`api`, `users_v2`), 1–63 characters, as Cloud Map and DNS allow.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);
string_newtype!(ServiceName);

impl FromStr for ServiceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        const KIND: &str = "service name";
        if s.is_empty() {
            return Err(NameError::Empty { kind: KIND });
        }
        check_label(KIND, s, s)?;
        Ok(Self(s.to_owned()))
    }
}

/// A namespace name: a dotted DNS name (`my-app.local`, `my-app`), at most 253 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceName(String);
string_newtype!(NamespaceName);

impl FromStr for NamespaceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        check_dotted("namespace name", s)?;
        Ok(Self(s.to_owned()))
    }
}

/// A SPIFFE trust domain (`mesh.local`): lowercase letters, digits, '.', '-' and '_'.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);
string_newtype!(TrustDomain);

impl FromStr for TrustDomain {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        const KIND: &str = "trust domain";
        if let Some(ch) = s.chars().find(|c| c.is_ascii_uppercase()) {
            return Err(NameError::InvalidChar {
                kind: KIND,
                value: s.to_owned(),
                ch,
                allowed: "lowercase ASCII letters, digits, '.', '-' and '_'",
            });
        }
        check_dotted(KIND, s)?;
        Ok(Self(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        assert!("api".parse::<ServiceName>().is_ok());
        assert!("users_v2".parse::<ServiceName>().is_ok());
        assert!("a".repeat(63).parse::<ServiceName>().is_ok());
        assert!(matches!(
            "a".repeat(64).parse::<ServiceName>(),
            Err(NameError::TooLong { .. })
        ));
        assert!(matches!(
            "".parse::<ServiceName>(),
            Err(NameError::Empty { .. })
        ));
        assert!(matches!(
            "api.v1".parse::<ServiceName>(),
            Err(NameError::InvalidChar { ch: '.', .. })
        ));
        assert!("-api".parse::<ServiceName>().is_err());
        assert!("api/x".parse::<ServiceName>().is_err());
    }

    #[test]
    fn namespace_names() {
        assert!("my-app.local".parse::<NamespaceName>().is_ok());
        assert!("my-app".parse::<NamespaceName>().is_ok());
        assert!("a..b".parse::<NamespaceName>().is_err());
        assert!(".a".parse::<NamespaceName>().is_err());
        assert!("a.".parse::<NamespaceName>().is_err());
        assert!("a b".parse::<NamespaceName>().is_err());
        let long = vec!["abcdefghij"; 30].join(".");
        assert!(matches!(
            long.parse::<NamespaceName>(),
            Err(NameError::TooLong { .. })
        ));
    }

    #[test]
    fn trust_domains() {
        assert!("mesh.local".parse::<TrustDomain>().is_ok());
        assert!("Mesh.local".parse::<TrustDomain>().is_err());
    }

    #[test]
    fn serde_validates() {
        let ok: ServiceName = serde_json::from_str("\"api\"").unwrap();
        assert_eq!(ok.as_str(), "api");
        let err = serde_json::from_str::<ServiceName>("\"a b\"").unwrap_err();
        assert!(err.to_string().contains("invalid character"), "{err}");
    }
}
