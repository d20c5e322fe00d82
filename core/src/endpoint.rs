//! The endpoint set of one service: what the discovery watch API sends and the proxy balances over.
//!
//! Wire format (JSON), served by `GET /v1/watch/<namespace>/<service>?revision=N&wait=30s`:
//! `{"namespace":"my-app.local","service":"api","revision":7,"endpoints":[{"instance_id":"api-1",
//! "address":"127.0.0.1","port":8080,"weight":1,"health":"HEALTHY","attributes":{"version":"v1"}}]}`

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::health::HealthStatus;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSet {
    pub namespace: String,
    pub service: String,
    /// Monotonic per service; a watcher passes the last one it saw and is answered when it moves.
    pub revision: u64,
    pub endpoints: Vec<Endpoint>,
    /// The service's `trellis:` tags: mesh policy its own sidecars apply (intentions, see
    /// [`crate::intentions`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// The service's `trellis:` service attributes: routes its callers' sidecars apply (see
    /// [`crate::route_spec`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub instance_id: String,
    pub address: IpAddr,
    pub port: u16,
    /// Relative weight for weighted balancing (canary versions); 1 unless the instance says otherwise.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub health: HealthStatus,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

fn default_weight() -> u32 {
    1
}

impl Endpoint {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

impl EndpointSet {
    /// The endpoints that may receive traffic. When none is serving, all of them (fail open, as
    /// Route 53 and Envoy's panic threshold do): the caller can tell by comparing lengths.
    pub fn serving(&self) -> impl Iterator<Item = &Endpoint> {
        let any = self.endpoints.iter().any(|e| e.health.is_serving());
        self.endpoints
            .iter()
            .filter(move |e| !any || e.health.is_serving())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_and_defaults() {
        let json = r#"{"namespace":"my-app.local","service":"api","revision":7,
            "endpoints":[{"instance_id":"api-1","address":"127.0.0.1","port":8080}]}"#;
        let set: EndpointSet = serde_json::from_str(json).unwrap();
        assert_eq!(set.endpoints[0].weight, 1);
        assert_eq!(set.endpoints[0].health, HealthStatus::Unknown);
        let again: EndpointSet =
            serde_json::from_str(&serde_json::to_string(&set).unwrap()).unwrap();
        assert_eq!(set, again);
    }

    #[test]
    fn serving_fails_open() {
        let ep = |id: &str, health| Endpoint {
            instance_id: id.into(),
            address: "127.0.0.1".parse().unwrap(),
            port: 1,
            weight: 1,
            health,
            attributes: BTreeMap::new(),
        };
        let mut set = EndpointSet {
            namespace: "n".into(),
            service: "s".into(),
            revision: 1,
            endpoints: vec![
                ep("a", HealthStatus::Healthy),
                ep("b", HealthStatus::Unhealthy),
            ],
            tags: BTreeMap::new(),
            attributes: BTreeMap::new(),
        };
        assert_eq!(set.serving().count(), 1);
        set.endpoints[0].health = HealthStatus::Unhealthy;
        assert_eq!(set.serving().count(), 2);
    }
}
