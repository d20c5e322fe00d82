//! rustls handshakes between issued identities, over real loopback sockets.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_ca::{
    Credential, EphemeralCa, Identity, RenewFuture, Renewer, TrustBundle, peer_spiffe_id,
};

/// A renewer that always hands out the same credential (to test verification of odd certs).
struct Fixed(
    parking_lot::Mutex<Option<Credential>>,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    Vec<u8>,
);
impl Renewer for Fixed {
    fn renew(&self) -> RenewFuture<'_> {
        let c = self.0.lock().take();
        let chain = self.1.clone();
        let key = self.2.clone();
        Box::pin(async move {
            Ok(c.unwrap_or(Credential {
                chain,
                key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
                roots: None,
            }))
        })
    }
}

async fn fixed_identity(
    m: &trellis_ca::IdentityMaterial,
    bundle: Arc<TrustBundle>,
) -> Arc<Identity> {
    let r = Fixed(
        parking_lot::Mutex::new(None),
        m.issued.chain.clone(),
        m.key_der.clone(),
    );
    Identity::new(Arc::new(r), bundle).await.unwrap()
}

/// Serves one mTLS echo per connection; reports the peer id of each accepted handshake.
async fn server(
    id: Arc<Identity>,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<String, String>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(id.server_config(&[b"h2"]).unwrap()));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(s).await {
                    Ok(mut tls) => {
                        let peer = peer_spiffe_id(tls.get_ref().1)
                            .map(|i| i.to_string())
                            .unwrap_or_default();
                        let _ = tx.send(Ok(peer));
                        let mut b = [0u8; 4];
                        if tls.read_exact(&mut b).await.is_ok() {
                            let _ = tls.write_all(&b).await;
                            let _ = tls.shutdown().await;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn connect(client: &Arc<Identity>, addr: std::net::SocketAddr) -> Result<String, String> {
    let cfg = client
        .client_config(None, &[b"h2"])
        .map_err(|e| e.to_string())?;
    let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tls = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("ignored.invalid").unwrap(), s)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 4];
    tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    assert_eq!(&b, b"ping");
    Ok(peer_spiffe_id(tls.get_ref().1)
        .map(|i| i.to_string())
        .unwrap_or_default())
}

#[tokio::test]
async fn handshake_between_issued_identities_and_failures() {
    let ca = EphemeralCa::new("mesh.local").unwrap();
    let srv = ca.issue_identity("my-app", "api", None).await.unwrap();
    let cli = ca.issue_identity("my-app", "web", None).await.unwrap();
    let (addr, mut rx) = server(srv.clone()).await;

    // Good: both sides see each other's SPIFFE id.
    assert_eq!(
        connect(&cli, addr).await.unwrap(),
        "spiffe://mesh.local/ns/my-app/svc/api"
    );
    assert_eq!(
        rx.recv().await.unwrap().unwrap(),
        "spiffe://mesh.local/ns/my-app/svc/web"
    );

    // Another CA's client cert (same trust domain name, different root): server refuses.
    let other = EphemeralCa::new("mesh.local").unwrap();
    let stranger = fixed_identity(
        &other.issue_material("my-app", "web", None).unwrap(),
        other.trust_bundle().unwrap(),
    )
    .await;
    assert!(connect(&stranger, addr).await.is_err());
    assert!(rx.recv().await.unwrap().is_err());

    // Expired client cert from the right CA: refused.
    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .issue_material_with_validity(
            "my-app",
            "web",
            now - time::Duration::hours(2),
            now - time::Duration::hours(1),
        )
        .unwrap();
    let old = fixed_identity(&expired, ca.trust_bundle().unwrap()).await;
    assert!(connect(&old, addr).await.is_err());
    let err = rx.recv().await.unwrap().unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");

    // Wrong trust domain: a CA for other.local whose root the server even trusts; the SPIFFE
    // check refuses it.
    let foreign = EphemeralCa::new("other.local").unwrap();
    let mut roots = ca.roots();
    roots.extend(foreign.roots());
    srv.trust_bundle().update(roots).unwrap();
    let m = foreign.issue_material("my-app", "web", None).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(trellis_ca::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(ca.trust_bundle().unwrap().server_verifier(None))
        .with_client_auth_cert(m.issued.chain.clone(), m.private_key())
        .unwrap();
    let s = TcpStream::connect(addr).await.unwrap();
    let res = async {
        let mut tls = TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("x.invalid").unwrap(), s)
            .await?;
        tls.write_all(b"ping").await?;
        let mut b = [0u8; 4];
        tls.read_exact(&mut b).await
    }
    .await;
    assert!(res.is_err());
    let err = rx.recv().await.unwrap().unwrap_err();
    assert!(err.contains("trust domain"), "{err}");

    // And the client side refuses a server from another CA.
    let other_srv = other.issue_identity("my-app", "api", None).await.unwrap();
    let (addr2, _rx2) = server(other_srv).await;
    let err = connect(&cli, addr2).await.unwrap_err();
    assert!(err.contains("invalid peer certificate"), "{err}");
}

#[tokio::test]
async fn rotation_under_live_listener_never_fails_a_handshake() {
    let ca = EphemeralCa::new("mesh.local").unwrap();
    // 3 s certificates: renewed every ~2 s by the background task.
    let srv = ca
        .issue_identity("my-app", "api", Some(Duration::from_secs(3)))
        .await
        .unwrap();
    let cli = ca
        .issue_identity("my-app", "web", Some(Duration::from_secs(3)))
        .await
        .unwrap();
    let t1 = srv.spawn_renewal();
    let t2 = cli.spawn_renewal();
    let (addr, _rx) = server(srv.clone()).await;
    let first = srv.leaf();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut n = 0;
    while tokio::time::Instant::now() < deadline {
        connect(&cli, addr).await.unwrap();
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        srv.renewals() >= 1 && cli.renewals() >= 1,
        "renewed: {} {}",
        srv.renewals(),
        cli.renewals()
    );
    assert_ne!(srv.leaf(), first);
    assert!(n > 10);
    t1.abort();
    t2.abort();
}

#[tokio::test]
async fn root_rotation_with_two_root_bundle() {
    // Old CA and new CA share the trust domain; peers trust both roots during the rotation.
    let old = EphemeralCa::new("mesh.local").unwrap();
    let new = EphemeralCa::new("mesh.local").unwrap();
    let srv = old.issue_identity("my-app", "api", None).await.unwrap();
    let cli = new.issue_identity("my-app", "web", None).await.unwrap();
    let (addr, _rx) = server(srv.clone()).await;
    // Before the bundles hold both roots: refused.
    assert!(connect(&cli, addr).await.is_err());
    // Step 1 of the procedure: every workload trusts old + new root.
    let both: Vec<_> = old.roots().into_iter().chain(new.roots()).collect();
    srv.trust_bundle().update(both.clone()).unwrap();
    cli.trust_bundle().update(both).unwrap();
    assert_eq!(
        connect(&cli, addr).await.unwrap(),
        "spiffe://mesh.local/ns/my-app/svc/api"
    );
}

#[tokio::test(start_paused = true)]
async fn failed_renewal_backs_off_exponentially() {
    struct Flaky {
        ca: EphemeralCa,
        calls: std::sync::atomic::AtomicU32,
        times: parking_lot::Mutex<Vec<tokio::time::Instant>>,
    }
    impl Renewer for Flaky {
        fn renew(&self) -> RenewFuture<'_> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.times.lock().push(tokio::time::Instant::now());
                if n == 0 || n >= 4 {
                    Ok(self
                        .ca
                        .issue_material("n", "s", Some(Duration::from_secs(3000)))
                        .unwrap()
                        .credential())
                } else {
                    Err(trellis_ca::CaError::Internal("CA down".into()))
                }
            })
        }
    }
    let ca = EphemeralCa::new("mesh.local").unwrap();
    let bundle = ca.trust_bundle().unwrap();
    let flaky = Arc::new(Flaky {
        ca,
        calls: 0.into(),
        times: Default::default(),
    });
    let id = Identity::new(flaky.clone(), bundle).await.unwrap();
    let start = tokio::time::Instant::now();
    let task = id.spawn_renewal();
    tokio::time::sleep(Duration::from_secs(2100)).await;
    let times = flaky.times.lock().clone();
    assert!(times.len() >= 5, "{}", times.len());
    let first_retry = times[1] - start;
    // Renewal at 2/3 of ~3000 s minus <=10% jitter.
    assert!(
        first_retry >= Duration::from_secs(1690) && first_retry <= Duration::from_secs(2001),
        "{first_retry:?}"
    );
    let gaps: Vec<_> = times
        .windows(2)
        .skip(1)
        .take(3)
        .map(|w| w[1] - w[0])
        .collect();
    assert!(
        gaps[1] >= gaps[0] * 2 - Duration::from_millis(10)
            && gaps[2] >= gaps[1] * 2 - Duration::from_millis(10),
        "{gaps:?}"
    );
    assert_eq!(id.renewals(), 1);
    task.abort();
}

#[tokio::test]
async fn file_renewer_loads_cli_style_files() {
    let ca = EphemeralCa::new("mesh.local").unwrap();
    let m = ca.issue_material("my-app", "api", None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let crt = dir.path().join("api.crt");
    let key = dir.path().join("api.key");
    std::fs::write(&crt, &m.issued.chain_pem).unwrap();
    std::fs::write(&key, &m.key_pem).unwrap();
    let id = Identity::new(
        trellis_ca::FileRenewer::new(&crt, &key),
        ca.trust_bundle().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        id.spiffe_id().to_string(),
        "spiffe://mesh.local/ns/my-app/svc/api"
    );
    // A truncated key file: the error names it.
    std::fs::write(&key, &m.key_pem[..40]).unwrap();
    let err = id.rotate_now().await.unwrap_err().to_string();
    assert!(err.contains("api.key"), "{err}");
}
