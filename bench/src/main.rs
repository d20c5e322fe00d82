//! `trellis-bench`: run benchmark scenarios against real peers, side by side, and write the results
//! (Markdown tables with ratios, JSON, SVG) to `bench/results/`.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use trellis_bench::report::{self, ScenarioResult};
use trellis_bench::scenarios::{
    Subject, control, dns, http, instructions, lb, memory, mtls, tcp, trellis,
};
use trellis_bench::{Ctx, proc};

const SCENARIOS: &[&str] = &[
    "http1-keepalive",
    "http1-newconn",
    "http1-large",
    "http2",
    "mtls-pair",
    "tcp",
    "dns",
    "lb-rules",
    "resources",
    "control-plane",
    "instructions",
];

#[derive(Parser)]
#[command(about = "Benchmarks trellis against nginx, HAProxy, unbound and openssl in one run")]
struct Args {
    /// Scenario to run, or `all`. One of: http1-keepalive, http1-newconn, http1-large, http2, mtls-pair, tcp, dns, lb-rules, resources, control-plane, instructions.
    #[arg(default_value = "all")]
    scenario: String,
    /// Short runs (about 3 minutes for all): proves each scenario produces numbers, nothing more.
    #[arg(long)]
    quick: bool,
    /// Worker threads/processes for every proxy under test.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Measured runs per subject (median reported).
    #[arg(long)]
    runs: Option<usize>,
    /// Seconds per measured run.
    #[arg(long)]
    seconds: Option<u64>,
    /// Load-generator connections for keep-alive scenarios.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Do not pin processes to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Where results go (default bench/results/latest, or bench/results/quick with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not apt-get install missing peers and load tools.
    #[arg(long)]
    no_install: bool,
    /// Use the release binaries already in target/release instead of building them.
    #[arg(long)]
    no_build: bool,
    /// The dns scenario also measures every server capped at this percentage of its core (a
    /// cgroup CPU quota), where one dnsperf cannot saturate an uncapped server; 0 skips it.
    #[arg(long, default_value_t = 50)]
    dns_cpu_cap: u32,
    /// The http1-keepalive and lb-rules (1 rule) scenarios also measure every proxy capped at this
    /// percentage of its core, where wrk and the origin on one core cannot saturate an uncapped
    /// proxy; 0 skips it.
    #[arg(long, default_value_t = 50)]
    http_cpu_cap: u32,
    /// Rewrite the tables and plots of a results directory from its results.json; runs nothing.
    #[arg(long, value_name = "DIR")]
    replot: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    if let Some(dir) = &args.replot {
        return replot(dir);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .context("bench crate has no parent dir")?;
    let selected: Vec<&str> = if args.scenario == "all" {
        SCENARIOS.to_vec()
    } else if SCENARIOS.contains(&args.scenario.as_str()) {
        vec![args.scenario.as_str()]
    } else {
        bail!(
            "unknown scenario {:?}; known: all, {}",
            args.scenario,
            SCENARIOS.join(", ")
        );
    };
    if !args.no_install {
        install_tools()?;
    }
    if !args.no_build {
        build_trellis(&root)?;
    }
    let work = root.join("bench/work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let ctx = Ctx {
        quick: args.quick,
        runs: args.runs.unwrap_or(if args.quick { 1 } else { 3 }),
        duration: Duration::from_secs(args.seconds.unwrap_or(if args.quick { 2 } else { 10 })),
        workers: args.workers,
        connections: args.connections,
        pin: !args.no_pin && num_cpus() >= 2,
        work: work.canonicalize()?,
        bin_dir: root
            .join("target/release")
            .canonicalize()
            .unwrap_or(root.join("target/release")),
        wrap: Vec::new(),
        cpu_cap: None,
    };
    let out = args.out.clone().unwrap_or_else(|| {
        root.join("bench/results")
            .join(if args.quick { "quick" } else { "latest" })
    });
    let mut results: Vec<ScenarioResult> = Vec::new();
    for s in selected {
        let http_cap = (args.http_cpu_cap > 0).then_some(args.http_cpu_cap);
        if s == "lb-rules"
            || s == "resources"
            || s == "control-plane"
            || s == "dns"
            || s == "http1-keepalive"
        {
            let many = match s {
                "lb-rules" => lb::run(&ctx, http_cap)?,
                "http1-keepalive" => {
                    let mut v = vec![http::run(
                        &ctx,
                        http::Shape::KeepAlive,
                        "trellis",
                        http_subjects_and_floor(),
                    )?];
                    if let Some(percent) = http_cap {
                        v.extend(http::run_keepalive_capped(
                            &ctx,
                            percent,
                            http_subjects_and_floor(),
                        )?);
                    }
                    v
                }
                "dns" => dns::run(
                    &ctx,
                    dns::standard_subjects(),
                    (args.dns_cpu_cap > 0).then_some(args.dns_cpu_cap),
                )?,
                "resources" => memory::run(&ctx, http_subjects())?,
                _ => control::run(&ctx)?,
            };
            for r in many {
                print!("{}", r.to_markdown());
                results.push(r);
            }
            report::write_all(&out, &header(&ctx), &results)?;
            continue;
        }
        let r = match s {
            "http1-newconn" => {
                http::run(&ctx, http::Shape::NewConnection, "trellis", http_subjects())?
            }
            "http1-large" => http::run(&ctx, http::Shape::Large, "trellis", http_subjects())?,
            "http2" => http::run_h2(&ctx, "trellis", h2_subjects())?,
            "mtls-pair" => mtls::run(&ctx)?,
            "instructions" => instructions::run(&ctx, http_subjects_and_floor())?,
            "tcp" => tcp::run(&ctx, "trellis", tcp_subjects())?,
            _ => unreachable!("checked above"),
        };
        print!("{}", r.to_markdown());
        results.push(r);
        // After every scenario, so a failure later keeps what was measured.
        report::write_all(&out, &header(&ctx), &results)?;
    }
    report::write_all(&out, &header(&ctx), &results)?;
    eprintln!("results written to {}", out.display());
    let _ = std::fs::remove_dir_all(&ctx.work);
    Ok(())
}

/// Regenerates results.md and the SVGs of `dir` from its results.json (keeping the header).
fn replot(dir: &std::path::Path) -> Result<()> {
    let json = std::fs::read_to_string(dir.join("results.json"))
        .with_context(|| format!("reading {}/results.json", dir.display()))?;
    let results: Vec<ScenarioResult> =
        serde_json::from_str(&json).context("parsing results.json")?;
    let md = std::fs::read_to_string(dir.join("results.md")).unwrap_or_default();
    let header = md.split("### ").next().unwrap_or_default().to_owned();
    report::write_all(dir, &header, &results)?;
    eprintln!("rewrote {}", dir.display());
    Ok(())
}

fn http_subjects() -> Vec<Subject<'static>> {
    http::standard_subjects(vec![Subject::new("trellis", |ctx, port, origin| {
        trellis::sidecar(ctx, port, origin, false)
    })])
}

/// [`http_subjects`] plus the floor (the topology's ceiling, `bench/src/floor.rs`).
fn http_subjects_and_floor() -> Vec<Subject<'static>> {
    let mut v = http_subjects();
    v.push(Subject::floor());
    v
}

fn h2_subjects() -> Vec<Subject<'static>> {
    http::h2_subjects(vec![Subject::new("trellis", |ctx, port, origin| {
        trellis::sidecar(ctx, port, origin, false)
    })])
}

fn tcp_subjects() -> Vec<Subject<'static>> {
    tcp::standard_subjects(vec![Subject::new("trellis", |ctx, port, origin| {
        trellis::sidecar(ctx, port, origin, true)
    })])
}

/// Builds the release binaries the trellis subjects run.
fn build_trellis(root: &std::path::Path) -> Result<()> {
    let ok = Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "trellis-proxy",
            "-p",
            "trellis-discovery",
            "-p",
            "trellis-ca",
            // The floor subject of the keep-alive and LB scenarios (bench/src/floor.rs).
            "-p",
            "trellis-bench",
        ])
        .status()
        .context("running cargo build")?
        .success();
    if !ok {
        bail!("cargo build --release of the trellis binaries failed");
    }
    // The DNS scenario populates trellis-discovery through its API with this example.
    let ok = Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "trellis-discovery",
            "--example",
            "discovery_bench",
        ])
        .status()
        .context("running cargo build")?
        .success();
    if !ok {
        bail!("cargo build --release of the discovery_bench example failed");
    }
    Ok(())
}

fn header(ctx: &Ctx) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let now = time::OffsetDateTime::now_utc();
    format!(
        "# trellis benchmark results\n\nRun {now} on {} × {cpu}, {} run(s) of {}s per subject, {} worker(s) per proxy{}.\n\n",
        num_cpus(),
        ctx.runs,
        ctx.duration.as_secs(),
        ctx.workers,
        if ctx.quick {
            " (--quick: smoke numbers, not for comparison)"
        } else {
            ""
        }
    )
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// apt-get installs the peers and load tools that are missing.
fn install_tools() -> Result<()> {
    let wanted = [
        ("nginx", "nginx-light"),
        ("haproxy", "haproxy"),
        ("wrk", "wrk"),
        ("h2load", "nghttp2-client"),
        ("dnsperf", "dnsperf"),
        ("unbound", "unbound"),
        ("openssl", "openssl"),
        ("taskset", "util-linux"),
        ("valgrind", "valgrind"),
    ];
    let stream_module = std::path::Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| !proc::have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !stream_module.exists() {
        missing.push("libnginx-mod-stream");
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    let ok = Command::new("sh")
        .args(["-c", &format!(
            "DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {}",
            missing.join(" ")
        )])
        .status()
        .context("running apt-get")?
        .success();
    if !ok {
        bail!("apt-get could not install {}", missing.join(" "));
    }
    Ok(())
}
