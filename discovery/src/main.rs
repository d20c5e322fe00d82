//! `trellis-discovery serve`: parses the CLI, installs tracing and runs the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use trellis_discovery::{Credentials, HealthConfig, RateLimit, ServerConfig};

#[derive(Parser)]
#[command(name = "trellis-discovery", version, about = "Trellis control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Cloud Map API, the watch API, DNS and health checks.
    Serve(Box<Serve>),
    /// Copy the registry between stores (into an empty one): embedded → etcd, or back for backups.
    Migrate(Migrate),
}

#[derive(Parser)]
struct Migrate {
    /// `embedded:DIR` or `etcd:URL[,URL...]`.
    #[arg(long)]
    from: trellis_discovery::StoreSpec,
    /// `embedded:DIR` or `etcd:URL[,URL...]` (must be empty).
    #[arg(long)]
    to: trellis_discovery::StoreSpec,
    /// Key prefix of the registry in etcd.
    #[arg(long, default_value = "/trellis/", env = "TRELLIS_ETCD_PREFIX")]
    etcd_prefix: String,
    #[command(flatten)]
    etcd_tls: EtcdTlsArgs,
}

/// TLS to etcd, shared by `serve` and `migrate`.
#[derive(clap::Args)]
struct EtcdTlsArgs {
    /// CA certificate (PEM) of the etcd members, for `https://` endpoints.
    #[arg(long, env = "TRELLIS_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd members that require one (with --etcd-key).
    #[arg(long, env = "TRELLIS_ETCD_CERT", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for --etcd-cert.
    #[arg(long, env = "TRELLIS_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

impl EtcdTlsArgs {
    fn tls(self) -> Option<trellis_discovery::EtcdTls> {
        self.etcd_ca.map(|ca| trellis_discovery::EtcdTls {
            ca,
            client: self.etcd_cert.zip(self.etcd_key),
        })
    }
}

#[derive(Parser)]
struct Serve {
    /// Cloud Map API, watch API, /metrics and CA address.
    #[arg(long, default_value = "127.0.0.1:9400", env = "TRELLIS_API_LISTEN")]
    api_listen: SocketAddr,
    /// Serve the API (Cloud Map, watch, CA, /metrics) over HTTPS, with a certificate from the
    /// built-in CA for the control plane's SPIFFE id; clients verify it with the mesh's
    /// `root.crt` (`<data-dir>/ca/root.crt`).
    #[arg(long, env = "TRELLIS_API_TLS")]
    api_tls: bool,
    /// More DNS names or IP addresses for the API certificate (comma-separated), for clients
    /// that check host names (`aws --ca-bundle`, curl); `localhost`, loopback, the listen
    /// address and the host name are always in it.
    #[arg(
        long,
        env = "TRELLIS_API_TLS_SANS",
        value_delimiter = ',',
        requires = "api_tls"
    )]
    api_tls_san: Vec<String>,
    /// Authoritative DNS address (UDP and TCP).
    #[arg(long, default_value = "127.0.0.1:9053", env = "TRELLIS_DNS_LISTEN")]
    dns_listen: SocketAddr,
    /// State directory (registry store, CA).
    #[arg(long, default_value = "./.trellis", env = "TRELLIS_DATA_DIR")]
    data_dir: PathBuf,
    /// Forward names outside our zones to this resolver (default: answer REFUSED).
    #[arg(long, env = "TRELLIS_DNS_FORWARD")]
    dns_forward: Option<SocketAddr>,
    /// Access key id accepted for SigV4 (required when the API listens off loopback).
    #[arg(long, env = "TRELLIS_ACCESS_KEY_ID")]
    access_key_id: Option<String>,
    /// Secret access key for SigV4.
    #[arg(long, env = "TRELLIS_SECRET_ACCESS_KEY", hide_env_values = true)]
    secret_access_key: Option<String>,
    /// Verify SigV4 even on loopback.
    #[arg(long)]
    require_signature: bool,
    /// Active health check interval.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    health_interval: Duration,
    /// Active health check timeout.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    health_timeout: Duration,
    /// Consecutive successes before an unhealthy instance is healthy again.
    #[arg(long, default_value_t = 1)]
    healthy_threshold: u32,
    /// Concurrent active health checks.
    #[arg(long, default_value_t = 1024)]
    health_concurrency: usize,
    /// Trust domain of the CA created on first start in `<data-dir>/ca`.
    #[arg(long, default_value = "mesh.local", env = "TRELLIS_TRUST_DOMAIN")]
    trust_domain: trellis_core::TrustDomain,
    /// Region used in ARNs.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Account id used in ARNs.
    #[arg(long, default_value = "123456789012")]
    account: String,
    /// Where the registry lives: `embedded` (redb in --data-dir, one node) or `etcd` (replicas).
    #[arg(long, value_enum, default_value = "embedded", env = "TRELLIS_STORE")]
    store: StoreKind,
    /// etcd client URLs, comma-separated (with --store etcd).
    #[arg(
        long,
        env = "TRELLIS_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,
    /// Key prefix of this registry in etcd (with --store etcd).
    #[arg(long, default_value = "/trellis/", env = "TRELLIS_ETCD_PREFIX")]
    etcd_prefix: String,
    /// Lease TTL of this replica in etcd: its health checks move to the others within about this.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, env = "TRELLIS_ETCD_LEASE_TTL")]
    etcd_lease_ttl: Duration,
    #[command(flatten)]
    etcd_tls: EtcdTlsArgs,
    /// AWS API calls per second per client address (burst: twice that); 0 turns the limit off.
    #[arg(long, default_value_t = 200, env = "TRELLIS_API_RATE_LIMIT")]
    api_rate_limit: u32,
    /// DNS responses per second per client subnet (/24, /56), burst twice that; 0 (default): off.
    #[arg(long, default_value_t = 0, env = "TRELLIS_DNS_RATE_LIMIT")]
    dns_rate_limit: u32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StoreKind {
    Embedded,
    Etcd,
}

fn rate(per_second: u32) -> Option<RateLimit> {
    (per_second > 0).then(|| RateLimit {
        per_second: f64::from(per_second),
        burst: per_second.saturating_mul(2),
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let s = match Cli::parse().command {
        Command::Serve(s) => *s,
        Command::Migrate(m) => return migrate(m),
    };
    let credentials = match (s.access_key_id, s.secret_access_key) {
        (Some(access_key_id), Some(secret_access_key)) => Some(Credentials {
            access_key_id,
            secret_access_key,
        }),
        (None, None) => None,
        _ => {
            eprintln!("trellis-discovery: --access-key-id and --secret-access-key go together");
            return ExitCode::from(2);
        }
    };
    let mut config = ServerConfig::new(s.api_listen);
    config.dns_listen = Some(s.dns_listen);
    config.data_dir = Some(s.data_dir);
    config.dns_forward = s.dns_forward;
    config.credentials = credentials;
    config.require_signature = s.require_signature.then_some(true);
    config.health = HealthConfig {
        interval: s.health_interval,
        timeout: s.health_timeout,
        healthy_threshold: s.healthy_threshold.max(1),
        concurrency: s.health_concurrency.max(1),
    };
    config.trust_domain = s.trust_domain;
    config.registry.region = s.region;
    config.registry.account = s.account;
    if let StoreKind::Etcd = s.store {
        let mut etcd = trellis_discovery::EtcdConfig::new(s.etcd_endpoints, &s.etcd_prefix);
        etcd.lease_ttl = s.etcd_lease_ttl;
        etcd.tls = s.etcd_tls.tls();
        config.etcd = Some(etcd);
    }
    config.api_tls = s.api_tls.then_some(trellis_discovery::ApiTls {
        names: s.api_tls_san,
    });
    config.api_rate_limit = rate(s.api_rate_limit);
    config.dns_rate_limit = rate(s.dns_rate_limit);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trellis-discovery: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let server = trellis_discovery::Server::start(config).await?;
        // One plain line for scripts and tests (ports may be ephemeral).
        println!(
            "trellis-discovery: api {} dns {}",
            server.api_url(),
            server.dns_addr.map(|a| a.to_string()).unwrap_or_default()
        );
        shutdown_signal().await;
        server.shutdown().await;
        Ok::<(), trellis_discovery::ServerError>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-discovery: {e}");
            ExitCode::FAILURE
        }
    }
}

fn migrate(m: Migrate) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trellis-discovery: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tls = m.etcd_tls.tls();
    match runtime.block_on(trellis_discovery::migrate(
        &m.from,
        &m.to,
        &m.etcd_prefix,
        tls.as_ref(),
    )) {
        Ok(n) => {
            println!("trellis-discovery: migrated {n} records");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("trellis-discovery: migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrate_takes_the_same_etcd_tls_options_as_serve() {
        let tls_args = [
            "--etcd-ca",
            "/etc/etcd/ca.pem",
            "--etcd-cert",
            "/etc/etcd/c.pem",
            "--etcd-key",
            "/etc/etcd/k.pem",
        ];
        let args = ["trellis-discovery", "migrate", "--from", "embedded:/d"]
            .into_iter()
            .chain(["--to", "etcd:https://127.0.0.1:2379"])
            .chain(tls_args);
        let Command::Migrate(m) = Cli::try_parse_from(args).unwrap().command else {
            panic!("not migrate");
        };
        let expected = trellis_discovery::EtcdTls {
            ca: "/etc/etcd/ca.pem".into(),
            client: Some(("/etc/etcd/c.pem".into(), "/etc/etcd/k.pem".into())),
        };
        assert_eq!(m.etcd_tls.tls(), Some(expected.clone()));
        let args = ["trellis-discovery", "serve", "--store", "etcd"]
            .into_iter()
            .chain(tls_args);
        let Command::Serve(s) = Cli::try_parse_from(args).unwrap().command else {
            panic!("not serve");
        };
        assert_eq!(s.etcd_tls.tls(), Some(expected));
        // A client certificate needs its key, on migrate as on serve.
        let args = ["trellis-discovery", "migrate", "--from", "embedded:/d"]
            .into_iter()
            .chain(["--to", "etcd:https://127.0.0.1:2379"])
            .chain(["--etcd-ca", "ca.pem", "--etcd-cert", "c.pem"]);
        assert!(Cli::try_parse_from(args).is_err());
    }
}
