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
    let ca = EphemeralCa::new("trellis.local").unwrap();
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
        headers.contains("x-forwarded-client-cert: By=spiffe://trellis.local/ns/my-app.local/svc/api;URI=spiffe://trellis.local/ns/my-app.local/svc/web"),
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
    let ca = EphemeralCa::new("trellis.local").unwrap();
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
    let ca = EphemeralCa::new("trellis.local").unwrap();
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
