//! `soak`: the demo mesh under steady load with churn, for `bench/soak/run.sh`.
//!
//! Load: `--concurrency` clients loop GET `/` and `/api/x` through the LB (LB → LB sidecar ═mTLS═>
//! web sidecar → web → sidecars → api → users). Churn, all the time: an extra `api` instance is
//! registered and deregistered every 2 s; an instance on a dead port is registered (its health
//! check flips it to UNHEALTHY) and removed every 7 s; the LB shifts the `/api/*` weights every
//! 15 s; the control plane restarts at 1/3 and 2/3 of the run. Every 10 s: requests sent/failed,
//! p50/p99 latency, RSS and open fds (the mesh runs in this one process). Writes `report.md`,
//! `samples.csv` and `soak.svg` to `--out`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use trellis_examples::demo::{self, DemoOptions};

#[derive(Parser)]
struct Args {
    /// Length of the run.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Concurrent load clients.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Where the report goes.
    #[arg(long, default_value = "bench/results/soak")]
    out: PathBuf,
}

#[derive(Default, Clone)]
struct Window {
    sent: u64,
    failed: u64,
    latencies_us: Vec<u64>,
}

struct Sample {
    t: u64,
    sent: u64,
    failed: u64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: f64,
    fds: usize,
    event: String,
}

type Shared = Arc<parking_lot::Mutex<Window>>;

/// Churn operations that succeeded, for the report (a churn that silently failed proves nothing).
#[derive(Default)]
struct Churn {
    registered: std::sync::atomic::AtomicU64,
    deregistered: std::sync::atomic::AtomicU64,
    dead_registered: std::sync::atomic::AtomicU64,
    /// Dead instances seen UNHEALTHY before they were removed.
    health_flips: std::sync::atomic::AtomicU64,
    weight_shifts: std::sync::atomic::AtomicU64,
    restarts: std::sync::atomic::AtomicU64,
}

fn bump<E: std::fmt::Display>(c: &std::sync::atomic::AtomicU64, r: Result<(), E>) {
    if let Err(e) = &r {
        eprintln!("soak: churn step failed: {e}");
    }
    if r.is_ok() {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut mesh = demo::start(DemoOptions {
        api_listen: any,
        dns_listen: any,
        lb_listen: any,
        data_dir: None,
        progress: true,
    })
    .await?;
    let lb = mesh.lb_addr;
    let lb_admin = mesh.lb.admin;
    let listener = mesh.lb.listeners[0].0.clone();
    let cloudmap = Arc::new(trellis_examples::cloudmap::CloudMap::new(mesh.api_addr()));
    let services = cloudmap.call("ListServices", json!({})).await?;
    let api_id = services["Services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["Name"] == "api"))
        .and_then(|s| s["Id"].as_str())
        .ok_or("no api service")?
        .to_owned();
    let api_inbound = mesh
        .instances
        .iter()
        .find(|i| i.service == "api")
        .and_then(|i| i.inbound())
        .ok_or("no api instance")?;

    let total = Duration::from_secs(args.seconds);
    let start = Instant::now();
    let window: Shared = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for c in 0..args.concurrency {
        let (window, stop) = (window.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let path = if c % 2 == 0 { "/" } else { "/api/x" };
            while !stop.is_cancelled() {
                let t = Instant::now();
                let ok = matches!(demo::http_get(lb, path).await, Some((200, _)));
                let mut w = window.lock();
                w.sent += 1;
                if ok {
                    w.latencies_us.push(t.elapsed().as_micros() as u64);
                } else {
                    w.failed += 1;
                }
            }
        }));
    }

    // Churn: register/deregister, health flips, weight shifts.
    let counts: Arc<Churn> = Arc::default();
    let churn = {
        let (cloudmap, api_id, stop) = (cloudmap.clone(), api_id.clone(), stop.clone());
        let counts = counts.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut n = 0u64;
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Full<bytes::Bytes>>();
            while !stop.is_cancelled() {
                tick.tick().await;
                n += 1;
                let extra = format!("soak-extra-{}", n / 2);
                if n.is_multiple_of(2) {
                    let r = cloudmap.register(&api_id, &extra, api_inbound, &[]).await;
                    bump(&counts.registered, r);
                } else if n > 1 {
                    let prev = format!("soak-extra-{}", (n - 1) / 2);
                    let r = cloudmap
                        .call(
                            "DeregisterInstance",
                            json!({"ServiceId": api_id, "InstanceId": prev}),
                        )
                        .await
                        .map(|_| ());
                    bump(&counts.deregistered, r);
                }
                if n.is_multiple_of(7) {
                    let dead = SocketAddr::from(([127, 0, 0, 1], 1));
                    let r = cloudmap
                        .register(&api_id, &format!("soak-dead-{n}"), dead, &[])
                        .await;
                    bump(&counts.dead_registered, r);
                }
                if n % 7 == 5 && n > 7 {
                    // Before removing it: did its health check flip it to UNHEALTHY?
                    let dead = format!("soak-dead-{}", n - 5);
                    let status = cloudmap
                        .call(
                            "GetInstancesHealthStatus",
                            json!({"ServiceId": api_id, "Instances": [dead]}),
                        )
                        .await;
                    let flipped = status
                        .as_ref()
                        .is_ok_and(|v| v["Status"][&dead] == "UNHEALTHY");
                    bump(
                        &counts.health_flips,
                        if flipped {
                            Ok(())
                        } else {
                            Err(format!("{dead} not UNHEALTHY: {status:?}"))
                        },
                    );
                    let r = cloudmap
                        .call(
                            "DeregisterInstance",
                            json!({"ServiceId": api_id, "InstanceId": format!("soak-dead-{}", n - 5)}),
                        )
                        .await
                        .map(|_| ());
                    bump(&counts.deregistered, r);
                }
                if n.is_multiple_of(15) {
                    let w = if (n / 15).is_multiple_of(2) {
                        (90, 10)
                    } else {
                        (70, 30)
                    };
                    let body = json!({"api": w.0, "api-canary": w.1}).to_string();
                    let uri =
                        format!("http://{lb_admin}/v1/listeners/{listener}/rules/api/weights");
                    if let Ok(req) = http::Request::put(uri)
                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    {
                        let r = match client.request(req).await {
                            Ok(r) if r.status() == 200 => Ok(()),
                            Ok(r) => Err(format!("weights: HTTP {}", r.status())),
                            Err(e) => Err(e.to_string()),
                        };
                        bump(&counts.weight_shifts, r);
                    }
                }
            }
        })
    };

    let mut samples = Vec::new();
    let mut restarts = 0;
    let mut next = Duration::from_secs(10);
    while start.elapsed() < total {
        let mut event = String::new();
        let due_restart = total * (restarts + 1) / 3;
        if restarts < 2 && start.elapsed() >= due_restart {
            let t = Instant::now();
            mesh.restart_control_plane().await?;
            restarts += 1;
            bump(&counts.restarts, Ok::<(), String>(()));
            event = format!(
                "control plane restart {restarts} ({:.1}s)",
                t.elapsed().as_secs_f64()
            );
            eprintln!("soak: {event}");
        }
        let now = start.elapsed();
        if now < next {
            tokio::time::sleep((next - now).min(Duration::from_millis(500))).await;
            if !event.is_empty() {
                samples.push(sample(&window, now.as_secs(), event));
            }
            continue;
        }
        next += Duration::from_secs(10);
        let s = sample(&window, now.as_secs(), event);
        eprintln!(
            "soak: t={}s sent={} failed={} p99={:.1}ms rss={:.1}MiB fds={}",
            s.t, s.sent, s.failed, s.p99_ms, s.rss_mib, s.fds
        );
        samples.push(s);
    }
    stop.cancel();
    for l in load {
        let _ = l.await;
    }
    let _ = churn.await;
    samples.push(sample(&window, start.elapsed().as_secs(), "end".into()));
    mesh.shutdown().await;
    write_report(&args, &samples, &counts)?;
    Ok(())
}

fn sample(window: &Shared, t: u64, event: String) -> Sample {
    let w = std::mem::take(&mut *window.lock());
    let mut l = w.latencies_us;
    l.sort_unstable();
    let pct = |p: f64| {
        if l.is_empty() {
            0.0
        } else {
            l[((l.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    Sample {
        t,
        sent: w.sent,
        failed: w.failed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        rss_mib: rss_kib() as f64 / 1024.0,
        fds: std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0),
        event,
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn write_report(args: &Args, s: &[Sample], churn: &Churn) -> std::io::Result<()> {
    let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    std::fs::create_dir_all(&args.out)?;
    let mut csv = String::from("t_s,sent,failed,p50_ms,p99_ms,rss_mib,fds,event\n");
    for x in s {
        csv.push_str(&format!(
            "{},{},{},{:.2},{:.2},{:.1},{},{}\n",
            x.t, x.sent, x.failed, x.p50_ms, x.p99_ms, x.rss_mib, x.fds, x.event
        ));
    }
    std::fs::write(args.out.join("samples.csv"), csv)?;
    let sent: u64 = s.iter().map(|x| x.sent).sum();
    let failed: u64 = s.iter().map(|x| x.failed).sum();
    // Warm-up: the first minute (or the first third of a short run).
    let warm = s.iter().map(|x| x.t).max().unwrap_or(0).min(180) / 3;
    let after: Vec<&Sample> = s
        .iter()
        .filter(|x| x.t >= warm && x.event.is_empty())
        .collect();
    let range = |f: &dyn Fn(&Sample) -> f64| {
        let v: Vec<f64> = after.iter().map(|x| f(x)).collect();
        let lo = v.iter().cloned().fold(f64::MAX, f64::min);
        let hi = v.iter().cloned().fold(f64::MIN, f64::max);
        (lo, hi)
    };
    let (rss_lo, rss_hi) = range(&|x| x.rss_mib);
    let (fd_lo, fd_hi) = range(&|x| x.fds as f64);
    let mut md = format!(
        "# Soak: {} s, {} load clients through the LB and the sidecars\n\n\
         Churn all the time: an extra `api` instance registered/deregistered every 2 s, a dead \
         instance registered (health check flips it UNHEALTHY) and removed every 7 s, LB `/api/*` \
         weights shifted 90/10 <-> 70/30 every 15 s, control plane restarted twice. The whole mesh \
         (control plane, CA, 6 sidecars, LB, apps) runs in one process: RSS and fds are that \
         process's.\n\n\
         - requests sent: **{sent}**, failed: **{failed}** ({:.3}%)\n\
         - after warm-up ({warm} s): RSS {rss_lo:.1}-{rss_hi:.1} MiB ({:+.1}%), open fds {fd_lo}-{fd_hi}\n\
         - churn that succeeded: {} registrations, {} deregistrations, {} dead instances (of which {} seen \
         UNHEALTHY before removal), {} LB weight shifts, {} control plane restarts\n\n\
         | t (s) | sent | failed | p50 ms | p99 ms | RSS MiB | fds | event |\n|---|---|---|---|---|---|---|---|\n",
        args.seconds,
        args.concurrency,
        100.0 * failed as f64 / sent.max(1) as f64,
        100.0 * (rss_hi - rss_lo) / rss_lo.max(1.0),
        n(&churn.registered),
        n(&churn.deregistered),
        n(&churn.dead_registered),
        n(&churn.health_flips),
        n(&churn.weight_shifts),
        n(&churn.restarts),
    );
    for x in s {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} |\n",
            x.t, x.sent, x.failed, x.p50_ms, x.p99_ms, x.rss_mib, x.fds, x.event
        ));
    }
    md.push_str("\n![soak](soak.svg)\n");
    std::fs::write(args.out.join("report.md"), md)?;
    std::fs::write(args.out.join("soak.svg"), svg(s))
}

/// A chart: title, value of a sample, colour.
type Series<'a> = (&'a str, &'a dyn Fn(&Sample) -> f64, &'a str);

/// Three stacked line charts (p99 ms, RSS MiB, fds) over time, restarts marked.
fn svg(s: &[Sample]) -> String {
    let (w, h, pad) = (900.0, 180.0, 50.0);
    let tmax = s.iter().map(|x| x.t).max().unwrap_or(1).max(1) as f64;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" font-family="sans-serif" font-size="12">"#,
        3.0 * h + 40.0
    );
    let series: [Series<'_>; 3] = [
        ("p99 latency (ms)", &|x| x.p99_ms, "#d62728"),
        ("RSS (MiB)", &|x| x.rss_mib, "#1f77b4"),
        ("open fds", &|x| x.fds as f64, "#2ca02c"),
    ];
    for (i, (title, f, color)) in series.iter().enumerate() {
        let y0 = i as f64 * h + 20.0;
        let vmax = s.iter().map(*f).fold(0.0, f64::max).max(1.0) * 1.1;
        let px = |t: u64| pad + (t as f64 / tmax) * (w - 2.0 * pad);
        let py = |v: f64| y0 + h - 30.0 - (v / vmax) * (h - 50.0);
        out.push_str(&format!(
            r#"<text x="{pad}" y="{}">{title} (max {vmax:.1})</text><line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
            y0 + 12.0,
            py(0.0),
            w - pad,
            py(0.0)
        ));
        let pts: Vec<String> = s
            .iter()
            .filter(|x| x.event.is_empty())
            .map(|x| format!("{:.1},{:.1}", px(x.t), py(f(x))))
            .collect();
        out.push_str(&format!(
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        ));
        for x in s.iter().filter(|x| x.event.starts_with("control plane")) {
            out.push_str(&format!(
                r#"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="gray" stroke-dasharray="4"/>"#,
                px(x.t),
                y0 + 16.0,
                py(0.0)
            ));
        }
    }
    out.push_str(&format!(
        r#"<text x="{pad}" y="{}">time (s), 0-{tmax}; dashed: control plane restarts</text></svg>"#,
        3.0 * h + 30.0
    ));
    out
}
