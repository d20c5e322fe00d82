//! trellis-bench: measures trellis against the peers people already run (nginx, HAProxy, unbound,
//! openssl), side by side in one run on one machine, with the same worker count.
//!
//! The harness owns processes ([`proc`]), load generators ([`load`]), resource sampling
//! ([`resources`]) and reporting ([`report`]: Markdown tables with ratios, raw JSON, SVG plots).
//! Each scenario lives in its own module under [`scenarios`].

pub mod cgroup;
pub mod load;
pub mod proc;
pub mod report;
pub mod resources;
pub mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

/// Settings shared by every scenario.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Short runs that only prove every scenario produces numbers.
    pub quick: bool,
    /// Measured runs per subject (the median is reported).
    pub runs: usize,
    /// Length of each measured run.
    pub duration: Duration,
    /// Worker threads/processes for every proxy under test.
    pub workers: usize,
    /// Concurrent connections of the load generator.
    pub connections: usize,
    /// Pin the subject under test to CPU 1 and load + origin to CPU 0.
    pub pin: bool,
    /// Scratch directory for configs and logs (removed and recreated per run).
    pub work: PathBuf,
    /// The workspace's release binaries.
    pub bin_dir: PathBuf,
    /// A command every subject runs under (e.g. `valgrind --tool=callgrind`), none normally.
    /// Subjects then run as a single process (nginx without its master).
    pub wrap: Vec<String>,
    /// A cgroup's `cgroup.procs` that every subject joins before it starts ([`cgroup::CpuCap`]),
    /// none normally.
    pub cpu_cap: Option<PathBuf>,
}

impl Ctx {
    /// This context with its own work dir `<work>/<name>` (created).
    pub fn in_subdir(&self, name: &str) -> std::io::Result<Ctx> {
        let work = self.work.join(name);
        std::fs::create_dir_all(&work)?;
        Ok(Ctx {
            work,
            ..self.clone()
        })
    }
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
    /// `taskset` prefix for a process in the given role, when pinning.
    pub fn cpu_for(&self, role: Role) -> Option<&'static str> {
        if !self.pin {
            return None;
        }
        Some(match role {
            Role::Subject => "1",
            Role::Load | Role::Origin => "0",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Subject,
    Load,
    Origin,
}
