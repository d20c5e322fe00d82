//! Equivalent configurations of the peers (nginx, HAProxy) for each scenario, one worker each.

use std::net::SocketAddr;

use anyhow::Result;

use crate::proc::{CONFIG, Launch, Proc};
use crate::{Ctx, Role};

/// nginx serving a fixed small body (and `/large`, a 1 MiB file): the origin behind every proxy.
pub fn nginx_origin(ctx: &Ctx, port: u16) -> Result<(Proc, SocketAddr)> {
    std::fs::write(ctx.work.join("large.bin"), vec![b'x'; 1 << 20])?;
    let conf = format!(
        "{common}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location = /large {{ root {work}; try_files /large.bin =404; }}
    location / {{ default_type text/plain; return 200 \"hello from the origin\\n\"; }}
  }}
}}",
        common = nginx_common(ctx, "origin"),
        work = ctx.work.display()
    );
    start_nginx(ctx, Role::Origin, "nginx-origin", &conf, port)
}

/// nginx serving the origin's small body over cleartext HTTP/2 (prior knowledge, as h2load speaks
/// it): the "direct" subject of the HTTP/2 scenario.
pub fn nginx_origin_h2(ctx: &Ctx, port: u16) -> Result<(Proc, SocketAddr)> {
    let conf = format!(
        "{common}
http {{
  access_log off;
  keepalive_requests 1000000;
  http2_max_concurrent_streams 256;
  server {{
    listen 127.0.0.1:{port} http2 reuseport backlog=4096;
    location / {{ default_type text/plain; return 200 \"hello from the origin\\n\"; }}
  }}
}}",
        common = nginx_common(ctx, "origin-h2")
    );
    start_nginx(ctx, Role::Subject, "nginx-origin-h2", &conf, port)
}

/// nginx as an HTTP reverse proxy with upstream keep-alive.
pub fn nginx_proxy(ctx: &Ctx, port: u16, origin: SocketAddr) -> Result<(Proc, SocketAddr)> {
    nginx_proxy_with(ctx, port, origin, false)
}

/// [`nginx_proxy`] whose listener speaks cleartext HTTP/2 (prior knowledge); HTTP/1.1 upstream.
pub fn nginx_proxy_h2(ctx: &Ctx, port: u16, origin: SocketAddr) -> Result<(Proc, SocketAddr)> {
    nginx_proxy_with(ctx, port, origin, true)
}

fn nginx_proxy_with(
    ctx: &Ctx,
    port: u16,
    origin: SocketAddr,
    h2: bool,
) -> Result<(Proc, SocketAddr)> {
    let (listen_extra, h2_conf, tag, name) = if h2 {
        (
            " http2",
            "\n  http2_max_concurrent_streams 256;",
            "proxy-h2",
            "nginx-h2",
        )
    } else {
        ("", "", "proxy", "nginx")
    };
    let conf = format!(
        "{common}
http {{
  access_log off;
  keepalive_requests 1000000;
  upstream origin {{ server {origin}; keepalive 256; keepalive_requests 1000000; }}{h2_conf}
  server {{
    listen 127.0.0.1:{port}{listen_extra} reuseport backlog=4096;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_buffering off;
    }}
  }}
}}",
        common = nginx_common(ctx, tag)
    );
    start_nginx(ctx, Role::Subject, name, &conf, port)
}

/// nginx stream (raw TCP) proxy.
pub fn nginx_stream(ctx: &Ctx, port: u16, origin: SocketAddr) -> Result<(Proc, SocketAddr)> {
    let conf = format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;
{common}
stream {{
  server {{ listen 127.0.0.1:{port} reuseport; proxy_pass {origin}; }}
}}",
        common = nginx_common(ctx, "stream")
    );
    start_nginx(ctx, Role::Subject, "nginx-stream", &conf, port)
}

/// nginx (one worker per `ctx.workers`) with the given body inside its `http { }` block.
pub fn nginx_custom(
    ctx: &Ctx,
    name: &str,
    port: u16,
    http_body: &str,
) -> Result<(Proc, SocketAddr)> {
    let conf = format!(
        "{common}
http {{
  access_log off;
  keepalive_requests 1000000;
{http_body}
}}",
        common = nginx_common(ctx, name)
    );
    start_nginx(ctx, Role::Subject, name, &conf, port)
}

fn nginx_common(ctx: &Ctx, tag: &str) -> String {
    let w = ctx.work.display();
    format!(
        "daemon off;
master_process {master};
user root;
worker_processes {workers};
pid {w}/nginx-{tag}.pid;
error_log {w}/nginx-{tag}.err warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; multi_accept on; }}",
        workers = ctx.workers,
        // Under a wrapper (valgrind) the one process must do the work itself.
        master = if ctx.wrap.is_empty() { "on" } else { "off" }
    )
}

fn start_nginx(
    ctx: &Ctx,
    role: Role,
    name: &str,
    conf: &str,
    port: u16,
) -> Result<(Proc, SocketAddr)> {
    let w = ctx.work.display();
    // Temp paths live in the work dir so nothing outside it is touched.
    let conf = conf.replacen(
        "http {",
        &format!(
            "http {{\n  client_body_temp_path {w}/nb-{name};\n  proxy_temp_path {w}/np-{name};\n  fastcgi_temp_path {w}/nf-{name};\n  uwsgi_temp_path {w}/nu-{name};\n  scgi_temp_path {w}/ns-{name};"
        ),
        1,
    );
    let prefix = format!("{w}/");
    Launch {
        role,
        name,
        program: "nginx".as_ref(),
        args: &["-p", &prefix, "-c", CONFIG],
        env: &[],
        config_file: &format!("{name}.conf"),
        config: &conf,
        port,
    }
    .start(ctx)
}

/// HAProxy in HTTP mode (or TCP mode with splicing) with one thread.
pub fn haproxy(ctx: &Ctx, port: u16, origin: SocketAddr, tcp: bool) -> Result<(Proc, SocketAddr)> {
    haproxy_with(ctx, port, origin, tcp, false)
}

/// HAProxy in HTTP mode whose frontend speaks cleartext HTTP/2 (`proto h2`); HTTP/1.1 upstream.
pub fn haproxy_h2(ctx: &Ctx, port: u16, origin: SocketAddr) -> Result<(Proc, SocketAddr)> {
    haproxy_with(ctx, port, origin, false, true)
}

fn haproxy_with(
    ctx: &Ctx,
    port: u16,
    origin: SocketAddr,
    tcp: bool,
    h2: bool,
) -> Result<(Proc, SocketAddr)> {
    let bind_extra = if h2 { " proto h2" } else { "" };
    let mode = if tcp {
        "mode tcp\n  option splice-auto"
    } else {
        "mode http\n  option http-keep-alive\n  http-reuse always"
    };
    let conf = format!(
        "global
  nbthread {workers}
  maxconn 4000
  tune.bufsize 16384
defaults
  {mode}
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend f
  bind 127.0.0.1:{port}{bind_extra}
  default_backend b
backend b
  server origin {origin}
",
        workers = ctx.workers
    );
    let name = match (tcp, h2) {
        (true, _) => "haproxy-tcp",
        (false, true) => "haproxy-h2",
        (false, false) => "haproxy",
    };
    start_haproxy(ctx, name, &conf, port)
}

/// HAProxy (`nbthread` = workers) with the given sections after `global` and `defaults` (HTTP
/// mode, keep-alive, connection reuse); it must bind `port`.
pub fn haproxy_custom(
    ctx: &Ctx,
    name: &str,
    port: u16,
    sections: &str,
) -> Result<(Proc, SocketAddr)> {
    let conf = format!(
        "global
  nbthread {workers}
  maxconn 4000
  tune.bufsize 16384
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
{sections}",
        workers = ctx.workers
    );
    start_haproxy(ctx, name, &conf, port)
}

fn start_haproxy(ctx: &Ctx, name: &str, conf: &str, port: u16) -> Result<(Proc, SocketAddr)> {
    Launch {
        role: Role::Subject,
        name,
        program: "haproxy".as_ref(),
        args: &["-db", "-f", CONFIG],
        env: &[],
        config_file: &format!("{name}.cfg"),
        config: conf,
        port,
    }
    .start(ctx)
}
