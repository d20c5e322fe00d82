//! Health state of an instance, spelled as Cloud Map spells it on the wire.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HealthStatus {
    Healthy,
    Unhealthy,
    /// No check result yet (Cloud Map reports UNKNOWN for instances without health checks).
    #[default]
    Unknown,
}

impl HealthStatus {
    /// Whether traffic may be sent: UNKNOWN counts as serving, as in Cloud Map's DiscoverInstances.
    pub fn is_serving(self) -> bool {
        !matches!(self, HealthStatus::Unhealthy)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "HEALTHY",
            HealthStatus::Unhealthy => "UNHEALTHY",
            HealthStatus::Unknown => "UNKNOWN",
        }
    }
}
