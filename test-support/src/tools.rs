//! Real tools the tests drive, and the skip-or-fail rule for a missing one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The workspace root (the folder holding the root Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Whether CI demands every tool (a missing tool then fails the test instead of skipping it).
pub fn tools_required() -> bool {
    std::env::var_os("TRELLIS_REQUIRE_TOOLS").is_some()
}

/// Finds `program`: the repo's `.venv/bin` first (where scripts/install-test-deps.sh puts the AWS
/// clients), then PATH. Returns None when it is not there.
pub fn find(program: &str) -> Option<PathBuf> {
    let venv = workspace_root().join(".venv/bin").join(program);
    if venv.is_file() {
        return Some(venv);
    }
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::piped())
        .output()
        .ok()?;
    if !ok.status.success() {
        return None;
    }
    let path = String::from_utf8_lossy(&ok.stdout).trim().to_owned();
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// Finds `program` or decides the test's fate: returns None (after printing why) when the test should
/// be skipped, panics when CI requires the tool.
pub fn require(program: &str, why: &str) -> Option<PathBuf> {
    if let Some(p) = find(program) {
        return Some(p);
    }
    skip_or_fail(&format!(
        "{program} not found ({why}); run scripts/install-test-deps.sh"
    ))
}

/// A python3 that imports all of `modules` (the venv's first).
pub fn python_with(modules: &[&str]) -> Option<PathBuf> {
    let import = format!("import {}", modules.join(", "));
    let venv = workspace_root().join(".venv/bin/python3");
    [venv, PathBuf::from("python3")].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", &import])
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Skips (returns None) on a developer machine; panics under CI's `TRELLIS_REQUIRE_TOOLS`.
pub fn skip_or_fail<T>(reason: &str) -> Option<T> {
    assert!(
        !tools_required(),
        "required by CI (TRELLIS_REQUIRE_TOOLS is set): {reason}"
    );
    eprintln!("skipping: {reason}");
    None
}

/// Whether the tests run as root (network namespaces, iptables).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
