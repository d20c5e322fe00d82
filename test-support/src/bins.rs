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

/// Spawns `cmd`, a server that prints its bound addresses as its first line on stdout, and reads
/// that line (empty when the process exited before printing it).
pub fn spawn_reading_first_line(
    cmd: &mut std::process::Command,
) -> std::io::Result<(std::process::Child, String)> {
    use std::io::BufRead;
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        std::io::BufReader::new(out).read_line(&mut line)?;
    }
    Ok((child, line))
}

/// The API address in the first line `trellis-discovery serve` prints
/// (`trellis-discovery: api http://A dns D`, or `https://A` with `--api-tls`).
pub fn discovery_api(line: &str) -> Option<std::net::SocketAddr> {
    let url = line.split_whitespace().nth(2)?;
    url.strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?
        .parse()
        .ok()
}
