//! The compose mesh stays valid and its scripts work for real: the compose file parses
//! (`docker-compose config`), Prometheus's config passes `promtool check config`, every sidecar's
//! environment is a valid sidecar config, the LB config compiles, the Grafana dashboard only queries
//! metrics trellis exports, and `init.sh` + `register.sh` (the real aws CLI) set up a control plane.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use trellis_discovery::{Server, ServerConfig};
use trellis_examples::cloudmap::CloudMap;
use trellis_proxy::{Config, MapEnv};
use trellis_test_support::{bins, tools};

fn compose_dir() -> PathBuf {
    tools::workspace_root().join("compose")
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn compose_file_is_valid() {
    let Some(dc) = tools::require("docker-compose", "compose file validation") else {
        return;
    };
    run_ok(
        Command::new(dc)
            .arg("-f")
            .arg(compose_dir().join("docker-compose.yml"))
            .args(["config", "-q"]),
    );
}

#[test]
fn prometheus_config_passes_promtool() {
    let Some(promtool) = tools::require("promtool", "Prometheus config check") else {
        return;
    };
    run_ok(
        Command::new(promtool)
            .args(["check", "config"])
            .arg(compose_dir().join("prometheus.yml")),
    );
}

#[test]
fn every_sidecar_environment_is_a_valid_config() {
    let Some(python) =
        tools::python_with(&["yaml"]).or_else(|| tools::skip_or_fail("no python3 with PyYAML"))
    else {
        return;
    };
    let script = "import json,sys,yaml; d=yaml.safe_load(open(sys.argv[1])); \
        print(json.dumps({k: v.get('environment', {}) for k, v in d['services'].items() \
        if v.get('command') == ['sidecar']}))";
    let json = run_ok(
        Command::new(python)
            .args(["-c", script])
            .arg(compose_dir().join("docker-compose.yml")),
    );
    let sidecars: BTreeMap<String, BTreeMap<String, String>> =
        serde_json::from_str(&json).expect("json");
    assert_eq!(sidecars.len(), 4, "{sidecars:?}");
    for (name, env) in sidecars {
        let config = Config::load(None, &MapEnv(env)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(config.control_plane.is_some(), "{name}");
    }
}

#[test]
fn lb_config_compiles() {
    let config = trellis_proxy::lb::LbConfig::load(&compose_dir().join("lb.toml")).expect("load");
    config.compile().expect("compile");
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let dash = std::fs::read_to_string(compose_dir().join("grafana/dashboards/trellis.json"))
        .expect("dashboard");
    let _: serde_json::Value = serde_json::from_str(&dash).expect("dashboard is JSON");
    let mut sources = String::new();
    for dir in ["proxy/src", "discovery/src"] {
        for entry in std::fs::read_dir(tools::workspace_root().join(dir)).expect("src") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(path).expect("read"));
            }
        }
    }
    let mut checked = 0;
    for (i, _) in dash.match_indices("trellis_") {
        let name: String = dash[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = name.trim_end_matches("_bucket");
        if base == "trellis_golden_signals" {
            continue;
        }
        assert!(
            sources.contains(&format!("\"{base}\"")),
            "dashboard queries {name}, which no component exports"
        );
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} metric references");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_and_register_scripts_set_up_a_control_plane() {
    let Some(aws) = tools::require("aws", "register.sh uses the aws CLI") else {
        return;
    };
    let data = std::env::temp_dir().join(format!("trellis-compose-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let ca_bin = bins::binary("trellis-ca", "trellis-ca");
    let path = format!(
        "{}:{}:{}",
        ca_bin.parent().expect("bin dir").display(),
        aws.parent().expect("aws dir").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let tokens = data.join("tokens");
    run_ok(
        Command::new("sh")
            .arg(compose_dir().join("init.sh"))
            .env("PATH", &path)
            .env("DATA", &data)
            .env("TOKENS", &tokens),
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tokens.join("api.token"))
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The control plane opens the CA init.sh made, as in compose.
    // With --api-tls, as in compose: register.sh's aws CLI verifies it with the root init.sh
    // copied beside the tokens.
    let mut cfg = ServerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.data_dir = Some(data.clone());
    cfg.api_tls = Some(trellis_discovery::ApiTls::default());
    let server = Server::start(cfg).await.expect("control plane");
    let endpoint = server.api_url();
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let root = tokens.join("root.crt");
    assert!(root.is_file(), "init.sh copies the root beside the tokens");
    for _ in 0..2 {
        // Twice: the script is idempotent.
        run_ok(
            Command::new("sh")
                .arg(compose_dir().join("register.sh"))
                .env("PATH", &path)
                .env("ENDPOINT", &endpoint)
                .env("AWS_CA_BUNDLE", &root)
                .env("AWS_ACCESS_KEY_ID", "compose")
                .env("AWS_SECRET_ACCESS_KEY", "compose")
                .env("USERS_IP", "127.0.0.21")
                .env("API_IP", "127.0.0.22")
                .env("WEB_IP", "127.0.0.23"),
        );
    }
    let bundle = trellis_ca::TrustBundle::from_pem(
        "mesh.local".parse().expect("trust domain"),
        &std::fs::read_to_string(&root).expect("root.crt"),
    )
    .expect("bundle");
    let https = trellis_ca::cp_client::Transport::https(&bundle).expect("transport");
    let cm = CloudMap::with_transport(server.api_addr, &https);
    for svc in ["users", "api", "web"] {
        let r = cm
            .call(
                "DiscoverInstances",
                serde_json::json!({ "NamespaceName": "my-app.local", "ServiceName": svc, "HealthStatus": "ALL" }),
            )
            .await
            .expect("discover");
        let instances = r["Instances"].as_array().expect("instances");
        assert_eq!(instances.len(), 1, "{svc}: {r}");
        assert_eq!(instances[0]["Attributes"]["AWS_INSTANCE_PORT"], "15443");
    }
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&data);
}
