//! The real `trellis-proxy sidecar` process: config from a file plus `TRELLIS_*` variables,
//! SIGHUP reload, SIGTERM drain without losing the request in flight.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn config(app: std::net::SocketAddr) -> String {
    format!(
        "[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n\n[[clusters]]\nservice = \"api\"\nendpoints = [{{ address = \"{app}\" }}]\n"
    )
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test]
async fn binary_reloads_on_sighup_and_drains_on_sigterm() {
    let a = app("a", None).await;
    let b = app("b", None).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, config(a.addr)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
        .env_clear()
        .args(["sidecar", "--config"])
        .arg(&path)
        // Identity and admin from the environment, the rest from the file.
        .env("TRELLIS_IDENTITY__NAMESPACE", "my-app.local")
        .env("TRELLIS_IDENTITY__SERVICE", "web")
        .env("TRELLIS_ADMIN__LISTEN", "127.0.0.1:0")
        .env("TRELLIS_RUNTIME__DRAIN_TIMEOUT", "5s")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addrs: serde_json::Value = serde_json::from_str(&line).unwrap();
    let admin = addrs["admin"].as_str().unwrap().to_owned();
    let port = addrs["upstreams"]["api"].as_str().unwrap().to_owned();
    let c = h1_client();
    assert_eq!(get(&c, &format!("http://{admin}/ready")).await.0, 200);
    // The container health check the ECS example uses.
    let probe = |path: &str| {
        Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
            .args(["probe", &format!("http://{admin}{path}")])
            .status()
            .unwrap()
            .success()
    };
    assert!(probe("/ready"));
    assert!(!probe("/nope"));
    assert_eq!(get(&c, &format!("http://{port}/")).await.1, "a");

    // SIGHUP: the static cluster now points at b.
    std::fs::write(&path, config(b.addr)).unwrap();
    signal(child.id(), "-HUP");
    let mut switched = false;
    for _ in 0..100 {
        if get(&c, &format!("http://{port}/")).await.1 == "b" {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(switched, "reload applied");

    // A file change alone is picked up too (polled every second).
    std::fs::write(&path, config(a.addr)).unwrap();
    let mut switched = false;
    for _ in 0..150 {
        if get(&c, &format!("http://{port}/")).await.1 == "a" {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(switched, "file change applied");

    // SIGTERM with a request in flight: it completes, then the process exits 0.
    let seen = a.hits.load(std::sync::atomic::Ordering::SeqCst);
    let slow = {
        let c = c.clone();
        let port = port.clone();
        tokio::spawn(async move { get(&c, &format!("http://{port}/slow")).await.0 })
    };
    wait_hits(&a, seen + 1).await;
    signal(child.id(), "-TERM");
    assert_eq!(slow.await.unwrap(), 200);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn invalid_config_fails_at_start_naming_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
        .env_clear()
        .args(["sidecar", "--check"])
        .env("TRELLIS_IDENTITY__NAMESPACE", "my-app.local")
        .env("TRELLIS_IDENTITY__SERVICE", "web")
        .env("TRELLIS_LIMITS__MAX_CONNECTIONZ", "3")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_connectionz"), "{err}");
}

#[test]
fn ecs_task_definition_environment_loads() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/ecs/task-definition.json"
    );
    let td: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut env = trellis_proxy::MapEnv::default();
    for c in td["containerDefinitions"].as_array().unwrap() {
        for e in c["environment"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap();
            if name.starts_with("TRELLIS_") {
                env.0
                    .insert(name.to_owned(), e["value"].as_str().unwrap().to_owned());
            }
        }
        for e in c["secrets"].as_array().into_iter().flatten() {
            // Secrets arrive as environment variables at run time; any value stands in here.
            env.0.insert(
                e["name"].as_str().unwrap().to_owned(),
                "from-secrets-manager".to_owned(),
            );
        }
    }
    assert!(env.0.contains_key("TRELLIS_IDENTITY__SERVICE"), "{env:?}");
    let c = trellis_proxy::Config::load(None, &env).unwrap();
    assert_eq!(c.identity.service.as_str(), "api");
}

#[tokio::test]
async fn json_access_log() {
    let a = app("a", None).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, config(a.addr)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis-proxy"))
        .env_clear()
        .args(["sidecar", "--log-json", "--config"])
        .arg(&path)
        .env("TRELLIS_IDENTITY__NAMESPACE", "my-app.local")
        .env("TRELLIS_IDENTITY__SERVICE", "web")
        .env("TRELLIS_ADMIN__LISTEN", "127.0.0.1:0")
        .env("TRELLIS_RUNTIME__ACCESS_LOG", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addrs: serde_json::Value = serde_json::from_str(&line).unwrap();
    let port = addrs["upstreams"]["api"].as_str().unwrap().to_owned();
    assert_eq!(
        get(&h1_client(), &format!("http://{port}/hello?x=1"))
            .await
            .0,
        200
    );
    signal(child.id(), "-TERM");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let entry = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "trellis_proxy::access")
        .unwrap_or_else(|| panic!("no access log line in {log}"));
    assert_eq!(entry["fields"]["status"], 200, "{entry}");
    assert_eq!(entry["fields"]["path"], "/hello", "{entry}");
    assert_eq!(entry["fields"]["upstream"], "api", "{entry}");
}

/// `trellis-proxy probe https://...` (the compose control plane's health check): the chain and
/// the host name verify against `--cacert`; without it, or against other roots, the probe fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_checks_an_https_control_plane_against_its_roots() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = trellis_discovery::ServerConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.data_dir = Some(dir.path().to_owned());
    cfg.api_tls = Some(trellis_discovery::ApiTls::default());
    let server = trellis_discovery::Server::start(cfg).await.unwrap();
    let port = server.api_addr.port();
    let root = dir.path().join("ca").join("root.crt");
    let other = dir.path().join("other.pem");
    std::fs::write(
        &other,
        trellis_ca::EphemeralCa::new("mesh.local")
            .unwrap()
            .roots_pem(),
    )
    .unwrap();
    let probe = move |url: String, cacert: Option<std::path::PathBuf>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis-proxy"));
        cmd.args(["probe", &url]);
        if let Some(c) = cacert {
            cmd.arg("--cacert").arg(c);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let run = |url: String, cacert: Option<std::path::PathBuf>| {
        tokio::task::spawn_blocking(move || probe(url, cacert))
    };
    let (ok, err) = run(
        format!("https://127.0.0.1:{port}/healthz"),
        Some(root.clone()),
    )
    .await
    .unwrap();
    assert!(ok, "{err}");
    let (ok, err) = run(format!("https://localhost:{port}/healthz"), Some(root))
        .await
        .unwrap();
    assert!(ok, "{err}");
    let (ok, err) = run(format!("https://127.0.0.1:{port}/healthz"), None)
        .await
        .unwrap();
    assert!(!ok && err.contains("--cacert"), "{err}");
    let (ok, err) = run(format!("https://127.0.0.1:{port}/healthz"), Some(other))
        .await
        .unwrap();
    assert!(!ok && err.contains("UnknownIssuer"), "{err}");
    server.shutdown().await;
}
