//! trellis-proxy: parses the command line, installs tracing and runs the chosen front end.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "trellis-proxy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the path-based internal load balancer.
    Lb {
        /// The LB config (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Only validate the config and exit.
        #[arg(long)]
        check: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Lb { config, check } => run_lb(config, check).await,
    }
}

async fn run_lb(path: PathBuf, check: bool) -> ExitCode {
    let config = match trellis_proxy::lb::LbConfig::load(&path).and_then(|c| c.compile().map(|_| c))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trellis-proxy lb: {e}");
            return ExitCode::from(2);
        }
    };
    if check {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    let stop = CancellationToken::new();
    let handle = match trellis_proxy::lb::start(config, stop.clone()).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("trellis-proxy lb: {e}");
            return ExitCode::from(1);
        }
    };
    for (name, addr) in &handle.listeners {
        println!("listener {name} on {addr}");
    }
    println!("admin on {}", handle.admin);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal received; draining");
        stop.cancel();
    });
    handle.run_until_stopped().await;
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
