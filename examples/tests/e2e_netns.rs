//! End to end across network namespaces (needs root; skipped with a message otherwise).
//!
//! Four "hosts" made by the test (`test_support::netns::Lab`): the control plane (`cp`: discovery +
//! CA), two `api` instances (`a1`, `a2`: demo-service + sidecar each) and a `client` host whose `web`
//! sidecar calls `api`. Everything is registered through the Cloud Map API (curl with SigV4, since
//! the API listens off loopback). Checked:
//! - traffic across hosts is mTLS: a plain HTTP client is refused by an `api` sidecar;
//! - `kill -9` of an instance: it leaves DNS and the client's endpoint set within the health
//!   threshold, and the client sees no error meanwhile (retries + ejection);
//! - transparent interception: the app calls `api` by name and by IP (no Host mapping); the sidecar
//!   routes by `SO_ORIGINAL_DST`, over mTLS, balanced over both instances;
//! - the control plane killed and restarted: sidecars keep serving while it is down, and it comes
//!   back with every registration;
//! - cleanup: every namespace is gone afterwards (the lab removes them on drop, also on failure).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trellis_test_support::bins::binary;
use trellis_test_support::netns::{Host, Lab};
use trellis_test_support::tools::{self, is_root};

const NS: &str = "my-app.local";
const TRUST: &str = "mesh.local";
const KEY: &str = "AKIDE2ETEST";
const SECRET: &str = "e2e-secret-key";
const API_PORT: u16 = 9400;
/// Port 53, so the client host's own resolver (glibc) can ask the control plane.
const DNS_PORT: u16 = 53;
const INBOUND_PORT: u16 = 15001;
const UPSTREAM_PORT: u16 = 15101;
const EGRESS_PORT: u16 = 15080;
/// The sidecar's user: its own traffic is excluded from interception.
const SIDECAR_UID: u32 = 1337;

/// Child processes, killed on drop (the lab kills whatever is left in its namespaces too).
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(host: &Host, program: &Path, args: &[&str], log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    host.command(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap()
}

/// Polls `f` every 100 ms until it returns true or `limit` passes.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Captures every frame on `eth0` of `host` for `secs` seconds (an AF_PACKET socket in python3:
/// no tcpdump needed). Returns once the socket is bound; join the thread for the bytes.
fn capture(host: &Host, python: &Path, dir: &Path, secs: f32) -> std::thread::JoinHandle<Vec<u8>> {
    const SNIFF: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
s.bind(("eth0", 0))
s.settimeout(0.1)
buf = bytearray()
open(sys.argv[1] + ".ready", "w").close()
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        buf += s.recv(65535)
    except socket.timeout:
        pass
open(sys.argv[1], "wb").write(buf)
"#;
    let out = dir.join(format!("capture-{}", host.name));
    let mut child = host
        .command(python)
        .args(["-c", SNIFF])
        .arg(&out)
        .arg(secs.to_string())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let ready = out.with_extension("ready");
    assert!(
        wait_until(Duration::from_secs(5), || ready.exists()),
        "capture started"
    );
    std::thread::spawn(move || {
        assert!(child.wait().unwrap().success());
        std::fs::read(out).unwrap()
    })
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// One Cloud Map API call from the control-plane host, signed with SigV4 by curl.
fn cloudmap(cp: &Host, action: &str, body: &serde_json::Value) -> Option<serde_json::Value> {
    let out = cp
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "--aws-sigv4",
            "aws:amz:us-east-1:servicediscovery",
            "--user",
            &format!("{KEY}:{SECRET}"),
            "-H",
            &format!("x-amz-target: Route53AutoNaming_v20170314.{action}"),
            "-H",
            "content-type: application/x-amz-json-1.1",
            "-w",
            "\n%{http_code}",
            "--data",
            &body.to_string(),
            &format!("http://{}:{API_PORT}/", cp.addr),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (json, code) = text.rsplit_once('\n')?;
    if code.trim() != "200" {
        eprintln!(
            "{action}: HTTP {code}: {json} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    serde_json::from_str(json).ok()
}

/// GET through curl inside `host`; returns (status, body) or None when no HTTP answer came.
fn curl(host: &Host, url: &str) -> Option<(u16, String)> {
    let out = host
        .command("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n')?;
    let code: u16 = code.trim().parse().ok()?;
    (code != 0).then(|| (code, body.to_owned()))
}

fn dig(cp: &Host, dig: &Path) -> Vec<String> {
    let out = cp
        .command(dig)
        .args([
            "+short",
            "+time=2",
            "+tries=1",
            &format!("@{}", cp.addr),
            "-p",
            &DNS_PORT.to_string(),
            &format!("api.{NS}"),
            "A",
        ])
        .output()
        .unwrap();
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

/// `credential` is the control-plane credential line: `token = ".."` or `token_file = ".."`.
fn sidecar_toml(cp: &Host, credential: &str, service: &str, inbound: Option<&Host>) -> String {
    let mut t = format!(
        "[identity]\nnamespace = \"{NS}\"\nservice = \"{service}\"\ntrust_domain = \"{TRUST}\"\n\n\
         [control_plane]\naddress = \"{}:{API_PORT}\"\n{credential}\nwatch_wait = \"5s\"\n\n\
         [admin]\nlisten = \"127.0.0.1:15000\"\n\n\
         [resilience]\nmax_retries = 3\nconnect_timeout = \"500ms\"\noutlier_consecutive_5xx = 1\n\n",
        cp.addr
    );
    match inbound {
        Some(h) => t.push_str(&format!(
            "[inbound]\nlisten = \"{}:{INBOUND_PORT}\"\napp = \"127.0.0.1:8080\"\n\
             intentions = {{ default = \"deny\", rules = [{{ source = \"web\", action = \"allow\" }}] }}\n",
            h.addr
        )),
        None => t.push_str(&format!(
            "[outbound]\negress_listen = \"127.0.0.1:{EGRESS_PORT}\"\n\
             upstreams = [{{ service = \"api\", local_port = {UPSTREAM_PORT} }}]\n"
        )),
    }
    t
}

fn token(ca: &Path, dir: &Path, service: &str) -> String {
    let out = Command::new(ca)
        .args(["token", "create", "--dir"])
        .arg(dir)
        .args(["--namespace", NS, "--service", service])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["token"].as_str().unwrap().to_owned()
}

fn start_cp(cp: &Host, bin: &Path, data: &Path, log: &Path) -> Child {
    spawn(
        cp,
        bin,
        &[
            "serve",
            "--api-listen",
            &format!("{}:{API_PORT}", cp.addr),
            "--dns-listen",
            &format!("{}:{DNS_PORT}", cp.addr),
            "--data-dir",
            data.to_str().unwrap(),
            "--access-key-id",
            KEY,
            "--secret-access-key",
            SECRET,
            "--health-interval",
            "500ms",
            "--health-timeout",
            "300ms",
        ],
        log,
    )
}

#[test]
fn mesh_across_network_namespaces() {
    if !is_root() {
        eprintln!("skipping: network namespaces need root");
        return;
    }
    let Some(dig_bin) = tools::require("dig", "DNS checks") else {
        return;
    };
    if tools::require("curl", "HTTP client").is_none() {
        return;
    }
    let discovery = binary("trellis-discovery", "trellis-discovery");
    let ca = binary("trellis-ca", "trellis-ca");
    let proxy = binary("trellis-proxy", "trellis-proxy");
    let demo = binary("trellis-examples", "demo-service");

    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cp");
    let ca_dir = data.join("ca");
    let init = Command::new(&ca)
        .args(["init", "--trust-domain", TRUST, "--dir"])
        .arg(&ca_dir)
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let api_token = token(&ca, &ca_dir, "api");
    // The web sidecar (its own uid) reads its join token from a 0600 file it owns.
    let web_token = tmp.path().join("web.token");
    let out = Command::new(&ca)
        .args(["token", "create", "--dir"])
        .arg(&ca_dir)
        .args(["--namespace", NS, "--service", "web", "--out"])
        .arg(&web_token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let chown = Command::new("chown")
        .arg(format!("{SIDECAR_UID}:{SIDECAR_UID}"))
        .arg(&web_token)
        .status()
        .unwrap();
    assert!(chown.success());

    let lab = Lab::new(&["cp", "a1", "a2", "client"]).unwrap();
    let (cp, a1, a2, client) = (
        lab.host("cp").clone(),
        lab.host("a1").clone(),
        lab.host("a2").clone(),
        lab.host("client").clone(),
    );
    let log = |name: &str| tmp.path().join(format!("{name}.log"));
    let dump_logs = || {
        for name in ["cp", "cp2", "a1-app", "a1-sc", "a2-app", "a2-sc", "web-sc"] {
            if let Ok(s) = std::fs::read_to_string(log(name)) {
                let tail: Vec<&str> = s.lines().rev().take(15).collect();
                eprintln!(
                    "--- {name}.log (last lines, newest first)\n{}",
                    tail.join("\n")
                );
            }
        }
    };
    let mut procs = Procs(Vec::new());
    procs.0.push(start_cp(&cp, &discovery, &data, &log("cp")));
    let up = wait_until(Duration::from_secs(20), || {
        cloudmap(&cp, "ListNamespaces", &serde_json::json!({})).is_some()
    });
    if !up {
        dump_logs();
    }
    assert!(up, "control plane answers the Cloud Map API");

    // Namespace, service (TCP health check on the sidecar's inbound port), two instances.
    let op = cloudmap(
        &cp,
        "CreatePrivateDnsNamespace",
        &serde_json::json!({"Name": NS, "Vpc": "vpc-e2e"}),
    )
    .unwrap();
    let got = cloudmap(
        &cp,
        "GetOperation",
        &serde_json::json!({"OperationId": op["OperationId"]}),
    )
    .unwrap();
    let ns_id = got["Operation"]["Targets"]["NAMESPACE"]
        .as_str()
        .unwrap()
        .to_owned();
    let svc = cloudmap(
        &cp,
        "CreateService",
        &serde_json::json!({"Name": "api", "NamespaceId": ns_id,
            "DnsConfig": {"DnsRecords": [{"Type": "A", "TTL": 1}]},
            "HealthCheckConfig": {"Type": "TCP", "FailureThreshold": 1}}),
    )
    .unwrap();
    let svc_id = svc["Service"]["Id"].as_str().unwrap().to_owned();

    let conf = tmp.path().join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    let mut pids = std::collections::BTreeMap::new();
    for (i, h) in [&a1, &a2].into_iter().enumerate() {
        let name = format!("a{}", i + 1);
        let app = spawn(
            h,
            &demo,
            &[
                "--service",
                "api",
                "--version",
                "v1",
                "--instance",
                &name,
                "--listen",
                "127.0.0.1:8080",
            ],
            &log(&format!("{name}-app")),
        );
        let path = conf.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            sidecar_toml(&cp, &format!("token = \"{api_token}\""), "api", Some(h)),
        )
        .unwrap();
        let sc = spawn(
            h,
            &proxy,
            &["sidecar", "--config", path.to_str().unwrap()],
            &log(&format!("{name}-sc")),
        );
        pids.insert(name.clone(), (app.id(), sc.id()));
        procs.0.push(app);
        procs.0.push(sc);
        cloudmap(
            &cp,
            "RegisterInstance",
            &serde_json::json!({"ServiceId": svc_id, "InstanceId": name,
                "Attributes": {"AWS_INSTANCE_IPV4": h.addr.to_string(),
                               "AWS_INSTANCE_PORT": INBOUND_PORT.to_string()}}),
        )
        .unwrap();
    }
    // The client's sidecar runs as its own user, as in a task with transparent interception.
    let web_conf = conf.join("web.toml");
    std::fs::write(
        &web_conf,
        sidecar_toml(
            &cp,
            &format!("token_file = \"{}\"", web_token.display()),
            "web",
            None,
        ),
    )
    .unwrap();
    for d in [tmp.path(), conf.as_path()] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(
        &web_conf,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let uid = SIDECAR_UID.to_string();
    procs.0.push(spawn(
        &client,
        Path::new("setpriv"),
        &[
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
            proxy.to_str().unwrap(),
            "sidecar",
            "--config",
            web_conf.to_str().unwrap(),
        ],
        &log("web-sc"),
    ));

    // Both instances healthy in DNS, and the client reaches both through its sidecar (mTLS).
    let want = vec![a1.addr.to_string(), a2.addr.to_string()];
    let dns_ok = wait_until(Duration::from_secs(20), || dig(&cp, &dig_bin) == want);
    if !dns_ok {
        dump_logs();
    }
    assert!(dns_ok, "DNS lists both instances: {:?}", dig(&cp, &dig_bin));
    let url = format!("http://127.0.0.1:{UPSTREAM_PORT}/");
    let mut seen = std::collections::BTreeSet::new();
    let mut last = None;
    let both = wait_until(Duration::from_secs(20), || {
        last = curl(&client, &url);
        if let Some((200, body)) = &last {
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            if let Some(i) = v["instance"].as_str() {
                seen.insert(i.to_owned());
            }
        }
        seen.len() == 2
    });
    if !both {
        dump_logs();
    }
    assert!(
        both,
        "client reaches both instances, saw {seen:?}, last answer {last:?}"
    );

    // The server side saw the client's mesh identity (from its verified certificate).
    let (_, body) = curl(&client, &url).unwrap();
    assert!(
        body.contains("spiffe://mesh.local/ns/my-app.local/svc/web"),
        "{body}"
    );

    // Transparent interception: the app calls plain http://api.my-app.local/ (resolved by the
    // control plane's DNS); the rules of `trellis-proxy init-iptables` (every TCP port, the
    // sidecar's uid and loopback excluded) hand the connection to the sidecar's egress listener,
    // which routes by the original destination (an `api` endpoint IP) over mTLS.
    let resolv = tmp.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {}\n", cp.addr)).unwrap();
    let init = |extra: &str| {
        client.sh(&format!(
            "{} init-iptables --proxy-uid {SIDECAR_UID} --egress-port {EGRESS_PORT} {extra}",
            proxy.display()
        ))
    };
    for _ in 0..2 {
        // Installing twice replaces the first set.
        let out = init("");
        assert!(out.status.success(), "{out:?}");
    }
    let nat = client.sh("iptables -t nat -S");
    let nat = String::from_utf8_lossy(&nat.stdout).to_string();
    assert_eq!(nat.matches("-j TRELLIS_OUTPUT").count(), 1, "{nat}");
    let out = client.sh(&format!(
        "mount --bind {} /etc/resolv.conf && curl -sS --max-time 5 http://api.{NS}/intercepted",
        resolv.display()
    ));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(body.contains("\"service\":\"api\""), "{body}");
    assert!(body.contains("\"path\":\"/intercepted\""), "{body}");
    assert!(
        body.contains("svc/web"),
        "went through the sidecar over mTLS: {body}"
    );
    // By IP, with no name or Host mapping at all: the sidecar reads the original destination
    // (SO_ORIGINAL_DST), finds an `api` endpoint's address, and balances over `api` with mTLS
    // (nothing listens on port 80 of the api hosts, so only the sidecar can answer).
    let mut by_ip = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (code, body) = curl(&client, &format!("http://{}/intercepted-ip", a1.addr)).unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"path\":\"/intercepted-ip\""), "{body}");
        assert!(body.contains("svc/web"), "by IP over mTLS: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if let Some(i) = v["instance"].as_str() {
            by_ip.insert(i.to_owned());
        }
    }
    assert_eq!(by_ip.len(), 2, "by IP is load balanced over api: {by_ip:?}");
    let out = init("--remove");
    assert!(out.status.success(), "{out:?}");
    let nat = client.sh("iptables -t nat -S");
    let nat = String::from_utf8_lossy(&nat.stdout).to_string();
    assert!(!nat.contains("TRELLIS"), "rules removed: {nat}");
    assert_eq!(
        curl(&client, &format!("http://{}/intercepted-ip", a1.addr)),
        None,
        "without interception nothing answers on port 80"
    );

    // On the wire between hosts there is no plaintext: a capture on a1's interface sees neither the
    // request path nor the response body of mesh traffic, but does see a plain client's request
    // (so the capture works).
    if let Some(python) = tools::python_with(&["socket"]) {
        let cap = capture(&a1, &python, tmp.path(), 2.0);
        for _ in 0..4 {
            let (code, _) = curl(&client, &format!("{url}mesh-marker-7f3a")).unwrap();
            assert_eq!(code, 200);
        }
        let _ = curl(
            &client,
            &format!("http://{}:{INBOUND_PORT}/plain-marker-7f3a", a1.addr),
        );
        let bytes = cap.join().unwrap();
        assert!(
            contains(&bytes, "plain-marker-7f3a"),
            "capture works ({} bytes)",
            bytes.len()
        );
        assert!(
            !contains(&bytes, "mesh-marker-7f3a"),
            "mesh traffic crossed the wire in plaintext"
        );
    } else {
        tools::skip_or_fail::<()>("python3 not found (packet capture)");
    }

    // A plain client across hosts is refused by the api sidecar (mTLS only)...
    let plain = curl(&client, &format!("http://{}:{INBOUND_PORT}/", a1.addr));
    assert!(
        !matches!(plain, Some((200, _))),
        "plaintext must not reach the app: {plain:?}"
    );
    eprintln!("plain HTTP to the api sidecar: {plain:?}");
    // ... and a TLS client without a mesh certificate is refused too.
    let anon = client.sh(&format!(
        "curl -sk --max-time 5 -o /dev/null -w '%{{http_code}}' https://{}:{INBOUND_PORT}/",
        a1.addr
    ));
    let code = String::from_utf8_lossy(&anon.stdout).to_string();
    assert!(
        code.trim() != "200",
        "a client without a certificate must be refused, got {code}"
    );

    // kill -9 instance a2 (sidecar and app): no client error, and it leaves DNS and the endpoints.
    let (app2, sc2) = pids["a2"];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let client = client.clone();
        let url = url.clone();
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match curl(&client, &url) {
                    Some((200, _)) => {}
                    other => errors.push(other),
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (n, errors)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    for pid in [sc2, app2] {
        assert!(
            Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    }
    let killed = Instant::now();
    let left_dns = wait_until(Duration::from_secs(10), || {
        dig(&cp, &dig_bin) == vec![a1.addr.to_string()]
    });
    assert!(left_dns, "a2 leaves DNS: {:?}", dig(&cp, &dig_bin));
    eprintln!("a2 left DNS {:?} after kill -9", killed.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (n, errors) = load.join().unwrap();
    assert!(n >= 5, "the load ran ({n} requests)");
    eprintln!("{n} requests across the kill, {} errors", errors.len());
    assert!(
        errors.is_empty(),
        "client errors during the kill: {errors:?} of {n}"
    );
    for _ in 0..10 {
        let (code, body) = curl(&client, &url).unwrap();
        assert_eq!(code, 200);
        assert!(body.contains("\"a1\""), "{body}");
    }

    // The control plane dies: sidecars keep serving from their last snapshot.
    let mut cp_child = procs.0.remove(0);
    cp_child.kill().unwrap();
    cp_child.wait().unwrap();
    for _ in 0..10 {
        assert_eq!(curl(&client, &url).map(|r| r.0), Some(200));
    }
    // It restarts from its data dir with every registration.
    procs.0.push(start_cp(&cp, &discovery, &data, &log("cp2")));
    let mut instances = Vec::new();
    let back = wait_until(Duration::from_secs(20), || {
        let Some(v) = cloudmap(
            &cp,
            "ListInstances",
            &serde_json::json!({"ServiceId": svc_id}),
        ) else {
            return false;
        };
        instances = v["Instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["Id"].as_str().map(str::to_owned))
            .collect();
        instances.sort();
        true
    });
    if !back {
        dump_logs();
    }
    assert!(back, "control plane restarted");
    assert_eq!(instances, vec!["a1".to_owned(), "a2".to_owned()]);
    assert!(wait_until(Duration::from_secs(10), || dig(&cp, &dig_bin)
        == vec![a1.addr.to_string()]));
    for _ in 0..5 {
        assert_eq!(curl(&client, &url).map(|r| r.0), Some(200));
    }

    // Cleanup: every namespace of the lab is gone once it is dropped.
    let names: Vec<String> = lab.hosts.iter().map(|h| h.netns.clone()).collect();
    drop(procs);
    drop(lab);
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for n in names {
        assert!(!list.contains(&n), "{n} left behind");
    }
}

#[test]
fn a_failing_test_still_cleans_up_its_hosts_and_processes() {
    if !is_root() {
        eprintln!("skipping: network namespaces need root");
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let failed = std::thread::spawn(move || {
        let lab = Lab::new(&["x", "y"]).unwrap();
        // Never waited on here on purpose: the lab's drop must kill it.
        #[allow(clippy::zombie_processes)]
        let child = lab
            .host("x")
            .command("sleep")
            .arg("300")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let names: Vec<String> = lab.hosts.iter().map(|h| h.netns.clone()).collect();
        tx.send((names, child.id())).unwrap();
        panic!("a test failing mid-way");
    })
    .join();
    assert!(failed.is_err(), "the thread panicked");
    let (names, pid) = rx.recv().unwrap();
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for n in names {
        assert!(!list.contains(&n), "{n} left behind after a panic");
    }
    // The process that ran in the namespace is gone (killed, not left running).
    let gone = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split_whitespace().nth(2) == Some("Z"))
            .unwrap_or(true)
    });
    assert!(
        gone,
        "process {pid} still running after the lab was dropped"
    );
}
