//! Authoritative DNS: dnsperf against trellis-discovery and against unbound serving the same 1,000
//! names (A records, one per service), each server with one worker thread.

use std::net::SocketAddr;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{Subject, busy_note, measure_all, with_cpu_cap};
use crate::proc::{CONFIG, Launch, Proc, free_port};
use crate::report::ScenarioResult;
use crate::{Ctx, Role, load};

/// The zone every subject serves.
pub const ZONE: &str = "bench.local";

/// Number of names (services `svc0..svc{N-1}`, one A record each).
pub const NAMES: usize = 1000;

/// The address of name `i`, the same in every subject.
fn address(i: usize) -> String {
    format!("10.{}.{}.{}", i / 65536 % 256, i / 256 % 256, i % 256)
}

/// trellis-discovery with one worker thread, populated through its Cloud Map API with
/// [`NAMES`] services (by the `discovery_bench` example's `populate`).
pub fn trellis(ctx: &Ctx, dns_port: u16) -> Result<(Option<Proc>, SocketAddr)> {
    let api = free_port()?;
    let data = ctx.work.join("discovery-data");
    let _ = std::fs::remove_dir_all(&data);
    let api_s = format!("127.0.0.1:{api}");
    let dns_s = format!("127.0.0.1:{dns_port}");
    let data_s = data.display().to_string();
    let workers = ctx.workers.to_string();
    let mut p = Proc::spawn_env(
        ctx,
        Role::Subject,
        "trellis-discovery",
        &ctx.bin("trellis-discovery"),
        &[
            "serve",
            "--api-listen",
            &api_s,
            "--dns-listen",
            &dns_s,
            "--data-dir",
            &data_s,
            // The populate step registers 1,000 services as fast as it can.
            "--api-rate-limit",
            "0",
        ],
        &[("TOKIO_WORKER_THREADS", &workers), ("RUST_LOG", "warn")],
    )?;
    let api_addr = SocketAddr::from(([127, 0, 0, 1], api));
    p.wait_tcp(ctx, api_addr)?;
    let dns_addr = SocketAddr::from(([127, 0, 0, 1], dns_port));
    p.wait_tcp(ctx, dns_addr)?;
    let populate = ctx.bin_dir.join("examples/discovery_bench");
    let ok = Command::new(&populate)
        .args(["populate", &api_s, ZONE, &NAMES.to_string()])
        .status()
        .with_context(|| format!("running {}", populate.display()))?
        .success();
    if !ok {
        bail!("discovery_bench populate failed");
    }
    Ok((Some(p), dns_addr))
}

/// unbound answering the same names from `local-data`, `num-threads` = workers.
pub fn unbound(ctx: &Ctx, port: u16) -> Result<(Option<Proc>, SocketAddr)> {
    let w = ctx.work.display();
    let mut conf = format!(
        "server:
  interface: 127.0.0.1
  port: {port}
  num-threads: {workers}
  do-daemonize: no
  use-syslog: no
  logfile: \"\"
  username: \"\"
  chroot: \"\"
  directory: \"{w}\"
  pidfile: \"{w}/unbound.pid\"
  access-control: 127.0.0.0/8 allow
  verbosity: 0
  so-reuseport: yes
  local-zone: \"{ZONE}.\" static
",
        workers = ctx.workers
    );
    for i in 0..NAMES {
        conf.push_str(&format!(
            "  local-data: \"svc{i}.{ZONE}. 60 IN A {}\"\n",
            address(i)
        ));
    }
    let (p, addr) = Launch {
        role: Role::Subject,
        name: "unbound",
        program: "unbound".as_ref(),
        args: &["-d", "-c", CONFIG],
        env: &[],
        config_file: "unbound.conf",
        config: &conf,
        port,
    }
    .start(ctx)?;
    Ok((Some(p), addr))
}

pub fn standard_subjects() -> Vec<Subject<'static>> {
    vec![
        Subject::new("trellis", |ctx, port, _| trellis(ctx, port)),
        Subject::new("unbound", |ctx, port, _| unbound(ctx, port)),
    ]
}

/// Measures every subject at full speed (where one dnsperf on one core is usually the limit),
/// then, when `cap_percent` is set and cgroups are writable, again with every server capped at
/// the same share of its core, so that the servers are the bottleneck.
pub fn run(
    ctx: &Ctx,
    subjects: Vec<Subject<'_>>,
    cap_percent: Option<u32>,
) -> Result<Vec<ScenarioResult>> {
    eprintln!("scenario dns");
    let queries = ctx.work.join("queries.txt");
    let text: String = (0..NAMES).map(|i| format!("svc{i}.{ZONE} A\n")).collect();
    std::fs::write(&queries, text)?;
    let load = |ctx: &Ctx, addr: SocketAddr, d| load::dnsperf(ctx, addr, &queries, d);
    // No origin: the subjects answer themselves.
    let unused = SocketAddr::from(([127, 0, 0, 1], 0));
    let rows = measure_all(ctx, "dns", &subjects, unused, &load)?;
    let mut notes = vec![format!(
        "dnsperf: 4 clients, up to 200 outstanding, {}s × {} runs; every server {} worker thread(s){}; target: trellis ≥ 1.2× unbound. Latency is dnsperf's average (p50 column), no percentiles.",
        ctx.duration.as_secs(),
        ctx.runs,
        ctx.workers,
        if ctx.pin {
            ", pinned to CPU 1, dnsperf to CPU 0"
        } else {
            ""
        }
    )];
    notes.push(busy_note(&rows, 100, "queries"));
    let mut results = vec![ScenarioResult {
        name: "dns".into(),
        title: format!("Authoritative DNS, {NAMES} names (A), UDP"),
        unit: "queries/s".into(),
        ours: "trellis".into(),
        rows,
        notes,
    }];
    let Some(percent) = cap_percent else {
        return Ok(results);
    };
    eprintln!("scenario dns, every server capped at {percent}% of its core");
    let rows = match with_cpu_cap(ctx, percent, |capped| {
        measure_all(capped, "dns-capped", &subjects, unused, &load)
    })? {
        Ok(rows) => rows,
        Err(why) => {
            eprintln!("  dns capped: skipped ({why})");
            results[0]
                .notes
                .push(format!("The capped measurement was skipped: {why}."));
            return Ok(results);
        }
    };
    let notes = vec![
        format!(
            "The same servers and load, each server in a cgroup capped at {percent}% of one core (CFS quota), so that the servers, not the one dnsperf, are the bottleneck: queries/s compares what each server answers with the same CPU. Target: trellis ≥ 1.2× unbound."
        ),
        busy_note(&rows, percent, "queries"),
    ];
    results.push(ScenarioResult {
        name: "dns-capped".into(),
        title: format!(
            "Authoritative DNS, {NAMES} names (A), UDP, every server capped at {percent}% of its core"
        ),
        unit: "queries/s".into(),
        ours: "trellis".into(),
        rows,
        notes,
    });
    Ok(results)
}
