//! ALB-like active health checks: every `interval`, `GET path` on each target (or on the
//! configured port) within `timeout`; `unhealthy_threshold` consecutive failures take a target
//! out of rotation, `healthy_threshold` consecutive passes bring it back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio_util::sync::CancellationToken;

use super::target::{Target, TargetGroup};

pub type ProbeClient = Client<HttpConnector, Empty<Bytes>>;

/// Runs until `stop` fires.
pub async fn run(group: Arc<TargetGroup>, client: ProbeClient, stop: CancellationToken) {
    let hc = group.health_check().clone();
    if !hc.enabled {
        return;
    }
    let mut tick = tokio::time::interval(hc.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let targets = group.targets();
        let probes = targets.iter().filter(|t| !t.is_draining()).map(|t| {
            let (group, client) = (&group, &client);
            async move {
                let ok = probe(client, group, t).await;
                verdict(group, t, ok);
            }
        });
        futures_util::future::join_all(probes).await;
    }
}

async fn probe(client: &ProbeClient, group: &TargetGroup, t: &Target) -> bool {
    let hc = group.health_check();
    let addr = SocketAddr::new(t.addr.ip(), hc.port.unwrap_or(t.addr.port()));
    let Ok(req) = http::Request::get(format!("http://{addr}{}", hc.path))
        .header(http::header::USER_AGENT, "trellis-lb-health-check")
        .body(Empty::new())
    else {
        return false;
    };
    match tokio::time::timeout(hc.timeout, client.request(req)).await {
        Ok(Ok(resp)) => group.matcher.accepts(resp.status().as_u16()),
        _ => false,
    }
}

fn verdict(group: &TargetGroup, t: &Target, ok: bool) {
    let hc = group.health_check();
    if ok {
        t.failures.store(0, Relaxed);
        let n = t.passes.fetch_add(1, Relaxed) + 1;
        if !t.is_healthy() && n >= u64::from(hc.healthy_threshold) {
            group.set_healthy(t, true);
        }
    } else {
        t.passes.store(0, Relaxed);
        let n = t.failures.fetch_add(1, Relaxed) + 1;
        if t.is_healthy() && n >= u64::from(hc.unhealthy_threshold) {
            group.set_healthy(t, false);
        }
    }
}
