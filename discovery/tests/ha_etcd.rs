//! The control plane on etcd: real etcd members and `trellis-discovery serve --store etcd` replicas
//! (separate processes, so they can be SIGKILLed), driven with curl and dig on loopback.
// Test helpers may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trellis_test_support::etcd::EtcdCluster;
use trellis_test_support::tools;

/// One `trellis-discovery serve --store etcd` process, killed on drop.
struct Replica {
    child: Child,
    api: SocketAddr,
    dns: SocketAddr,
    log: tempfile::NamedTempFile,
    _dir: tempfile::TempDir,
}

impl Replica {
    fn start(etcd: &EtcdCluster, prefix: &str) -> Replica {
        Self::try_start(etcd, prefix).unwrap()
    }

    /// `Err(stderr)` when the replica exits instead of serving.
    fn try_start(etcd: &EtcdCluster, prefix: &str) -> Result<Replica, String> {
        Self::spawn(etcd, prefix, &[])
    }

    fn spawn(etcd: &EtcdCluster, prefix: &str, extra: &[&str]) -> Result<Replica, String> {
        // Each replica has its own data directory (its CA); the registry is in etcd.
        Self::spawn_in(etcd, prefix, extra, tempfile::tempdir().unwrap())
    }

    fn spawn_in(
        etcd: &EtcdCluster,
        prefix: &str,
        extra: &[&str],
        dir: tempfile::TempDir,
    ) -> Result<Replica, String> {
        // Logs go to a file (a pipe nobody reads would fill up and stall the replica).
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis-discovery"));
        cmd.args([
            "serve",
            "--api-listen",
            "127.0.0.1:0",
            "--dns-listen",
            "127.0.0.1:0",
            "--store",
            "etcd",
            "--etcd-prefix",
            prefix,
            "--health-interval",
            "200ms",
        ])
        .args(extra)
        .arg("--etcd-endpoints")
        .arg(etcd.endpoints())
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stderr(log.reopen().unwrap());
        let (mut child, line) = spawn_reading_first_line(&mut cmd);
        if line.is_empty() {
            let _ = child.wait();
            return Err(std::fs::read_to_string(log.path()).unwrap_or_default());
        }
        // "trellis-discovery: api http://A dns D"
        let words: Vec<&str> = line.split_whitespace().collect();
        Ok(Replica {
            api: trellis_test_support::bins::discovery_api(&line).unwrap(),
            dns: words[4].parse().unwrap(),
            child,
            log,
            _dir: dir,
        })
    }

    /// What the replica logged (warnings and errors), for failure messages.
    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_reading_first_line(cmd: &mut Command) -> (Child, String) {
    trellis_test_support::bins::spawn_reading_first_line(cmd).unwrap()
}

/// `None` when etcd, curl or dig is missing (skipped unless CI requires tools).
fn cluster(members: usize) -> Option<EtcdCluster> {
    tools::require("curl", "the HA tests call the API with curl")?;
    tools::require("dig", "the HA tests query DNS with dig")?;
    EtcdCluster::start(members)
}

/// One request with curl (`data` as the body, `@FILE` for a file's): (HTTP status, body).
fn curl(method: &str, url: &str, headers: &[String], data: &str) -> (u16, String) {
    curl_with(None, method, url, headers, data)
}

/// [`curl`], verifying an `https://` URL against `cacert`.
fn curl_with(
    cacert: Option<&std::path::Path>,
    method: &str,
    url: &str,
    headers: &[String],
    data: &str,
) -> (u16, String) {
    let mut cmd = Command::new("curl");
    if let Some(ca) = cacert {
        cmd.arg("--cacert").arg(ca);
    }
    cmd.args([
        "-s",
        "-m",
        "10",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
    ]);
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    let out = cmd.args(["--data-binary", data]).arg(url).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// One Cloud Map call with curl: (HTTP status, JSON body).
fn api(addr: SocketAddr, action: &str, body: &Value) -> (u16, Value) {
    api_at(&format!("http://{addr}"), None, action, body)
}

/// [`api`] at a base URL; an `https://` one verified against `cacert`.
fn api_at(
    base: &str,
    cacert: Option<&std::path::Path>,
    action: &str,
    body: &Value,
) -> (u16, Value) {
    let headers = [
        "content-type: application/x-amz-json-1.1".to_owned(),
        format!("x-amz-target: Route53AutoNaming_v20170314.{action}"),
    ];
    let url = format!("{base}/");
    let (status, body) = curl_with(cacert, "POST", &url, &headers, &body.to_string());
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "30", "-o", "-", "-w", "\n%{http_code}"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn ok(addr: SocketAddr, action: &str, body: Value) -> Value {
    let (s, v) = api(addr, action, &body);
    assert_eq!(s, 200, "{action} on {addr}: {v}");
    v
}

/// A private DNS namespace with an A+SRV service; returns the service id.
fn setup(addr: SocketAddr, ns: &str) -> String {
    let op = ok(
        addr,
        "CreatePrivateDnsNamespace",
        json!({"Name": ns, "Vpc": "vpc-1"}),
    );
    let got = ok(
        addr,
        "GetOperation",
        json!({"OperationId": op["OperationId"]}),
    );
    let ns_id = got["Operation"]["Targets"]["NAMESPACE"].as_str().unwrap();
    let svc = ok(
        addr,
        "CreateService",
        json!({"Name": "api", "NamespaceId": ns_id, "DnsConfig": {"RoutingPolicy": "MULTIVALUE",
            "DnsRecords": [{"Type": "A", "TTL": 5}, {"Type": "SRV", "TTL": 5}]}}),
    );
    svc["Service"]["Id"].as_str().unwrap().to_owned()
}

/// An HTTP namespace with service `api` (plus `extra` CreateService fields); returns its id.
fn http_service(addr: SocketAddr, ns: &str, extra: Value) -> String {
    let op = ok(addr, "CreateHttpNamespace", json!({"Name": ns}));
    let got = ok(
        addr,
        "GetOperation",
        json!({"OperationId": op["OperationId"]}),
    );
    let mut req = json!({"Name": "api", "NamespaceId": got["Operation"]["Targets"]["NAMESPACE"]});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            req[k] = v;
        }
    }
    ok(addr, "CreateService", req)["Service"]["Id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn register_body(svc: &str, id: &str, ip: &str) -> Value {
    json!({"ServiceId": svc, "InstanceId": id,
        "Attributes": {"AWS_INSTANCE_IPV4": ip, "AWS_INSTANCE_PORT": "80"}})
}

/// The sorted instance ids `DiscoverInstances` returns, or the error it answered with.
fn try_discover(addr: SocketAddr, ns: &str) -> Result<Vec<String>, String> {
    let (s, v) = api(
        addr,
        "DiscoverInstances",
        &json!({"NamespaceName": ns, "ServiceName": "api", "HealthStatus": "ALL"}),
    );
    if s != 200 {
        return Err(format!("DiscoverInstances on {addr}: {s} {v}"));
    }
    let mut ids: Vec<String> = v["Instances"]
        .as_array()
        .ok_or_else(|| format!("no Instances in {v}"))?
        .iter()
        .map(|i| i["InstanceId"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    Ok(ids)
}

fn discover(addr: SocketAddr, ns: &str) -> Vec<String> {
    try_discover(addr, ns).unwrap_or_else(|e| panic!("{e}"))
}

/// For polling: another replica may not have seen the namespace yet, which is not a failure.
fn discovers(addr: SocketAddr, ns: &str, want: &[&str]) -> bool {
    try_discover(addr, ns).is_ok_and(|ids| ids == want)
}

fn dig_a(dns: SocketAddr, name: &str) -> Vec<String> {
    let out = Command::new("dig")
        .arg(format!("@{}", dns.ip()))
        .args([
            "-p",
            &dns.port().to_string(),
            "+short",
            "+tries=1",
            "+time=2",
        ])
        .arg(name)
        .arg("A")
        .output()
        .unwrap();
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

/// Polls `f` until it returns true or `within` passes.
fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn stale(addr: SocketAddr) -> bool {
    get(addr, "/metrics")
        .1
        .lines()
        .any(|l| l == "trellis_discovery_store_stale 1")
}

#[test]
fn replicas_share_one_registry() {
    let Some(etcd) = cluster(1) else { return };
    let (a, b, c) = (
        Replica::start(&etcd, "/one/"),
        Replica::start(&etcd, "/one/"),
        Replica::start(&etcd, "/one/"),
    );
    let svc = setup(a.api, "ha.local");
    ok(
        a.api,
        "RegisterInstance",
        register_body(&svc, "i-1", "10.0.0.1"),
    );
    // Acknowledged on A: answered by B's API and C's DNS at once or within moments.
    eventually(Duration::from_secs(2), "B discovers i-1", || {
        discovers(b.api, "ha.local", &["i-1"])
    });
    eventually(Duration::from_secs(2), "C answers DNS", || {
        dig_a(c.dns, "api.ha.local") == ["10.0.0.1"]
    });

    // A watcher held on B wakes for a write on A.
    let (s, body) = get(b.api, "/v1/watch/ha.local/api?health=all");
    assert_eq!(s, 200, "{body}");
    let rev = serde_json::from_str::<Value>(&body).unwrap()["revision"]
        .as_u64()
        .unwrap();
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let r = get(
            b.api,
            &format!("/v1/watch/ha.local/api?health=all&revision={rev}&wait=20s"),
        );
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    ok(
        a.api,
        "RegisterInstance",
        register_body(&svc, "i-2", "10.0.0.2"),
    );
    let ((s, body), took) = waiter.join().unwrap();
    assert_eq!(s, 200);
    assert!(took < Duration::from_secs(10), "{took:?}");
    let set: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(set["endpoints"].as_array().unwrap().len(), 2, "{set}");
    // InstancesRevision comes from etcd: the same on every replica once they caught up.
    eventually(Duration::from_secs(2), "one revision everywhere", || {
        let r = |addr| {
            api(
                addr,
                "DiscoverInstancesRevision",
                &json!({"NamespaceName": "ha.local", "ServiceName": "api"}),
            )
            .1["InstancesRevision"]
                .clone()
        };
        r(a.api) == r(b.api) && r(b.api) == r(c.api)
    });

    // Names are unique across replicas; a service with instances cannot go.
    let (s, v) = api(
        c.api,
        "CreatePrivateDnsNamespace",
        &json!({"Name": "ha.local", "Vpc": "vpc-1"}),
    );
    assert_eq!(
        (s, v["__type"].as_str()),
        (400, Some("NamespaceAlreadyExists"))
    );
    let (s, v) = api(b.api, "DeleteService", &json!({"Id": svc}));
    assert_eq!((s, v["__type"].as_str()), (409, Some("ResourceInUse")));

    // CreatorRequestId race: the same request on A and B at once, many times over.
    for round in 0..10 {
        let name = format!("race{round}.local");
        let body =
            json!({"Name": name, "Vpc": "vpc-1", "CreatorRequestId": format!("req-{round}")});
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let calls: Vec<_> = [a.api, b.api]
            .into_iter()
            .map(|addr| {
                let (body, barrier) = (body.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    api(addr, "CreatePrivateDnsNamespace", &body)
                })
            })
            .collect();
        let answers: Vec<(u16, Value)> = calls.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(answers[0].0, 200, "{answers:?}");
        assert_eq!(answers[1].0, 200, "{answers:?}");
        assert_eq!(
            answers[0].1["OperationId"], answers[1].1["OperationId"],
            "one operation, the other gets the duplicate answer"
        );
        let list = ok(c.api, "ListNamespaces", json!({}));
        let same = list["Namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["Name"] == name.as_str())
            .count();
        assert_eq!(same, 1, "round {round}: {list}");
    }
}

#[test]
fn incompatible_prefix_is_refused() {
    let Some(etcd) = cluster(1) else { return };
    // A prefix holding keys that are not ours: refuse with a clear message.
    let out = Command::new("curl")
        .args(["-s", "-X", "POST", "-d"])
        .arg(r#"{"key":"L290aGVyL3ZlcnNpb24=","value":"c29tZXRoaW5nLWVsc2UvOQ=="}"#)
        .arg(format!("http://{}/v3/kv/put", etcd.client_addr(0)))
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = Replica::try_start(&etcd, "/other/").err().unwrap();
    assert!(
        err.contains("incompatible version") && err.contains("something-else/9"),
        "{err}"
    );
    // An empty prefix is initialised; a second replica accepts it.
    let _first = Replica::start(&etcd, "/fresh/");
    let _second = Replica::start(&etcd, "/fresh/");
}

#[test]
fn quorum_loss_refuses_writes_and_serves_reads_then_converges() {
    let Some(mut etcd) = cluster(3) else { return };
    let (a, b) = (Replica::start(&etcd, "/q/"), Replica::start(&etcd, "/q/"));
    let svc = setup(a.api, "q.local");
    ok(
        a.api,
        "RegisterInstance",
        register_body(&svc, "i-1", "10.0.0.1"),
    );

    eventually(Duration::from_secs(5), "B sees A's write", || {
        discovers(b.api, "q.local", &["i-1"])
    });

    // One member of three down: everything still works.
    etcd.kill(2);
    ok(
        b.api,
        "RegisterInstance",
        register_body(&svc, "i-2", "10.0.0.2"),
    );
    eventually(Duration::from_secs(5), "A and B see B's write", || {
        discovers(a.api, "q.local", &["i-1", "i-2"]) && discovers(b.api, "q.local", &["i-1", "i-2"])
    });

    // Two of three down: writes refused with a retryable error, reads served from the view.
    etcd.kill(1);
    let (s, v) = api(
        a.api,
        "RegisterInstance",
        &register_body(&svc, "i-3", "10.0.0.3"),
    );
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["__type"], "ServiceUnavailableException", "{v}");
    assert_eq!(discover(b.api, "q.local"), ["i-1", "i-2"], "{}", b.log());
    assert_eq!(dig_a(b.dns, "api.q.local"), ["10.0.0.1", "10.0.0.2"]);
    eventually(Duration::from_secs(5), "stale gauge on A", || stale(a.api));

    // Quorum back: writes accepted again and both replicas converge without a restart.
    etcd.restart(1);
    etcd.restart(2);
    etcd.wait_ready(0..3);
    eventually(Duration::from_secs(10), "writes accepted again", || {
        api(
            a.api,
            "RegisterInstance",
            &register_body(&svc, "i-3", "10.0.0.3"),
        )
        .0 == 200
    });
    eventually(Duration::from_secs(5), "B converges", || {
        discovers(b.api, "q.local", &["i-1", "i-2", "i-3"])
    });
    eventually(Duration::from_secs(5), "not stale", || {
        !stale(a.api) && !stale(b.api)
    });
}

#[test]
fn kill_9_replica_during_registration_storm_loses_nothing_acknowledged() {
    let Some(etcd) = cluster(1) else { return };
    let (mut a, b) = (Replica::start(&etcd, "/s/"), Replica::start(&etcd, "/s/"));
    let svc = setup(a.api, "storm.local");
    let acked = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (acked, stop, svc) = (acked.clone(), stop.clone(), svc.clone());
            // Clients 0-1 write to A (killed), 2-3 to B (carries on).
            let addr = if c < 2 { a.api } else { b.api };
            std::thread::spawn(move || {
                for n in 0.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let id = format!("c{c}-{n}");
                    if api(
                        addr,
                        "RegisterInstance",
                        &register_body(&svc, &id, "10.0.0.1"),
                    )
                    .0 == 200
                    {
                        acked.lock().push(id);
                    }
                }
            })
        })
        .collect();
    eventually(Duration::from_secs(20), "a storm", || {
        acked.lock().len() >= 60
    });
    a.kill(); // SIGKILL
    let after_kill = acked.lock().len();
    eventually(Duration::from_secs(10), "B carries on", || {
        acked.lock().len() >= after_kill + 20
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let acked = acked.lock().clone();
    let have: std::collections::HashSet<String> = {
        let v = ok(
            b.api,
            "ListInstances",
            json!({"ServiceId": svc, "MaxResults": 100}),
        );
        let mut ids: std::collections::HashSet<String> = v["Instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["Id"].as_str().unwrap().to_owned())
            .collect();
        let mut token = v["NextToken"].clone();
        while let Some(t) = token.as_str().map(str::to_owned) {
            let v = ok(
                b.api,
                "ListInstances",
                json!({"ServiceId": svc, "MaxResults": 100, "NextToken": t}),
            );
            ids.extend(
                v["Instances"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i["Id"].as_str().unwrap().to_owned()),
            );
            token = v["NextToken"].clone();
        }
        ids
    };
    let lost: Vec<_> = acked.iter().filter(|id| !have.contains(*id)).collect();
    eprintln!(
        "acknowledged {} registrations ({} before kill -9 of A), B lists {}",
        acked.len(),
        after_kill,
        have.len()
    );
    assert!(lost.is_empty(), "lost acknowledged registrations: {lost:?}");
}

/// An HTTP app on loopback answering every request with `name`.
fn app(name: &'static str) -> SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                );
            });
        }
    });
    addr
}

#[test]
fn sidecar_fails_over_between_control_plane_replicas() {
    let Some(etcd) = cluster(1) else { return };
    let (mut a, b) = (Replica::start(&etcd, "/sc/"), Replica::start(&etcd, "/sc/"));
    let svc = http_service(a.api, "side.local", json!({}));
    let register = |via: SocketAddr, id: &str, at: SocketAddr| {
        ok(
            via,
            "RegisterInstance",
            json!({"ServiceId": svc, "InstanceId": id, "Attributes": {
                "AWS_INSTANCE_IPV4": at.ip().to_string(), "AWS_INSTANCE_PORT": at.port().to_string()}}),
        );
    };
    register(a.api, "one", app("one"));

    let dir = std::env::temp_dir().join(format!("trellis-ha-sidecar-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\nnamespace = \"side.local\"\nservice = \"web\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [control_plane]\naddresses = [\"{}\", \"{}\"]\nwatch_wait = \"2s\"\n\n\
             [outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n",
            a.api, b.api
        ),
    )
    .unwrap();
    let (mut sidecar, port) = ready_sidecar(&config);
    assert_eq!(get(port, "/"), (200, "one".to_owned()));

    // The first replica dies: every request is still served (from the last snapshot, then B).
    a.kill();
    let t = Instant::now();
    let mut served = 0;
    while t.elapsed() < Duration::from_secs(2) {
        assert_eq!(get(port, "/"), (200, "one".to_owned()), "request {served}");
        served += 1;
    }
    // The watch resumed on B: a change made there reaches the sidecar.
    register(b.api, "two", app("two"));
    eventually(Duration::from_secs(10), "sidecar follows B", || {
        get(port, "/").1 == "two"
    });
    eprintln!("{served} requests served while replica A was down");
    let _ = sidecar.kill();
    let _ = sidecar.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `trellis-proxy sidecar` process on `config`, once ready: the process and its `api` upstream
/// port.
fn ready_sidecar(config: &std::path::Path) -> (Child, SocketAddr) {
    let proxy = trellis_test_support::bins::binary("trellis-proxy", "trellis-proxy");
    let (sidecar, line) = spawn_reading_first_line(
        Command::new(proxy)
            .args(["sidecar", "--config"])
            .arg(config)
            .env("RUST_LOG", "error")
            .stderr(Stdio::null()),
    );
    let addrs: Value = serde_json::from_str(&line).unwrap();
    let admin: SocketAddr = addrs["admin"].as_str().unwrap().parse().unwrap();
    let port: SocketAddr = addrs["upstreams"]["api"].as_str().unwrap().parse().unwrap();
    eventually(Duration::from_secs(5), "sidecar ready", || {
        get(admin, "/ready").0 == 200
    });
    (sidecar, port)
}

/// Copies a directory tree (a CA directory shared by replicas, as an operator would).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// `--api-tls` on replicas that share one CA directory: each serves HTTPS with its own
/// certificate that the shared root verifies, and a sidecar with `control_plane.tls` fails over
/// from one to the other like over plain HTTP.
#[test]
fn https_replicas_share_one_root_and_the_sidecar_fails_over() {
    let Some(etcd) = cluster(1) else { return };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    trellis_ca::CaDir::new(dir_a.path().join("ca"))
        .init("mesh.local".parse().unwrap(), trellis_ca::Policy::default())
        .unwrap();
    copy_dir(&dir_a.path().join("ca"), &dir_b.path().join("ca"));
    let keep = tempfile::tempdir().unwrap();
    let root = keep.path().join("root.crt");
    std::fs::copy(dir_a.path().join("ca").join("root.crt"), &root).unwrap();
    let mut a = Replica::spawn_in(&etcd, "/tls/", &["--api-tls"], dir_a).unwrap();
    let b = Replica::spawn_in(&etcd, "/tls/", &["--api-tls"], dir_b).unwrap();
    let ok_at = |addr: SocketAddr, action: &str, body: Value| {
        let (s, v) = api_at(&format!("https://{addr}"), Some(&root), action, &body);
        assert_eq!(s, 200, "{action} on {addr}: {v}");
        v
    };
    // Both replicas verify against the one root.
    for r in [&a, &b] {
        let (s, _) = curl_with(
            Some(&root),
            "GET",
            &format!("https://{}/v1/ca/roots", r.api),
            &[],
            "",
        );
        assert_eq!(s, 200, "replica {} over HTTPS", r.api);
    }
    let op = ok_at(a.api, "CreateHttpNamespace", json!({"Name": "tls.local"}));
    let got = ok_at(
        a.api,
        "GetOperation",
        json!({"OperationId": op["OperationId"]}),
    );
    let ns = got["Operation"]["Targets"]["NAMESPACE"].clone();
    let svc = ok_at(
        a.api,
        "CreateService",
        json!({"Name": "api", "NamespaceId": ns}),
    )["Service"]["Id"]
        .clone();
    let register = |via: SocketAddr, id: &str, at: SocketAddr| {
        ok_at(
            via,
            "RegisterInstance",
            json!({"ServiceId": svc, "InstanceId": id, "Attributes": {
                "AWS_INSTANCE_IPV4": at.ip().to_string(), "AWS_INSTANCE_PORT": at.port().to_string()}}),
        );
    };
    register(a.api, "one", app("one"));

    let config = keep.path().join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\nnamespace = \"tls.local\"\nservice = \"web\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [control_plane]\naddresses = [\"{}\", \"{}\"]\ntls = true\ntrust_bundle = \"{}\"\nwatch_wait = \"2s\"\n\n\
             [outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n",
            a.api,
            b.api,
            root.display()
        ),
    )
    .unwrap();
    let (mut sidecar, port) = ready_sidecar(&config);
    assert_eq!(get(port, "/"), (200, "one".to_owned()));

    // Replica A dies; a change made on B reaches the sidecar over B's HTTPS watch.
    a.kill();
    register(b.api, "two", app("two"));
    eventually(Duration::from_secs(10), "sidecar follows B", || {
        get(port, "/").1 == "two"
    });
    let _ = sidecar.kill();
    let _ = sidecar.wait();
}

#[test]
fn health_checks_move_when_a_replica_dies() {
    let Some(etcd) = cluster(1) else { return };
    let fast = ["--etcd-lease-ttl", "2s"];
    let mut a = Replica::spawn(&etcd, "/hc/", &fast).unwrap();
    let b = Replica::spawn(&etcd, "/hc/", &fast).unwrap();
    let svc = http_service(
        a.api,
        "hc.local",
        json!({"HealthCheckConfig": {"Type": "TCP", "FailureThreshold": 1}}),
    );
    // The service was created on a; b learns it through etcd's watch, which may lag a moment.
    eventually(Duration::from_secs(10), "the service known to b", || {
        api(b.api, "GetService", &json!({"Id": svc})).0 == 200
    });
    // Eight instances (TCP checks: a listening socket is healthy): both replicas own some.
    let mut apps: Vec<std::net::TcpListener> = (0..8)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    for (n, l) in apps.iter().enumerate() {
        let at = l.local_addr().unwrap();
        ok(
            b.api,
            "RegisterInstance",
            json!({"ServiceId": svc, "InstanceId": format!("i-{n}"), "Attributes": {
                "AWS_INSTANCE_IPV4": "127.0.0.1", "AWS_INSTANCE_PORT": at.port().to_string()}}),
        );
    }
    let statuses = |addr| {
        let v = ok(addr, "GetInstancesHealthStatus", json!({"ServiceId": svc}));
        v["Status"]
            .as_object()
            .unwrap()
            .values()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    eventually(
        Duration::from_secs(10),
        "all healthy on both replicas",
        || {
            let (sa, sb) = (statuses(a.api), statuses(b.api));
            sa.len() == 8 && sa.iter().all(|s| s == "HEALTHY") && sa == sb
        },
    );
    // Checks are shared out, not repeated: each replica ran some.
    let checks = |addr| -> f64 {
        get(addr, "/metrics")
            .1
            .lines()
            .filter(|l| l.starts_with("trellis_discovery_health_checks_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(checks(a.api) > 0.0 && checks(b.api) > 0.0);
    // A dies; then every instance dies: B alone must notice all of them (A's share moved to B).
    a.kill();
    std::thread::sleep(Duration::from_secs(3));
    apps.clear();
    eventually(
        Duration::from_secs(10),
        "B detects every instance down",
        || {
            let s = statuses(b.api);
            s.len() == 8 && s.iter().all(|s| s == "UNHEALTHY")
        },
    );
    // The custom/TTL paths go through any replica too: a flip written by B is in etcd, so a new
    // replica started now sees it without checking anything itself.
    let c = Replica::spawn(&etcd, "/hc/", &fast).unwrap();
    assert!(statuses(c.api).iter().all(|s| s == "UNHEALTHY"));
}

/// A single embedded-store node (the default), killed on drop.
fn embedded(dir: &std::path::Path) -> Replica {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis-discovery"));
    cmd.args([
        "serve",
        "--api-listen",
        "127.0.0.1:0",
        "--dns-listen",
        "127.0.0.1:0",
    ])
    .arg("--data-dir")
    .arg(dir)
    .env("RUST_LOG", "error")
    .stderr(Stdio::null());
    let (child, line) = spawn_reading_first_line(&mut cmd);
    let words: Vec<&str> = line.split_whitespace().collect();
    Replica {
        api: words[2].trim_start_matches("http://").parse().unwrap(),
        dns: words[4].parse().unwrap(),
        child,
        log: tempfile::NamedTempFile::new().unwrap(),
        _dir: tempfile::tempdir().unwrap(),
    }
}

fn migrate(from: &str, to: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis-discovery"))
        .args([
            "migrate",
            "--from",
            from,
            "--to",
            to,
            "--etcd-prefix",
            "/mig/",
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn migrate_embedded_to_etcd_and_back() {
    let Some(etcd) = cluster(1) else { return };
    let one = tempfile::tempdir().unwrap();
    {
        let node = embedded(one.path());
        let svc = setup(node.api, "grow.local");
        for n in 0..3 {
            ok(
                node.api,
                "RegisterInstance",
                register_body(&svc, &format!("i-{n}"), &format!("10.0.0.{n}")),
            );
        }
    }
    // The node is stopped (killed); its store moves to etcd.
    let (done, out) = migrate(
        &format!("embedded:{}", one.path().display()),
        &format!("etcd:{}", etcd.endpoints()),
    );
    assert!(done, "{out}");
    let replica = Replica::start(&etcd, "/mig/");
    assert_eq!(discover(replica.api, "grow.local"), ["i-0", "i-1", "i-2"]);
    assert_eq!(
        dig_a(replica.dns, "api.grow.local"),
        ["10.0.0.0", "10.0.0.1", "10.0.0.2"]
    );
    // A second migration into the now non-empty prefix is refused.
    let (done, out) = migrate(
        &format!("embedded:{}", one.path().display()),
        &format!("etcd:{}", etcd.endpoints()),
    );
    assert!(!done && out.contains("already holds a registry"), "{out}");
    // And back, for a backup: the embedded node serves the same registry.
    let backup = tempfile::tempdir().unwrap();
    let (done, out) = migrate(
        &format!("etcd:{}", etcd.endpoints()),
        &format!("embedded:{}", backup.path().display()),
    );
    assert!(done, "{out}");
    let restored = embedded(backup.path());
    assert_eq!(discover(restored.api, "grow.local"), ["i-0", "i-1", "i-2"]);
}

#[test]
fn ha_compose_file_is_valid() {
    let Some(dc) = tools::require("docker-compose", "compose file validation") else {
        return;
    };
    let file = tools::workspace_root().join("compose/ha/docker-compose.yml");
    let out = Command::new(dc)
        .arg("-f")
        .arg(&file)
        .args(["config", "-q"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every sidecar lists both replicas.
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(
        r#"TRELLIS_CONTROL_PLANE__ADDRESSES: '["172.29.0.11:9400", "172.29.0.12:9400"]'"#
    ));
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A replica's data directory whose CA has its own intermediate key, signed by the shared
/// (offline) root in `root`.
fn replica_ca(
    ca: &std::path::Path,
    root: &std::path::Path,
    work: &std::path::Path,
    name: &str,
) -> tempfile::TempDir {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("ca");
    run(Command::new(ca)
        .args([
            "init",
            "--external-root",
            "--trust-domain",
            "mesh.local",
            "--dir",
        ])
        .arg(&dir));
    let cert = work.join(format!("{name}.crt"));
    run(Command::new(ca)
        .arg("sign-intermediate")
        .arg("--dir")
        .arg(root)
        .arg(dir.join("intermediate.csr"))
        .arg("--out")
        .arg(&cert));
    run(Command::new(ca)
        .args(["install-intermediate", "--dir"])
        .arg(&dir)
        .arg(&cert)
        .arg("--root")
        .arg(root.join("root.crt")));
    data
}

/// `curl` with a bearer token: (HTTP status, body).
fn call(method: &str, url: String, token: &str, data: &str) -> (u16, String) {
    curl(
        method,
        &url,
        &[format!("authorization: Bearer {token}")],
        data,
    )
}

/// `openssl verify -crl_check` of the leaf in `chain` (leaf, intermediate) against `root` and
/// the CRLs in `crl`: what openssl printed.
fn verify_with_crl(
    openssl: &std::path::Path,
    root: &std::path::Path,
    crl: &std::path::Path,
    chain: &std::path::Path,
) -> String {
    let out = Command::new(openssl)
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(root)
        .arg("-CRLfile")
        .arg(crl)
        .arg("-untrusted")
        .arg(chain)
        .arg(chain)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn ca_state_is_shared_through_etcd() {
    let Some(etcd) = cluster(1) else { return };
    let Some(openssl) = tools::require("openssl", "CSRs and CRL checks with openssl") else {
        return;
    };
    let ca = trellis_test_support::bins::binary("trellis-ca", "trellis-ca");
    let work = tempfile::tempdir().unwrap();
    let w = |name: &str| work.path().join(name);
    let root = w("root");
    run(Command::new(&ca)
        .args(["init", "--trust-domain", "mesh.local", "--dir"])
        .arg(&root));
    // An admin credential made offline in A's CA directory: published to etcd when A starts.
    let data_a = replica_ca(&ca, &root, work.path(), "a");
    run(Command::new(&ca)
        .args(["token", "create", "--admin", "--dir"])
        .arg(data_a.path().join("ca"))
        .arg("--out")
        .arg(w("admin.token")));
    let admin = std::fs::read_to_string(w("admin.token")).unwrap();
    let admin = admin.trim();
    let data_b = replica_ca(&ca, &root, work.path(), "b");
    let data_c = replica_ca(&ca, &root, work.path(), "c");
    let replicas: Vec<Replica> = [data_a, data_b, data_c]
        .into_iter()
        .map(|d| Replica::spawn_in(&etcd, "/cas/", &[], d).unwrap())
        .collect();
    let url = |r: usize, path: &str| format!("http://{}{path}", replicas[r].api);

    // A scoped join token created through A's admin API...
    let (s, body) = call(
        "POST",
        url(0, "/v1/ca/tokens"),
        admin,
        r#"{"namespace":"ha.local","service":"api"}"#,
    );
    assert_eq!(s, 200, "{body}");
    let token: Value = serde_json::from_str(&body).unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    // ... is accepted for issuance by B (and by A).
    run(Command::new(&openssl)
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=api"])
        .arg("-keyout")
        .arg(w("leaf.key"))
        .arg("-out")
        .arg(w("leaf.csr")));
    let csr = format!("@{}", w("leaf.csr").display());
    let mut chains = Vec::new();
    for r in [1, 0] {
        let mut answer = (0, String::new());
        eventually(
            Duration::from_secs(5),
            "the token works on every replica",
            || {
                answer = call("POST", url(r, "/v1/ca/sign"), &token, &csr);
                answer.0 == 200
            },
        );
        let path = w(&format!("chain-{r}.pem"));
        std::fs::write(&path, &answer.1).unwrap();
        chains.push(path);
    }
    let (chain_b, chain_a) = (&chains[0], &chains[1]);
    let serial_of = |chain: &std::path::Path| {
        run(Command::new(&openssl)
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(chain))
        .trim()
        .trim_start_matches("serial=")
        .to_lowercase()
    };
    let (serial_a, serial_b) = (serial_of(chain_a), serial_of(chain_b));

    // A's certificate revoked through B's admin API (with the admin token made on A).
    let revoke = format!(r#"{{"serial":"{serial_a}","reason":"keyCompromise"}}"#);
    let mut answer = (0, String::new());
    eventually(Duration::from_secs(5), "B revokes A's certificate", || {
        answer = call("POST", url(1, "/v1/ca/revoke"), admin, &revoke);
        answer.0 != 404
    });
    assert_eq!(answer.0, 200, "{}", answer.1);
    // Every replica's CRL answer lists it: openssl rejects A's leaf, B's stays good.
    let crl = w("crl.pem");
    for replica in &replicas {
        eventually(
            Duration::from_secs(5),
            "the revocation in every CRL",
            || {
                let (s, pem) = get(replica.api, "/v1/ca/crl");
                std::fs::write(&crl, &pem).unwrap();
                s == 200
                    && pem.matches("BEGIN X509 CRL").count() == 3
                    && verify_with_crl(&openssl, &root.join("root.crt"), &crl, chain_a)
                        .contains("revoked")
            },
        );
        let out = verify_with_crl(&openssl, &root.join("root.crt"), &crl, chain_b);
        assert!(out.contains(": OK"), "{out}");
    }
    // Revoking again, anywhere, is refused.
    let (s, body) = call(
        "POST",
        url(2, "/v1/ca/revoke"),
        admin,
        &format!(r#"{{"serial":"{serial_a}"}}"#),
    );
    assert_eq!(s, 409, "{body}");

    // The audit log read through C holds the issuances of A and B and B's revocation.
    let (s, body) = call("GET", url(2, "/v1/ca/audit"), admin, "");
    assert_eq!(s, 200, "{body}");
    let log: Value = serde_json::from_str(&body).unwrap();
    let events: Vec<(String, String)> = log["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["event"].as_str().unwrap().to_owned(),
                r["serial"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for want in [
        ("issue".to_owned(), serial_a.clone()),
        ("issue".to_owned(), serial_b.clone()),
        ("revoke:keyCompromise".to_owned(), serial_a.clone()),
    ] {
        assert!(events.contains(&want), "{want:?} not in {events:?}");
    }
    // A workload credential may not read it.
    assert_eq!(call("GET", url(2, "/v1/ca/audit"), &token, "").0, 403);

    // A restarted replica reads the shared state again: the token made through A's API (it is only
    // in etcd) still works there.
    let mut replicas = replicas;
    let mut a = replicas.swap_remove(0);
    a.kill();
    let dir = std::mem::replace(&mut a._dir, tempfile::tempdir().unwrap());
    drop(a);
    let a = Replica::spawn_in(&etcd, "/cas/", &[], dir).unwrap();
    let (s, body) = call("POST", format!("http://{}/v1/ca/sign", a.api), &token, &csr);
    assert_eq!(s, 200, "{body}");
}

#[test]
fn replicas_sign_with_their_own_intermediate_under_one_root() {
    let Some(etcd) = cluster(1) else { return };
    let Some(openssl) = tools::require("openssl", "leaf verification with openssl verify") else {
        return;
    };
    let ca = trellis_test_support::bins::binary("trellis-ca", "trellis-ca");
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    run(Command::new(&ca)
        .args(["init", "--trust-domain", "mesh.local", "--dir"])
        .arg(&root));
    let mut chains = Vec::new();
    let mut replicas = Vec::new();
    let mut serials = Vec::new();
    for name in ["a", "b"] {
        let data = replica_ca(&ca, &root, work.path(), name);
        let dir = data.path().join("ca");
        let token = work.path().join(format!("{name}.token"));
        run(Command::new(&ca)
            .args([
                "token",
                "create",
                "--namespace",
                "ha.local",
                "--service",
                "api",
                "--dir",
            ])
            .arg(&dir)
            .arg("--out")
            .arg(&token));
        let admin = work.path().join(format!("{name}-admin.token"));
        run(Command::new(&ca)
            .args(["token", "create", "--admin", "--dir"])
            .arg(&dir)
            .arg("--out")
            .arg(&admin));
        let replica = Replica::spawn_in(&etcd, "/ca/", &[], data).unwrap();
        // A workload key and CSR, signed by this replica over its API.
        let (key, csr) = (
            work.path().join(format!("{name}.key")),
            work.path().join(format!("{name}.csr")),
        );
        run(Command::new(&openssl)
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-subj", "/CN=api"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr));
        let headers = work.path().join(format!("{name}.headers"));
        let chain = run(Command::new("curl")
            .arg("-D")
            .arg(&headers)
            .args(["-sf", "-X", "POST", "-H"])
            .arg(format!(
                "authorization: Bearer {}",
                std::fs::read_to_string(&token).unwrap().trim()
            ))
            .arg("--data-binary")
            .arg(format!("@{}", csr.display()))
            .arg(format!("http://{}/v1/ca/sign", replica.api)));
        let path = work.path().join(format!("{name}-chain.pem"));
        std::fs::write(&path, &chain).unwrap();
        chains.push((chain, path));
        let serial = std::fs::read_to_string(&headers)
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("x-trellis-serial: ")
                    .map(|s| s.trim().to_owned())
            })
            .unwrap();
        serials.push((serial, admin));
        replicas.push(replica);
    }
    // Different intermediates, one trust bundle: both leaves verify against the shared root.
    let intermediate = |chain: &str| {
        chain
            .split("-----END CERTIFICATE-----")
            .nth(1)
            .unwrap()
            .to_owned()
    };
    assert_ne!(intermediate(&chains[0].0), intermediate(&chains[1].0));
    for (_, path) in &chains {
        let out = run(Command::new(&openssl)
            .arg("verify")
            .arg("-CAfile")
            .arg(root.join("root.crt"))
            .arg("-untrusted")
            .arg(path)
            .arg(path));
        assert!(out.contains(": OK"), "{out}");
    }

    // A revocation on A appears in B's CRL (B answers every replica's CRL).
    let (serial, token) = &serials[0];
    let revoke = run(Command::new("curl")
        .args(["-sf", "-X", "POST", "-H"])
        .arg(format!(
            "authorization: Bearer {}",
            std::fs::read_to_string(token).unwrap().trim()
        ))
        .arg("--data-binary")
        .arg(format!(r#"{{"serial":"{serial}"}}"#))
        .arg(format!("http://{}/v1/ca/revoke", replicas[0].api)));
    let crl = work.path().join("crl-from-b.pem");
    eventually(Duration::from_secs(10), "A's revocation in B's CRL", || {
        let (s, pem) = get(replicas[1].api, "/v1/ca/crl");
        std::fs::write(&crl, &pem).unwrap();
        s == 200 && pem.matches("BEGIN X509 CRL").count() == 2 && {
            let out = Command::new(&openssl)
                .arg("verify")
                .arg("-crl_check")
                .arg("-CAfile")
                .arg(root.join("root.crt"))
                .arg("-CRLfile")
                .arg(&crl)
                .arg("-untrusted")
                .arg(&chains[0].1)
                .arg(&chains[0].1)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("revoked")
                || String::from_utf8_lossy(&out.stderr).contains("revoked")
        }
    });
    let _ = revoke;
    // B's own leaf is still good under B's CRL from the same file.
    let out = run(Command::new(&openssl)
        .arg("verify")
        .arg("-crl_check")
        .arg("-CAfile")
        .arg(root.join("root.crt"))
        .arg("-CRLfile")
        .arg(&crl)
        .arg("-untrusted")
        .arg(&chains[1].1)
        .arg(&chains[1].1));
    assert!(out.contains(": OK"), "{out}");
}

#[test]
fn etcd_over_tls_with_a_client_certificate() {
    let Some(openssl) = tools::require("openssl", "certificates for etcd TLS") else {
        return;
    };
    if tools::require("curl", "the HA tests call the API with curl").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(Command::new(&openssl)
        .args(["req", "-x509", "-days", "1", "-subj", "/CN=test etcd CA"])
        .args(ec)
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.crt")));
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(p(&format!("{name}.ext")), ext).unwrap();
        run(Command::new(&openssl)
            .args(["req", "-new", "-subj", &format!("/CN={name}")])
            .args(ec)
            .arg("-keyout")
            .arg(p(&format!("{name}.key")))
            .arg("-out")
            .arg(p(&format!("{name}.csr"))));
        run(Command::new(&openssl)
            .args(["x509", "-req", "-days", "1", "-CAcreateserial", "-in"])
            .arg(p(&format!("{name}.csr")))
            .arg("-CA")
            .arg(p("ca.crt"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-extfile")
            .arg(p(&format!("{name}.ext")))
            .arg("-out")
            .arg(p(&format!("{name}.crt"))));
    }
    let tls = trellis_test_support::etcd::Tls {
        ca: p("ca.crt"),
        cert: p("server.crt"),
        key: p("server.key"),
        client_cert: p("client.crt"),
        client_key: p("client.key"),
    };
    let Some(etcd) = EtcdCluster::start_with(1, Some(tls)) else {
        return;
    };
    let ca = p("ca.crt").display().to_string();
    let (cert, key) = (
        p("client.crt").display().to_string(),
        p("client.key").display().to_string(),
    );
    // Without a client certificate the member refuses us: the replica does not start.
    assert!(Replica::spawn(&etcd, "/tls/", &["--etcd-ca", &ca]).is_err());
    let with_cert = ["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key];
    let a = Replica::spawn(&etcd, "/tls/", &with_cert).unwrap();
    let b = Replica::spawn(&etcd, "/tls/", &with_cert).unwrap();
    let svc = setup(a.api, "tls.local");
    ok(
        a.api,
        "RegisterInstance",
        register_body(&svc, "i-1", "10.0.0.1"),
    );
    eventually(Duration::from_secs(3), "B discovers over TLS", || {
        discovers(b.api, "tls.local", &["i-1"])
    });
    // `migrate` takes the same TLS options: a backup of the registry over TLS.
    let backup = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trellis-discovery"))
        .args(["migrate", "--etcd-prefix", "/tls/", "--from"])
        .arg(format!("etcd:{}", etcd.endpoints()))
        .arg("--to")
        .arg(format!("embedded:{}", backup.path().display()))
        .args(with_cert)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("migrated"), "{text}");
    let restored = embedded(backup.path());
    assert_eq!(discover(restored.api, "tls.local"), ["i-1"]);
}
