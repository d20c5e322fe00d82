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
    let attrs = serde_json::json!({"ServiceId": svc, "Attributes": {"team": "core"}});
    let (s, body) = api(server.api_addr, "UpdateServiceAttributes", attrs).await;
    assert_eq!(s, 200, "{body}");
    server.shutdown().await;
    let server = start(Some(dir.path())).await;
    let (s, set) = watch(server.api_addr, "persist.local/api").await;
    assert_eq!(s, 200);
    assert_eq!(set.unwrap().endpoints[0].instance_id, "a");
    let (s, got) = api(
        server.api_addr,
        "GetServiceAttributes",
        serde_json::json!({"ServiceId": svc}),
    )
    .await;
    assert_eq!(s, 200, "{got}");
    assert_eq!(
        got["ServiceAttributes"]["Attributes"],
        serde_json::json!({"team": "core"})
    );
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

fn dig(dns: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", dns.ip()))
        .args(["-p", &dns.port().to_string(), "+tries=1", "+time=2"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn answers(out: &str) -> Vec<String> {
    let mut in_answer = false;
    let mut v = Vec::new();
    for line in out.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answer = true;
        } else if line.is_empty() || line.starts_with(";;") {
            in_answer = false;
        } else if in_answer {
            v.push(line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_with_dig() {
    if tool("dig").is_none() {
        return;
    }
    let server = start(None).await;
    let (addr, dns) = (server.api_addr, server.dns_addr.unwrap());
    let (_, svc) = setup(
        addr,
        "dns.local",
        serde_json::json!({"HealthCheckCustomConfig": {"FailureThreshold": 1}}),
    )
    .await;
    for i in 1..=10 {
        register(
            addr,
            &svc,
            &format!("i{i}"),
            &format!("10.0.0.{i}"),
            8000 + i,
        )
        .await;
    }
    let acked = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        let a = dig(dns, &["api.dns.local", "A"]);
        let elapsed = acked.elapsed();
        let srv = dig(dns, &["api.dns.local", "SRV"]);
        let soa = dig(dns, &["dns.local", "SOA"]);
        let ns = dig(dns, &["dns.local", "NS"]);
        let nx = dig(dns, &["nope.dns.local", "A"]);
        let nodata = dig(dns, &["api.dns.local", "TXT"]);
        let refused = dig(dns, &["example.com", "A"]);
        let tcp = dig(dns, &["+tcp", "api.dns.local", "A"]);
        let target = dig(dns, &["i3.api.dns.local", "A"]);
        (a, elapsed, srv, soa, ns, nx, nodata, refused, tcp, target)
    })
    .await
    .unwrap();
    let (a, elapsed, srv, soa, ns, nx, nodata, refused, tcp, target) = out;
    eprintln!("register -> dig answered in {elapsed:?}");
    let a_ans = answers(&a);
    assert_eq!(a_ans.len(), 8, "MULTIVALUE answers at most 8:\n{a}");
    assert!(
        a_ans
            .iter()
            .all(|l| l.starts_with("api.dns.local. 7 IN A 10.0.0.")),
        "{a}"
    );
    assert!(a.contains("flags: qr aa"), "authoritative: {a}");
    let srv_ans = answers(&srv);
    assert_eq!(srv_ans.len(), 8, "{srv}");
    assert!(srv_ans[0].contains("IN SRV 1 1 80"), "{srv}");
    assert!(srv.contains(";; ADDITIONAL SECTION"), "{srv}");
    assert!(
        answers(&soa)[0].contains("IN SOA ns1.dns.local. hostmaster.dns.local."),
        "{soa}"
    );
    assert!(answers(&ns)[0].contains("IN NS ns1.dns.local."), "{ns}");
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert!(
        nx.contains(";; AUTHORITY SECTION") && nx.contains("SOA"),
        "{nx}"
    );
    assert!(
        nodata.contains("status: NOERROR") && answers(&nodata).is_empty(),
        "{nodata}"
    );
    assert!(nodata.contains("SOA"), "{nodata}");
    assert!(refused.contains("status: REFUSED"), "{refused}");
    assert_eq!(answers(&tcp).len(), 8, "{tcp}");
    assert_eq!(
        answers(&target),
        vec!["i3.api.dns.local. 7 IN A 10.0.0.3".to_owned()]
    );

    // Unhealthy instances leave the answer; when all are unhealthy, all come back (fail open).
    for i in 1..=10 {
        let status = if i <= 9 { "UNHEALTHY" } else { "HEALTHY" };
        let (s, _) = api(
            addr,
            "UpdateInstanceCustomHealthStatus",
            serde_json::json!({"ServiceId": svc, "InstanceId": format!("i{i}"), "Status": status}),
        )
        .await;
        assert_eq!(s, 200);
    }
    let one = tokio::task::spawn_blocking(move || dig(dns, &["api.dns.local", "A"]))
        .await
        .unwrap();
    assert_eq!(
        answers(&one),
        vec!["api.dns.local. 7 IN A 10.0.0.10".to_owned()],
        "{one}"
    );
    let (s, _) = api(
        addr,
        "UpdateInstanceCustomHealthStatus",
        serde_json::json!({"ServiceId": svc, "InstanceId": "i10", "Status": "UNHEALTHY"}),
    )
    .await;
    assert_eq!(s, 200);
    let all = tokio::task::spawn_blocking(move || dig(dns, &["api.dns.local", "A"]))
        .await
        .unwrap();
    assert_eq!(answers(&all).len(), 8, "fail open: {all}");
    let (_, m) = http(addr, "GET", "/metrics", &[], b"").await;
    let m = String::from_utf8(m).unwrap();
    assert!(m.contains("trellis_discovery_dns_fail_open_total 1"), "{m}");
    assert!(
        m.contains("trellis_discovery_dns_queries_total{qtype=\"A\",rcode=\"NOERROR\"}"),
        "{m}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_truncation_and_weighted() {
    if tool("dig").is_none() {
        return;
    }
    let server = start(None).await;
    let (addr, dns) = (server.api_addr, server.dns_addr.unwrap());
    // AAAA + SRV with long instance ids: 8 SRV answers with additionals overflow 512 bytes.
    let (s, op) = api(
        addr,
        "CreatePrivateDnsNamespace",
        serde_json::json!({"Name": "big.local", "Vpc": "v"}),
    )
    .await;
    assert_eq!(s, 200);
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
    let (_, svc) = api(
        addr,
        "CreateService",
        serde_json::json!({"Name": "api", "NamespaceId": ns_id,
        "DnsConfig": {"RoutingPolicy": "WEIGHTED", "DnsRecords": [{"Type": "A", "TTL": 5}]}}),
    )
    .await;
    let wsvc = svc["Service"]["Id"].as_str().unwrap().to_owned();
    let (_, svc) = api(
        addr,
        "CreateService",
        serde_json::json!({"Name": "srv", "NamespaceId": ns_id,
        "DnsConfig": {"DnsRecords": [{"Type": "SRV", "TTL": 5}, {"Type": "AAAA", "TTL": 5}]}}),
    )
    .await;
    let ssvc = svc["Service"]["Id"].as_str().unwrap().to_owned();
    for i in 0..8 {
        register(addr, &wsvc, &format!("w{i}"), &format!("10.9.0.{i}"), 80).await;
        let (s, b) = api(addr, "RegisterInstance", serde_json::json!({"ServiceId": ssvc,
            "InstanceId": format!("instance-with-a-rather-long-identifier-number-{i:02}"),
            "Attributes": {"AWS_INSTANCE_IPV6": format!("2001:db8::{i}"), "AWS_INSTANCE_PORT": "443"}})).await;
        assert_eq!(s, 200, "{b}");
    }
    let (w, notcp, edns) = tokio::task::spawn_blocking(move || {
        (
            dig(dns, &["api.big.local", "A"]),
            dig(dns, &["+noedns", "+ignore", "srv.big.local", "SRV"]),
            dig(dns, &["+bufsize=4096", "srv.big.local", "SRV"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(answers(&w).len(), 1, "WEIGHTED answers one: {w}");
    assert!(
        notcp.contains(" tc"),
        "512-byte UDP answer truncated: {notcp}"
    );
    assert!(edns.contains("; EDNS: version: 0"), "{edns}");
    assert_eq!(answers(&edns).len(), 8, "{edns}");
    server.shutdown().await;
}

/// A loopback HTTP app whose /health answers 200 or 500 as `up` says.
async fn app(up: std::sync::Arc<std::sync::atomic::AtomicBool>) -> SocketAddr {
    app_with(up, None).await
}

/// [`app`], over TLS when `tls` is given.
async fn app_with(
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> SocketAddr {
    let l = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                return;
            };
            let (up, tls) = (up.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    None => answer_health(s, &up).await,
                    Some(tls) => {
                        if let Ok(s) = tls.accept(s).await {
                            answer_health(s, &up).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Reads a request and answers 200 or 500 as `up` says, then closes.
async fn answer_health<IO>(mut s: IO, up: &std::sync::atomic::AtomicBool)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = [0u8; 1024];
    let _ = s.read(&mut buf).await;
    let status = if up.load(std::sync::atomic::Ordering::SeqCst) {
        "200 OK"
    } else {
        "500 Internal Server Error"
    };
    let _ = s
        .write_all(
            format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
    let _ = s.shutdown().await;
}

/// Polls the watch API until `pred` holds for the full set; returns the time it took.
async fn until(
    addr: SocketAddr,
    q: &str,
    limit: Duration,
    pred: impl Fn(&EndpointSet) -> bool,
) -> Duration {
    let t = Instant::now();
    let mut rev = None;
    loop {
        let path = match rev {
            Some(r) => format!("{q}&revision={r}&wait=1s"),
            None => q.to_owned(),
        };
        let (_, set) = watch(addr, &path).await;
        let set = set.unwrap();
        if pred(&set) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "condition not reached within {limit:?}: {set:?}"
        );
        rev = Some(set.revision);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_http_and_tcp_checks() {
    let server = start(None).await;
    let addr = server.api_addr;
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let app_addr = app(up.clone()).await;
    let (_, svc) = setup(
        addr,
        "hc.local",
        serde_json::json!({
        "HealthCheckConfig": {"Type": "HTTP", "ResourcePath": "/health", "FailureThreshold": 2}}),
    )
    .await;
    register(addr, &svc, "good", "127.0.0.1", app_addr.port()).await;
    // A closed port: bind, read the port back, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    register(addr, &svc, "dead", "127.0.0.1", closed).await;
    let health = |set: &EndpointSet, id: &str| {
        set.endpoints
            .iter()
            .find(|e| e.instance_id == id)
            .map(|e| e.health)
    };
    let q = "hc.local/api?health=all";
    until(addr, q, Duration::from_secs(5), |s| {
        health(s, "good") == Some(trellis_discovery::HealthStatus::Healthy)
            && health(s, "dead") == Some(trellis_discovery::HealthStatus::Unhealthy)
    })
    .await;
    // Serving set: only the healthy one.
    let (_, set) = watch(addr, "hc.local/api").await;
    assert_eq!(
        set.unwrap()
            .endpoints
            .iter()
            .map(|e| e.instance_id.as_str())
            .collect::<Vec<_>>(),
        ["good"]
    );

    // Failing: out within interval (100ms) x threshold (2) + slack for a loaded machine.
    up.store(false, std::sync::atomic::Ordering::SeqCst);
    let took = until(addr, q, Duration::from_secs(5), |s| {
        health(s, "good") == Some(trellis_discovery::HealthStatus::Unhealthy)
    })
    .await;
    eprintln!("failing instance left after {took:?} (bound 200ms + 100ms)");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Both unhealthy: the watch answer fails open with both.
    let (_, set) = watch(addr, "hc.local/api").await;
    assert_eq!(set.unwrap().endpoints.len(), 2);
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    until(addr, q, Duration::from_secs(5), |s| {
        health(s, "good") == Some(trellis_discovery::HealthStatus::Healthy)
    })
    .await;
    let (_, m) = http(addr, "GET", "/metrics", &[], b"").await;
    let m = String::from_utf8(m).unwrap();
    assert!(
        m.contains("trellis_discovery_health_checks_total{result=\"failure\",type=\"HTTP\"}"),
        "{m}"
    );
    assert!(
        m.contains("trellis_discovery_instances{health=\"HEALTHY\"} 1"),
        "{m}"
    );
    server.shutdown().await;
}

/// Per-service settings from tags override the server-wide defaults (here: a 1 h interval and
/// 2xx-3xx, so only the tags can make these checks run and fail in time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_service_health_check_settings_from_tags() {
    let mut cfg = ServerConfig::new(loopback());
    cfg.health = HealthConfig {
        interval: Duration::from_secs(3600),
        timeout: Duration::from_secs(2),
        healthy_threshold: 1,
        concurrency: 8,
    };
    let server = Server::start(cfg).await.unwrap();
    let addr = server.api_addr;
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let app_addr = app(up).await;
    let (_, svc) = setup(
        addr,
        "tags.local",
        serde_json::json!({
            "HealthCheckConfig": {"Type": "HTTP", "ResourcePath": "/health", "FailureThreshold": 1},
            "Tags": [{"Key": "trellis:health-check-interval", "Value": "100ms"},
                     {"Key": "trellis:health-check-matcher", "Value": "204"}]}),
    )
    .await;
    let (_, got) = api(addr, "GetService", serde_json::json!({"Id": svc})).await;
    let arn = got["Service"]["Arn"].as_str().unwrap().to_owned();
    // A bad value is refused with InvalidInput naming the tag.
    for (key, value) in [
        ("trellis:health-check-interval", "1ms"),
        ("trellis:healthy-threshold", "0"),
        ("trellis:health-check-matcher", "2xx"),
    ] {
        let (s, b) = api(
            addr,
            "TagResource",
            serde_json::json!({"ResourceARN": arn, "Tags": [{"Key": key, "Value": value}]}),
        )
        .await;
        assert_eq!(
            (s, b["__type"].as_str()),
            (400, Some("InvalidInput")),
            "{b}"
        );
        assert!(b["Message"].as_str().unwrap().contains(key), "{b}");
    }
    register(addr, &svc, "app", "127.0.0.1", app_addr.port()).await;
    let health = |set: &EndpointSet| set.endpoints.first().map(|e| e.health);
    let q = "tags.local/api?health=all";
    // The app answers 200, which the service's matcher (204) calls a failure.
    until(addr, q, Duration::from_secs(5), |s| {
        health(s) == Some(trellis_discovery::HealthStatus::Unhealthy)
    })
    .await;
    // Retagged live: 2xx matches again; the check restarts with the new settings.
    let (s, b) = api(
        addr,
        "TagResource",
        serde_json::json!({"ResourceARN": arn, "Tags": [
            {"Key": "trellis:health-check-matcher", "Value": "200-299"},
            {"Key": "trellis:healthy-threshold", "Value": "2"}]}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    until(addr, q, Duration::from_secs(10), |s| {
        health(s) == Some(trellis_discovery::HealthStatus::Healthy)
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_heartbeats() {
    let server = start(None).await;
    let addr = server.api_addr;
    let (_, svc) = setup(addr, "ttl.local", serde_json::json!({})).await;
    let (s, b) = api(addr, "RegisterInstance", serde_json::json!({"ServiceId": svc, "InstanceId": "hb",
        "Attributes": {"AWS_INSTANCE_IPV4": "127.0.0.1", "AWS_INSTANCE_PORT": "1", "TRELLIS_HEALTH_TTL": "400ms"}})).await;
    assert_eq!(s, 200, "{b}");
    let (s, _) = http(addr, "POST", "/v1/heartbeat/ttl.local/api/hb", &[], b"").await;
    assert_eq!(s, 204);
    let (_, set) = watch(addr, "ttl.local/api").await;
    assert_eq!(
        set.unwrap().endpoints[0].health,
        trellis_discovery::HealthStatus::Healthy
    );
    // Heartbeats keep it healthy...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (s, _) = http(addr, "POST", "/v1/heartbeat/ttl.local/api/hb", &[], b"").await;
        assert_eq!(s, 204);
    }
    let (_, set) = watch(addr, "ttl.local/api?health=all").await;
    assert_eq!(
        set.unwrap().endpoints[0].health,
        trellis_discovery::HealthStatus::Healthy
    );
    // ...and silence makes it unhealthy.
    let took = until(
        addr,
        "ttl.local/api?health=all",
        Duration::from_secs(5),
        |s| s.endpoints[0].health == trellis_discovery::HealthStatus::Unhealthy,
    )
    .await;
    assert!(took >= Duration::from_millis(300), "{took:?}");
    let (s, _) = http(addr, "POST", "/v1/heartbeat/ttl.local/api/nope", &[], b"").await;
    assert_eq!(s, 404);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_registration_storm_loses_no_acknowledged_write() {
    use trellis_test_support::bins;
    let dir = tempfile::tempdir().unwrap();
    let spawn = |dir: &Path| {
        let (child, line) = bins::spawn_reading_first_line(
            Command::new(env!("CARGO_BIN_EXE_trellis-discovery"))
                .args(["serve", "--api-listen", "127.0.0.1:0"])
                .args(["--dns-listen", "127.0.0.1:0", "--data-dir"])
                .arg(dir)
                .env("RUST_LOG", "warn"),
        )
        .unwrap();
        (child, bins::discovery_api(&line).unwrap())
    };
    let (mut child, addr) = spawn(dir.path());
    let (_, svc) = setup(addr, "storm.local", serde_json::json!({})).await;
    let acked = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (acked, svc) = (acked.clone(), svc.clone());
        clients.push(tokio::spawn(async move {
            for n in 0.. {
                let id = format!("c{c}-{n}");
                let body = serde_json::json!({"ServiceId": svc, "InstanceId": id,
                    "Attributes": {"AWS_INSTANCE_IPV4": "10.0.0.1", "AWS_INSTANCE_PORT": "80"}});
                let target = "Route53AutoNaming_v20170314.RegisterInstance";
                let Ok(mut s) = TcpStream::connect(addr).await else { return };
                let b = body.to_string();
                let req = format!("POST / HTTP/1.1\r\nhost: x\r\nx-amz-target: {target}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{b}", b.len());
                if s.write_all(req.as_bytes()).await.is_err() {
                    return;
                }
                let mut out = Vec::new();
                if s.read_to_end(&mut out).await.is_err() || !out.starts_with(b"HTTP/1.1 200") {
                    return;
                }
                acked.lock().push(id);
            }
        }));
    }
    let t = Instant::now();
    while acked.lock().len() < 200 && t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for c in clients {
        let _ = c.await;
    }
    let acked = acked.lock().clone();
    assert!(acked.len() >= 50, "storm too small: {}", acked.len());
    let (mut child, addr) = spawn(dir.path());
    let (s, set) = watch(addr, "storm.local/api?health=all").await;
    assert_eq!(s, 200);
    let have: std::collections::HashSet<String> = set
        .unwrap()
        .endpoints
        .into_iter()
        .map(|e| e.instance_id)
        .collect();
    let lost: Vec<_> = acked.iter().filter(|id| !have.contains(*id)).collect();
    eprintln!(
        "acknowledged {} registrations before kill -9, recovered {}",
        acked.len(),
        have.len()
    );
    assert!(lost.is_empty(), "lost acknowledged registrations: {lost:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_forwarding_for_foreign_names() {
    if tool("dig").is_none() {
        return;
    }
    // The "upstream resolver" is another trellis, authoritative for upstream.test.
    let upstream = start(None).await;
    let (_, svc) = setup(upstream.api_addr, "upstream.test", serde_json::json!({})).await;
    register(upstream.api_addr, &svc, "u1", "192.0.2.7", 80).await;
    let mut cfg = ServerConfig::new(loopback());
    cfg.dns_listen = Some(loopback());
    cfg.dns_forward = upstream.dns_addr;
    let server = Server::start(cfg).await.unwrap();
    let (_, own) = setup(server.api_addr, "own.local", serde_json::json!({})).await;
    register(server.api_addr, &own, "o1", "192.0.2.9", 80).await;
    let dns = server.dns_addr.unwrap();
    let (fwd, local) = tokio::task::spawn_blocking(move || {
        (
            dig(dns, &["api.upstream.test", "A"]),
            dig(dns, &["api.own.local", "A"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        answers(&fwd),
        vec!["api.upstream.test. 7 IN A 192.0.2.7".to_owned()],
        "{fwd}"
    );
    assert!(
        !fwd.contains(" aa"),
        "forwarded answers are not authoritative: {fwd}"
    );
    assert_eq!(
        answers(&local),
        vec!["api.own.local. 7 IN A 192.0.2.9".to_owned()],
        "{local}"
    );
    server.shutdown().await;
    upstream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_is_mounted_and_initialised_on_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(Some(dir.path())).await;
    let (s, roots) = http(server.api_addr, "GET", "/v1/ca/roots", &[], b"").await;
    assert_eq!(s, 200);
    let roots = String::from_utf8(roots).unwrap();
    assert!(roots.contains("BEGIN CERTIFICATE"), "{roots}");
    // Signing without a credential is refused by the CA, not by the Cloud Map front.
    let (s, _) = http(server.api_addr, "POST", "/v1/ca/sign", &[], b"{}").await;
    assert!(s == 401 || s == 403 || s == 400, "{s}");
    let (_, m) = http(server.api_addr, "GET", "/metrics", &[], b"").await;
    let m = String::from_utf8(m).unwrap();
    assert!(
        m.contains("trellis_discovery_api_requests_total")
            || m.contains("trellis_discovery_instances"),
        "{m}"
    );
    assert!(m.contains("trellis_ca_"), "CA metrics appended: {m}");
    server.shutdown().await;
    // Second start opens the same CA.
    let server = start(Some(dir.path())).await;
    let (_, again) = http(server.api_addr, "GET", "/v1/ca/roots", &[], b"").await;
    assert_eq!(String::from_utf8(again).unwrap(), roots);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_follow_registry_changes_and_ignore_case() {
    if tool("dig").is_none() {
        return;
    }
    let server = start(None).await;
    let (addr, dns) = (server.api_addr, server.dns_addr.unwrap());
    let (_, svc) = setup(addr, "cache.local", serde_json::json!({})).await;
    register(addr, &svc, "a", "10.7.0.1", 80).await;
    let first = tokio::task::spawn_blocking(move || {
        // The same question twice (the second is served from the answer cache), in mixed case.
        (
            dig(dns, &["api.cache.local", "A"]),
            dig(dns, &["API.Cache.LOCAL", "A"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        answers(&first.0),
        vec!["api.cache.local. 7 IN A 10.7.0.1".to_owned()],
        "{}",
        first.0
    );
    assert_eq!(answers(&first.1).len(), 1, "{}", first.1);
    assert!(
        first.1.contains("API.Cache.LOCAL"),
        "question echoed as asked: {}",
        first.1
    );
    register(addr, &svc, "b", "10.7.0.2", 80).await;
    let second = tokio::task::spawn_blocking(move || dig(dns, &["api.cache.local", "A"]))
        .await
        .unwrap();
    assert_eq!(
        answers(&second).len(),
        2,
        "a registration is visible at once: {second}"
    );
    let (s, _) = api(
        addr,
        "DeregisterInstance",
        serde_json::json!({"ServiceId": svc, "InstanceId": "a"}),
    )
    .await;
    assert_eq!(s, 200);
    let third = tokio::task::spawn_blocking(move || dig(dns, &["api.cache.local", "A"]))
        .await
        .unwrap();
    assert_eq!(
        answers(&third),
        vec!["api.cache.local. 7 IN A 10.7.0.2".to_owned()],
        "{third}"
    );
    server.shutdown().await;
}

/// With several runtime workers the server answers UDP on one `SO_REUSEPORT` socket per worker;
/// every client, whichever socket the kernel hashes it to, gets its answer from the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_udp_answers_every_client_across_reuseport_sockets() {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let server = start(None).await;
    let (addr, dns) = (server.api_addr, server.dns_addr.unwrap());
    let (_, svc) = setup(addr, "spread.local", serde_json::json!({})).await;
    register(addr, &svc, "a", "10.8.0.1", 80).await;
    let mut query = Message::new();
    query.set_id(42).set_recursion_desired(false);
    query.add_query(Query::query(
        Name::from_ascii("api.spread.local.").unwrap(),
        RecordType::A,
    ));
    let query = query.to_vec().unwrap();
    for _ in 0..32 {
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(&query, dns).await.unwrap();
        let mut buf = [0u8; 512];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("every client is answered")
            .unwrap();
        assert_eq!(
            from, dns,
            "the answer comes from the port the query went to"
        );
        let reply = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(reply.id(), 42);
        assert_eq!(reply.answers().len(), 1);
    }
}

/// `--api-tls`: the API's certificate verifies against the CA's `root.crt` with openssl and the
/// aws CLI (`--ca-bundle`), carries the control plane's SPIFFE id and the names clients dial;
/// without the bundle the aws CLI refuses the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_api_for_openssl_and_the_aws_cli() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig::new(loopback());
    cfg.data_dir = Some(dir.path().to_owned());
    cfg.api_tls = Some(trellis_discovery::ApiTls {
        names: vec!["cp.example.internal".into()],
    });
    let server = Server::start(cfg).await.unwrap();
    let addr = server.api_addr;
    let url = server.api_url();
    assert_eq!(url, format!("https://{addr}"));
    let root = dir.path().join("ca").join("root.crt");

    if tool("openssl").is_some() {
        let root_s = root.display().to_string();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "openssl s_client -connect {addr} -CAfile {root_s} -verify_return_error </dev/null 2>&1 \
                     | tee /dev/stderr | openssl x509 -noout -ext subjectAltName"
                ))
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let sans = String::from_utf8_lossy(&out.stdout).to_string();
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(log.contains("Verify return code: 0 (ok)"), "{log}");
        for want in [
            "URI:spiffe://mesh.local/ns/trellis-system/svc/control-plane",
            "DNS:localhost",
            "IP Address:127.0.0.1",
            "DNS:cp.example.internal",
        ] {
            assert!(sans.contains(want), "{want} not in {sans}");
        }
    }

    if let Some(cli) = tool("aws") {
        let root_s = root.display().to_string();
        let (ok, listed, unverified) = tokio::task::spawn_blocking(move || {
            let ca = ["--ca-bundle", root_s.as_str()];
            let ok = aws(
                &cli,
                &url,
                &[&ca[..], &["create-http-namespace", "--name", "tls-ns"]].concat(),
                "AKIDTRELLIS",
                "secret",
            );
            let listed = aws(
                &cli,
                &url,
                &[&ca[..], &["list-namespaces"]].concat(),
                "AKIDTRELLIS",
                "secret",
            );
            let unverified = aws(&cli, &url, &["list-namespaces"], "AKIDTRELLIS", "secret");
            (ok, listed, unverified)
        })
        .await
        .unwrap();
        let text = |o: &std::process::Output| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        };
        assert!(ok.status.success(), "{}", text(&ok));
        assert!(text(&listed).contains("tls-ns"), "{}", text(&listed));
        assert!(!unverified.status.success(), "{}", text(&unverified));
        assert!(
            text(&unverified).contains("SSL") || text(&unverified).contains("certificate"),
            "{}",
            text(&unverified)
        );
    }

    // Plain HTTP on the TLS port fails its handshake, and the metrics say so; the API
    // certificate's expiry is exported.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut sink)).await;
    if tool("curl").is_some() {
        let root_s = root.display().to_string();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("curl")
                .args(["-sS", "--cacert", &root_s])
                .arg(format!("https://127.0.0.1:{}/metrics", addr.port()))
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let m = String::from_utf8_lossy(&out.stdout).to_string();
        let value = |name: &str| -> i64 {
            m.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} not in:\n{m}"))
        };
        assert!(value("trellis_discovery_api_tls_handshake_failures_total ") >= 1);
        let expiry = value("trellis_discovery_api_certificate_expiry_timestamp_seconds ");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(expiry > now, "expiry {expiry} not after now {now}");
    }
    server.shutdown().await;
}

/// A loopback HTTPS app (a certificate from a CA the checker does not know) whose /health answers
/// 200 or 500 as `up` says.
async fn https_app(up: std::sync::Arc<std::sync::atomic::AtomicBool>) -> SocketAddr {
    let ca = trellis_ca::EphemeralCa::new("apps.local").unwrap();
    let m = ca.issue_material("apps", "web", None).unwrap();
    let config =
        tokio_rustls::rustls::ServerConfig::builder_with_provider(trellis_ca::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(m.chain().to_vec(), m.private_key())
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    app_with(up, Some(acceptor)).await
}

/// HTTPS checks as Route 53's: a TLS handshake (any certificate) and then a 2xx/3xx answer. A
/// port that accepts TCP but does not speak TLS is unhealthy (a TCP connect alone would pass it),
/// and an HTTPS app answering 500 leaves the healthy set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_https_checks_complete_a_tls_handshake() {
    let server = start(None).await;
    let addr = server.api_addr;
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let tls_app = https_app(up.clone()).await;
    let plain_app = app(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(
        true,
    )))
    .await;
    let (_, svc) = setup(
        addr,
        "tls.local",
        serde_json::json!({
        "HealthCheckConfig": {"Type": "HTTPS", "ResourcePath": "/health", "FailureThreshold": 1}}),
    )
    .await;
    register(addr, &svc, "tls", "127.0.0.1", tls_app.port()).await;
    register(addr, &svc, "plain", "127.0.0.1", plain_app.port()).await;
    let health = |set: &EndpointSet, id: &str| {
        set.endpoints
            .iter()
            .find(|e| e.instance_id == id)
            .map(|e| e.health)
    };
    let q = "tls.local/api?health=all";
    until(addr, q, Duration::from_secs(5), |s| {
        health(s, "tls") == Some(trellis_discovery::HealthStatus::Healthy)
            && health(s, "plain") == Some(trellis_discovery::HealthStatus::Unhealthy)
    })
    .await;
    up.store(false, std::sync::atomic::Ordering::SeqCst);
    until(addr, q, Duration::from_secs(5), |s| {
        health(s, "tls") == Some(trellis_discovery::HealthStatus::Unhealthy)
    })
    .await;
    let (_, m) = http(addr, "GET", "/metrics", &[], b"").await;
    let m = String::from_utf8(m).unwrap();
    assert!(
        m.contains("trellis_discovery_health_checks_total{result=\"success\",type=\"HTTPS\"}"),
        "{m}"
    );
    server.shutdown().await;
}

/// Pushed routes: `trellis:` service attributes travel with the endpoint set and move its revision
/// (watchers hear of them); other attributes do neither. A bad route is refused, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_service_attributes_travel_with_the_endpoint_set() {
    let server = start(None).await;
    let addr = server.api_addr;
    let (_, svc) = setup(addr, "attrs.local", serde_json::json!({})).await;
    register(addr, &svc, "a", "127.0.0.1", 8080).await;
    let (_, set) = watch(addr, "attrs.local/api").await;
    let first = set.unwrap();
    assert!(first.attributes.is_empty());

    let set_attrs = |attrs: serde_json::Value| {
        api(
            addr,
            "UpdateServiceAttributes",
            serde_json::json!({"ServiceId": svc, "Attributes": attrs}),
        )
    };
    let (s, _) = set_attrs(serde_json::json!({"team": "core"})).await;
    assert_eq!(s, 200);
    let (_, same) = watch(
        addr,
        &format!("attrs.local/api?revision={}&wait=200ms", first.revision),
    )
    .await;
    let same = same.unwrap();
    assert_eq!(same.revision, first.revision, "a plain attribute moved it");
    assert!(same.attributes.is_empty());

    let route = r#"{"match":{"prefix":"/v2"},"targets":[{"cluster":"api-v2"}]}"#;
    let (s, _) = set_attrs(serde_json::json!({"trellis:route:v2": route})).await;
    assert_eq!(s, 200);
    let (_, moved) = watch(
        addr,
        &format!("attrs.local/api?revision={}&wait=5s", first.revision),
    )
    .await;
    let moved = moved.unwrap();
    assert!(moved.revision > first.revision);
    assert_eq!(
        moved.attributes,
        [("trellis:route:v2".to_owned(), route.to_owned())].into()
    );

    let (s, body) = set_attrs(serde_json::json!({"trellis:route:x": "{\"targets\": []}"})).await;
    assert_eq!(s, 400);
    assert_eq!(body["__type"], "InvalidInput");
    let msg = body["message"]
        .as_str()
        .or(body["Message"].as_str())
        .unwrap_or_default();
    assert!(msg.contains("trellis:route:x.targets"), "{body}");
    server.shutdown().await;
}
