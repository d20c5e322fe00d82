//! Issuance policy: lifetimes and which DNS names a workload certificate may carry.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::CaError;

pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest lifetime the CA issues (short enough for rotation tests, long enough to be useful).
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// notBefore is backdated by this much to tolerate clock skew.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// Which DNS SANs a workload certificate gets besides its SPIFFE URI SAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DnsSans {
    /// Only the SPIFFE URI SAN.
    None,
    /// Also `<service>.<namespace>`, so non-mesh TLS clients can verify by hostname.
    #[default]
    ServiceNamespace,
}

/// What the CA allows when it signs a workload certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(with = "secs", default = "default_ttl")]
    pub default_ttl: Duration,
    #[serde(with = "secs", default = "default_max_ttl")]
    pub max_ttl: Duration,
    #[serde(default)]
    pub dns_sans: DnsSans,
}

fn default_ttl() -> Duration {
    DEFAULT_TTL
}
fn default_max_ttl() -> Duration {
    DEFAULT_MAX_TTL
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            default_ttl: DEFAULT_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            dns_sans: DnsSans::default(),
        }
    }
}

impl Policy {
    /// The lifetime to issue for a requested TTL: the default when absent; an error above the
    /// maximum unless `clamp` (the AWS API clamps, the native API refuses).
    pub fn ttl(&self, requested: Option<Duration>, clamp: bool) -> Result<Duration, CaError> {
        let ttl = requested.unwrap_or(self.default_ttl.min(self.max_ttl));
        if ttl > self.max_ttl {
            if clamp {
                return Ok(self.max_ttl);
            }
            return Err(CaError::TtlTooLong {
                requested: ttl,
                max: self.max_ttl,
            });
        }
        Ok(ttl.max(MIN_TTL))
    }
}

/// `3600`, `3600s`, `90m`, `24h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let (num, mult) = match s.as_bytes().last()? {
        b's' => (&s[..s.len() - 1], 1),
        b'm' => (&s[..s.len() - 1], 60),
        b'h' => (&s[..s.len() - 1], 3600),
        b'd' => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()?
        .checked_mul(mult)
        .map(Duration::from_secs)
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rules() {
        let p = Policy::default();
        assert_eq!(p.ttl(None, false).unwrap(), DEFAULT_TTL);
        assert!(
            p.ttl(Some(Duration::from_secs(8 * 24 * 3600)), false)
                .is_err()
        );
        assert_eq!(
            p.ttl(Some(Duration::from_secs(8 * 24 * 3600)), true)
                .unwrap(),
            DEFAULT_MAX_TTL
        );
        assert_eq!(p.ttl(Some(Duration::ZERO), false).unwrap(), MIN_TTL);
    }
}
