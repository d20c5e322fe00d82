//! The native HTTP API over a real socket.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use trellis_ca::api::{CaApi, serve};
use trellis_ca::{CaDir, Identity, Policy, Scope, TrustBundle, generate_key_and_csr, spiffe_id_of};

pub struct Running {
    pub url: String,
    pub api: CaApi,
    pub _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::new(dir.path().join("ca"));
    let a = ca
        .init("mesh.local".parse().unwrap(), Policy::default())
        .unwrap();
    let api = CaApi::new(a, ca.tokens().unwrap(), "us-east-1");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(l, None, api.clone(), async move {
        let _ = rx.await;
    }));
    Running {
        url,
        api,
        _dir: dir,
        stop: Some(tx),
    }
}

pub async fn call(method: &str, url: &str, auth: Option<&str>, body: &str) -> (u16, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut b = http::Request::builder().method(method).uri(url);
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    let resp = client
        .request(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn ws(ns: &str, svc: &str) -> Scope {
    Scope::Workload {
        namespace: ns.parse().unwrap(),
        service: svc.parse().unwrap(),
    }
}

/// A bearer token for the `my-app/api` workload.
fn api_token(ca: &Running) -> String {
    ca.api
        .tokens()
        .create(ws("my-app", "api"))
        .unwrap()
        .bearer()
}

#[tokio::test]
async fn sign_roots_crl_metrics_and_scoped_tokens() {
    let ca = start().await;
    let tok_a = ca.api.tokens().create(ws("my-app", "a")).unwrap().bearer();
    let admin = ca.api.tokens().create(Scope::Admin).unwrap().bearer();
    let (_k, csr) = generate_key_and_csr().unwrap();

    // Good: token A gets A's identity.
    let (st, body) = call(
        "POST",
        &format!("{}/v1/ca/sign", ca.url),
        Some(&format!("Bearer {tok_a}")),
        &csr,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let chain = trellis_ca::parse_certs(&body).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(
        spiffe_id_of(&chain[0]).unwrap().to_string(),
        "spiffe://mesh.local/ns/my-app/svc/a"
    );

    // Token A can never get B's identity.
    let (st, body) = call(
        "POST",
        &format!("{}/v1/ca/sign?service=b", ca.url),
        Some(&format!("Bearer {tok_a}")),
        &csr,
    )
    .await;
    assert_eq!(st, 403, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "forbidden");
    // Missing and bad tokens: 401 with a JSON error.
    for auth in [
        None,
        Some("Bearer nope"),
        Some("Bearer TRL00.0000"),
        Some("Basic abc"),
    ] {
        let (st, body) = call("POST", &format!("{}/v1/ca/sign", ca.url), auth, &csr).await;
        assert_eq!(st, 401, "{auth:?}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "unauthenticated");
    }
    // Bad CSR: 400 JSON.
    let (st, body) = call(
        "POST",
        &format!("{}/v1/ca/sign", ca.url),
        Some(&format!("Bearer {tok_a}")),
        "garbage",
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"],
        "bad_csr"
    );
    // TTL above the max: 400.
    let (st, _) = call(
        "POST",
        &format!("{}/v1/ca/sign?ttl=30d", ca.url),
        Some(&format!("Bearer {tok_a}")),
        &csr,
    )
    .await;
    assert_eq!(st, 400);
    // Admin names the identity.
    let (st, body) = call(
        "POST",
        &format!("{}/v1/ca/sign?namespace=x&service=y&ttl=1h", ca.url),
        Some(&format!("Bearer {admin}")),
        &csr,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let chain = trellis_ca::parse_certs(&body).unwrap();
    let serial = {
        let (_, x) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        hex::encode(x.serial.to_bytes_be())
    };
    // Revoke: only admin.
    let rb = format!("{{\"serial\":\"{serial}\",\"reason\":\"keyCompromise\"}}");
    let (st, _) = call(
        "POST",
        &format!("{}/v1/ca/revoke", ca.url),
        Some(&format!("Bearer {tok_a}")),
        &rb,
    )
    .await;
    assert_eq!(st, 403);
    let (st, body) = call(
        "POST",
        &format!("{}/v1/ca/revoke", ca.url),
        Some(&format!("Bearer {admin}")),
        &rb,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (st, _) = call(
        "POST",
        &format!("{}/v1/ca/revoke", ca.url),
        Some(&format!("Bearer {admin}")),
        &rb,
    )
    .await;
    assert_eq!(st, 409);

    let (st, roots) = call("GET", &format!("{}/v1/ca/roots", ca.url), None, "").await;
    assert_eq!(st, 200);
    assert_eq!(trellis_ca::parse_certs(&roots).unwrap().len(), 1);
    let (st, crl) = call("GET", &format!("{}/v1/ca/crl", ca.url), None, "").await;
    assert_eq!(st, 200);
    let crl_der = pem::parse(&crl).unwrap().into_contents();
    let (_, crl) = x509_parser::parse_x509_crl(&crl_der).unwrap();
    assert_eq!(crl.iter_revoked_certificates().count(), 1);

    let (st, m) = call("GET", &format!("{}/metrics", ca.url), None, "").await;
    assert_eq!(st, 200);
    assert!(m.contains("trellis_ca_certificates_issued_total 2"), "{m}");
    assert!(
        m.contains("trellis_ca_issue_errors_total{reason=\"forbidden\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("trellis_ca_issue_errors_total{reason=\"unauthenticated\"} 4"),
        "{m}"
    );
    assert!(
        m.contains("trellis_ca_issue_errors_total{reason=\"bad_csr\"}")
            || m.contains("reason=\"malformed_csr\""),
        "{m}"
    );
    assert!(
        m.contains("trellis_ca_issue_duration_seconds_bucket"),
        "{m}"
    );
    assert!(
        m.contains("trellis_ca_cert_expiry_seconds{cert=\"root\"}"),
        "{m}"
    );
    assert!(
        m.contains("trellis_ca_cert_expiry_seconds{cert=\"intermediate\"}"),
        "{m}"
    );

    let (st, _) = call("GET", &format!("{}/v1/ca/nothing", ca.url), None, "").await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn identity_bootstraps_over_http_and_renews() {
    let ca = start().await;
    let tok = api_token(&ca);
    let id = Identity::bootstrap(
        &ca.url,
        &tok,
        "mesh.local".parse().unwrap(),
        Some(Duration::from_secs(3600)),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        id.spiffe_id().to_string(),
        "spiffe://mesh.local/ns/my-app/svc/api"
    );
    let first = id.leaf();
    id.rotate_now().await.unwrap();
    assert_ne!(id.leaf(), first);
    // A bad token fails to bootstrap.
    assert!(
        Identity::bootstrap(
            &ca.url,
            "TRL00.00",
            "mesh.local".parse().unwrap(),
            None,
            None
        )
        .await
        .is_err()
    );
    let _: Arc<TrustBundle> = id.trust_bundle().clone();
}

/// A control plane of several replicas: the identity bootstraps and renews from whichever answers
/// (a dead replica and one answering 503 are skipped), sticks to it, and moves on when it goes;
/// a refused token is every replica's answer and is not retried around.
#[tokio::test]
async fn identity_fails_over_between_ca_replicas() {
    let ca = start().await;
    let tok = api_token(&ca);
    // A replica that is down, and one that answers 503 to everything.
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let unavailable = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let unavailable_url = format!("http://{}", unavailable.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = unavailable.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    // A second real replica serving the same CA.
    let second = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second_url = format!("http://{}", second.local_addr().unwrap());
    let (stop_second, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(second, None, ca.api.clone(), async move {
        let _ = stopped.await;
    }));

    let id = Identity::bootstrap_replicas(
        &[&dead, &unavailable_url, &second_url, &ca.url],
        &tok,
        "mesh.local".parse().unwrap(),
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        id.spiffe_id().to_string(),
        "spiffe://mesh.local/ns/my-app/svc/api"
    );
    // The replica that answered goes away: the renewal comes from the next one.
    let _ = stop_second.send(());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = id.leaf();
    id.rotate_now().await.unwrap();
    assert_ne!(id.leaf(), before);
    assert_eq!(id.renewals(), 1);

    // A refused token is returned as it is, not as "no replica answered".
    let Err(err) = Identity::bootstrap_replicas(
        &[&ca.url, &dead],
        "TRL00.00",
        "mesh.local".parse().unwrap(),
        None,
        None,
    )
    .await
    else {
        panic!("a bad token is refused");
    };
    let err = err.to_string();
    assert!(err.contains("401") || err.contains("403"), "{err}");
    assert!(!err.contains("no CA replica answered"), "{err}");
    // Every replica down: the error names each one.
    let Err(err) = Identity::bootstrap_replicas(
        &[&dead, &unavailable_url],
        &tok,
        "mesh.local".parse().unwrap(),
        None,
        None,
    )
    .await
    else {
        panic!("no replica answers");
    };
    let err = err.to_string();
    assert!(err.contains("no CA replica answered"), "{err}");
    assert!(err.contains(&dead) && err.contains("503"), "{err}");
}

/// With configured trust anchors the identity trusts only them, ignores the roots the CA serves,
/// and refuses a CA whose certificates do not chain to them (a CA impersonated on the network).
#[tokio::test]
async fn pinned_trust_anchors_refuse_an_impostor_ca() {
    let ca = start().await;
    let tok = api_token(&ca);
    let real_roots = ca.api.authority().roots().to_vec();
    let id = Identity::bootstrap(
        &ca.url,
        &tok,
        "mesh.local".parse().unwrap(),
        None,
        Some(real_roots.clone()),
    )
    .await
    .unwrap();
    assert_eq!(*id.trust_bundle().roots(), real_roots);
    // The CA starts serving an extra root: a pinned identity does not pick it up.
    let other = trellis_ca::EphemeralCa::new("mesh.local").unwrap();
    let dir = CaDir::new(ca.api.authority().dir().unwrap());
    dir.bundle_add(&other.roots_pem()).unwrap();
    assert_eq!(ca.api.reload_trust_bundle().unwrap(), 2);
    id.rotate_now().await.unwrap();
    assert_eq!(*id.trust_bundle().roots(), real_roots);
    // Pinned to another root, the real CA's certificates are refused with a clear error.
    let Err(err) = Identity::bootstrap(
        &ca.url,
        &tok,
        "mesh.local".parse().unwrap(),
        None,
        Some(trellis_ca::parse_certs(&other.roots_pem()).unwrap()),
    )
    .await
    else {
        panic!("an impostor CA is refused");
    };
    let err = err.to_string();
    assert!(err.contains("does not chain to the trusted roots"), "{err}");
    // An empty pinned bundle is a configuration error, not "trust nothing" at runtime.
    assert!(
        Identity::bootstrap(
            &ca.url,
            &tok,
            "mesh.local".parse().unwrap(),
            None,
            Some(vec![])
        )
        .await
        .is_err()
    );
}

#[tokio::test]
async fn bundle_add_is_served_without_restart() {
    let ca = start().await;
    let other = trellis_ca::EphemeralCa::new("mesh.local").unwrap();
    let dir = CaDir::new(ca.api.authority().dir().unwrap());
    dir.bundle_add(&other.roots_pem()).unwrap();
    assert_eq!(ca.api.reload_trust_bundle().unwrap(), 2);
    let (st, roots) = call("GET", &format!("{}/v1/ca/roots", ca.url), None, "").await;
    assert_eq!(st, 200);
    assert_eq!(trellis_ca::parse_certs(&roots).unwrap().len(), 2);
    // A renewing identity picks the new bundle up at its next renewal.
    let tok = api_token(&ca);
    let id = Identity::bootstrap(&ca.url, &tok, "mesh.local".parse().unwrap(), None, None)
        .await
        .unwrap();
    assert_eq!(id.trust_bundle().roots().len(), 2);
    dir.bundle_remove(&other.roots_pem()).unwrap();
    assert_eq!(ca.api.reload_trust_bundle().unwrap(), 1);
    id.rotate_now().await.unwrap();
    assert_eq!(id.trust_bundle().roots().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_http_issuances_unique_and_durable() {
    let ca = start().await;
    let tok = format!("Bearer {}", api_token(&ca));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let url = format!("{}/v1/ca/sign", ca.url);
            let tok = tok.clone();
            tokio::spawn(async move {
                let (_k, csr) = generate_key_and_csr().unwrap();
                let (st, body) = call("POST", &url, Some(&tok), &csr).await;
                assert_eq!(st, 200, "{body}");
                let chain = trellis_ca::parse_certs(&body).unwrap();
                let (_, x) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
                x.serial.to_bytes_be()
            })
        })
        .collect();
    let mut serials = std::collections::HashSet::new();
    for t in tasks {
        serials.insert(t.await.unwrap());
    }
    assert_eq!(serials.len(), 100);
    // Durable before returned: a fresh load of the directory sees all 100 (+ audit lines).
    let dir = CaDir::new(ca.api.authority().dir().unwrap());
    assert_eq!(dir.open().unwrap().issued_count(), 100);
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(audit.lines().count(), 100);
}
