//! Transparent interception inside a network namespace this test creates (root only; skipped
//! otherwise): iptables `REDIRECT` sends the app's connections to the sidecar's egress listener,
//! which recovers each original destination with `SO_ORIGINAL_DST` and routes by it.
//!
//! The test re-runs itself inside the namespace (`ip netns exec`), so the redirect rules and the
//! addresses it adds never touch the host. Inside: apps on `10.99.0.x` (on `lo`), the real
//! `trellis-proxy sidecar` binary as uid 1337 (excluded from interception, as in a task), and
//! `trellis-proxy init-iptables` rules.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use http::Request;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Marks the run inside the namespace (not `TRELLIS_*`: the sidecar would read it as config).
const INNER: &str = "INTERCEPT_TEST_INSIDE_NETNS";
const SIDECAR_UID: u32 = 1337;
/// Fixed ports are safe here: the namespace is the test's own.
const EGRESS_PORT: u16 = 15080;
const ADMIN_PORT: u16 = 15000;

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Deletes the namespace on drop (also when the test fails).
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn intercepted_connections_route_by_original_destination() {
    if std::env::var_os(INNER).is_some() {
        return tokio::runtime::Runtime::new().unwrap().block_on(inside());
    }
    if !is_root() {
        eprintln!("skipping: network namespaces and iptables need root");
        return;
    }
    for tool in ["ip", "iptables", "setpriv"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            assert!(
                std::env::var_os("TRELLIS_REQUIRE_TOOLS").is_none(),
                "{tool} is required (TRELLIS_REQUIRE_TOOLS=1)"
            );
            eprintln!("skipping: {tool} not found");
            return;
        }
    }
    let ns = Netns(format!("trellis-od-{}", std::process::id()));
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success()
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "intercepted_connections_route_by_original_destination",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(INNER, "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    eprintln!(
        "--- inside the namespace:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the test inside the namespace failed");
}

fn sh(script: &str) {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(out.status.success(), "{script}: {out:?}");
}

/// A sidecar child process, killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn inside() {
    sh("ip link set lo up");
    // The VIPs (.10, .20) are local addresses nothing listens on: only interception answers.
    for i in [1, 2, 3, 4, 10, 20, 50] {
        sh(&format!("ip addr add 10.99.0.{i}/32 dev lo"));
    }

    // 1. The sockopt itself: a REDIRECTed connection reports where it was going; a direct one
    //    reports nothing or its own address.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    sh(&format!(
        "iptables -t nat -A OUTPUT -p tcp -d 10.99.0.50 --dport 1234 -j REDIRECT --to-ports {port}"
    ));
    let _c = TcpStream::connect("10.99.0.50:1234").await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    let orig: SocketAddr = "10.99.0.50:1234".parse().unwrap();
    assert_eq!(trellis_proxy::original_dst(&s), Some(orig));
    let _c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    let direct = trellis_proxy::original_dst(&s);
    assert!(
        direct.is_none() || direct == s.local_addr().ok(),
        "direct: {direct:?}"
    );
    sh("iptables -t nat -F OUTPUT");
    // IPv6 (`IP6T_SO_ORIGINAL_DST`), when the namespace has ip6tables' nat table.
    if Command::new("ip6tables")
        .args(["-t", "nat", "-S"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        sh("ip -6 addr add fd00::50/128 dev lo nodad");
        let l6 = TcpListener::bind("[::1]:0").await.unwrap();
        let port6 = l6.local_addr().unwrap().port();
        sh(&format!(
            "ip6tables -t nat -A OUTPUT -p tcp -d fd00::50 --dport 1234 -j REDIRECT --to-ports {port6}"
        ));
        let _c = TcpStream::connect("[fd00::50]:1234").await.unwrap();
        let (s, _) = l6.accept().await.unwrap();
        let orig6: SocketAddr = "[fd00::50]:1234".parse().unwrap();
        assert_eq!(trellis_proxy::original_dst(&s), Some(orig6));
        sh("ip6tables -t nat -F OUTPUT");
    } else {
        eprintln!("skipping the IPv6 part: no ip6tables nat table");
    }

    // 2. Apps: `api` (v1 and v2 behind routes), a raw TCP echo service, and a host the mesh does
    //    not know.
    let api = app_at("api", None, "10.99.0.1:8081".parse().unwrap()).await;
    let v2 = app_at("v2", None, "10.99.0.4:8082".parse().unwrap()).await;
    let other = app_at("other", None, "10.99.0.3:80".parse().unwrap()).await;
    let echo = TcpListener::bind("10.99.0.2:9000").await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });

    // 3. The sidecar as its own uid, and the interception rules.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[identity]
namespace = "my-app.local"
service = "web"

[admin]
listen = "127.0.0.1:{ADMIN_PORT}"

[outbound]
egress_listen = "127.0.0.1:{EGRESS_PORT}"
unknown_destination = "passthrough"
upstreams = [
  {{ service = "api", danger_plaintext = true, addresses = ["10.99.0.10:80"] }},
  {{ service = "api-v2", danger_plaintext = true }},
  {{ service = "echo", protocol = "tcp", danger_plaintext = true, addresses = ["10.99.0.20"] }},
]

[[outbound.routes]]
upstream = "api"
match = {{ headers = [{{ name = "x-canary", present = true }}] }}
targets = [{{ cluster = "api-v2" }}]

[[clusters]]
service = "api"
endpoints = [{{ address = "{}" }}]
[[clusters]]
service = "api-v2"
endpoints = [{{ address = "{}" }}]
[[clusters]]
service = "echo"
endpoints = [{{ address = "10.99.0.2:9000" }}]
"#,
            api.addr, v2.addr
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let proxy = env!("CARGO_BIN_EXE_trellis-proxy");
    let sidecar = start_sidecar(proxy, &config).await;
    let out = Command::new(proxy)
        .args([
            "init-iptables",
            "--proxy-uid",
            &SIDECAR_UID.to_string(),
            "--egress-port",
            &EGRESS_PORT.to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // 4. By original destination. A configured VIP (nothing listens there) reaches `api`...
    let c = h1_client();
    let (s, backend, _) = get(&c, "http://10.99.0.10/").await;
    assert_eq!((s, backend.as_str()), (200, "api"));
    // ... an endpoint IP (what `api`'s DNS name resolves to) is `api` too, with its routes
    //     applied (so it went through the sidecar, not straight to the app).
    let req = Request::get("http://10.99.0.1:8081/")
        .header("x-canary", "1")
        .body(body(""))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.headers()["x-backend"], "v2");
    // ... the Host header does not matter for intercepted traffic.
    let req = Request::get("http://10.99.0.10/")
        .header("host", "nope.example")
        .body(body(""))
        .unwrap();
    assert_eq!(c.request(req).await.unwrap().headers()["x-backend"], "api");

    // 5. Raw TCP (not HTTP) to a known service is relayed to its cluster.
    let mut t = TcpStream::connect("10.99.0.20:7000").await.unwrap();
    t.write_all(b"\x00\x01raw bytes, not HTTP\r\n")
        .await
        .unwrap();
    let mut back = [0u8; 23];
    tokio::time::timeout(Duration::from_secs(5), t.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"\x00\x01raw bytes, not HTTP\r\n");
    drop(t);

    // 6. An unknown destination passes through unchanged (the sidecar's uid is not redirected).
    let (s, backend, _) = get(&c, "http://10.99.0.3/").await;
    assert_eq!((s, backend.as_str()), (200, "other"));
    assert!(other.hits.load(std::sync::atomic::Ordering::SeqCst) >= 1);

    // 7. The egress listener still routes direct connections by Host.
    let req = Request::get(format!("http://127.0.0.1:{EGRESS_PORT}/"))
        .header("host", "api.my-app.local")
        .body(body(""))
        .unwrap();
    assert_eq!(c.request(req).await.unwrap().headers()["x-backend"], "api");

    // 8. With `unknown_destination = "refuse"` the same connection is closed unanswered.
    drop(sidecar);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"passthrough\"", "\"refuse\"");
    std::fs::write(&config, text).unwrap();
    let _sidecar = start_sidecar(proxy, &config).await;
    let refused = h1_client()
        .request(Request::get("http://10.99.0.3/").body(body("")).unwrap())
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let (s, backend, _) = get(&h1_client(), "http://10.99.0.10/").await;
    assert_eq!(
        (s, backend.as_str()),
        (200, "api"),
        "known services still work"
    );

    // 9. With `unknown_destination = "host"` it is served as HTTP routed by `Host`.
    drop(_sidecar);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"refuse\"", "\"host\"");
    std::fs::write(&config, text).unwrap();
    let _sidecar = start_sidecar(proxy, &config).await;
    let req = Request::get("http://10.99.0.3/")
        .header("host", "api")
        .body(body(""))
        .unwrap();
    let resp = h1_client().request(req).await.unwrap();
    assert_eq!(
        resp.headers()["x-backend"],
        "api",
        "routed by Host, not to `other`"
    );

    let out = Command::new(proxy)
        .args(["init-iptables", "--remove"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// The sidecar binary as [`SIDECAR_UID`], once its egress port accepts.
async fn start_sidecar(proxy: &str, config: &std::path::Path) -> Child {
    let child = Child(
        Command::new("setpriv")
            .args([
                &format!("--reuid={SIDECAR_UID}"),
                &format!("--regid={SIDECAR_UID}"),
                "--clear-groups",
                "--",
                proxy,
                "sidecar",
                "--config",
            ])
            .arg(config)
            .env_remove(INNER)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..100 {
        // The sidecar's own uid is never redirected, and loopback is excluded: a plain probe.
        if TcpStream::connect(("127.0.0.1", EGRESS_PORT)).await.is_ok() {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("sidecar not listening on {EGRESS_PORT}");
}
