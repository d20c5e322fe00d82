//! Instructions per request: each proxy runs under `valgrind --tool=callgrind` (this VM has no
//! PMU, so `perf stat -e instructions` is "not supported"), proxies a fixed number of keep-alive
//! requests, and is stopped with SIGTERM so callgrind writes its totals. Two runs with different
//! request counts cancel start-up and shutdown: instructions/request = ΔIr / Δrequests. Unlike
//! requests/s this is exact and does not depend on what else the machine is doing.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{Subject, peers};
use crate::Ctx;
use crate::load::{self, Sample};
use crate::proc::free_port;
use crate::report::{Row, ScenarioResult};

const CLIENTS: usize = 8;

pub fn run(ctx: &Ctx, subjects: Vec<Subject<'_>>) -> Result<ScenarioResult> {
    eprintln!("scenario instructions");
    if !crate::proc::have("valgrind") {
        bail!("valgrind is not installed (apt-get install valgrind)");
    }
    let (_origin_proc, origin) = peers::nginx_origin(ctx, free_port()?)?;
    let (small, large) = if ctx.quick {
        (200, 1_200)
    } else {
        (1_000, 11_000)
    };
    let mut rows = Vec::new();
    for s in subjects.iter().filter(|s| s.name != "direct") {
        let mut runs = Vec::new();
        for _ in 0..ctx.runs.min(2) {
            let a = instructions(ctx, s, origin, small)?;
            let b = instructions(ctx, s, origin, large)?;
            let per_req = (b - a) / (large - small) as f64;
            eprintln!("  {}: {per_req:.0} instructions/request", s.name);
            runs.push(Sample {
                rate: per_req,
                total: large - small,
                ..Sample::default()
            });
        }
        rows.push(Row {
            subject: s.name.clone(),
            runs,
        });
    }
    Ok(ScenarioResult {
        name: "instructions".into(),
        title: "Instructions per proxied request (callgrind), HTTP/1.1 keep-alive".into(),
        unit: "instructions/req".into(),
        ours: "trellis".into(),
        rows,
        notes: vec![format!(
            "valgrind --tool=callgrind; ({large} − {small}) requests over {CLIENTS} keep-alive connections \
             (h2load --h1), origin nginx. Lower is better: a ratio below 1 means trellis executes fewer \
             instructions per request than that peer. Counts user-space instructions only (not the kernel's)."
        )],
    })
}

/// Total instructions (callgrind `summary`) of `subject` for `requests` keep-alive requests.
fn instructions(
    ctx: &Ctx,
    subject: &Subject<'_>,
    origin: SocketAddr,
    requests: u64,
) -> Result<f64> {
    let out = ctx
        .work
        .join(format!("callgrind-{}-{requests}.%p", subject.name));
    let mut wrapped = ctx.clone();
    wrapped.wrap = vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--quiet".into(),
        format!("--callgrind-out-file={}", out.display()),
    ];
    let (proc, addr) = (subject.start)(&wrapped, free_port()?, origin)?;
    let mut proc = proc.context("a subject without a process has no instruction count")?;
    let pid = proc.pid();
    let s = load::h1_fixed(ctx, &format!("http://{addr}/"), CLIENTS, requests)?;
    if s.errors > 0 || s.total != requests {
        bail!(
            "{}: {} of {requests} requests failed",
            subject.name,
            s.errors
        );
    }
    // Let the last responses leave before stopping.
    std::thread::sleep(Duration::from_millis(200));
    proc.terminate(Duration::from_secs(60))?;
    let file = ctx
        .work
        .join(format!("callgrind-{}-{requests}.{pid}", subject.name));
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("summary: "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no summary line in {}", file.display()))
}
