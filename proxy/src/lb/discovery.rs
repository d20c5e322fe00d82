//! Target-group membership from the discovery watch API, through the sidecar's failover watch
//! ([`crate::watch`]): `GET /v1/watch/<ns>/<svc>?revision=N&wait=30s` on the first listed
//! control-plane replica, moving to the next on error and resuming from the last revision seen;
//! the group keeps its last members meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use trellis_ca::TrustBundle;
use trellis_ca::cp_client::Transport;
use trellis_core::EndpointSet;

use super::config::DiscoverySource;
use super::target::TargetGroup;
use crate::watch::{self, WatchSink, WatchTarget};

/// How long one long poll waits for a change.
const WAIT: Duration = Duration::from_secs(30);

/// A target group as a watch sink: serving endpoints become its members.
struct GroupSink {
    group: Arc<TargetGroup>,
    loaded: AtomicBool,
}

impl WatchSink for GroupSink {
    fn apply(&self, set: &EndpointSet) {
        let addrs: Vec<SocketAddr> = set.serving().map(|e| e.socket_addr()).collect();
        self.group.set_members(&addrs);
        self.loaded.store(true, Ordering::Release);
    }
    fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }
    fn unknown(&self) {
        tracing::warn!(group = %self.group.name, "service unknown to the control plane; retrying");
    }
}

/// How the watch reaches the control plane: HTTPS verified against the source's trust bundle
/// when it asks for TLS, else plain HTTP. Read at start, so a missing bundle fails the start.
pub fn transport(src: &DiscoverySource) -> Result<Transport, String> {
    if !src.https() {
        return Ok(Transport::plain());
    }
    let Some(path) = &src.trust_bundle else {
        return Err("tls needs trust_bundle".into());
    };
    let roots = trellis_ca::read_certs(path).map_err(|e| format!("trust_bundle {e}"))?;
    TrustBundle::new(src.trust_domain.clone(), roots)
        .and_then(|b| Transport::https(&b))
        .map_err(|e| format!("trust_bundle {}: {e}", path.display()))
}

pub async fn run(
    group: Arc<TargetGroup>,
    src: DiscoverySource,
    transport: Transport,
    stop: CancellationToken,
) {
    // `compile` validated the source: these parse.
    let (Ok(control_planes), Ok(namespace), Ok(service)) = (
        src.control_planes(),
        src.namespace.parse(),
        src.service.parse(),
    ) else {
        tracing::error!(group = %group.name, "invalid discovery source; no members from discovery");
        return;
    };
    let target = WatchTarget {
        control_planes,
        namespace,
        service,
        wait: WAIT,
        transport,
    };
    let sink = Arc::new(GroupSink {
        group,
        loaded: AtomicBool::new(false),
    });
    watch::run(target, sink, stop).await;
}
