//! The workspace's own binaries, for tests that run them as separate processes (in namespaces, or to
//! kill them with SIGKILL). Built on demand when missing, so `cargo test -p <one crate>` works too.

use std::path::PathBuf;
use std::process::Command;

use crate::tools::workspace_root;

/// `target/<profile>` of the running test binary (its exe lives in `target/<profile>/deps/`).
pub fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(PathBuf::from))
        .unwrap_or_else(|| workspace_root().join("target/debug"))
}

/// The path of binary `bin` from package `package`, building it first when it is not there.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    let path = target_dir().join(bin);
    if !path.is_file() {
        let release = target_dir().ends_with("release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(workspace_root())
            .args(["build", "-p", package, "--bin", bin]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build -p {package} --bin {bin} failed"
        );
    }
    path
}
