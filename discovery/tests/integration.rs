//! Integration tests over real sockets: boto3, the aws CLI, dig, raw HTTP watchers, kill -9.
// Test helpers may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_discovery::{EndpointSet, HealthConfig, Server, ServerConfig};

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Finds a tool on PATH; with TRELLIS_REQUIRE_TOOLS=1 a missing tool fails the test.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("TRELLIS_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("required tool {name} not found on PATH");
        }
        eprintln!("skipping: {name} not found on PATH");
    }
    found
}

fn python_with_boto3() -> Option<PathBuf> {
    let py = tool("python3")?;
    let ok = Command::new(&py)
        .args(["-c", "import boto3, pytest"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("TRELLIS_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("python3 on PATH lacks boto3/pytest");
        }
        eprintln!("skipping: python3 lacks boto3/pytest");
        return None;
    }
    Some(py)
}

async fn start(data_dir: Option<&Path>) -> Server {
    let mut cfg = ServerConfig::new(loopback());
    cfg.dns_listen = Some(loopback());
    cfg.data_dir = data_dir.map(Path::to_path_buf);
    cfg.health = HealthConfig {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        healthy_threshold: 1,
        concurrency: 64,
    };
    Server::start(cfg).await.unwrap()
}

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    let status = text[9..12].parse().unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    (status, out[split..].to_vec())
}

async fn api(addr: SocketAddr, action: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let target = format!("Route53AutoNaming_v20170314.{action}");
    let (status, body) = http(
        addr,
        "POST",
        "/",
        &[
            ("x-amz-target", &target),
            ("content-type", "application/x-amz-json-1.1"),
        ],
        body.to_string().as_bytes(),
    )
    .await;
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// Creates a private DNS namespace and a MULTIVALUE A+SRV service; returns (ns id, service id).
async fn setup(addr: SocketAddr, ns: &str, extra: serde_json::Value) -> (String, String) {
    let (s, op) = api(
        addr,
        "CreatePrivateDnsNamespace",
        serde_json::json!({"Name": ns, "Vpc": "vpc-1"}),
    )
    .await;
    assert_eq!(s, 200, "{op}");
    let (_, got) = api(
        addr,
        "GetOperation",
        serde_json::json!({"OperationId": op["OperationId"]}),
    )
    .await;
    let ns_id = got["Operation"]["Targets"]["NAMESPACE"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut req = serde_json::json!({"Name": "api", "NamespaceId": ns_id,
        "DnsConfig": {"RoutingPolicy": "MULTIVALUE", "DnsRecords": [{"Type": "A", "TTL": 7}, {"Type": "SRV", "TTL": 7}]}});
    if let serde_json::Value::Object(m) = extra {
        for (k, v) in m {
            req[k] = v;
        }
    }
    let (s, svc) = api(addr, "CreateService", req).await;
    assert_eq!(s, 200, "{svc}");
    (ns_id, svc["Service"]["Id"].as_str().unwrap().to_owned())
}

async fn register(addr: SocketAddr, svc: &str, id: &str, ip: &str, port: u16) {
    let (s, b) = api(
        addr,
        "RegisterInstance",
        serde_json::json!({"ServiceId": svc, "InstanceId": id,
            "Attributes": {"AWS_INSTANCE_IPV4": ip, "AWS_INSTANCE_PORT": port.to_string()}}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_conformance() {
    let Some(py) = python_with_boto3() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(Some(dir.path())).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/test_cloudmap.py");
    let url = server.api_url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(script)
            .env("TRELLIS_API_URL", url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest failed:\n{text}");
    server.shutdown().await;
}

fn aws(aws: &Path, url: &str, args: &[&str], key: &str, secret: &str) -> std::process::Output {
    Command::new(aws)
        .args([
            "servicediscovery",
            "--endpoint-url",
            url,
            "--region",
            "us-east-1",
            "--output",
            "json",
        ])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", key)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_MAX_ATTEMPTS", "1")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_cli_and_sigv4() {
    let Some(cli) = tool("aws") else { return };
    let mut cfg = ServerConfig::new(loopback());
    cfg.credentials = Some(trellis_discovery::Credentials {
        access_key_id: "AKIDTRELLIS".into(),
        secret_access_key: "s3cret/KEY".into(),
    });
    // As off loopback: signatures are required and verified.
    cfg.require_signature = Some(true);
    let server = Server::start(cfg).await.unwrap();
    let url = server.api_url();
    let out = tokio::task::spawn_blocking(move || {
        let ok = aws(
            &cli,
            &url,
            &["create-http-namespace", "--name", "cli-ns"],
            "AKIDTRELLIS",
            "s3cret/KEY",
        );
        let listed = aws(
            &cli,
            &url,
            &["list-namespaces"],
            "AKIDTRELLIS",
            "s3cret/KEY",
        );
        let bad_secret = aws(&cli, &url, &["list-namespaces"], "AKIDTRELLIS", "wrong");
        let bad_key = aws(&cli, &url, &["list-namespaces"], "AKIDOTHER", "s3cret/KEY");
        (ok, listed, bad_secret, bad_key)
    })
    .await
    .unwrap();
    let (ok, listed, bad_secret, bad_key) = out;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("OperationId"));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("cli-ns"));
    assert!(!bad_secret.status.success());
    assert!(
        String::from_utf8_lossy(&bad_secret.stderr).contains("InvalidSignatureException"),
        "{}",
        String::from_utf8_lossy(&bad_secret.stderr)
    );
    assert!(
        String::from_utf8_lossy(&bad_key.stderr).contains("UnrecognizedClientException"),
        "{}",
        String::from_utf8_lossy(&bad_key.stderr)
    );
    // Unsigned requests are refused too.
    let (s, body) = api(server.api_addr, "ListNamespaces", serde_json::json!({})).await;
    assert_eq!(s, 403);
    assert_eq!(body["__type"], "MissingAuthenticationTokenException");
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_input_gets_invalid_input() {
    let server = start(None).await;
    let addr = server.api_addr;
    let (s, b) = http(
        addr,
        "POST",
        "/",
        &[("x-amz-target", "Route53AutoNaming_v20170314.ListNamespaces")],
        b"{not json",
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&b).unwrap()["__type"],
        "InvalidInput"
    );
    let (s, b) = api(addr, "CreateHttpNamespace", serde_json::json!({"Name": 42})).await;
    assert_eq!((s, b["__type"].as_str()), (400, Some("InvalidInput")));
    let (s, b) = api(
        addr,
        "CreateHttpNamespace",
        serde_json::json!({"Name": "x".repeat(2000)}),
    )
    .await;
    assert_eq!((s, b["__type"].as_str()), (400, Some("InvalidInput")));
    let (s, b) = api(addr, "Frobnicate", serde_json::json!({})).await;
    assert_eq!(
        (s, b["__type"].as_str()),
        (400, Some("UnknownOperationException"))
    );
    let big = vec![b' '; trellis_discovery::MAX_BODY + 1];
    let (s, _) = http(
        addr,
        "POST",
        "/",
        &[("x-amz-target", "Route53AutoNaming_v20170314.ListNamespaces")],
        &big,
    )
    .await;
    assert_eq!(s, 413);
    let (s, b) = http(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(s, 200);
    let text = String::from_utf8(b).unwrap();
    assert!(text.contains("trellis_discovery_api_requests_total{action=\"CreateHttpNamespace\",code=\"InvalidInput\"} 2"), "{text}");
    server.shutdown().await;
}

async fn watch(addr: SocketAddr, query: &str) -> (u16, Option<EndpointSet>) {
    let (s, b) = http(addr, "GET", &format!("/v1/watch/{query}"), &[], b"").await;
    (s, serde_json::from_slice(&b).ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_long_poll() {
    let server = start(None).await;
    let addr = server.api_addr;
    let (_, svc) = setup(addr, "watch.local", serde_json::json!({})).await;
    register(addr, &svc, "a", "127.0.0.1", 8080).await;
    let (s, set) = watch(addr, "watch.local/api").await;
    assert_eq!(s, 200);
    let set = set.unwrap();
    assert_eq!(set.endpoints.len(), 1);
    assert_eq!(set.endpoints[0].port, 8080);
    assert_eq!(set.endpoints[0].weight, 1);

    // Unchanged revision: held until the wait passes, then the same set.
    let t = Instant::now();
    let (_, again) = watch(
        addr,
        &format!("watch.local/api?revision={}&wait=300ms", set.revision),
    )
    .await;
    assert!(t.elapsed() >= Duration::from_millis(250));
    assert_eq!(again.unwrap().revision, set.revision);

    // A registration wakes a held watcher at once.
    let rev = set.revision;
    let waiter = tokio::spawn(async move {
        let (_, s) = watch(addr, &format!("watch.local/api?revision={rev}&wait=20s")).await;
        (s.unwrap(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, _) = api(
        addr,
        "RegisterInstance",
        serde_json::json!({"ServiceId": svc, "InstanceId": "b",
            "Attributes": {"AWS_INSTANCE_IPV4": "127.0.0.2", "AWS_INSTANCE_PORT": "9090", "TRELLIS_WEIGHT": "5"}}),
    )
    .await;
    let acked = Instant::now();
    assert_eq!(s, 200);
    let (set2, woke) = waiter.await.unwrap();
    assert!(set2.revision > rev);
    assert_eq!(set2.endpoints.len(), 2);
    assert_eq!(
        set2.endpoints
            .iter()
            .find(|e| e.instance_id == "b")
            .unwrap()
            .weight,
        5
    );
    let lag = woke.saturating_duration_since(acked);
    eprintln!("register -> watcher answered: {lag:?}");
    assert!(
        lag < Duration::from_secs(2),
        "watcher woke {lag:?} after the ack"
    );

    let (s, _) = watch(addr, "watch.local/nope").await;
    assert_eq!(s, 404);
    let (s, b) = http(addr, "GET", "/v1/watch/nope.local/api", &[], b"").await;
    assert_eq!(s, 404);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&b).unwrap()["error"],
        "ServiceNotFound"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_restart_and_corrupt_store_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(Some(dir.path())).await;
    let (_, svc) = setup(server.api_addr, "persist.local", serde_json::json!({})).await;
    register(server.api_addr, &svc, "a", "10.1.1.1", 80).await;
    server.shutdown().await;
    let server = start(Some(dir.path())).await;
    let (s, set) = watch(server.api_addr, "persist.local/api").await;
    assert_eq!(s, 200);
    assert_eq!(set.unwrap().endpoints[0].instance_id, "a");
    server.shutdown().await;
    std::fs::write(
        dir.path().join(trellis_discovery::STORE_FILE),
        vec![0x5a; 4096],
    )
    .unwrap();
    let mut cfg = ServerConfig::new(loopback());
    cfg.data_dir = Some(dir.path().to_path_buf());
    let err = Server::start(cfg)
        .await
        .err()
        .expect("corrupt store must refuse to start");
    assert!(
        err.to_string().contains(trellis_discovery::STORE_FILE),
        "{err}"
    );
}
