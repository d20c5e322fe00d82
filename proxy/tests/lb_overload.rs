//! The LB's own overload guard (`[limits] max_buffered_mb`, no sidecar in the process): HTTP/2
//! streams a client never reads make the LB hold response bytes past a 1 MiB budget; then new
//! connections are closed at accept and new requests on open ones get 503 + Retry-After, the admin
//! port answers with the gauge, and once the slow reader goes the LB serves again.
//! (Its own test binary: the pressure level and the gauge are process-wide.)

#![allow(clippy::unwrap_used)]

mod support;

use support::slow::{StalledH2, blaster};
use support::*;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use trellis_proxy::lb::{LbConfig, start};
use trellis_proxy::overload::Pressure;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_sheds_past_its_buffered_budget_then_serves_again() {
    let small = app("small", None).await;
    let big = blaster(true).await;
    let checks = r#"health_check = { path = "/health", interval = "1h", timeout = "1s" }"#;
    let config = format!(
        r#"
[limits]
max_buffered_mb = 1

[admin]
listen = "127.0.0.1:0"

[[target_group]]
name = "small"
targets = ["{}"]
{checks}

[[target_group]]
name = "big"
targets = ["{big}"]
{checks}

[[listener]]
name = "web"
listen = "127.0.0.1:0"
default_action = {{ type = "forward", target_groups = [{{ name = "small" }}] }}

[[listener.rule]]
name = "big"
priority = 1
conditions = [{{ field = "path-pattern", values = ["/big"] }}]
action = {{ type = "forward", target_groups = [{{ name = "big" }}] }}
"#,
        small.addr
    );
    let lb = start(
        LbConfig::from_str(&config).unwrap(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let port = lb.listeners[0].1;
    let mut open = TcpStream::connect(port).await.unwrap();
    assert!(on(&mut open, "small").await.starts_with("HTTP/1.1 200"));
    until_pressure("idle", Pressure::Normal).await;

    // 16 KiB (max_header_bytes) per stalled response: the budget is passed in under 70 streams.
    let stalled = StalledH2::until_shed(port, 120).await;
    until_pressure("past the buffered budget", Pressure::ShedRequests).await;
    assert_closed_at_accept(port).await;
    assert_shed(&mut open, "small").await;
    let text = admin_metrics(lb.admin).await;
    assert!(metric(&text, "trellis_proxy_overload_buffered_bytes") >= (1 << 20) as f64);
    assert_eq!(metric(&text, "trellis_proxy_overload_level"), 2.0);

    drop(stalled);
    until_pressure("budget freed", Pressure::Normal).await;
    assert_eq!(get(&h1_client(), &format!("http://{port}/")).await.0, 200);
    lb.shutdown().await;
}
