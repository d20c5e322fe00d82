//! The certificate of an `https` listener: PEM files read at start, or the built-in CA's
//! rotating [`Identity`] (fetched through the control plane's sign API with a key generated
//! here, renewed before expiry; rustls asks the identity on every handshake, so a renewal reaches
//! new connections without touching open ones).

use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use trellis_ca::Identity;

use super::config::{TlsConfig, TlsSource};

/// ALPN offered by `https` listeners.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A ready acceptor, and the renewal task when the certificate comes from the CA.
pub struct ListenerTls {
    pub acceptor: TlsAcceptor,
    pub renewal: Option<JoinHandle<()>>,
}

/// Builds the listener's TLS from its config; errors say what failed (the caller names the
/// listener).
pub async fn listener_tls(t: &TlsConfig) -> Result<ListenerTls, String> {
    match t.source {
        TlsSource::Files => Ok(ListenerTls {
            acceptor: from_files(t)?,
            renewal: None,
        }),
        TlsSource::Ca => {
            let id = from_ca(t).await?;
            let cfg = server_config()?.with_cert_resolver(Arc::clone(&id) as _);
            Ok(ListenerTls {
                acceptor: acceptor(cfg),
                renewal: Some(id.spawn_renewal()),
            })
        }
    }
}

fn server_config()
-> Result<rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>, String> {
    Ok(
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth(),
    )
}

fn acceptor(mut cfg: ServerConfig) -> TlsAcceptor {
    cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    TlsAcceptor::from(Arc::new(cfg))
}

fn from_files(t: &TlsConfig) -> Result<TlsAcceptor, String> {
    let (Some(cert), Some(key)) = (&t.cert, &t.key) else {
        return Err("tls.cert and tls.key are required".into());
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let cfg = server_config()?
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    Ok(acceptor(cfg))
}

/// A first certificate from the CA, checked to carry every configured DNS name.
async fn from_ca(t: &TlsConfig) -> Result<Arc<Identity>, String> {
    let Some(cp) = &t.control_plane else {
        return Err("tls.control_plane is required".into());
    };
    let scheme = if t.control_plane_tls { "https" } else { "http" };
    let urls: Vec<String> = cp.0.iter().map(|a| format!("{scheme}://{a}")).collect();
    let pinned = match &t.trust_bundle {
        Some(path) => {
            Some(trellis_ca::read_certs(path).map_err(|e| format!("tls.trust_bundle {e}"))?)
        }
        None => None,
    };
    let token = match (&t.token, &t.token_file) {
        (Some(tok), _) => tok.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("tls.token_file {}: {e}", path.display()))?,
        (None, None) => return Err("tls.token or tls.token_file is required".into()),
    };
    let id = Identity::bootstrap_replicas(&urls, &token, t.trust_domain.clone(), t.ttl, pinned)
        .await
        .map_err(|e| format!("certificate from the CA at {}: {e}", urls.join(", ")))?;
    let leaf = id.leaf();
    let cert = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| format!("CA-issued certificate: {e}"))?;
    for name in &t.dns_names {
        let server_name = ServerName::try_from(name.as_str())
            .map_err(|_| format!("tls.dns_names: `{name}` is not a DNS name"))?;
        cert.verify_is_valid_for_subject_name(&server_name)
            .map_err(|_| {
                format!(
                    "tls.dns_names: the CA-issued certificate for {} does not cover `{name}` (the CA names certificates <service>.<namespace> after the token's scope)",
                    id.spiffe_id()
                )
            })?;
    }
    tracing::info!(id = %id.spiffe_id(), not_after = %id.not_after(), "listener certificate issued by the CA");
    Ok(id)
}
