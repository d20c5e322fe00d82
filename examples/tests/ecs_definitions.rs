//! The ECS task and service definitions in examples/ecs must stay valid: botocore's own validator
//! (the one the aws CLI and boto3 run) checks them against the ECS API model.

use std::process::Command;

use trellis_test_support::tools::{python_with, skip_or_fail, workspace_root};

#[test]
fn ecs_definitions_match_botocore_model() {
    let Some(python) =
        python_with(&["botocore"]).or_else(|| skip_or_fail("no python3 with botocore"))
    else {
        return;
    };
    let out = Command::new(python)
        .arg(workspace_root().join("examples/ecs/validate.py"))
        .output()
        .expect("run validate.py");
    assert!(
        out.status.success(),
        "ECS definitions invalid:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The sidecar container's environment (secrets filled with stand-ins) is a valid sidecar config:
/// a control plane over HTTPS, its roots from an SSM parameter.
#[test]
fn ecs_sidecar_environment_is_a_valid_config() {
    let text = std::fs::read_to_string(workspace_root().join("examples/ecs/task-definition.json"))
        .expect("task definition");
    let task: serde_json::Value = serde_json::from_str(&text).expect("json");
    let proxy = task["containerDefinitions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "trellis-proxy"))
        .expect("trellis-proxy container");
    let mut env = std::collections::BTreeMap::new();
    for e in proxy["environment"].as_array().expect("environment") {
        let (Some(k), Some(v)) = (e["name"].as_str(), e["value"].as_str()) else {
            panic!("bad environment entry {e}");
        };
        env.insert(k.to_owned(), v.to_owned());
    }
    for s in proxy["secrets"].as_array().expect("secrets") {
        let k = s["name"].as_str().expect("secret name");
        env.insert(k.to_owned(), format!("stand-in for {}", s["valueFrom"]));
    }
    let config = trellis_proxy::Config::load(None, &trellis_proxy::MapEnv(env))
        .unwrap_or_else(|e| panic!("{e}"));
    let cp = config.control_plane.expect("control plane");
    assert!(cp.tls && cp.trust_bundle_pem.is_some(), "{cp:?}");
}
