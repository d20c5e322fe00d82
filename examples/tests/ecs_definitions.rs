//! The ECS task and service definitions in examples/ecs must stay valid: botocore's own validator
//! (the one the aws CLI and boto3 run) checks them against the ECS API model.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A python3 that can import botocore: the repo's .venv first, then PATH.
fn python_with_botocore() -> Option<PathBuf> {
    let venv = workspace_root().join(".venv/bin/python3");
    [venv, PathBuf::from("python3")].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import botocore"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn ecs_definitions_match_botocore_model() {
    let Some(python) = python_with_botocore() else {
        assert!(
            std::env::var_os("TRELLIS_REQUIRE_TOOLS").is_none(),
            "botocore is required (TRELLIS_REQUIRE_TOOLS is set): run scripts/install-test-deps.sh"
        );
        eprintln!("skipping: no python3 with botocore (run scripts/install-test-deps.sh)");
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
