//! `trellis-ca`: the CA's command line. Thin: every command is a call into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use trellis_ca::api::{CaApi, serve};
use trellis_ca::{
    CaDir, DnsSans, Policy, RevokeReason, Scope, Serial, VerifiedCsr, generate_key_and_csr,
};
use trellis_core::{NamespaceName, ServiceName, SpiffeId, TrustDomain};

#[derive(Parser)]
#[command(name = "trellis-ca", version, about = "Trellis private CA")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

fn duration(s: &str) -> Result<Duration, String> {
    trellis_ca::parse_duration(s)
        .ok_or_else(|| format!("bad duration {s:?} (e.g. 3600, 90m, 24h, 7d)"))
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a CA: root + intermediate, or (--external-root) an intermediate CSR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        trust_domain: TrustDomain,
        /// Write intermediate.csr for an external root instead of creating a root.
        #[arg(long)]
        external_root: bool,
        #[arg(long, value_parser = duration, default_value = "24h")]
        default_ttl: Duration,
        #[arg(long, value_parser = duration, default_value = "7d")]
        max_ttl: Duration,
        /// Add the `<service>.<namespace>` DNS SAN to workload certificates.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        dns_sans: bool,
    },
    /// Install the externally signed intermediate (after `init --external-root`).
    InstallIntermediate {
        #[arg(long)]
        dir: PathBuf,
        /// The signed intermediate certificate (PEM).
        cert: PathBuf,
        /// The external root certificate (PEM) it chains to. Without it, CERT must hold the
        /// intermediate followed by the root.
        #[arg(long)]
        root: Option<PathBuf>,
    },
    /// Sign a control-plane replica's intermediate CSR (its `init --external-root`) with this CA's
    /// root: every replica then signs with its own intermediate under the one shared root.
    SignIntermediate {
        /// The CA directory holding the root key.
        #[arg(long)]
        dir: PathBuf,
        /// The replica's `intermediate.csr`.
        csr: PathBuf,
        /// Where to write the intermediate certificate (PEM); refuses to overwrite.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a certificate for a locally generated key: writes PREFIX.crt (chain) and PREFIX.key.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        service: ServiceName,
        #[arg(long)]
        namespace: NamespaceName,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_parser = duration)]
        ttl: Option<Duration>,
        /// Sign this CSR (PEM) instead of generating a key.
        #[arg(long)]
        csr: Option<PathBuf>,
    },
    /// Revoke a certificate by serial (hex) and regenerate the CRL.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        serial: Serial,
        #[arg(long, default_value = "unspecified")]
        reason: RevokeReason,
    },
    /// Regenerate crl.pem and print it.
    Crl {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serve the issuance API (native + AWS Private CA JSON) and /metrics.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7300")]
        listen: String,
        /// Region shown in the CA's ARN.
        #[arg(long, default_value = "us-east-1")]
        region: String,
        /// Serve HTTPS with a certificate this CA issues for the control plane's SPIFFE id (as
        /// `trellis-discovery serve --api-tls`); clients verify it against `<dir>/root.crt`.
        #[arg(long)]
        tls: bool,
        /// More DNS names or IP addresses for that certificate (comma-separated), besides
        /// `localhost`, loopback and the listen address.
        #[arg(long, value_delimiter = ',', requires = "tls")]
        tls_san: Vec<String>,
    },
    /// Manage scoped credentials.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Manage extra trusted roots (root rotation).
    Bundle {
        #[command(subcommand)]
        cmd: BundleCmd,
    },
    /// Print the CA's ARN for the AWS-compatible API.
    Arn {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "us-east-1")]
        region: String,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a credential for one identity (--namespace + --service) or --admin. Prints JSON
    /// with the bearer token and the same credential as an AWS access key pair.
    Create {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, required_unless_present = "admin")]
        namespace: Option<NamespaceName>,
        #[arg(long, required_unless_present = "admin")]
        service: Option<ServiceName>,
        #[arg(long, conflicts_with_all = ["namespace", "service"])]
        admin: bool,
        /// Also write the bearer token alone to this file (mode 0600), e.g. for a sidecar's
        /// `control_plane.token_file`. Refuses to overwrite.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BundleCmd {
    /// Trust an additional root (PEM file).
    Add {
        #[arg(long)]
        dir: PathBuf,
        root: PathBuf,
    },
    /// Stop trusting an extra root (PEM file).
    Remove {
        #[arg(long)]
        dir: PathBuf,
        root: PathBuf,
    },
}

fn read(path: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn run(cli: Cli) -> Result<(), String> {
    let s = |e: trellis_ca::CaError| e.to_string();
    match cli.cmd {
        Cmd::Init {
            dir,
            trust_domain,
            external_root,
            default_ttl,
            max_ttl,
            dns_sans,
        } => {
            let policy = Policy {
                default_ttl,
                max_ttl,
                dns_sans: if dns_sans {
                    DnsSans::ServiceNamespace
                } else {
                    DnsSans::None
                },
            };
            let ca = CaDir::new(&dir);
            if external_root {
                let csr = ca.init_external_root(trust_domain, policy).map_err(s)?;
                println!(
                    "wrote {}: have it signed by your root (CA:true, pathlen 0), then run `trellis-ca install-intermediate --dir {} CERT --root ROOT`",
                    csr.display(),
                    dir.display()
                );
            } else {
                ca.init(trust_domain, policy).map_err(s)?;
                println!("created CA in {}", dir.display());
            }
        }
        Cmd::SignIntermediate { dir, csr, out } => {
            let pem = CaDir::new(&dir)
                .sign_intermediate(&read(&csr)?)
                .map_err(s)?;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&out)
                .and_then(|mut f| std::io::Write::write_all(&mut f, pem.as_bytes()))
                .map_err(|e| format!("{}: {e}", out.display()))?;
            println!(
                "wrote {}: install it with `trellis-ca install-intermediate --dir REPLICA_CA {} --root {}`",
                out.display(),
                out.display(),
                dir.join("root.crt").display()
            );
        }
        Cmd::InstallIntermediate { dir, cert, root } => {
            let cert_pem = read(&cert)?;
            let (inter, root_pem) = match root {
                Some(r) => (cert_pem, read(&r)?),
                None => {
                    let blocks = pem::parse_many(&cert_pem)
                        .map_err(|e| format!("{}: {e}", cert.display()))?;
                    let [i, r] = blocks.as_slice() else {
                        return Err(format!(
                            "{}: expected intermediate + root (or pass --root)",
                            cert.display()
                        ));
                    };
                    (pem::encode(i), pem::encode(r))
                }
            };
            CaDir::new(&dir)
                .install_intermediate(&inter, &root_pem)
                .map_err(s)?;
            println!("installed intermediate in {}", dir.display());
        }
        Cmd::Issue {
            dir,
            service,
            namespace,
            out,
            ttl,
            csr,
        } => {
            let a = CaDir::new(&dir).open().map_err(s)?;
            let id = SpiffeId::new(a.trust_domain().clone(), namespace, service);
            let (key_pem, csr_pem) = match csr {
                Some(p) => (None, read(&p)?),
                None => {
                    let (k, c) = generate_key_and_csr().map_err(s)?;
                    (Some(k.serialize_pem()), c)
                }
            };
            let v = VerifiedCsr::parse(csr_pem.as_bytes()).map_err(s)?;
            let issued = a.issue(&v, &id, ttl, false, "cli").map_err(s)?;
            let with_ext = |ext: &str| {
                let mut p = out.clone().into_os_string();
                p.push(ext);
                PathBuf::from(p)
            };
            let crt = with_ext(".crt");
            std::fs::write(&crt, &issued.chain_pem)
                .map_err(|e| format!("{}: {e}", crt.display()))?;
            if let Some(k) = key_pem {
                write_secret(&with_ext(".key"), k.as_bytes())?;
            }
            println!(
                "{} serial={} not_after={}",
                id, issued.serial, issued.not_after
            );
        }
        Cmd::Revoke {
            dir,
            serial,
            reason,
        } => {
            let a = CaDir::new(&dir).open().map_err(s)?;
            a.revoke(&serial, reason, "cli").map_err(s)?;
            println!("revoked {serial}; CRL regenerated");
        }
        Cmd::Crl { dir } => {
            let a = CaDir::new(&dir).open().map_err(s)?;
            print!("{}", a.crl_pem());
        }
        Cmd::Serve {
            dir,
            listen,
            region,
            tls,
            tls_san,
        } => {
            let ca = CaDir::new(&dir);
            let a = ca.open().map_err(s)?;
            let tokens = ca.tokens().map_err(s)?;
            let api = CaApi::new(a, tokens, &region);
            let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
            // Note: `serve` also re-signs the CRL daily (CaApi::spawn_maintenance).
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .map_err(|e| format!("bind {listen}: {e}"))?;
                let addr = listener.local_addr().map_err(|e| e.to_string())?;
                let acceptor = if tls {
                    Some(tls_acceptor(&api, addr, tls_san).await?)
                } else {
                    None
                };
                let scheme = if tls { "https" } else { "http" };
                println!(
                    "trellis-ca listening on {scheme}://{addr} (CA ARN {})",
                    api.ca_arn()
                );
                serve(listener, acceptor, api, async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await
                .map_err(|e| e.to_string())
            })?;
        }
        Cmd::Token {
            cmd:
                TokenCmd::Create {
                    dir,
                    namespace,
                    service,
                    admin,
                    out,
                },
        } => {
            let tokens = CaDir::new(&dir).tokens().map_err(s)?;
            let scope = match (admin, namespace, service) {
                (true, _, _) => Scope::Admin,
                (false, Some(namespace), Some(service)) => Scope::Workload { namespace, service },
                _ => return Err("give --namespace and --service, or --admin".into()),
            };
            let t = tokens.create(scope).map_err(s)?;
            if let Some(out) = out {
                write_secret(&out, t.bearer().as_bytes())?;
            }
            println!(
                "{}",
                serde_json::json!({
                    "token": t.bearer(),
                    "aws_access_key_id": t.id,
                    "aws_secret_access_key": t.secret,
                })
            );
        }
        Cmd::Bundle { cmd } => match cmd {
            BundleCmd::Add { dir, root } => {
                CaDir::new(&dir).bundle_add(&read(&root)?).map_err(s)?;
                println!("added {} to the trust bundle", root.display());
            }
            BundleCmd::Remove { dir, root } => {
                CaDir::new(&dir).bundle_remove(&read(&root)?).map_err(s)?;
                println!("removed {} from the trust bundle", root.display());
            }
        },
        Cmd::Arn { dir, region } => {
            let ca = CaDir::new(&dir);
            let api = CaApi::new(ca.open().map_err(s)?, ca.tokens().map_err(s)?, &region);
            println!("{}", api.ca_arn());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-ca: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes a new secret file with mode 0600; never overwrites.
fn write_secret(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The API's TLS acceptor: a certificate from this CA for the control plane's SPIFFE id, with
/// `localhost`, loopback, the listen address and `extra` as host names, renewed while the
/// runtime runs (the renewal task ends with the identity or the runtime).
async fn tls_acceptor(
    api: &CaApi,
    listen: std::net::SocketAddr,
    extra: Vec<String>,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    let mut names = trellis_ca::Identity::local_api_names(listen);
    names.extend(extra);
    let identity = trellis_ca::Identity::control_plane(api.authority(), names)
        .await
        .map_err(|e| format!("the API's certificate: {e}"))?;
    identity.spawn_renewal();
    let config = identity
        .public_server_config(&[b"h2", b"http/1.1"])
        .map_err(|e| e.to_string())?;
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}
