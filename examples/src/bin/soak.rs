//! `soak`: the demo mesh as separate processes under steady load with churn, for
//! `bench/soak/run.sh`.
//!
//! Processes (the real binaries, found beside this one): the control plane (`trellis-discovery`
//! with the CA), one `trellis-proxy sidecar` per demo instance and one for the LB, the LB
//! (`trellis-proxy lb`) and one `demo-service` per instance. Load: `--concurrency` clients loop
//! GET `/` and `/api/x` through the LB (LB → LB sidecar ═mTLS═> web sidecar → web → sidecars →
//! api → users). Churn, all the time: an extra `api` instance is registered and deregistered
//! every 2 s; an instance on a dead port is registered (its health check flips it to UNHEALTHY)
//! and removed every 7 s; the LB shifts the `/api/*` weights every 15 s; leaf certificates live
//! `--cert-ttl` and every sidecar renews them (at about 2/3 of their life); the control plane
//! restarts at 1/3 and 2/3 of the run. Every 10 s: requests sent/failed, p50/p99 latency, and
//! RSS and open fds of every process. Writes `report.md`, `samples.csv` and `soak.svg` to `--out`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use serde_json::json;
use trellis_ca::{CaDir, Policy, Scope};
use trellis_examples::cloudmap::CloudMap;
use trellis_examples::demo::{self, NAMESPACE, SidecarPorts, TOPOLOGY, TRUST_DOMAIN};

#[derive(Parser)]
struct Args {
    /// Length of the run.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Concurrent load clients.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Lifetime of the leaf certificates the CA issues (sidecars renew at about 2/3 of it).
    #[arg(long, default_value = "180s", value_parser = humantime_secs)]
    cert_ttl: Duration,
    /// Where the report goes.
    #[arg(long, default_value = "bench/results/soak")]
    out: PathBuf,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    s.trim_end_matches('s')
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s:?}: seconds, e.g. 180s ({e})"))
}

type Error = Box<dyn std::error::Error>;

#[derive(Default, Clone)]
struct Window {
    sent: u64,
    failed: u64,
    latencies_us: Vec<u64>,
}

/// One process at one sample.
#[derive(Clone, Copy)]
struct ProcSample {
    pid: u32,
    rss_mib: f64,
    fds: usize,
}

struct Sample {
    t: u64,
    sent: u64,
    failed: u64,
    p50_ms: f64,
    p99_ms: f64,
    /// Per process, in [`Mesh::procs`] order (None: not running at that moment).
    procs: Vec<Option<ProcSample>>,
    event: String,
}

type Shared = Arc<parking_lot::Mutex<Window>>;

/// Churn operations that succeeded, for the report (a churn that silently failed proves nothing).
#[derive(Default)]
struct Churn {
    registered: AtomicU64,
    deregistered: AtomicU64,
    dead_registered: AtomicU64,
    /// Dead instances seen UNHEALTHY before they were removed.
    health_flips: AtomicU64,
    weight_shifts: AtomicU64,
    restarts: AtomicU64,
}

/// Churn steps that failed (e.g. an API call during a control plane restart).
static CHURN_FAILED: AtomicU64 = AtomicU64::new(0);

fn bump<E: std::fmt::Display>(c: &AtomicU64, r: Result<(), E>) {
    match r {
        Ok(()) => {
            c.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            CHURN_FAILED.fetch_add(1, Ordering::Relaxed);
            eprintln!("soak: churn step failed: {e}");
        }
    }
}

/// One child process of the mesh.
struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: tokio::process::Child,
    /// Admin address of a sidecar (its certificate is sampled).
    sidecar_admin: Option<SocketAddr>,
}

impl Proc {
    fn spawn(name: &str, program: &Path, args: Vec<String>, logs: &Path) -> Result<Proc, Error> {
        let log = logs.join(format!("{name}.log"));
        let child = spawn_child(program, &args, &log)?;
        Ok(Proc {
            name: name.to_owned(),
            program: program.to_owned(),
            args,
            log,
            child,
            sidecar_admin: None,
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGTERM, wait (SIGKILL after 10 s), start again with the same arguments.
    async fn restart(&mut self) -> Result<(), Error> {
        self.stop().await;
        self.child = spawn_child(&self.program, &self.args, &self.log)?;
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    fn sample(&self) -> Option<ProcSample> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        Some(ProcSample {
            pid,
            rss_mib: rss_kib as f64 / 1024.0,
            fds,
        })
    }
}

fn spawn_child(
    program: &Path,
    args: &[String],
    log: &Path,
) -> Result<tokio::process::Child, Error> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    Ok(tokio::process::Command::new(program)
        .args(args)
        .env("TRELLIS_LOG", "warn")
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{}: {e}", program.display()))?)
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The mesh as processes.
struct Mesh {
    procs: Vec<Proc>,
    api: SocketAddr,
    lb: SocketAddr,
    lb_admin: SocketAddr,
    /// Inbound address of `api-1` (extra instances are registered there).
    api_inbound: SocketAddr,
    data: PathBuf,
}

const CONTROL_PLANE: usize = 0;

async fn start_mesh(cert_ttl: Duration) -> Result<Mesh, Error> {
    let bin = std::env::current_exe()?
        .parent()
        .ok_or("no directory of the soak binary")?
        .to_owned();
    let (discovery, proxy, service) = (
        bin.join("trellis-discovery"),
        bin.join("trellis-proxy"),
        bin.join("demo-service"),
    );
    for p in [&discovery, &proxy, &service] {
        if !p.exists() {
            return Err(format!(
                "{} missing: cargo build -p trellis-discovery -p trellis-proxy -p trellis-examples",
                p.display()
            )
            .into());
        }
    }
    let data = std::env::temp_dir().join(format!("trellis-soak-{}", std::process::id()));
    let logs = data.join("logs");
    std::fs::create_dir_all(&logs)?;

    // The CA with short-lived leaves, and a join token per workload.
    let ca_dir = CaDir::new(data.join("ca"));
    let policy = Policy {
        default_ttl: cert_ttl,
        ..Policy::default()
    };
    ca_dir.init(TRUST_DOMAIN.parse()?, policy)?;
    let tokens = ca_dir.tokens()?;
    let mut token_of = BTreeMap::new();
    for service in ["users", "api", "api-canary", "web", "lb"] {
        let t = tokens.create(Scope::Workload {
            namespace: NAMESPACE.parse()?,
            service: service.parse()?,
        })?;
        token_of.insert(service, t.bearer());
    }
    drop(tokens);

    let api = local(free_port()?);
    let dns = local(free_port()?);
    let mut procs = vec![Proc::spawn(
        "control-plane",
        &discovery,
        [
            "serve",
            "--api-listen",
            &api.to_string(),
            "--dns-listen",
            &dns.to_string(),
            "--data-dir",
            &data.display().to_string(),
            "--health-interval",
            "500ms",
            "--health-timeout",
            "400ms",
            "--trust-domain",
            TRUST_DOMAIN,
        ]
        .map(String::from)
        .to_vec(),
        &logs,
    )?];
    let cloudmap = CloudMap::new(api);
    wait_api(&cloudmap).await?;
    let ns_id = cloudmap.create_dns_namespace(NAMESPACE).await?;
    let mut service_ids = BTreeMap::new();
    for service in ["users", "api", "api-canary", "web"] {
        service_ids.insert(service, cloudmap.create_service(&ns_id, service).await?);
    }

    let sidecar =
        |name: &str, toml: String, admin: u16, procs: &mut Vec<Proc>| -> Result<(), Error> {
            let file = data.join(format!("sidecar-{name}.toml"));
            std::fs::write(&file, toml)?;
            let args = ["sidecar", "--config", &file.display().to_string()].map(String::from);
            let mut p = Proc::spawn(&format!("sidecar-{name}"), &proxy, args.to_vec(), &logs)?;
            p.sidecar_admin = Some(local(admin));
            procs.push(p);
            Ok(())
        };
    let mut inbound_of = BTreeMap::new();
    for spec in TOPOLOGY {
        let app = local(free_port()?);
        let mut ports = SidecarPorts {
            admin: free_port()?,
            inbound: free_port()?,
            upstreams: BTreeMap::new(),
        };
        for c in spec.calls {
            ports.upstreams.insert((*c).to_owned(), free_port()?);
        }
        let toml = demo::sidecar_toml(
            spec.service,
            api,
            &token_of[spec.service],
            Some((app, spec.allowed)),
            spec.calls,
            &ports,
        );
        sidecar(spec.id, toml, ports.admin, &mut procs)?;
        let mut args: Vec<String> = [
            "--service",
            spec.service,
            "--version",
            spec.version,
            "--instance",
            spec.id,
            "--listen",
            &app.to_string(),
        ]
        .map(String::from)
        .to_vec();
        for (c, port) in &ports.upstreams {
            args.push("--call".into());
            args.push(format!("{c}=http://{}/", local(*port)));
        }
        procs.push(Proc::spawn(
            &format!("app-{}", spec.id),
            &service,
            args,
            &logs,
        )?);
        inbound_of.insert(spec.id, local(ports.inbound));
    }
    for spec in TOPOLOGY {
        cloudmap
            .register(
                &service_ids[spec.service],
                spec.id,
                inbound_of[spec.id],
                &[("version", spec.version)],
            )
            .await?;
    }

    // The LB's sidecar (no inbound) and the LB in front of it.
    let lb_upstreams = ["web", "api", "api-canary"];
    let mut ports = SidecarPorts {
        admin: free_port()?,
        ..SidecarPorts::default()
    };
    for u in lb_upstreams {
        ports.upstreams.insert(u.to_owned(), free_port()?);
    }
    let toml = demo::sidecar_toml("lb", api, &token_of["lb"], None, &lb_upstreams, &ports);
    sidecar("lb", toml, ports.admin, &mut procs)?;
    let (lb, lb_admin) = (local(free_port()?), local(free_port()?));
    let targets = ports
        .upstreams
        .iter()
        .map(|(k, p)| (k.clone(), local(*p)))
        .collect();
    let file = data.join("lb.toml");
    std::fs::write(&file, demo::lb_toml(lb, lb_admin, &targets))?;
    let args = ["lb", "--config", &file.display().to_string()].map(String::from);
    procs.push(Proc::spawn("lb", &proxy, args.to_vec(), &logs)?);

    let mesh = Mesh {
        procs,
        api,
        lb,
        lb_admin,
        api_inbound: inbound_of["api-1"],
        data,
    };
    mesh.wait_ready(&cloudmap).await?;
    Ok(mesh)
}

async fn wait_api(cloudmap: &CloudMap) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while cloudmap.call("ListNamespaces", json!({})).await.is_err() {
        if Instant::now() > deadline {
            return Err("control plane API did not answer within 20s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

impl Mesh {
    async fn wait_ready(&self, cloudmap: &CloudMap) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(60);
        for p in &self.procs {
            let Some(admin) = p.sidecar_admin else {
                continue;
            };
            while demo::http_get(admin, "/ready").await.map(|(s, _)| s) != Some(200) {
                if Instant::now() > deadline {
                    return Err(format!("{} not ready (log: {})", p.name, p.log.display()).into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for service in ["users", "api", "api-canary", "web"] {
            let want = TOPOLOGY.iter().filter(|s| s.service == service).count();
            while cloudmap.healthy_instances(NAMESPACE, service).await?.len() < want {
                if Instant::now() > deadline {
                    return Err(format!("{service} instances not healthy").into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        while !matches!(demo::http_get(self.lb, "/").await, Some((200, _))) {
            if Instant::now() > deadline {
                return Err("no 200 through the LB".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn shutdown(mut self) {
        // Front to back, the control plane last.
        for p in self.procs.iter_mut().rev() {
            p.stop().await;
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// What the sidecars' certificates did: distinct expiries seen (a rotation each after the
/// first) and the least remaining lifetime seen (negative: a certificate expired in use).
#[derive(Default, Clone)]
struct Certs {
    expiries: Vec<i64>,
    least_left_s: Option<i64>,
}

async fn sample_certs(mesh: &Mesh, certs: &mut BTreeMap<String, Certs>) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for p in &mesh.procs {
        let Some(admin) = p.sidecar_admin else {
            continue;
        };
        let Some((200, text)) = demo::http_get(admin, "/metrics").await else {
            continue;
        };
        let Some(expiry) = text.lines().find_map(|l| {
            l.strip_prefix("trellis_proxy_cert_expiry_timestamp_seconds ")?
                .trim()
                .parse::<f64>()
                .ok()
        }) else {
            continue;
        };
        let c = certs.entry(p.name.clone()).or_default();
        let expiry = expiry as i64;
        if !c.expiries.contains(&expiry) {
            c.expiries.push(expiry);
        }
        let left = expiry - now;
        c.least_left_s = Some(c.least_left_s.map_or(left, |l| l.min(left)));
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

async fn run(args: Args) -> Result<(), Error> {
    let mut mesh = start_mesh(args.cert_ttl).await?;
    let names: Vec<String> = mesh.procs.iter().map(|p| p.name.clone()).collect();
    eprintln!(
        "soak: mesh up, {} processes: {}",
        names.len(),
        names.join(" ")
    );
    let lb = mesh.lb;
    let lb_admin = mesh.lb_admin;
    let cloudmap = Arc::new(CloudMap::new(mesh.api));
    let services = cloudmap.call("ListServices", json!({})).await?;
    let api_id = services["Services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["Name"] == "api"))
        .and_then(|s| s["Id"].as_str())
        .ok_or("no api service")?
        .to_owned();
    let api_inbound = mesh.api_inbound;

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

    let counts: Arc<Churn> = Arc::default();
    let churn = tokio::spawn(churn(
        cloudmap.clone(),
        api_id,
        api_inbound,
        lb_admin,
        counts.clone(),
        stop.clone(),
    ));

    let mut samples = Vec::new();
    let mut certs = BTreeMap::new();
    let mut restarts = 0;
    let mut next = Duration::from_secs(10);
    while start.elapsed() < total {
        let mut event = String::new();
        let due_restart = total * (restarts + 1) / 3;
        if restarts < 2 && start.elapsed() >= due_restart {
            let t = Instant::now();
            mesh.procs[CONTROL_PLANE].restart().await?;
            wait_api(&cloudmap).await?;
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
                samples.push(sample(&window, &mesh, now.as_secs(), event));
            }
            continue;
        }
        next += Duration::from_secs(10);
        sample_certs(&mesh, &mut certs).await;
        let s = sample(&window, &mesh, now.as_secs(), event);
        let (rss, fds) = totals(&s);
        eprintln!(
            "soak: t={}s sent={} failed={} p99={:.1}ms rss(all)={rss:.1}MiB fds(all)={fds}",
            s.t, s.sent, s.failed, s.p99_ms
        );
        samples.push(s);
    }
    stop.cancel();
    for l in load {
        let _ = l.await;
    }
    let _ = churn.await;
    sample_certs(&mesh, &mut certs).await;
    samples.push(sample(
        &window,
        &mesh,
        start.elapsed().as_secs(),
        "end".into(),
    ));
    mesh.shutdown().await;
    write_report(&args, &names, &samples, &counts, &certs)?;
    Ok(())
}

/// Register/deregister, health flips, weight shifts, until `stop`.
async fn churn(
    cloudmap: Arc<CloudMap>,
    api_id: String,
    api_inbound: SocketAddr,
    lb_admin: SocketAddr,
    counts: Arc<Churn>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let deregister = |id: String| {
        let (cloudmap, api_id) = (cloudmap.clone(), api_id.clone());
        async move {
            cloudmap
                .call(
                    "DeregisterInstance",
                    json!({"ServiceId": api_id, "InstanceId": id}),
                )
                .await
                .map(|_| ())
        }
    };
    while !stop.is_cancelled() {
        tick.tick().await;
        n += 1;
        if n.is_multiple_of(2) {
            let extra = format!("soak-extra-{}", n / 2);
            let r = cloudmap.register(&api_id, &extra, api_inbound, &[]).await;
            bump(&counts.registered, r);
        } else if n > 1 {
            let r = deregister(format!("soak-extra-{}", (n - 1) / 2)).await;
            bump(&counts.deregistered, r);
        }
        if n.is_multiple_of(7) {
            let dead = local(1);
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
            let r = deregister(dead).await;
            bump(&counts.deregistered, r);
        }
        if n.is_multiple_of(15) {
            let w = if (n / 15).is_multiple_of(2) {
                (90, 10)
            } else {
                (70, 30)
            };
            let body = json!({"api": w.0, "api-canary": w.1}).to_string();
            let uri = format!("http://{lb_admin}/v1/listeners/public/rules/api/weights");
            if let Ok(req) =
                http::Request::put(uri).body(http_body_util::Full::new(bytes::Bytes::from(body)))
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
}

fn sample(window: &Shared, mesh: &Mesh, t: u64, event: String) -> Sample {
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
        procs: mesh.procs.iter().map(Proc::sample).collect(),
        event,
    }
}

fn totals(s: &Sample) -> (f64, usize) {
    s.procs
        .iter()
        .flatten()
        .fold((0.0, 0), |(r, f), p| (r + p.rss_mib, f + p.fds))
}

/// Whether one process's series stays flat after warm-up.
struct Trend {
    /// Samples judged (after warm-up, of the incarnation shown).
    n: usize,
    /// Processes this role had (restarts).
    incarnations: usize,
    lo: f64,
    hi: f64,
    /// (max - min) / min, percent.
    range_pct: f64,
    /// Median of the last third vs the first third of the judged samples, percent.
    drift_pct: f64,
    /// Medians of the first and last thirds.
    first: f64,
    last: f64,
}

/// Judges `values` (t, pid, value) after `warm` seconds of each incarnation (a pid; a
/// restarted process warms up again): the incarnation with the widest range speaks for the
/// process.
fn trend(values: &[(u64, u32, f64)], warm: u64) -> Option<Trend> {
    let first_pid = values.first().map(|v| v.1);
    let mut runs: Vec<(u32, u64, Vec<f64>)> = Vec::new();
    for &(t, pid, v) in values {
        if runs.last().is_none_or(|r| r.0 != pid) {
            runs.push((pid, t, Vec::new()));
        }
        let Some(run) = runs.last_mut() else { continue };
        // The first incarnation starts with the run.
        let since = if Some(pid) == first_pid { t } else { t - run.1 };
        if since >= warm {
            run.2.push(v);
        }
    }
    let incarnations = runs.len();
    runs.iter()
        .filter_map(|r| judge(&r.2))
        .map(|t| Trend { incarnations, ..t })
        .max_by(|a, b| a.range_pct.total_cmp(&b.range_pct))
}

fn judge(judged: &[f64]) -> Option<Trend> {
    if judged.len() < 3 {
        return None;
    }
    let lo = judged.iter().cloned().fold(f64::MAX, f64::min);
    let hi = judged.iter().cloned().fold(f64::MIN, f64::max);
    let third = (judged.len() / 3).max(1);
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let first = median(&judged[..third]);
    let last = median(&judged[judged.len() - third..]);
    Some(Trend {
        n: judged.len(),
        incarnations: 1,
        lo,
        hi,
        range_pct: 100.0 * (hi - lo) / lo.max(1e-9),
        drift_pct: 100.0 * (last - first) / first.max(1e-9),
        first,
        last,
    })
}

/// Open fds move by a few with the requests in flight at the moment of the sample (each load
/// client has at most one connection open); a change within this many fds is that noise, not a
/// trend.
const FD_SLACK: f64 = 4.0;

/// Flat: max within 10% of min (or within `slack`, in the series' unit). Growing: the last third
/// sits more than that above the first third.
fn verdict(t: &Option<Trend>, slack: f64) -> String {
    let Some(t) = t else {
        return "too few samples".into();
    };
    let within = |base: f64, delta: f64| delta <= (0.1 * base).max(slack);
    if within(t.lo, t.hi - t.lo) {
        "**flat**".into()
    } else if within(t.first, t.last - t.first) {
        format!(
            "not within 10% (range {:.0}%), no upward drift ({:+.1}%)",
            t.range_pct, t.drift_pct
        )
    } else {
        format!("**GROWING** ({:+.1}%)", t.drift_pct)
    }
}

fn write_report(
    args: &Args,
    names: &[String],
    s: &[Sample],
    churn: &Churn,
    certs: &BTreeMap<String, Certs>,
) -> std::io::Result<()> {
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    std::fs::create_dir_all(&args.out)?;
    let mut csv = String::from("t_s,sent,failed,p50_ms,p99_ms,event");
    for name in names {
        csv.push_str(&format!(",{name}_pid,{name}_rss_mib,{name}_fds"));
    }
    csv.push('\n');
    for x in s {
        csv.push_str(&format!(
            "{},{},{},{:.2},{:.2},{}",
            x.t, x.sent, x.failed, x.p50_ms, x.p99_ms, x.event
        ));
        for p in &x.procs {
            match p {
                Some(p) => csv.push_str(&format!(",{},{:.1},{}", p.pid, p.rss_mib, p.fds)),
                None => csv.push_str(",,,"),
            }
        }
        csv.push('\n');
    }
    std::fs::write(args.out.join("samples.csv"), csv)?;

    let sent: u64 = s.iter().map(|x| x.sent).sum();
    let failed: u64 = s.iter().map(|x| x.failed).sum();
    // Warm-up: the first 20% of the run.
    let warm = args.seconds / 5;
    let ttl = args.cert_ttl.as_secs();
    let rotations: usize = certs
        .values()
        .map(|c| c.expiries.len().saturating_sub(1))
        .sum();
    let least = certs.values().filter_map(|c| c.least_left_s).min();
    let p99_max = s.iter().map(|x| x.p99_ms).fold(0.0, f64::max);
    // The soak starts the binaries beside its own, built in the same profile.
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let mut md = format!(
        "# Soak: {} s, {} load clients through the LB and the sidecars, every component its own process\n\n\
         Processes: the control plane (`trellis-discovery`, with the CA), {} sidecars (`trellis-proxy \
         sidecar`), the LB (`trellis-proxy lb`) and {} demo apps (`demo-service`), {build} builds. Churn \
         all the time: an extra `api` instance registered/deregistered every 2 s, a dead instance \
         registered (health check flips it UNHEALTHY) and removed every 7 s, LB `/api/*` weights \
         shifted 90/10 <-> 70/30 every 15 s, leaf certificates issued for {ttl} s and renewed by \
         every sidecar at about 2/3 of their life, control plane restarted twice.\n\n\
         - requests sent: **{sent}**, failed: **{failed}** ({:.3}%); p99 per 10 s window at most {p99_max:.1} ms\n\
         - certificate rotations seen: **{rotations}** across {} sidecars (TTL {ttl} s); least remaining \
         lifetime seen: {} s (never expired in use: {})\n\
         - churn that succeeded: {} registrations, {} deregistrations, {} dead instances (of which {} seen \
         UNHEALTHY before removal), {} LB weight shifts, {} control plane restarts; churn steps that \
         failed: {}\n\n\
         ## RSS and open fds per process, after warm-up (first {warm} s; a restarted process warms up again)\n\n\
         Sampled every 10 s from `/proc/<pid>/status` (VmRSS) and `/proc/<pid>/fd`. Flat: max within \
         10% of min over the judged samples (fds: or within {FD_SLACK} fds, the requests in flight \
         when sampled); growing: the median of the last third more than that above the first \
         third's (drift). A restarted process is judged per incarnation, the widest range shown.\n\n\
         | process | RSS MiB (min-max) | RSS | fds (min-max) | fds |\n|---|---|---|---|---|\n",
        args.seconds,
        args.concurrency,
        names.iter().filter(|n| n.starts_with("sidecar-")).count(),
        names.iter().filter(|n| n.starts_with("app-")).count(),
        100.0 * failed as f64 / sent.max(1) as f64,
        certs.len(),
        least.map_or("?".into(), |l| l.to_string()),
        least.is_some_and(|l| l > 0),
        n(&churn.registered),
        n(&churn.deregistered),
        n(&churn.dead_registered),
        n(&churn.health_flips),
        n(&churn.weight_shifts),
        n(&churn.restarts),
        CHURN_FAILED.load(Ordering::Relaxed),
    );
    for (i, name) in names.iter().enumerate() {
        let series = |f: &dyn Fn(&ProcSample) -> f64| -> Vec<(u64, u32, f64)> {
            s.iter()
                .filter(|x| x.event.is_empty())
                .filter_map(|x| {
                    x.procs
                        .get(i)
                        .copied()
                        .flatten()
                        .map(|p| (x.t, p.pid, f(&p)))
                })
                .collect()
        };
        let rss = trend(&series(&|p| p.rss_mib), warm);
        let fds = trend(&series(&|p| p.fds as f64), warm);
        let span = |t: &Option<Trend>, digits: usize| {
            t.as_ref().map_or("-".into(), |t| {
                let restarts = if t.incarnations > 1 {
                    format!(", worst of {} incarnations", t.incarnations)
                } else {
                    String::new()
                };
                format!(
                    "{:.*}-{:.*} ({} samples{restarts})",
                    digits, t.lo, digits, t.hi, t.n
                )
            })
        };
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} |\n",
            span(&rss, 1),
            verdict(&rss, 0.0),
            span(&fds, 0),
            verdict(&fds, FD_SLACK)
        ));
    }
    md.push_str(
        "\n## Over time\n\n| t (s) | sent | failed | p50 ms | p99 ms | RSS MiB (all) | fds (all) | event |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for x in s {
        let (rss, fds) = totals(x);
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {rss:.1} | {fds} | {} |\n",
            x.t, x.sent, x.failed, x.p50_ms, x.p99_ms, x.event
        ));
    }
    md.push_str("\nPer-process values: `samples.csv`.\n\n![soak](soak.svg)\n");
    std::fs::write(args.out.join("report.md"), md)?;
    std::fs::write(args.out.join("soak.svg"), svg(names, s))
}

const COLORS: [&str; 14] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
];

/// Three stacked charts over time: p99 ms; RSS MiB per process; open fds per process (one
/// line each, legend on the right); restarts dashed.
fn svg(names: &[String], s: &[Sample]) -> String {
    let (w, plot_w, h, pad) = (1100.0, 860.0, 220.0, 50.0);
    let tmax = s.iter().map(|x| x.t).max().unwrap_or(1).max(1) as f64;
    let px = |t: u64| pad + (t as f64 / tmax) * (plot_w - pad);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" font-family="sans-serif" font-size="11">"#,
        3.0 * h + 40.0
    );
    let plain: Vec<&Sample> = s.iter().filter(|x| x.event.is_empty()).collect();
    let charts: [(&str, Vec<Line>); 3] = [
        (
            "p99 latency (ms)",
            vec![(
                "p99".into(),
                plain.iter().map(|x| (x.t, x.p99_ms)).collect(),
                "#d62728",
            )],
        ),
        (
            "RSS (MiB) per process",
            per_process(names, &plain, |p| p.rss_mib),
        ),
        (
            "open fds per process",
            per_process(names, &plain, |p| p.fds as f64),
        ),
    ];
    for (i, (title, lines)) in charts.iter().enumerate() {
        let y0 = i as f64 * h + 20.0;
        let vmax = lines
            .iter()
            .flat_map(|l| l.1.iter().map(|p| p.1))
            .fold(0.0, f64::max)
            .max(1.0)
            * 1.1;
        let py = |v: f64| y0 + h - 30.0 - (v / vmax) * (h - 50.0);
        out.push_str(&format!(
            r#"<text x="{pad}" y="{}">{title} (axis max {vmax:.1})</text><line x1="{pad}" y1="{}" x2="{plot_w}" y2="{}" stroke="black"/>"#,
            y0 + 12.0,
            py(0.0),
            py(0.0)
        ));
        for (j, (name, pts, color)) in lines.iter().enumerate() {
            let points: Vec<String> = pts
                .iter()
                .map(|(t, v)| format!("{:.1},{:.1}", px(*t), py(*v)))
                .collect();
            out.push_str(&format!(
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                points.join(" ")
            ));
            if lines.len() > 1 {
                out.push_str(&format!(
                    r#"<text x="{}" y="{:.1}" fill="{color}">{name}</text>"#,
                    plot_w + 10.0,
                    y0 + 24.0 + j as f64 * 13.0
                ));
            }
        }
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

/// One line of a chart: name, (t, value) points, colour.
type Line = (String, Vec<(u64, f64)>, &'static str);

fn per_process(names: &[String], s: &[&Sample], f: impl Fn(&ProcSample) -> f64) -> Vec<Line> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let pts = s
                .iter()
                .filter_map(|x| x.procs.get(i).copied().flatten().map(|p| (x.t, f(&p))))
                .collect();
            (name.clone(), pts, COLORS[i % COLORS.len()])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(pid_at: impl Fn(u64) -> u32, value: impl Fn(u64) -> f64) -> Vec<(u64, u32, f64)> {
        (1..=30)
            .map(|i| (i * 10, pid_at(i * 10), value(i * 10)))
            .collect()
    }

    #[test]
    fn flat_noisy_and_growing_series() {
        let flat = trend(&series(|_| 1, |t| 100.0 + (t % 20) as f64 / 10.0), 60);
        assert_eq!(verdict(&flat, 0.0), "**flat**");
        // A leak: +1% per sample.
        let leak = trend(&series(|_| 1, |t| 100.0 + t as f64 / 10.0), 60);
        assert!(verdict(&leak, 0.0).contains("GROWING"));
        // Small counts jumping by in-flight requests are noise within the slack.
        let fds = trend(&series(|_| 1, |t| 20.0 + (t % 40) as f64 / 10.0), 60);
        assert_eq!(verdict(&fds, FD_SLACK), "**flat**");
        assert!(!verdict(&fds, 0.0).contains("flat"));
    }

    #[test]
    fn a_restarted_process_warms_up_again() {
        // Restarted at 150 s: the new incarnation starts low and climbs during its warm-up.
        let values = series(
            |t| if t < 150 { 1 } else { 2 },
            |t| {
                if t < 150 {
                    50.0
                } else {
                    20.0 + (t - 150).min(50) as f64
                }
            },
        );
        let t = trend(&values, 60).unwrap();
        assert_eq!(t.incarnations, 2);
        assert_eq!(verdict(&Some(t), 0.0), "**flat**");
        assert!(trend(&series(|_| 1, |_| 1.0), 400).is_none());
    }
}
