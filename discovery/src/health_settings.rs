//! Per-service health-check settings.
//!
//! Cloud Map's `HealthCheckConfig` carries only `Type`, `ResourcePath` and `FailureThreshold` (the
//! unhealthy threshold). The rest of what Consul or an ALB target group lets a team set per service
//! comes from the service's tags, so the real `aws servicediscovery create-service --tags` and
//! `tag-resource` set them:
//!
//! | tag key                          | value                         | default (server flag)   |
//! |----------------------------------|-------------------------------|-------------------------|
//! | `trellis:health-check-interval`  | duration, `100ms`..`1h`       | `--health-interval`     |
//! | `trellis:health-check-timeout`   | duration, `10ms`..`60s`       | `--health-timeout`      |
//! | `trellis:healthy-threshold`      | 1..10                         | `--healthy-threshold`   |
//! | `trellis:health-check-matcher`   | codes, e.g. `200-399`, `200,204` | `200-399` (Route 53) |
//!
//! Values are validated when the tags arrive (`InvalidInput` names the key); the checker reads them
//! with [`CheckSettings::for_service`].

use std::time::Duration;

use crate::health::HealthConfig;
use crate::model::Tag;

pub const TAG_INTERVAL: &str = "trellis:health-check-interval";
pub const TAG_TIMEOUT: &str = "trellis:health-check-timeout";
pub const TAG_HEALTHY_THRESHOLD: &str = "trellis:healthy-threshold";
pub const TAG_MATCHER: &str = "trellis:health-check-matcher";

const INTERVAL: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(3600));
const TIMEOUT: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(60));

/// Which HTTP status codes count as healthy: a list of inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusMatcher(Vec<(u16, u16)>);

impl Default for StatusMatcher {
    /// 2xx and 3xx, as Route 53 and ALB's default.
    fn default() -> Self {
        StatusMatcher(vec![(200, 399)])
    }
}

impl StatusMatcher {
    /// Parses `200`, `200-399`, `200,204,301-302`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim) {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let code = |c: &str| {
                c.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .ok_or_else(|| format!("`{c}` is not an HTTP status code (100-599)"))
            };
            let (lo, hi) = (code(lo)?, code(hi)?);
            if lo > hi {
                return Err(format!("range `{part}` is empty"));
            }
            out.push((lo, hi));
        }
        Ok(StatusMatcher(out))
    }

    pub fn matches(&self, code: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&code))
    }
}

/// Everything one active check needs besides its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub matcher: StatusMatcher,
}

impl CheckSettings {
    /// The server-wide defaults overridden by the service's (already validated) tags.
    pub fn for_service(defaults: &HealthConfig, failure_threshold: u32, tags: &[Tag]) -> Self {
        let mut s = CheckSettings {
            interval: defaults.interval,
            timeout: defaults.timeout,
            healthy_threshold: defaults.healthy_threshold.max(1),
            unhealthy_threshold: failure_threshold.max(1),
            matcher: StatusMatcher::default(),
        };
        for t in tags {
            // Invalid values never get stored (see `validate_tag`); skip defensively.
            let _ = s.apply(t);
        }
        s
    }

    fn apply(&mut self, t: &Tag) -> Result<(), String> {
        match t.key.as_str() {
            TAG_INTERVAL => self.interval = duration(&t.value, INTERVAL)?,
            TAG_TIMEOUT => self.timeout = duration(&t.value, TIMEOUT)?,
            TAG_HEALTHY_THRESHOLD => {
                self.healthy_threshold = t
                    .value
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=10).contains(n))
                    .ok_or("must be a whole number from 1 to 10")?
            }
            TAG_MATCHER => self.matcher = StatusMatcher::parse(&t.value)?,
            _ => {}
        }
        Ok(())
    }
}

fn duration(v: &str, (lo, hi): (Duration, Duration)) -> Result<Duration, String> {
    let d = humantime::parse_duration(v.trim())
        .map_err(|e| format!("`{v}` is not a duration like 5s or 500ms ({e})"))?;
    if d < lo || d > hi {
        return Err(format!(
            "must be between {} and {}",
            humantime::format_duration(lo),
            humantime::format_duration(hi)
        ));
    }
    Ok(d)
}

/// Checks one tag; `Err` carries the message for `InvalidInput`.
pub fn validate_tag(t: &Tag) -> Result<(), String> {
    CheckSettings::for_service(&HealthConfig::default(), 1, &[])
        .apply(t)
        .map_err(|e| format!("tag {}: {e}", t.key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(k: &str, v: &str) -> Tag {
        Tag {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn matcher_parses_lists_and_ranges() {
        let m = StatusMatcher::parse("200, 204,301-302").unwrap();
        assert!(m.matches(200) && m.matches(204) && m.matches(302));
        assert!(!m.matches(201) && !m.matches(303) && !m.matches(500));
        for bad in ["", "2xx", "99", "600", "300-200", "200-"] {
            assert!(StatusMatcher::parse(bad).is_err(), "{bad}");
        }
        assert!(StatusMatcher::default().matches(399) && !StatusMatcher::default().matches(400));
    }

    #[test]
    fn tags_override_defaults_and_bad_values_are_named() {
        let d = HealthConfig::default();
        let s = CheckSettings::for_service(
            &d,
            3,
            &[
                tag(TAG_INTERVAL, "250ms"),
                tag(TAG_TIMEOUT, "100ms"),
                tag(TAG_HEALTHY_THRESHOLD, "2"),
                tag(TAG_MATCHER, "204"),
                tag("team", "payments"),
            ],
        );
        assert_eq!(s.interval, Duration::from_millis(250));
        assert_eq!(s.timeout, Duration::from_millis(100));
        assert_eq!((s.healthy_threshold, s.unhealthy_threshold), (2, 3));
        assert!(s.matcher.matches(204) && !s.matcher.matches(200));
        let e = validate_tag(&tag(TAG_INTERVAL, "5ms")).unwrap_err();
        assert!(e.contains(TAG_INTERVAL) && e.contains("between"), "{e}");
        assert!(validate_tag(&tag(TAG_HEALTHY_THRESHOLD, "0")).is_err());
        assert!(validate_tag(&tag(TAG_TIMEOUT, "soon")).is_err());
        assert!(validate_tag(&tag("owner", "anything")).is_ok());
    }
}
