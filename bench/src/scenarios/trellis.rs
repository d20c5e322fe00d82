//! How the harness starts trellis itself, configured like the peers: one worker, same origin.

use std::net::SocketAddr;

use anyhow::Result;

use crate::proc::{Proc, free_port};
use crate::{Ctx, Role};

/// The sidecar's outbound side as a plain reverse proxy (app → sidecar → origin), for the HTTP
/// and TCP scenarios: a per-upstream local port, a static cluster, plaintext to the origin (the
/// peers talk plaintext to it too).
pub fn sidecar(
    ctx: &Ctx,
    port: u16,
    origin: SocketAddr,
    tcp: bool,
) -> Result<(Option<Proc>, SocketAddr)> {
    let admin = free_port()?;
    let protocol = if tcp { "tcp" } else { "http" };
    let conf = format!(
        r#"[identity]
namespace = "bench.local"
service = "bench"

[outbound]
upstreams = [{{ service = "origin", local_port = {port}, protocol = "{protocol}", danger_plaintext = true, balancer = "round_robin" }}]

[[clusters]]
service = "origin"
endpoints = [{{ address = "{origin}" }}]

[admin]
listen = "127.0.0.1:{admin}"

[runtime]
worker_threads = {workers}
"#,
        workers = ctx.workers
    );
    let name = if tcp { "trellis-tcp" } else { "trellis" };
    let path = ctx.work.join(format!("{name}.toml"));
    std::fs::write(&path, conf)?;
    let path_str = path.display().to_string();
    let mut p = Proc::spawn(
        ctx,
        Role::Subject,
        name,
        &ctx.bin("trellis-proxy"),
        &["sidecar", "--config", &path_str],
    )?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    p.wait_tcp(ctx, addr)?;
    Ok((Some(p), addr))
}
