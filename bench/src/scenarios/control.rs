//! The control plane: register → DNS-visible and register → watcher-woken latency plus durable
//! RegisterInstance throughput (the `discovery_bench latency` example, in-process server with its
//! redb store), and certificates/s of the CA against `openssl x509 -req` (`trellis-ca-bench`).
//! Both tools print one `BENCHJSON {...}` line that this module turns into tables.

use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::Ctx;
use crate::load::Sample;
use crate::report::{Row, ScenarioResult};

#[derive(Deserialize)]
struct Latency {
    samples: usize,
    dns_p50_us: f64,
    dns_p99_us: f64,
    watch_p50_us: f64,
    watch_p99_us: f64,
    register_per_s: f64,
}

#[derive(Deserialize)]
struct Issuance {
    inproc: f64,
    inproc_disk: f64,
    http: f64,
    http_clients: usize,
    openssl: f64,
}

pub fn run(ctx: &Ctx) -> Result<Vec<ScenarioResult>> {
    eprintln!("scenario control-plane");
    let samples = if ctx.quick { "50" } else { "300" };
    let mut lat_runs: Vec<Latency> = Vec::new();
    for _ in 0..ctx.runs {
        lat_runs.push(bench_json(
            &ctx.bin("examples/discovery_bench"),
            &["latency", samples],
        )?);
    }
    let (n, m) = if ctx.quick {
        ("500", "40")
    } else {
        ("4000", "200")
    };
    let mut ca_runs: Vec<Issuance> = Vec::new();
    for _ in 0..ctx.runs {
        ca_runs.push(bench_json(
            &ctx.bin("trellis-ca-bench"),
            &["--n", n, "--http-n", n, "--openssl-n", m],
        )?);
    }

    let latency_row = |name: &str, f: &dyn Fn(&Latency) -> (f64, f64)| Row {
        subject: name.into(),
        runs: lat_runs
            .iter()
            .map(|l| {
                let (p50, p99) = f(l);
                Sample {
                    p50_us: p50,
                    p99_us: p99,
                    total: l.samples as u64,
                    ..Sample::default()
                }
            })
            .collect(),
    };
    let rate_row = |name: &str, rates: Vec<f64>| Row {
        subject: name.into(),
        runs: rates
            .into_iter()
            .map(|rate| Sample {
                rate,
                ..Sample::default()
            })
            .collect(),
    };
    let discovery = ScenarioResult {
        name: "control-plane".into(),
        title: "Control plane: register → visible latency, durable registrations".into(),
        unit: "registrations/s".into(),
        ours: "RegisterInstance (fsync per write, 8 clients)".into(),
        rows: vec![
            latency_row("register → DNS answer", &|l| (l.dns_p50_us, l.dns_p99_us)),
            latency_row("register → watcher woken", &|l| {
                (l.watch_p50_us, l.watch_p99_us)
            }),
            rate_row(
                "RegisterInstance (fsync per write, 8 clients)",
                lat_runs.iter().map(|l| l.register_per_s).collect(),
            ),
        ],
        notes: vec![format!(
            "`discovery_bench latency {samples}` × {} run(s): the server in-process with its redb store; latency from the \
             API's acknowledgement to the first DNS answer (polled over UDP) or the woken long-poll. Target: p99 ≤ 20 ms.",
            ctx.runs
        )],
    };
    let clients = ca_runs.first().map_or(0, |c| c.http_clients);
    let ca = ScenarioResult {
        name: "ca-issuance".into(),
        title: "CA: certificates issued per second".into(),
        unit: "certs/s".into(),
        ours: "trellis HTTP API (fsynced)".into(),
        rows: vec![
            rate_row(
                "trellis in-process (1 core, in memory)",
                ca_runs.iter().map(|c| c.inproc).collect(),
            ),
            rate_row(
                "trellis in-process (1 core, fsynced)",
                ca_runs.iter().map(|c| c.inproc_disk).collect(),
            ),
            rate_row(
                "trellis HTTP API (fsynced)",
                ca_runs.iter().map(|c| c.http).collect(),
            ),
            rate_row(
                "openssl x509 -req",
                ca_runs.iter().map(|c| c.openssl).collect(),
            ),
        ],
        notes: vec![format!(
            "`trellis-ca-bench --n {n}` × {} run(s): CSR parse + signature check + policy + sign (P-256); the HTTP \
             API with {clients} concurrent clients and the audit log fsynced per certificate; openssl signs \
             with the same intermediate key, one process per certificate (how scripts use it).",
            ctx.runs
        )],
    };
    Ok(vec![discovery, ca])
}

/// Runs `program args` and parses its `BENCHJSON` line.
fn bench_json<T: for<'de> Deserialize<'de>>(program: &std::path::Path, args: &[&str]) -> Result<T> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}{}",
            program.display(),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCHJSON "))
        .with_context(|| format!("{} printed no BENCHJSON line:\n{stdout}", program.display()))?;
    serde_json::from_str(line).with_context(|| format!("parsing {line}"))
}
