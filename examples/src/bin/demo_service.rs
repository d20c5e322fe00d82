//! `demo-service`: one demo service instance (used by the demo, compose and the e2e tests).

use clap::Parser;
use trellis_examples::demo_service::{DemoConfig, spawn};

#[derive(Parser)]
#[command(about = "A small demo HTTP service for the trellis mesh demo")]
struct Args {
    /// Service name reported in answers.
    #[arg(long, env = "DEMO_SERVICE", default_value = "api")]
    service: String,
    #[arg(long, env = "DEMO_VERSION", default_value = "v1")]
    version: String,
    #[arg(long, env = "DEMO_INSTANCE", default_value = "local")]
    instance: String,
    #[arg(long, env = "DEMO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Downstream calls as NAME=URL, repeatable (e.g. api=http://127.0.0.1:9191).
    #[arg(long = "call", env = "DEMO_CALLS", value_delimiter = ',')]
    calls: Vec<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut calls = Vec::new();
    for c in &args.calls {
        match c.split_once('=') {
            Some((name, url)) => calls.push((name.to_owned(), url.to_owned())),
            None => {
                eprintln!("demo-service: --call must be NAME=URL, got {c:?}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let config = DemoConfig {
        service: args.service,
        version: args.version,
        instance: args.instance,
        calls,
    };
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (addr, task) = match spawn(args.listen, config, rx).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("demo-service: cannot listen on {}: {e}", args.listen);
            return std::process::ExitCode::from(1);
        }
    };
    eprintln!("demo-service listening on http://{addr}");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => { let _ = tx.send(true); }
        r = task => { if let Ok(Err(e)) = r { eprintln!("demo-service: {e}"); return std::process::ExitCode::from(1); } }
    }
    std::process::ExitCode::SUCCESS
}
