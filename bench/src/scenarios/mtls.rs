//! mTLS between two proxies, as the mesh runs: load → client-side proxy (plain in, TLS 1.3 out with
//! a client certificate) → server-side proxy (TLS in, client certificate required and verified,
//! plain out) → nginx origin. Trellis: two sidecars with certificates from the control plane's CA
//! (ALPN h2 between them); nginx and HAProxy: the same pair with certificates made by `openssl`
//! (HTTP/1.1 keep-alive with session reuse between them). CPU and RSS count both halves.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{Subject, measure, peers};
use crate::load;
use crate::proc::{Launch, Proc, free_port};
use crate::report::ScenarioResult;
use crate::{Ctx, Role};

pub fn subjects() -> Vec<Subject<'static>> {
    vec![
        Subject::new("trellis", |ctx, port, origin| {
            trellis_pair(ctx, port, origin).map(|(p, a)| (Some(p), a))
        }),
        Subject::direct(),
        Subject::new("nginx", |ctx, port, origin| {
            nginx_pair(ctx, port, origin).map(|(p, a)| (Some(p), a))
        }),
        Subject::new("haproxy", |ctx, port, origin| {
            haproxy_pair(ctx, port, origin).map(|(p, a)| (Some(p), a))
        }),
    ]
}

pub fn run(ctx: &Ctx) -> Result<ScenarioResult> {
    eprintln!("scenario mtls-pair");
    let (_origin_proc, origin) = peers::nginx_origin(ctx, free_port()?)?;
    let conns = ctx.connections;
    let load = move |ctx: &Ctx, addr: SocketAddr, d| {
        load::wrk(ctx, &format!("http://{addr}/"), conns, d, &[])
    };
    let mut rows = Vec::new();
    for s in &subjects() {
        rows.push(measure(ctx, s, origin, &load)?);
    }
    Ok(ScenarioResult {
        name: "mtls-pair".into(),
        title: "mTLS proxy pair (client side → TLS 1.3 + client cert → server side), keep-alive"
            .into(),
        unit: "req/s".into(),
        ours: "trellis".into(),
        rows,
        notes: vec![format!(
            "wrk: 1 thread, {conns} connections, {}s × {} runs; both proxies of a pair share CPU 1 \
             with {} worker(s) each; CPU µs/req and RSS are the pair's sum. Trellis multiplexes the \
             hop over HTTP/2 (ALPN) with SPIFFE identities; the peers keep HTTP/1.1 TLS connections alive.",
            ctx.duration.as_secs(),
            ctx.runs,
            ctx.workers
        )],
    })
}

/// Control plane (unmeasured; it only issued the certificates) + server sidecar `api` + client
/// sidecar `web` listening on `port`.
fn trellis_pair(ctx: &Ctx, port: u16, origin: SocketAddr) -> Result<(Proc, SocketAddr)> {
    let dir = ctx.work.join("mtls-cp");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let ca_dir = dir.join("ca");
    let ca = ctx.bin("trellis-ca");
    run_tool(
        &ca,
        &[
            "init",
            "--dir",
            path(&ca_dir)?,
            "--trust-domain",
            "mesh.local",
        ],
    )?;
    for svc in ["web", "api"] {
        let out = dir.join(format!("{svc}.token"));
        run_tool(
            &ca,
            &[
                "token",
                "create",
                "--dir",
                path(&ca_dir)?,
                "--namespace",
                "bench.local",
                "--service",
                svc,
                "--out",
                path(&out)?,
            ],
        )?;
    }
    let api_port = free_port()?;
    let dns_port = free_port()?;
    let (cp, cp_addr) = Launch {
        role: Role::Origin,
        name: "trellis-cp",
        program: &ctx.bin("trellis-discovery"),
        args: &[
            "serve",
            "--data-dir",
            path(&dir)?,
            "--api-listen",
            &format!("127.0.0.1:{api_port}"),
            "--dns-listen",
            &format!("127.0.0.1:{dns_port}"),
        ],
        env: &[],
        config_file: "trellis-cp.unused",
        config: "",
        port: api_port,
    }
    .start(ctx)?;
    let common = |svc: &str| {
        format!(
            "[identity]\nnamespace = \"bench.local\"\nservice = \"{svc}\"\n\n\
             [control_plane]\naddress = \"{cp_addr}\"\ntoken_file = \"{}\"\n\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n\n[runtime]\nworker_threads = {}\n\n",
            dir.join(format!("{svc}.token")).display(),
            free_port().unwrap_or(0),
            ctx.workers
        )
    };
    let inbound = free_port()?;
    let server_conf = format!(
        "{}[inbound]\nlisten = \"127.0.0.1:{inbound}\"\napp = \"{origin}\"\nprotocol = \"http\"\n\n\
         [inbound.intentions]\ndefault = \"deny\"\nrules = [{{ source = \"web\", action = \"allow\" }}]\n",
        common("api")
    );
    let client_conf = format!(
        "{}[outbound]\nupstreams = [{{ service = \"api\", local_port = {port}, protocol = \"http\", balancer = \"round_robin\" }}]\n\n\
         [[clusters]]\nservice = \"api\"\nendpoints = [{{ address = \"127.0.0.1:{inbound}\" }}]\n",
        common("web")
    );
    let sidecar =
        |name: &str, conf: &str, port: u16| super::trellis::launch_sidecar(ctx, name, conf, port);
    let (server, _) = sidecar("trellis-mtls-server", &server_conf, inbound)?;
    let (client, addr) = sidecar("trellis-mtls-client", &client_conf, port)?;
    Ok((client.with_measured(server).with_background(cp), addr))
}

/// CA, server and client certificates (P-256, like trellis's) made with `openssl`; returns the
/// directory holding ca.pem, server.pem/.key, client.pem/.key and the HAProxy bundles *.crt.
fn peer_certs(ctx: &Ctx) -> Result<std::path::PathBuf> {
    let dir = ctx.work.join("mtls-certs");
    if dir.join("client.crt").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir)?;
    let d = path(&dir)?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=bench-ca",
    ]);
    openssl(d, &ca)?;
    for who in ["server", "client"] {
        let (key, csr, pem, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        std::fs::write(
            dir.join(&ext),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )?;
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj"]);
        let subj = format!("/CN={who}");
        req.push(&subj);
        openssl(d, &req)?;
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        )?;
        let bundle =
            std::fs::read_to_string(dir.join(&pem))? + &std::fs::read_to_string(dir.join(&key))?;
        std::fs::write(dir.join(format!("{who}.crt")), bundle)?;
    }
    Ok(dir)
}

fn nginx_pair(ctx: &Ctx, port: u16, origin: SocketAddr) -> Result<(Proc, SocketAddr)> {
    let c = peer_certs(ctx)?.display().to_string();
    let back = free_port()?;
    let (server, _) = peers::nginx_custom(
        ctx,
        "nginx-mtls-server",
        back,
        &format!(
            "  upstream origin {{ server {origin}; keepalive 256; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{back} ssl reuseport backlog=4096;
    ssl_protocols TLSv1.3;
    ssl_certificate {c}/server.pem;
    ssl_certificate_key {c}/server.key;
    ssl_client_certificate {c}/ca.pem;
    ssl_verify_client on;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering off;
    }}
  }}"
        ),
    )?;
    let (client, addr) = peers::nginx_custom(
        ctx,
        "nginx-mtls-client",
        port,
        &format!(
            "  upstream back {{ server 127.0.0.1:{back}; keepalive 256; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{
      proxy_pass https://back;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering off;
      proxy_ssl_protocols TLSv1.3;
      proxy_ssl_certificate {c}/client.pem;
      proxy_ssl_certificate_key {c}/client.key;
      proxy_ssl_trusted_certificate {c}/ca.pem;
      proxy_ssl_verify on;
      proxy_ssl_name localhost;
      proxy_ssl_session_reuse on;
    }}
  }}"
        ),
    )?;
    Ok((client.with_measured(server), addr))
}

fn haproxy_pair(ctx: &Ctx, port: u16, origin: SocketAddr) -> Result<(Proc, SocketAddr)> {
    let c = peer_certs(ctx)?.display().to_string();
    let back = free_port()?;
    let (server, _) = peers::haproxy_custom(
        ctx,
        "haproxy-mtls-server",
        back,
        &format!(
            "frontend f
  bind 127.0.0.1:{back} ssl crt {c}/server.crt ca-file {c}/ca.pem verify required ssl-min-ver TLSv1.3
  default_backend b
backend b
  server origin {origin}
"
        ),
    )?;
    let (client, addr) = peers::haproxy_custom(
        ctx,
        "haproxy-mtls-client",
        port,
        &format!(
            "frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  server back 127.0.0.1:{back} ssl crt {c}/client.crt ca-file {c}/ca.pem verify required verifyhost localhost sni str(localhost) ssl-min-ver TLSv1.3
"
        ),
    )?;
    Ok((client.with_measured(server), addr))
}

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}

fn run_tool(program: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn openssl(dir: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
