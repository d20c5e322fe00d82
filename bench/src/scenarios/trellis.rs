//! How the harness starts trellis itself, configured like the peers: one worker, same origin.

use std::net::SocketAddr;

use anyhow::Result;

use crate::proc::{CONFIG, Launch, Proc, free_port};
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
    let (p, addr) = launch_sidecar(ctx, name, &conf, port)?;
    Ok((Some(p), addr))
}

/// Starts `trellis-proxy sidecar` with `config` (written to `<name>.toml`), listening on `port`.
pub fn launch_sidecar(
    ctx: &Ctx,
    name: &str,
    config: &str,
    port: u16,
) -> Result<(Proc, SocketAddr)> {
    Launch {
        role: Role::Subject,
        name,
        program: &ctx.bin("trellis-proxy"),
        args: &["sidecar", "--config", CONFIG],
        env: &[],
        config_file: &format!("{name}.toml"),
        config,
        port,
    }
    .start(ctx)
}
