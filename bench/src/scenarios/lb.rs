//! Path-rule scaling of the internal load balancer: `trellis-proxy lb` vs HAProxy (one ACL +
//! `use_backend` per rule) vs nginx (one `location` per rule), at 1, 100 and 1,000 path rules, the
//! request always hitting the LAST rule (the worst case for a linear scan).

use std::fmt::Write as _;
use std::net::SocketAddr;

use anyhow::Result;

use super::{
    CappedRun, Entry, Load, Subject, ceiling_note, kernel_note, load_cpu_note, measure_capped,
    measure_interleaved, peers,
};
use crate::proc::{CONFIG, Launch, Proc, free_port};
use crate::report::ScenarioResult;
use crate::{Ctx, Role, load};

/// The rule counts measured.
pub const RULE_COUNTS: &[usize] = &[1, 100, 1000];

fn trellis(ctx: &Ctx, port: u16, origin: SocketAddr, n: usize) -> Result<Proc> {
    let admin = free_port()?;
    let mut conf = format!(
        "[admin]
listen = \"127.0.0.1:{admin}\"

[[target_group]]
name = \"be\"
targets = [\"{origin}\"]
health_check = {{ path = \"/\", interval = \"5s\", timeout = \"1s\" }}

[[listener]]
name = \"web\"
listen = \"127.0.0.1:{port}\"
default_action = {{ type = \"fixed-response\", status = 404 }}
"
    );
    for i in 1..=n {
        let _ = write!(
            conf,
            "
[[listener.rule]]
name = \"r{i}\"
priority = {i}
conditions = [{{ field = \"path-pattern\", values = [\"/svc{i}/*\"] }}]
action = {{ type = \"forward\", target_groups = [{{ name = \"be\" }}] }}
"
        );
    }
    let workers = ctx.workers.to_string();
    let (p, _) = Launch {
        role: Role::Subject,
        name: &format!("trellis-lb-{n}"),
        program: &ctx.bin("trellis-proxy"),
        args: &["lb", "--config", CONFIG],
        env: &[("TOKIO_WORKER_THREADS", &workers), ("TRELLIS_LOG", "warn")],
        config_file: &format!("lb-{n}.toml"),
        config: &conf,
        port,
    }
    .start(ctx)?;
    Ok(p)
}

fn haproxy(ctx: &Ctx, port: u16, origin: SocketAddr, n: usize) -> Result<Proc> {
    let mut conf = format!(
        "global
  nbthread {workers}
  maxconn 4000
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:{port}
",
        workers = ctx.workers
    );
    for i in 1..=n {
        let _ = writeln!(conf, "  acl r{i} path_beg /svc{i}/");
    }
    for i in 1..=n {
        let _ = writeln!(conf, "  use_backend be if r{i}");
    }
    let _ = write!(
        conf,
        "  default_backend nomatch
backend be
  server origin {origin}
backend nomatch
  http-request return status 404
"
    );
    let (p, _) = Launch {
        role: Role::Subject,
        name: &format!("haproxy-lb-{n}"),
        program: "haproxy".as_ref(),
        args: &["-db", "-f", CONFIG],
        env: &[],
        config_file: &format!("haproxy-lb-{n}.cfg"),
        config: &conf,
        port,
    }
    .start(ctx)?;
    Ok(p)
}

fn nginx(ctx: &Ctx, port: u16, origin: SocketAddr, n: usize) -> Result<Proc> {
    let mut locations = String::new();
    for i in 1..=n {
        let _ = writeln!(
            locations,
            "    location /svc{i}/ {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }}"
        );
    }
    let (p, _) = peers::nginx_custom(
        ctx,
        &format!("nginx-lb-{n}"),
        port,
        &format!(
            "  upstream origin {{ server {origin}; keepalive 256; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
{locations}    location / {{ return 404; }}
  }}"
        ),
    )?;
    Ok(p)
}

/// trellis, HAProxy and nginx at `n` rules; at 1 rule also the floor (see `bench/src/floor.rs`),
/// whose rate is the most any proxy could reach here.
fn subjects(n: usize) -> Vec<Subject<'static>> {
    let mut v = vec![
        Subject::new("trellis", move |ctx, port, origin| {
            trellis(ctx, port, origin, n)
                .map(|p| (Some(p), SocketAddr::from(([127, 0, 0, 1], port))))
        }),
        Subject::new("haproxy", move |ctx, port, origin| {
            haproxy(ctx, port, origin, n)
                .map(|p| (Some(p), SocketAddr::from(([127, 0, 0, 1], port))))
        }),
        Subject::new("nginx", move |ctx, port, origin| {
            nginx(ctx, port, origin, n).map(|p| (Some(p), SocketAddr::from(([127, 0, 0, 1], port))))
        }),
    ];
    if n == 1 {
        v.push(Subject::floor());
    }
    v
}

/// One result per rule count (`lb-rules-1`, `lb-rules-100`, `lb-rules-1000`); the last one's notes
/// carry trellis at 1,000 rules ÷ trellis at 1 rule (target ≥ 0.90). With `cap_percent`, one more
/// (`lb-rules-1-capped`): 1 rule again with every proxy capped at that share of its core, where
/// uncapped the load generator and origin set the ceiling (see the floor subject).
pub fn run(ctx: &Ctx, cap_percent: Option<u32>) -> Result<Vec<ScenarioResult>> {
    eprintln!("scenario lb-rules");
    let (_origin_proc, origin) = peers::nginx_origin(ctx, free_port()?)?;
    let conns = ctx.connections;
    // Every subject at every rule count runs side by side and is measured in alternating rounds,
    // so that trellis at 1,000 rules and at 1 rule meet the same machine.
    let subjects: Vec<(usize, Vec<Subject<'static>>)> =
        RULE_COUNTS.iter().map(|&n| (n, subjects(n))).collect();
    let loads: Vec<Box<Load<'_>>> = RULE_COUNTS
        .iter()
        .map(|&n| {
            let path = format!("/svc{n}/item");
            Box::new(move |ctx: &Ctx, addr: SocketAddr, d| {
                load::wrk(ctx, &format!("http://{addr}{path}"), conns, d, &[])
            }) as Box<Load<'_>>
        })
        .collect();
    let mut entries = Vec::new();
    for ((n, group), load) in subjects.iter().zip(&loads) {
        for subject in group {
            entries.push(Entry {
                ctx: ctx.in_subdir(&format!("rules-{n}-{}", subject.name))?,
                subject,
                origin,
                load: load.as_ref(),
            });
        }
    }
    let mut all_rows = measure_interleaved(&entries)?.into_iter();
    let mut out: Vec<ScenarioResult> = Vec::new();
    for (n, group) in &subjects {
        let n = *n;
        let path = format!("/svc{n}/item");
        let rows: Vec<_> = all_rows.by_ref().take(group.len()).collect();
        let mut notes = vec![format!(
            "wrk: 1 thread, {conns} connections at `{path}` (the last of {n} rule(s)), {}s × {} rounds; every proxy {} worker(s); all {} subjects of the three rule counts run side by side and are measured in alternating rounds. Target: trellis ≥ 1.2× HAProxy.",
            ctx.duration.as_secs(),
            ctx.runs,
            ctx.workers,
            entries.len()
        )];
        notes.extend(kernel_note(&rows));
        notes.extend(load_cpu_note(&rows));
        notes.extend(ceiling_note(&rows, "trellis", "haproxy", 1.2));
        let cpu_one = out.first().and_then(|first| cpu_of(&first.rows));
        if let (Some(now), Some(one)) = (cpu_of(&rows), cpu_one)
            && now > 0.0
        {
            notes.push(format!(
                "CPU per request, trellis at 1 rule ÷ at {n} rules = {:.2} (the same ratio measured in CPU time, which a noisy machine disturbs less than wall-clock req/s)",
                one / now
            ));
        }
        let one = out.first().and_then(|first| rate_of(&first.rows));
        if let (Some(now), Some(one)) = (rate_of(&rows), one)
            && one > 0.0
        {
            let ratio = now / one;
            notes.push(format!(
                "trellis at {n} rules ÷ trellis at 1 rule = {ratio:.2} (target ≥ 0.90: {})",
                if ratio >= 0.9 { "met" } else { "MISSED" }
            ));
        }
        out.push(ScenarioResult {
            name: format!("lb-rules-{n}"),
            title: format!("Internal LB, {n} path rule(s), request matching the last"),
            unit: "req/s".into(),
            ours: "trellis".into(),
            rows,
            notes,
        });
    }
    if let Some(percent) = cap_percent {
        out.extend(run_capped(ctx, origin, percent, &loads[0])?);
    }
    Ok(out)
}

/// 1 rule, every proxy capped at `percent`% of its core; `None` where cgroups are not writable.
fn run_capped(
    ctx: &Ctx,
    origin: SocketAddr,
    percent: u32,
    load: &Load<'_>,
) -> Result<Option<ScenarioResult>> {
    let subjects = subjects(1);
    measure_capped(
        ctx,
        percent,
        CappedRun {
            name: "lb-rules-1-capped",
            title: format!(
                "Internal LB, 1 path rule, every proxy capped at {percent}% of its core"
            ),
            subjects: &subjects,
            origin,
            load,
            load_note: format!(
                "wrk: 1 thread, {} connections at `/svc1/item`, {}s × {} rounds; every proxy {} worker(s).",
                ctx.connections,
                ctx.duration.as_secs(),
                ctx.runs,
                ctx.workers,
            ),
        },
    )
}

fn rate_of(rows: &[crate::report::Row]) -> Option<f64> {
    rows.iter()
        .find(|row| row.subject == "trellis")
        .map(|row| row.median(|s| s.rate))
}

fn cpu_of(rows: &[crate::report::Row]) -> Option<f64> {
    rows.iter()
        .find(|row| row.subject == "trellis")?
        .cpu_median()
}
