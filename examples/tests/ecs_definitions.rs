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
