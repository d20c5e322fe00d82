use std::path::{Path, PathBuf};
use std::process::Command;

/// Finds a tool on PATH. Missing: fail under TRELLIS_REQUIRE_TOOLS=1, otherwise skip.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    // The repo-local venv that scripts/install-test-deps.sh creates.
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.venv/bin")
        .join(name);
    if venv.is_file() {
        return Some(venv);
    }
    if std::env::var("TRELLIS_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("required tool {name} not found on PATH (run scripts/install-test-deps.sh)");
    }
    eprintln!("skipping: {name} not found on PATH (run scripts/install-test-deps.sh)");
    None
}

/// Runs a command; returns (success, stdout+stderr).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("spawn");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}
