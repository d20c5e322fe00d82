//! Child processes owned by a benchmark: started with a config in the work dir, waited on until they
//! listen, and killed (with their process group) when dropped, so no run leaves anything behind.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{Ctx, Role};

pub struct Proc {
    pub name: String,
    child: Child,
    /// Processes that are part of this subject (e.g. the server half of a proxy pair): their CPU
    /// and memory count with this one's, and they stop with it.
    measured: Vec<Proc>,
    /// Processes this subject needs but that are not measured (e.g. the control plane that issued
    /// its certificates); they stop with it.
    background: Vec<Proc>,
}

impl Proc {
    /// Spawns `program args` (with extra environment, e.g. `TOKIO_WORKER_THREADS`) in its own
    /// process group, output to `<work>/<name>.log`.
    pub fn spawn_env(
        ctx: &Ctx,
        role: Role,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        let log = std::fs::File::create(ctx.work.join(format!("{name}.log")))?;
        // [taskset -c CPU] [join the CPU cap's cgroup] [wrapper...] program args
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(cpu) = ctx.cpu_for(role) {
            argv.extend(["taskset", "-c", cpu].map(std::ffi::OsString::from));
        }
        if role == Role::Subject {
            if let Some(procs) = &ctx.cpu_cap {
                argv.extend(crate::cgroup::join_prefix(procs));
            }
            argv.extend(ctx.wrap.iter().map(std::ffi::OsString::from));
        }
        argv.push(program.as_os_str().to_owned());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            measured: Vec::new(),
            background: Vec::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// This process and every measured companion (see [`Proc::with_measured`]).
    pub fn pids(&self) -> Vec<u32> {
        let mut v = vec![self.pid()];
        v.extend(self.measured.iter().flat_map(Proc::pids));
        v
    }

    /// Makes `other` part of this subject: measured together, stopped together.
    pub fn with_measured(mut self, other: Proc) -> Proc {
        self.measured.push(other);
        self
    }

    /// Keeps `other` running as long as this subject, without measuring it.
    pub fn with_background(mut self, other: Proc) -> Proc {
        self.background.push(other);
        self
    }

    /// Waits until `addr` accepts TCP connections, or fails with the process's log tail.
    pub fn wait_tcp(&mut self, ctx: &Ctx, addr: SocketAddr) -> Result<()> {
        // Slower under a wrapper such as valgrind.
        let limit = Duration::from_secs(if ctx.wrap.is_empty() { 20 } else { 120 });
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening:\n{}",
                    self.name,
                    self.log_tail(ctx)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} did not listen on {addr} within {limit:?}:\n{}",
            self.name,
            self.log_tail(ctx)
        )
    }

    /// SIGTERM, then waits up to `limit` for the process to exit (e.g. so valgrind writes its
    /// profile); SIGKILL after that. Companions are stopped on drop as usual.
    pub fn terminate(&mut self, limit: Duration) -> Result<()> {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{} did not exit within {limit:?} of SIGTERM", self.name)
    }

    fn log_tail(&self, ctx: &Ctx) -> String {
        let text = std::fs::read_to_string(ctx.work.join(format!("{}.log", self.name)))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The whole group: nginx and HAProxy fork workers.
        let pgid = self.child.id() as i32;
        #[allow(unsafe_code)]
        // SAFETY: kill(2) with a negative pid signals the process group we created; no memory is touched.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound then released; the race is acceptable for a benchmark).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Stands for the written config file's path in [`Launch::args`].
pub const CONFIG: &str = "{config}";

/// A config-driven subject (nginx, HAProxy, unbound, trellis): write its config into the work dir,
/// start it, wait until it listens.
pub struct Launch<'a> {
    pub role: Role,
    pub name: &'a str,
    pub program: &'a Path,
    /// Arguments; [`CONFIG`] is replaced by the config file's path.
    pub args: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
    /// File name of the config inside the work dir.
    pub config_file: &'a str,
    pub config: &'a str,
    /// Loopback port the subject listens on when ready.
    pub port: u16,
}

impl Launch<'_> {
    pub fn start(&self, ctx: &Ctx) -> Result<(Proc, SocketAddr)> {
        let path = ctx.work.join(self.config_file);
        std::fs::write(&path, self.config)?;
        let path = path.display().to_string();
        let args: Vec<&str> = self
            .args
            .iter()
            .map(|a| if *a == CONFIG { path.as_str() } else { a })
            .collect();
        let mut p = Proc::spawn_env(ctx, self.role, self.name, self.program, &args, self.env)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        p.wait_tcp(ctx, addr)?;
        Ok((p, addr))
    }
}
