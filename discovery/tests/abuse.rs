//! Abuse of the control plane over real sockets: per-client API throttling (raw HTTP and the aws
//! CLI's retries), the SigV4 replay window (botocore's signer with a skewed clock), body limits,
//! and DNS: size limits with TC, no amplification for unknown names, response-rate limiting per
//! subnet and bounded DNS-over-TCP connections (raw UDP/TCP and `dig`).
// Test helpers may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use trellis_discovery::{Credentials, RateLimit, Server, ServerConfig};
use trellis_test_support::memory::rss_kib;
use trellis_test_support::tools;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// One HTTP/1.1 request from `from` (a loopback address) on a fresh connection.
async fn http_from(
    from: IpAddr,
    addr: SocketAddr,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    let mut req = format!(
        "POST / HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head, out[split..].to_vec())
}

async fn call(from: IpAddr, addr: SocketAddr, action: &str, body: &str) -> (u16, String, Vec<u8>) {
    let target = format!("Route53AutoNaming_v20170314.{action}");
    http_from(
        from,
        addr,
        &[
            ("x-amz-target", &target),
            ("content-type", "application/x-amz-json-1.1"),
        ],
        body.as_bytes(),
    )
    .await
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_throttles_per_client_with_aws_throttling_shape() {
    let mut cfg = ServerConfig::new(loopback());
    cfg.api_rate_limit = Some(RateLimit {
        per_second: 2.0,
        burst: 5,
    });
    let server = Server::start(cfg).await.unwrap();
    let a: IpAddr = "127.0.0.1".parse().unwrap();
    let b: IpAddr = "127.0.0.2".parse().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let (s, head, body) = call(a, server.api_addr, "ListNamespaces", "{}").await;
        if s == 400 {
            let v = json(&body);
            assert_eq!(v["__type"], "ThrottlingException", "{v}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("x-amzn-errortype: throttlingexception")
            );
        }
        statuses.push(s);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!((5..=7).contains(&ok), "burst of 5 (+refill): {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 400),
        "{statuses:?}"
    );
    // Another client is still served at once.
    assert_eq!(
        call(b, server.api_addr, "ListNamespaces", "{}").await.0,
        200
    );
    // Health and metrics are never throttled; the metric counts the throttled calls.
    let (_, _, m) = http_from(a, server.api_addr, &[], b"").await;
    drop(m);
    let mut s = TcpStream::connect(server.api_addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(
        text.contains(r#"trellis_discovery_api_requests_total{action="ListNamespaces",code="ThrottlingException"}"#),
        "{text}"
    );
    // After a refill the first client is served again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        call(a, server.api_addr, "ListNamespaces", "{}").await.0,
        200
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_cli_retries_throttled_calls() {
    let Some(cli) = tools::require("aws", "the aws CLI retries throttled calls") else {
        return;
    };
    let mut cfg = ServerConfig::new(loopback());
    // One token, refilled every 4 s: longer than the CLI takes to start, shorter than its retries.
    cfg.api_rate_limit = Some(RateLimit {
        per_second: 0.25,
        burst: 1,
    });
    let server = Server::start(cfg).await.unwrap();
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    // Spend the client's only token: the CLI's first attempt is throttled.
    assert_eq!(
        call(lo, server.api_addr, "ListNamespaces", "{}").await.0,
        200
    );
    let url = server.api_url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(cli)
            .args([
                "servicediscovery",
                "--endpoint-url",
                &url,
                "--region",
                "us-east-1",
            ])
            .args(["list-namespaces", "--debug"])
            .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .env("AWS_RETRY_MODE", "standard")
            .env("AWS_MAX_ATTEMPTS", "10")
            .env_remove("AWS_PROFILE")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("ThrottlingException"),
        "first attempt must be throttled"
    );
    assert!(
        err.contains("Retry needed") || err.contains("retry"),
        "the CLI must retry: {}",
        &err[err.len().saturating_sub(3000)..]
    );
    server.shutdown().await;
}

/// Signs a Cloud Map request with botocore's own signer but a clock `skew_secs` off, and sends it.
fn signed_call(url: &str, skew_secs: i64) -> (u16, serde_json::Value) {
    let script = r#"
import sys, json, datetime, urllib.request, urllib.error
import botocore.auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
url, skew = sys.argv[1], int(sys.argv[2])
now = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=skew)
botocore.auth.get_current_datetime = lambda *a, **k: now.replace(tzinfo=None)
body = b'{}'
req = AWSRequest(method='POST', url=url + '/', data=body, headers={
    'X-Amz-Target': 'Route53AutoNaming_v20170314.ListNamespaces',
    'Content-Type': 'application/x-amz-json-1.1'})
botocore.auth.SigV4Auth(Credentials('AKIDREPLAY', 'replay/SECRET'), 'servicediscovery', 'us-east-1').add_auth(req)
r = urllib.request.Request(url + '/', data=body, headers=dict(req.headers.items()), method='POST')
try:
    resp = urllib.request.urlopen(r)
    print(resp.status); print(resp.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"#;
    let py = tools::require("python3", "botocore signs with a skewed clock").unwrap();
    let out = Command::new(py)
        .args(["-c", script, url, &skew_secs.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let status = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("signer failed: {}", String::from_utf8_lossy(&out.stderr)));
    (
        status,
        serde_json::from_str(lines.next().unwrap_or("null")).unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigv4_signatures_older_than_five_minutes_are_refused() {
    if tools::require("python3", "botocore signs with a skewed clock").is_none() {
        return;
    }
    let mut cfg = ServerConfig::new(loopback());
    cfg.credentials = Some(Credentials {
        access_key_id: "AKIDREPLAY".into(),
        secret_access_key: "replay/SECRET".into(),
    });
    cfg.require_signature = Some(true);
    let server = Server::start(cfg).await.unwrap();
    let url = server.api_url();
    let results = tokio::task::spawn_blocking(move || {
        [0, -240, -360, 420].map(|skew| (skew, signed_call(&url, skew)))
    })
    .await
    .unwrap();
    for (skew, (status, body)) in results {
        if skew.abs() < 300 {
            assert_eq!(status, 200, "skew {skew}: {body}");
        } else {
            assert_eq!(status, 403, "skew {skew}: {body}");
            assert_eq!(body["__type"], "InvalidSignatureException");
            assert!(
                body["Message"]
                    .as_str()
                    .unwrap()
                    .starts_with("Signature expired"),
                "{body}"
            );
        }
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_and_the_server_stays_up() {
    let server = Server::start(ServerConfig::new(loopback())).await.unwrap();
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let before = rss_kib();
    for _ in 0..4 {
        // Declared too large: refused before reading.
        let big = vec![b' '; trellis_discovery::MAX_BODY + 1];
        let (s, _, body) = call(lo, server.api_addr, "ListNamespaces", "").await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
        let target = "Route53AutoNaming_v20170314.ListNamespaces";
        let (s, _, body) = http_from(lo, server.api_addr, &[("x-amz-target", target)], &big).await;
        assert_eq!(s, 413);
        assert_eq!(json(&body)["__type"], "InvalidInput");
        // Chunked, no length: cut off at the limit.
        let mut st = TcpStream::connect(server.api_addr).await.unwrap();
        st.write_all(
            format!(
                "POST / HTTP/1.1\r\nhost: x\r\nx-amz-target: {target}\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let chunk = vec![b' '; 64 * 1024];
        let mut status = String::new();
        for _ in 0..40 {
            let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
            if st.write_all(&frame).await.is_err() {
                break;
            }
        }
        let mut buf = vec![0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), st.read(&mut buf)).await {
            status = String::from_utf8_lossy(&buf[..n]).to_string();
        }
        assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    }
    assert!(rss_kib() < before + 64 * 1024, "memory must stay bounded");
    assert_eq!(
        call(lo, server.api_addr, "ListNamespaces", "{}").await.0,
        200
    );
    server.shutdown().await;
}

// ---- DNS ----

async fn dns_server(cfg: impl FnOnce(&mut ServerConfig)) -> Server {
    let mut c = ServerConfig::new(loopback());
    c.dns_listen = Some(loopback());
    cfg(&mut c);
    let server = Server::start(c).await.unwrap();
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let (_, _, ns) = call(
        lo,
        server.api_addr,
        "CreatePrivateDnsNamespace",
        r#"{"Name":"abuse.local","Vpc":"v"}"#,
    )
    .await;
    assert!(json(&ns)["OperationId"].is_string());
    let (_, _, list) = call(lo, server.api_addr, "ListNamespaces", "{}").await;
    let ns_id = json(&list)["Namespaces"][0]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, _, svc) = call(
        lo,
        server.api_addr,
        "CreateService",
        &format!(
            r#"{{"Name":"many","NamespaceId":"{ns_id}","DnsConfig":{{"RoutingPolicy":"MULTIVALUE","DnsRecords":[{{"Type":"SRV","TTL":60}},{{"Type":"AAAA","TTL":60}}]}}}}"#
        ),
    )
    .await;
    let svc_id = json(&svc)["Service"]["Id"].as_str().unwrap().to_owned();
    for i in 0..40 {
        let body = format!(
            r#"{{"ServiceId":"{svc_id}","InstanceId":"instance-with-a-rather-long-identifier-number-{i:02}","Attributes":{{"AWS_INSTANCE_IPV6":"2001:db8::{}","AWS_INSTANCE_PORT":"443"}}}}"#,
            i + 1
        );
        assert_eq!(
            call(lo, server.api_addr, "RegisterInstance", &body).await.0,
            200
        );
    }
    server
}

fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(0x4242).set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

async fn udp_ask(from: &UdpSocket, dns: SocketAddr, q: &[u8]) -> Option<Vec<u8>> {
    from.send_to(q, dns).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    match tokio::time::timeout(Duration::from_millis(500), from.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_fit_the_query_and_unknown_names_do_not_amplify() {
    let server = dns_server(|_| {}).await;
    let dns = server.dns_addr.unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // 8 SRV answers with long names and their AAAA additionals: over 512 bytes.
    for (edns, limit) in [(None, 512), (Some(1232), 1232), (Some(65_000), 4096)] {
        let q = query("many.abuse.local.", RecordType::SRV, edns);
        let a = udp_ask(&sock, dns, &q).await.unwrap();
        assert!(a.len() <= limit, "{} > {limit}", a.len());
        let m = Message::from_vec(&a).unwrap();
        if limit == 512 {
            assert!(m.truncated(), "a cut answer sets TC");
        }
    }
    // Unknown names: NXDOMAIN in our zone, REFUSED outside; never more than twice the query.
    for name in [
        "x.abuse.local.",
        "nothing-here.abuse.local.",
        "www.example.com.",
        "a.",
    ] {
        for edns in [None, Some(4096)] {
            let q = query(name, RecordType::A, edns);
            let a = udp_ask(&sock, dns, &q).await.unwrap();
            assert!(
                a.len() <= 2 * q.len(),
                "{name}: {} bytes for a {}-byte query",
                a.len(),
                q.len()
            );
            let rcode = Message::from_vec(&a).unwrap().response_code();
            assert!(
                matches!(rcode, ResponseCode::NXDomain | ResponseCode::Refused),
                "{rcode:?}"
            );
        }
    }
    // Over TCP the whole answer comes back (dig +tcp), and dig's NXDOMAIN keeps its SOA.
    if let Some(dig) = tools::require("dig", "dig +tcp reads the whole answer") {
        let port = dns.port().to_string();
        let out = Command::new(&dig)
            .args([
                "@127.0.0.1",
                "-p",
                &port,
                "+tcp",
                "+time=2",
                "+tries=1",
                "many.abuse.local",
                "SRV",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("ANSWER: 8,") && !text.contains(" tc "),
            "{text}"
        );
        let out = Command::new(&dig)
            .args([
                "@127.0.0.1",
                "-p",
                &port,
                "+time=2",
                "+tries=1",
                "nothing-here.abuse.local",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("NXDOMAIN") && text.contains("SOA"), "{text}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_response_rate_limit_per_subnet() {
    let server = dns_server(|c| {
        c.dns_rate_limit = Some(RateLimit {
            per_second: 5.0,
            burst: 5,
        })
    })
    .await;
    let dns = server.dns_addr.unwrap();
    let flood = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let q = query("many.abuse.local.", RecordType::SRV, Some(4096));
    let (mut full, mut slipped, mut silent) = (0, 0, 0);
    for _ in 0..60 {
        match udp_ask(&flood, dns, &q).await {
            Some(a) if Message::from_vec(&a).unwrap().answers().is_empty() => {
                assert!(a.len() <= q.len(), "a slip is never larger than the query");
                assert!(Message::from_vec(&a).unwrap().truncated());
                slipped += 1;
            }
            Some(_) => full += 1,
            None => silent += 1,
        }
    }
    assert!(full <= 5 + 4, "rate-limited: {full} full answers");
    assert!(
        slipped >= 40,
        "over the limit: truncated slips ({slipped}, silent {silent})"
    );
    // Another /24 is not affected.
    let other = UdpSocket::bind("127.0.1.1:0").await.unwrap();
    let a = udp_ask(&other, dns, &q).await.unwrap();
    assert!(!Message::from_vec(&a).unwrap().answers().is_empty());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_over_tcp_connections_are_bounded() {
    let server = dns_server(|c| c.dns_max_tcp_connections = 8).await;
    let dns = server.dns_addr.unwrap();
    let before = rss_kib();
    // Fill every slot with idle connections, then 200 more: those are closed at once.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(dns).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut closed = 0;
    for _ in 0..200 {
        let mut s = TcpStream::connect(dns).await.unwrap();
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) | Ok(Err(_)) =
            tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 200, "connections over the cap are closed");
    assert!(rss_kib() < before + 32 * 1024);
    // UDP is unaffected; once a slot frees, TCP answers again.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert!(
        udp_ask(
            &sock,
            dns,
            &query("many.abuse.local.", RecordType::SRV, None)
        )
        .await
        .is_some()
    );
    drop(idle.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut s = TcpStream::connect(dns).await.unwrap();
    let q = query("many.abuse.local.", RecordType::SRV, None);
    s.write_u16(q.len() as u16).await.unwrap();
    s.write_all(&q).await.unwrap();
    let n = s.read_u16().await.unwrap();
    let mut a = vec![0u8; n.into()];
    s.read_exact(&mut a).await.unwrap();
    assert_eq!(Message::from_vec(&a).unwrap().answers().len(), 8);
    server.shutdown().await;
}
