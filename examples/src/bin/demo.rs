//! `demo`: the README's main job. Starts the whole mesh on loopback, prints what to try, and
//! stops everything on Ctrl-C. `--scenario kill-api` also kills one `api` instance and shows it
//! leaving DNS, Cloud Map's healthy set and the sidecars' endpoint sets while requests keep working.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use trellis_examples::demo::{self, Demo, DemoOptions, NAMESPACE, http_get};

#[derive(Parser)]
#[command(
    about = "The trellis local demo mesh: control plane, CA, four services with sidecars, and the LB"
)]
struct Args {
    /// Control plane API (Cloud Map, watch, CA).
    #[arg(long, default_value = "127.0.0.1:9400")]
    api_listen: SocketAddr,
    /// Authoritative DNS (UDP and TCP).
    #[arg(long, default_value = "127.0.0.1:9053")]
    dns_listen: SocketAddr,
    /// The internal load balancer's public listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    lb_listen: SocketAddr,
    /// Keep state here instead of a temporary directory.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// Demonstrate failure handling after start-up.
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// Exit after start-up (and the scenario) instead of waiting for Ctrl-C.
    #[arg(long)]
    exit: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Scenario {
    /// Kill api-2 (app and sidecar) and watch it leave DNS and the endpoint sets.
    KillApi,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let opts = DemoOptions {
        api_listen: args.api_listen,
        dns_listen: args.dns_listen,
        lb_listen: args.lb_listen,
        data_dir: args.data_dir,
        progress: true,
    };
    eprintln!("starting the trellis demo mesh on loopback…");
    let mut mesh = match demo::start(opts).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", mesh.banner());
    if let Some((_, body)) = http_get(mesh.lb_addr, "/").await {
        println!("GET http://{}/ →\n{body}", mesh.lb_addr);
    }
    if let Some(Scenario::KillApi) = args.scenario {
        kill_api(&mut mesh).await;
    }
    if !args.exit {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("\nstopping…");
    }
    mesh.shutdown().await;
    eprintln!("stopped.");
    ExitCode::SUCCESS
}

/// Kills api-2 and reports, every 250 ms, what DNS, Cloud Map and web's sidecar see, and whether
/// requests through the LB still succeed.
async fn kill_api(mesh: &mut Demo) {
    println!("scenario kill-api: killing api-2 (app and sidecar, no deregistration)…");
    let t0 = Instant::now();
    let _ = mesh.kill("api-2");
    let mut ok = 0u32;
    let mut failed = 0u32;
    let (mut gone_cloudmap, mut gone_watch) = (None, None);
    while t0.elapsed() < Duration::from_secs(15) {
        for _ in 0..4 {
            match http_get(mesh.lb_addr, "/api/orders").await {
                Some((200, _)) => ok += 1,
                _ => failed += 1,
            }
        }
        let healthy = mesh
            .cloudmap()
            .healthy_instances(NAMESPACE, "api")
            .await
            .unwrap_or_default();
        if gone_cloudmap.is_none() && !healthy.iter().any(|i| i == "api-2") {
            gone_cloudmap = Some(t0.elapsed());
            println!(
                "  +{:.1}s api-2 is unhealthy: Cloud Map HEALTHY set {:?}, DNS answers only those",
                t0.elapsed().as_secs_f64(),
                healthy
            );
        }
        if let Some((200, body)) =
            http_get(mesh.api_addr(), &format!("/v1/watch/{NAMESPACE}/api")).await
            && gone_watch.is_none()
            && !body.contains("api-2")
        {
            gone_watch = Some(t0.elapsed());
            println!(
                "  +{:.1}s api-2 left the watch API's endpoint set (sidecars drop it)",
                t0.elapsed().as_secs_f64()
            );
        }
        if gone_cloudmap.is_some() && gone_watch.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "  requests through the LB meanwhile: {ok} ok, {failed} failed (retries and ejection hide the dead instance)"
    );
    if let Some(dns) = mesh.dns_addr() {
        println!(
            "  check: dig @{} -p {} api.{NAMESPACE} +short",
            dns.ip(),
            dns.port()
        );
    }
}
