//! Two sidecars with mTLS from an in-process CA: identity required, intentions enforced, the
//! verified peer identity reaches the app, TCP over mTLS, and certificate rotation under load.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use trellis_ca::{EphemeralCa, Identity};
use trellis_proxy::{Config, Running, StartOptions};

async fn start(toml: &str, identity: Arc<Identity>) -> (Running, CancellationToken) {
    let config = Config::from_toml(toml).unwrap();
    let token = CancellationToken::new();
    let opts = StartOptions {
        identity: Some(identity),
    };
    (
        trellis_proxy::start_with(config, opts, token.clone())
            .await
            .unwrap(),
        token,
    )
}

/// A server-side sidecar for `service`, fronting `app`, allowing only `allow`.
fn server_config(service: &str, app: SocketAddr, protocol: &str, allow: &str) -> String {
    format!(
        "[identity]\nnamespace = \"my-app.local\"\nservice = \"{service}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\nprotocol = \"{protocol}\"\n\n\
         [inbound.intentions]\ndefault = \"deny\"\nrules = [{{ source = \"{allow}\", action = \"allow\" }}]\n"
    )
}

/// A client-side sidecar for `service` whose upstream `target` lives at `at` (another sidecar).
fn client_config(service: &str, target: &str, at: SocketAddr, protocol: &str) -> String {
    format!(
        "[identity]\nnamespace = \"my-app.local\"\nservice = \"{service}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [outbound]\nupstreams = [{{ service = \"{target}\", local_port = 0, protocol = \"{protocol}\" }}]\n\n\
         [[clusters]]\nservice = \"{target}\"\nendpoints = [{{ address = \"{at}\" }}]\n"
    )
}

#[tokio::test]
async fn mtls_between_sidecars_with_intentions() {
    let ca = EphemeralCa::new("mesh.local").unwrap();
    let api_id = ca
        .issue_identity("my-app.local", "api", None)
        .await
        .unwrap();
    let web_id = ca
        .issue_identity("my-app.local", "web", None)
        .await
        .unwrap();
    let batch_id = ca
        .issue_identity("my-app.local", "batch", None)
        .await
        .unwrap();
    let app = app("api-app", None).await;
    let (api, api_stop) = start(&server_config("api", app.addr, "http", "web"), api_id).await;
    let inbound = api.inbound_addr.unwrap();
    let (web, web_stop) = start(
        &client_config("web", "api", inbound, "http"),
        web_id.clone(),
    )
    .await;
    let c = h1_client();
    let web_port = web.upstream_addrs["api"];

    // Allowed: through both sidecars, with the verified caller identity for the app.
    let (s, backend, _) = get(&c, &format!("http://{web_port}/")).await;
    assert_eq!((s, backend.as_str()), (200, "api-app"));
    let headers = String::from_utf8(
        get(&c, &format!("http://{web_port}/headers"))
            .await
            .2
            .to_vec(),
    )
    .unwrap();
    assert!(
        headers.contains("x-forwarded-client-cert: By=spiffe://mesh.local/ns/my-app.local/svc/api;URI=spiffe://mesh.local/ns/my-app.local/svc/web"),
        "{headers}"
    );
    // A large body over the multiplexed mTLS hop.
    let data = vec![7u8; 3 * 1024 * 1024];
    let req = http::Request::post(format!("http://{web_port}/echo"))
        .body(body(data.clone()))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    use http_body_util::BodyExt;
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes().len(),
        data.len()
    );

    // Plaintext to the inbound port is refused, and counted.
    let plain = get_raw(inbound).await;
    assert!(
        !plain.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&plain)
    );
    let metrics = String::from_utf8(
        get(&c, &format!("http://{}/metrics", api.admin_addr))
            .await
            .2
            .to_vec(),
    )
    .unwrap();
    assert!(
        !metrics.contains("trellis_proxy_tls_handshake_failures_total 0"),
        "{metrics}"
    );

    // A valid identity that intentions do not allow: 403, counted.
    let (batch, batch_stop) =
        start(&client_config("batch", "api", inbound, "http"), batch_id).await;
    let (s, _, _) = get(&c, &format!("http://{}/", batch.upstream_addrs["api"])).await;
    assert_eq!(s, 403);
    let metrics = String::from_utf8(
        get(&c, &format!("http://{}/metrics", api.admin_addr))
            .await
            .2
            .to_vec(),
    )
    .unwrap();
    assert!(
        metrics.contains("trellis_proxy_authz_denied_total 1"),
        "{metrics}"
    );

    // The wrong server identity: web expects `api`, but this endpoint is `batch` → refused (503).
    let impostor_id = ca
        .issue_identity("my-app.local", "batch", None)
        .await
        .unwrap();
    let (impostor, imp_stop) = start(
        &server_config("batch", app.addr, "http", "web"),
        impostor_id,
    )
    .await;
    let (web2, web2_stop) = start(
        &client_config("web", "api", impostor.inbound_addr.unwrap(), "http"),
        web_id,
    )
    .await;
    let (s, _, _) = get(&c, &format!("http://{}/", web2.upstream_addrs["api"])).await;
    assert_eq!(s, 503);

    for (r, t) in [
        (web2, web2_stop),
        (impostor, imp_stop),
        (batch, batch_stop),
        (web, web_stop),
        (api, api_stop),
    ] {
        t.cancel();
        r.wait().await;
    }
}

/// Writes a plain HTTP request and returns whatever comes back before the close.
async fn get_raw(addr: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn tcp_over_mtls_relays_large_streams() {
    let ca = EphemeralCa::new("mesh.local").unwrap();
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let db_id = ca.issue_identity("my-app.local", "db", None).await.unwrap();
    let web_id = ca
        .issue_identity("my-app.local", "web", None)
        .await
        .unwrap();
    let (db, db_stop) = start(&server_config("db", echo_addr, "tcp", "web"), db_id).await;
    let (web, web_stop) = start(
        &client_config("web", "db", db.inbound_addr.unwrap(), "tcp"),
        web_id,
    )
    .await;
    let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 241) as u8).collect();
    let (mut r, mut w) = TcpStream::connect(web.upstream_addrs["db"])
        .await
        .unwrap()
        .into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert!(
        back == data,
        "relayed {} of {} bytes",
        back.len(),
        data.len()
    );
    for (r, t) in [(web, web_stop), (db, db_stop)] {
        t.cancel();
        r.wait().await;
    }
}

#[tokio::test]
async fn certificate_rotation_under_load_fails_no_request() {
    let ca = EphemeralCa::new("mesh.local").unwrap();
    let api_id = ca
        .issue_identity("my-app.local", "api", None)
        .await
        .unwrap();
    let web_id = ca
        .issue_identity("my-app.local", "web", None)
        .await
        .unwrap();
    let app = app("api-app", None).await;
    let (api, api_stop) = start(
        &server_config("api", app.addr, "http", "web"),
        api_id.clone(),
    )
    .await;
    let (web, web_stop) = start(
        &client_config("web", "api", api.inbound_addr.unwrap(), "http"),
        web_id.clone(),
    )
    .await;
    let port = web.upstream_addrs["api"];
    let stop_load = CancellationToken::new();
    let mut workers = Vec::new();
    for i in 0..4 {
        let stop = stop_load.clone();
        workers.push(tokio::spawn(async move {
            // Half the workers reuse connections, half open a new one per request (new handshakes).
            let (mut ok, mut failed) = (0u32, 0u32);
            let shared = h1_client();
            while !stop.is_cancelled() {
                let c = if i % 2 == 0 {
                    shared.clone()
                } else {
                    h1_client()
                };
                match c
                    .request(
                        http::Request::get(format!("http://{port}/"))
                            .body(body(""))
                            .unwrap(),
                    )
                    .await
                {
                    Ok(r) if r.status() == 200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        api_id.rotate_now().await.unwrap();
        web_id.rotate_now().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    stop_load.cancel();
    let (mut ok, mut failed) = (0, 0);
    for w in workers {
        let (o, f) = w.await.unwrap();
        ok += o;
        failed += f;
    }
    assert_eq!(failed, 0, "{ok} ok");
    assert!(ok > 20, "{ok}");
    assert_eq!(api_id.renewals(), 5);
    for (r, t) in [(web, web_stop), (api, api_stop)] {
        t.cancel();
        r.wait().await;
    }
}

/// A fake sign API (`POST /v1/ca/sign`, `GET /v1/ca/roots`) over an in-process CA, accepting one
/// bearer token and issuing for one SPIFFE id. Returns its address and how many it signed.
async fn sign_api(
    ca: Arc<EphemeralCa>,
    token: &'static str,
    service: &'static str,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use http_body_util::{BodyExt, Full};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let signed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = signed.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (ca, count) = (ca.clone(), count.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (ca, count) = (ca.clone(), count.clone());
                        async move {
                            let reply = |code: u16, body: String| {
                                let mut r =
                                    http::Response::new(Full::new(bytes::Bytes::from(body)));
                                *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
                                Ok::<_, std::convert::Infallible>(r)
                            };
                            match req.uri().path() {
                                "/v1/ca/roots" => reply(200, ca.roots_pem()),
                                "/v1/ca/sign" => {
                                    let auth = req
                                        .headers()
                                        .get("authorization")
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or("");
                                    if auth != format!("Bearer {token}") {
                                        return reply(401, "{\"message\":\"bad token\"}".into());
                                    }
                                    let csr = req.into_body().collect().await.unwrap().to_bytes();
                                    let id = ca.spiffe_id("my-app.local", service).unwrap();
                                    let csr = trellis_ca::VerifiedCsr::parse(&csr).unwrap();
                                    let issued = ca
                                        .authority()
                                        .issue(&csr, &id, None, true, "test")
                                        .unwrap();
                                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                    reply(200, issued.chain_pem)
                                }
                                _ => reply(404, String::new()),
                            }
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, signed)
}

#[tokio::test]
async fn bootstraps_its_certificate_from_the_sign_api_with_a_token() {
    let ca = Arc::new(EphemeralCa::new("mesh.local").unwrap());
    let (cp, signed) = sign_api(ca.clone(), "join-t0ken", "api").await;
    let app = app("api-app", None).await;
    // The first control-plane replica listed is down: the certificate comes from the next one.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let toml = |token: &str| {
        format!(
            "{}\n[control_plane]\naddresses = [\"{dead}\", \"localhost:{}\"]\ntoken = \"{token}\"\n",
            server_config("api", app.addr, "http", "web"),
            cp.port()
        )
    };
    // A wrong token fails the start with a message about the identity.
    let err = trellis_proxy::start(
        Config::from_toml(&toml("wrong")).unwrap(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("identity"), "{err}");

    // Pinned trust anchors (`control_plane.trust_bundle`): a control plane whose certificates do
    // not chain to them is refused at start, naming the problem.
    let dir = tempfile::tempdir().unwrap();
    let impostor = EphemeralCa::new("mesh.local").unwrap();
    let wrong = dir.path().join("wrong-root.pem");
    std::fs::write(&wrong, impostor.roots_pem()).unwrap();
    let pinned = |path: &std::path::Path| {
        format!(
            "{}trust_bundle = \"{}\"\n",
            toml("join-t0ken"),
            path.display()
        )
    };
    let err = trellis_proxy::start(
        Config::from_toml(&pinned(&wrong)).unwrap(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("does not chain to the trusted roots"),
        "{err}"
    );
    let right = dir.path().join("root.pem");
    std::fs::write(&right, ca.roots_pem()).unwrap();

    let stop = CancellationToken::new();
    let api = trellis_proxy::start(Config::from_toml(&pinned(&right)).unwrap(), stop.clone())
        .await
        .unwrap();
    assert_eq!(signed.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(
        api.identity().unwrap().spiffe_id().service().as_str(),
        "api"
    );
    let c = h1_client();
    assert_eq!(
        get(&c, &format!("http://{}/ready", api.admin_addr)).await.0,
        200
    );
    let config = String::from_utf8(
        get(&c, &format!("http://{}/config", api.admin_addr))
            .await
            .2
            .to_vec(),
    )
    .unwrap();
    assert!(
        !config.contains("join-t0ken") && config.contains("<redacted>"),
        "{config}"
    );
    let metrics = String::from_utf8(
        get(&c, &format!("http://{}/metrics", api.admin_addr))
            .await
            .2
            .to_vec(),
    )
    .unwrap();
    assert!(
        !metrics.contains("trellis_proxy_cert_expiry_timestamp_seconds 0"),
        "{metrics}"
    );

    // A caller with a certificate from the same CA gets through.
    let web_id = ca
        .issue_identity("my-app.local", "web", None)
        .await
        .unwrap();
    let (web, web_stop) = start(
        &client_config("web", "api", api.inbound_addr.unwrap(), "http"),
        web_id,
    )
    .await;
    assert_eq!(
        get(&c, &format!("http://{}/", web.upstream_addrs["api"]))
            .await
            .1,
        "api-app"
    );
    for (r, t) in [(web, web_stop), (api, stop)] {
        t.cancel();
        r.wait().await;
    }
}

/// `openssl` from PATH; a missing tool skips the test, or fails it when CI requires tools.
fn openssl() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("openssl"))
            .find(|f| f.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("TRELLIS_REQUIRE_TOOLS").is_none(),
            "openssl is required (TRELLIS_REQUIRE_TOOLS=1)"
        );
        eprintln!("skipping: openssl not on PATH");
    }
    found
}

/// Runs `openssl s_client` against `addr`, sends one HTTP request, returns stdout+stderr.
fn s_client(
    openssl: &std::path::Path,
    addr: SocketAddr,
    cert: Option<(&std::path::Path, &std::path::Path)>,
    ca: &std::path::Path,
) -> String {
    use std::io::Write;
    let mut cmd = std::process::Command::new(openssl);
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-tls1_3",
        "-ign_eof",
        "-quiet",
        "-alpn",
        "http/1.1",
        "-CAfile",
    ])
    .arg(ca);
    if let Some((c, k)) = cert {
        // -cert sends only the leaf; the intermediate travels with -cert_chain.
        cmd.arg("-cert")
            .arg(c)
            .arg("-cert_chain")
            .arg(c)
            .arg("-key")
            .arg(k);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n");
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn openssl_client_needs_a_certificate() {
    let Some(openssl) = openssl() else { return };
    let ca = EphemeralCa::new("mesh.local").unwrap();
    let api_id = ca
        .issue_identity("my-app.local", "api", None)
        .await
        .unwrap();
    let app = app("api-app", None).await;
    let (api, stop) = start(&server_config("api", app.addr, "http", "web"), api_id).await;
    let inbound = api.inbound_addr.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca.roots_pem()).unwrap();
    let web = ca.issue_material("my-app.local", "web", None).unwrap();
    let (cert, key) = (dir.path().join("web.pem"), dir.path().join("web.key"));
    std::fs::write(&cert, &web.issued.chain_pem).unwrap();
    std::fs::write(&key, &web.key_pem).unwrap();

    let o = openssl.clone();
    let without = tokio::task::spawn_blocking(move || s_client(&o, inbound, None, &ca_pem))
        .await
        .unwrap();
    assert!(!without.contains("HTTP/1.1 200"), "{without}");
    let ca_pem = dir.path().join("ca.pem");
    let with = tokio::task::spawn_blocking(move || {
        s_client(&openssl, inbound, Some((&cert, &key)), &ca_pem)
    })
    .await
    .unwrap();
    assert!(with.contains("HTTP/1.1 200"), "{with}");
    stop.cancel();
    api.wait().await;
}

#[tokio::test]
async fn upgrade_crosses_two_sidecars_over_mtls() {
    let ca = EphemeralCa::new("mesh.local").unwrap();
    let api_id = ca
        .issue_identity("my-app.local", "api", None)
        .await
        .unwrap();
    let web_id = ca
        .issue_identity("my-app.local", "web", None)
        .await
        .unwrap();
    let app = app("api-app", None).await;
    let (api, api_stop) = start(&server_config("api", app.addr, "http", "web"), api_id).await;
    let (web, web_stop) = start(
        &client_config("web", "api", api.inbound_addr.unwrap(), "http"),
        web_id,
    )
    .await;
    let mut s = TcpStream::connect(web.upstream_addrs["api"]).await.unwrap();
    s.write_all(
        b"GET /upgrade HTTP/1.1\r\nhost: api\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s.write_all(b"ping over two hops").await.unwrap();
    let mut echo = [0u8; 18];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping over two hops");
    drop(s);
    for (r, t) in [(web, web_stop), (api, api_stop)] {
        t.cancel();
        r.wait().await;
    }
}
