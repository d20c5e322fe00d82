//! Control-plane benchmarks (run by `bench/discovery/run.sh`, release build):
//!
//! - `latency`: starts the control plane in-process (durable store in a temp dir), registers
//!   instances one by one and measures register-ack → DNS-visible and register-ack → watcher-woken
//!   latency (p50/p99), plus RegisterInstance throughput with durable writes.
//! - `health [instances]`: 10,000 TCP-checked instances (interval 1s) against one loopback
//!   listener: checks done vs scheduled over 10 s (drift) and the process's CPU.
//! - `populate <api-url> <zone> <n>`: creates `<zone>` with services `svc0..svc{n-1}`, one A
//!   instance each (the names dnsperf queries).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use trellis_discovery::{Server, ServerConfig};

async fn post(addr: SocketAddr, action: &str, body: serde_json::Value) -> serde_json::Value {
    let b = body.to_string();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST / HTTP/1.1\r\nhost: x\r\nx-amz-target: Route53AutoNaming_v20170314.{action}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{b}",
        b.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    serde_json::from_slice(&out[split..]).unwrap()
}

async fn create_zone(addr: SocketAddr, zone: &str) -> String {
    let op = post(
        addr,
        "CreatePrivateDnsNamespace",
        serde_json::json!({"Name": zone, "Vpc": "v"}),
    )
    .await;
    let got = post(
        addr,
        "GetOperation",
        serde_json::json!({"OperationId": op["OperationId"]}),
    )
    .await;
    got["Operation"]["Targets"]["NAMESPACE"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn create_service(addr: SocketAddr, ns: &str, name: &str) -> String {
    let s = post(
        addr,
        "CreateService",
        serde_json::json!({"Name": name, "NamespaceId": ns,
        "DnsConfig": {"DnsRecords": [{"Type": "A", "TTL": 60}]}}),
    )
    .await;
    s["Service"]["Id"].as_str().unwrap().to_owned()
}

async fn register(addr: SocketAddr, svc: &str, id: &str, ip: &str) {
    post(
        addr,
        "RegisterInstance",
        serde_json::json!({"ServiceId": svc, "InstanceId": id,
        "Attributes": {"AWS_INSTANCE_IPV4": ip, "AWS_INSTANCE_PORT": "80"}}),
    )
    .await;
}

async fn dns_answers(sock: &UdpSocket, dns: SocketAddr, name: &str) -> usize {
    let mut m = Message::new();
    m.set_id(rand_id())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    sock.send_to(&m.to_vec().unwrap(), dns).await.unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).await.unwrap();
    Message::from_vec(&buf[..n]).unwrap().answers().len()
}

fn rand_id() -> u16 {
    (Instant::now().elapsed().as_nanos() as u16).wrapping_mul(31)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn watch_once(addr: SocketAddr, path: &str) -> u64 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let v: serde_json::Value = serde_json::from_slice(&out[split..]).unwrap();
    v["revision"].as_u64().unwrap()
}

async fn latency(samples: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.dns_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_path_buf());
    // Measuring the server, not its per-client API throttle.
    cfg.api_rate_limit = None;
    let server = Server::start(cfg).await.unwrap();
    let (api, dns) = (server.api_addr, server.dns_addr.unwrap());
    let ns = create_zone(api, "lat.local").await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    // register -> DNS visible: a fresh service each time, polled until it answers.
    let mut dns_lat = Vec::new();
    for i in 0..samples {
        let name = format!("d{i}");
        let svc = create_service(api, &ns, &name).await;
        register(api, &svc, "a", "10.0.0.1").await;
        let acked = Instant::now();
        while dns_answers(&sock, dns, &format!("{name}.lat.local.")).await == 0 {}
        dns_lat.push(acked.elapsed());
    }

    // register -> watcher woken.
    let svc = create_service(api, &ns, "w").await;
    register(api, &svc, "seed", "10.0.0.1").await;
    let mut watch_lat = Vec::new();
    for i in 0..samples {
        let rev = watch_once(api, "/v1/watch/lat.local/w").await;
        let waiter = tokio::spawn(async move {
            watch_once(
                api,
                &format!("/v1/watch/lat.local/w?revision={rev}&wait=10s"),
            )
            .await;
            Instant::now()
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
        register(api, &svc, &format!("i{i}"), "10.0.0.2").await;
        let acked = Instant::now();
        let woke = waiter.await.unwrap();
        watch_lat.push(woke.saturating_duration_since(acked));
    }

    // RegisterInstance throughput, durable writes, 8 concurrent clients.
    let svc = create_service(api, &ns, "t").await;
    let n = 2000;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..8 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..n / 8 {
                register(api, &svc, &format!("c{c}-{k}"), "10.0.0.3").await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rps = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "register->dns   p50 {:?} p99 {:?} (n={samples})",
        pct(&mut dns_lat, 0.5),
        pct(&mut dns_lat, 0.99)
    );
    println!(
        "register->watch p50 {:?} p99 {:?} (n={samples})",
        pct(&mut watch_lat, 0.5),
        pct(&mut watch_lat, 0.99)
    );
    println!(
        "RegisterInstance durable throughput: {rps:.0}/s (8 clients, new connection per request)"
    );
    // One machine-readable line for trellis-bench's control-plane scenario.
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "BENCHJSON {}",
        serde_json::json!({
            "samples": samples,
            "dns_p50_us": us(pct(&mut dns_lat, 0.5)),
            "dns_p99_us": us(pct(&mut dns_lat, 0.99)),
            "watch_p50_us": us(pct(&mut watch_lat, 0.5)),
            "watch_p99_us": us(pct(&mut watch_lat, 0.99)),
            "register_per_s": rps,
        })
    );
    server.shutdown().await;
}

fn cpu_seconds() -> f64 {
    // utime + stime (fields 14 and 15 of /proc/self/stat), in clock ticks of 100 Hz.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

async fn checks_done(api: SocketAddr) -> f64 {
    let mut s = TcpStream::connect(api).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.lines()
        .filter(|l| l.starts_with("trellis_discovery_health_checks_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn health(n: usize) {
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = target.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = target.accept().await {
            drop(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_path_buf());
    // Measuring the server, not its per-client API throttle.
    cfg.api_rate_limit = None;
    cfg.health.interval = Duration::from_secs(1);
    cfg.health.timeout = Duration::from_millis(500);
    cfg.health.concurrency = std::env::var("HEALTH_CONCURRENCY")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(cfg.health.concurrency);
    let concurrency = cfg.health.concurrency;
    let server = Server::start(cfg).await.unwrap();
    let api = server.api_addr;
    let ns = create_zone(api, "hc.local").await;
    let svc = post(
        api,
        "CreateService",
        serde_json::json!({"Name": "hc", "NamespaceId": ns,
        "DnsConfig": {"DnsRecords": [{"Type": "A", "TTL": 60}]},
        "HealthCheckConfig": {"Type": "TCP", "FailureThreshold": 2}}),
    )
    .await;
    let svc = svc["Service"]["Id"].as_str().unwrap().to_owned();
    let mut tasks = Vec::new();
    for c in 0..8 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            for k in (c..n).step_by(8) {
                post(api, "RegisterInstance", serde_json::json!({"ServiceId": svc, "InstanceId": format!("i{k}"),
                    "Attributes": {"AWS_INSTANCE_IPV4": "127.0.0.1", "AWS_INSTANCE_PORT": port.to_string()}})).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (c0, cpu0, t0) = (checks_done(api).await, cpu_seconds(), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (c1, cpu1, el) = (
        checks_done(api).await,
        cpu_seconds(),
        t0.elapsed().as_secs_f64(),
    );
    let expected = n as f64 * el;
    println!(
        "health: {n} instances, interval 1s, concurrency {concurrency}: {:.0} checks/s of {:.0} scheduled (drift {:.1}%), CPU {:.0}% of one core (checker + target listener)",
        (c1 - c0) / el,
        n as f64,
        100.0 * (expected - (c1 - c0)) / expected,
        100.0 * (cpu1 - cpu0) / el
    );
    server.shutdown().await;
}

async fn populate(api: SocketAddr, zone: &str, n: usize) {
    let ns = create_zone(api, zone).await;
    for i in 0..n {
        let svc = create_service(api, &ns, &format!("svc{i}")).await;
        register(
            api,
            &svc,
            "a",
            &format!("10.{}.{}.{}", i / 65536 % 256, i / 256 % 256, i % 256),
        )
        .await;
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("latency") => latency(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200)).await,
        Some("health") => health(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10_000)).await,
        Some("populate") => {
            let api: SocketAddr = args[1].trim_start_matches("http://").parse().unwrap();
            populate(api, &args[2], args[3].parse().unwrap()).await;
        }
        _ => eprintln!(
            "usage: discovery_bench latency [samples] | health [instances] | populate <api> <zone> <n>"
        ),
    }
}
