//! A CPU cap for subjects: a cgroup (v2 `cpu.max`, or v1 `cpu.cfs_quota_us`) that every subject
//! process joins before it execs, so that each server gets the same share of its core.
//!
//! Used where one load generator on one core cannot saturate a server on the other (DNS: one
//! dnsperf tops out near 260k queries/s, about what either server answers at full speed). With
//! the same cap on every server, the servers are the bottleneck and their queries/s compare
//! their speed rather than the generator's.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// CFS period: short, so that throttling does not come in 100 ms bursts that dnsperf would
/// count as lost queries.
const PERIOD_US: u64 = 10_000;

/// A cgroup with a CPU quota; removed when dropped (after its processes have exited).
#[derive(Debug)]
pub struct CpuCap {
    dir: PathBuf,
}

impl CpuCap {
    /// Creates the cgroup `trellis-bench-cap` limited to `percent` of one CPU. Fails (with the
    /// reason) where cgroups are not writable, e.g. without root or in a container.
    pub fn create(percent: u32) -> Result<CpuCap> {
        if !(1..=100).contains(&percent) {
            bail!("a CPU cap is 1–100% of one core, not {percent}%");
        }
        let quota = PERIOD_US * u64::from(percent) / 100;
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
        let dir = if v2.exists() {
            let root = Path::new("/sys/fs/cgroup");
            // The cpu controller must be enabled for the root's children.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu");
            let dir = root.join("trellis-bench-cap");
            make_dir(&dir)?;
            write(&dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
            dir
        } else {
            let dir = Path::new("/sys/fs/cgroup/cpu/trellis-bench-cap").to_path_buf();
            make_dir(&dir)?;
            write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            dir
        };
        Ok(CpuCap { dir })
    }

    /// The file a process writes its pid into to join.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

/// The command prefix that moves the process into `procs_file`'s cgroup and then execs the rest
/// (the pid stays the same, so the harness still measures the server itself).
pub fn join_prefix(procs_file: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "sh".into(),
        "-c".into(),
        r#"echo $$ > "$0" && exec "$@""#.into(),
        procs_file.as_os_str().to_owned(),
    ]
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn make_dir(dir: &Path) -> Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating cgroup {}", dir.display())),
    }
}

fn write(file: &Path, value: &str) -> Result<()> {
    std::fs::write(file, value).with_context(|| format!("writing {value:?} to {}", file.display()))
}
