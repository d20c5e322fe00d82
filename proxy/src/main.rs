//! `trellis-proxy`: parses the command line, loads config, installs tracing, runs the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use trellis_proxy::{Config, ProcessEnv};

mod alloc;

/// mimalloc: the request path allocates a few small objects per request (header maps, boxed
/// futures); glibc's malloc/free cost ~1.8k instructions per proxied request in callgrind.
#[global_allocator]
static GLOBAL: alloc::MiMalloc = alloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "trellis-proxy", version, about = "Trellis data plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar next to one app instance.
    Sidecar {
        /// TOML config; `TRELLIS_*` variables override it (or configure everything without it).
        #[arg(long, env = "TRELLIS_CONFIG")]
        config: Option<PathBuf>,
        /// Log as JSON lines.
        #[arg(long)]
        log_json: bool,
        /// Check the config and exit.
        #[arg(long)]
        check: bool,
    },
    /// Run the path-based internal load balancer.
    Lb {
        /// The LB config (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Log as JSON lines.
        #[arg(long)]
        log_json: bool,
        /// Check the config and exit.
        #[arg(long)]
        check: bool,
    },
    /// Health probe for containers without curl: GET an http:// or https:// URL, exit 0 on 2xx,
    /// 1 otherwise.
    Probe {
        /// e.g. http://127.0.0.1:9901/ready, https://127.0.0.1:9400/healthz
        url: String,
        /// For https:// URLs: the root certificate(s) (PEM) the server's chain and name must
        /// verify against, e.g. the control plane's `<data-dir>/ca/root.crt`.
        #[arg(long)]
        cacert: Option<PathBuf>,
        /// Give up after this long.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Transparent interception: in the app's network namespace, redirect its outbound TCP to the
    /// sidecar's egress listener (the sidecar's uid and loopback excluded). Needs CAP_NET_ADMIN.
    InitIptables {
        /// The uid the sidecar runs as (its own traffic is not redirected).
        #[arg(long, default_value_t = 1337)]
        proxy_uid: u32,
        /// The sidecar's `outbound.egress_listen` port.
        #[arg(long, default_value_t = 15080)]
        egress_port: u16,
        /// Destination ports to intercept (comma-separated); all TCP ports when absent.
        #[arg(long, value_delimiter = ',')]
        ports: Vec<u16>,
        /// Destination networks never intercepted (comma-separated CIDRs), besides loopback.
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<ipnet::Ipv4Net>,
        /// Remove the rules instead of installing them.
        #[arg(long)]
        remove: bool,
        /// Print the iptables commands instead of running them.
        #[arg(long)]
        dry_run: bool,
        /// The iptables program.
        #[arg(long, default_value = "iptables")]
        iptables: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Sidecar {
            config,
            log_json,
            check,
        } => sidecar(config, log_json, check),
        Command::Lb {
            config,
            log_json,
            check,
        } => lb(config, log_json, check),
        Command::InitIptables {
            proxy_uid,
            egress_port,
            ports,
            exclude,
            remove,
            dry_run,
            iptables,
        } => {
            use trellis_proxy::intercept;
            let c = intercept::InterceptConfig {
                proxy_uid,
                egress_port,
                ports,
                exclude,
            };
            if dry_run {
                let rules = if remove {
                    intercept::remove_rules()
                } else {
                    intercept::install_rules(&c)
                };
                for r in rules {
                    println!("{iptables} {}", r.join(" "));
                }
                return ExitCode::SUCCESS;
            }
            if remove {
                intercept::remove(&iptables);
                return ExitCode::SUCCESS;
            }
            match intercept::install(&iptables, &c) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("trellis-proxy init-iptables: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Probe {
            url,
            cacert,
            timeout,
        } => match probe(&url, cacert.as_deref(), timeout) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trellis-proxy probe: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn sidecar(path: Option<PathBuf>, log_json: bool, check: bool) -> ExitCode {
    install_tracing(log_json);
    let config = match Config::load(path.as_deref(), &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trellis-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if check {
        println!("config ok");
        return ExitCode::SUCCESS;
    }
    // One worker: a current-thread runtime (no work stealing, no cross-thread wake-ups).
    let mut rt = if config.runtime.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if config.runtime.worker_threads > 1 {
        rt.worker_threads(config.runtime.worker_threads);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-proxy: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let running = match trellis_proxy::start(config, shutdown.clone()).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("trellis-proxy: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(admin = %running.admin_addr, inbound = ?running.inbound_addr,
            egress = ?running.egress_addr, upstreams = ?running.upstream_addrs, "sidecar started");
        // One machine-readable line with the bound addresses (ports may have been 0).
        println!(
            "{}",
            serde_json::json!({
                "admin": running.admin_addr,
                "inbound": running.inbound_addr,
                "egress": running.egress_addr,
                "upstreams": running.upstream_addrs,
            })
        );
        let running = std::sync::Arc::new(running);
        if let Some(p) = &path {
            spawn_file_watch(
                p.clone(),
                std::sync::Arc::downgrade(&running),
                shutdown.clone(),
            );
        }
        spawn_signals(shutdown.clone(), std::sync::Arc::clone(&running), path);
        // Nothing to do until SIGTERM/SIGINT; then the drain runs, and this waits for it.
        shutdown.cancelled().await;
        running.wait().await;
        ExitCode::SUCCESS
    })
}

fn spawn_signals(
    shutdown: CancellationToken,
    running: std::sync::Arc<trellis_proxy::Running>,
    path: Option<PathBuf>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => match Config::load(path.as_deref(), &ProcessEnv) {
                    Ok(c) => running.reload(&c),
                    Err(e) => tracing::error!(error = %e, "reload failed; keeping the running config"),
                },
            }
        }
        // Our handle goes first, so the drain can start as soon as shutdown is seen.
        drop(running);
        shutdown.cancel();
    });
}

/// How often the config file's modification time is checked (reload on change, like SIGHUP).
const FILE_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

fn spawn_file_watch(
    path: PathBuf,
    running: std::sync::Weak<trellis_proxy::Running>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut last = mtime(&path);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(FILE_WATCH_INTERVAL) => {}
            }
            let now = mtime(&path);
            if now == last {
                continue;
            }
            last = now;
            let Some(running) = running.upgrade() else {
                return;
            };
            match Config::load(Some(&path), &ProcessEnv) {
                Ok(c) => running.reload(&c),
                Err(e) => {
                    tracing::error!(error = %e, "config file changed but is invalid; keeping the running config")
                }
            }
        }
    });
}

fn lb(path: PathBuf, log_json: bool, check: bool) -> ExitCode {
    use trellis_proxy::lb::LbConfig;
    install_tracing(log_json);
    let config =
        match LbConfig::load_with_env(&path, &ProcessEnv).and_then(|c| c.compile().map(|_| c)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("trellis-proxy lb: {e}");
                return ExitCode::from(2);
            }
        };
    if check {
        println!("config ok");
        return ExitCode::SUCCESS;
    }
    // `TOKIO_WORKER_THREADS=1`: a current-thread runtime, as the sidecar uses for one worker (no
    // work-stealing scheduler, no cross-thread wake-ups); otherwise tokio's multi-thread runtime
    // with that many workers (default: one per CPU).
    let one_worker = std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|v| v.trim() == "1");
    let mut rt = if one_worker {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-proxy lb: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let handle = match trellis_proxy::lb::start(config, shutdown.clone()).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("trellis-proxy lb: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(listeners = ?handle.listeners, admin = %handle.admin, "lb started");
        let reloader = handle.reloader();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = hup.recv() => {
                        let result = LbConfig::load_with_env(&path, &ProcessEnv)
                            .map_err(trellis_proxy::lb::LbError::from)
                            .and_then(|c| reloader.reload(c));
                        match result {
                            Ok(()) => tracing::info!("config reloaded (SIGHUP)"),
                            Err(e) => tracing::error!(error = %e, "reload failed; keeping the running config"),
                        }
                    }
                }
            }
            tracing::info!("signal received; draining");
            shutdown.cancel();
        });
        handle.run_until_stopped().await;
        ExitCode::SUCCESS
    })
}

fn install_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// One blocking HTTP/1.0 GET (over TLS for https://); no runtime needed for a health check.
fn probe(
    url: &str,
    cacert: Option<&std::path::Path>,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let (https, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => return Err("only http:// and https:// URLs are supported".into()),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))?;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
    if !https {
        return probe_status(&mut s, &request);
    }
    let cacert = cacert.ok_or("an https:// URL needs --cacert FILE (e.g. the mesh's root.crt)")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in trellis_ca::read_certs(cacert)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", cacert.display()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(trellis_ca::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host}: {e}"))?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(|e| e.to_string())?;
    probe_status(&mut rustls::StreamOwned::new(conn, s), &request)
}

/// Sends `request` and reads the status line: `Ok` on 2xx.
fn probe_status(
    io: &mut (impl std::io::Read + std::io::Write),
    request: &str,
) -> Result<(), String> {
    io.write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    io.read_exact(&mut head)
        .map_err(|e| format!("reading status: {e}"))?;
    match &head[9..12] {
        [b'2', _, _] => Ok(()),
        code => Err(format!("status {}", String::from_utf8_lossy(code))),
    }
}
