//! The scenarios. Each builds its peers, runs the same load against every subject in the same run,
//! and returns a [`ScenarioResult`](crate::report::ScenarioResult).

pub mod control;
pub mod dns;
pub mod http;
pub mod instructions;
pub mod lb;
pub mod memory;
pub mod mtls;
pub mod peers;
pub mod tcp;
pub mod trellis;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;

use crate::load::Sample;
use crate::proc::{Proc, free_port};
use crate::report::Row;
use crate::{Ctx, resources};

/// A way to start one subject in front of `origin`: returns its process (None for "direct") and the
/// address the load generator should hit.
pub type Starter<'a> =
    Box<dyn Fn(&Ctx, u16, SocketAddr) -> Result<(Option<Proc>, SocketAddr)> + 'a>;

pub struct Subject<'a> {
    pub name: String,
    pub start: Starter<'a>,
}

impl<'a> Subject<'a> {
    pub fn new(
        name: &str,
        start: impl Fn(&Ctx, u16, SocketAddr) -> Result<(Option<Proc>, SocketAddr)> + 'a,
    ) -> Self {
        Subject {
            name: name.to_owned(),
            start: Box::new(start),
        }
    }
    /// The origin itself, no proxy.
    pub fn direct() -> Self {
        Subject::new("direct", |_, _, origin| Ok((None, origin)))
    }
}

/// Starts `subject`, warms up, then runs `load` `ctx.runs` times, recording the subject's CPU time
/// per request and its RSS. The subject is stopped before returning.
pub fn measure(
    ctx: &Ctx,
    subject: &Subject<'_>,
    origin: SocketAddr,
    load: &dyn Fn(&Ctx, SocketAddr, Duration) -> Result<Sample>,
) -> Result<Row> {
    let port = free_port()?;
    let (proc, addr) = (subject.start)(ctx, port, origin)?;
    let pids = proc.as_ref().map(Proc::pids);
    eprintln!("  {}: warm-up", subject.name);
    load(ctx, addr, warmup(ctx))?;
    let mut runs = Vec::new();
    for i in 0..ctx.runs {
        let cpu_of = |pids: &[u32]| pids.iter().map(|p| resources::cpu_seconds(*p)).sum::<f64>();
        let cpu0 = pids.as_deref().map(cpu_of);
        let mut s = load(ctx, addr, ctx.duration)?;
        if let (Some(pids), Some(cpu0)) = (&pids, cpu0) {
            let cpu = cpu_of(pids) - cpu0;
            if s.total > 0 {
                s.cpu_us_per_req = Some(cpu * 1e6 / s.total as f64);
            }
            s.rss_kib = Some(pids.iter().map(|p| resources::rss_kib(*p)).sum());
        }
        eprintln!(
            "  {}: run {}/{}: {:.0}/s p99 {:.0}µs errors {}{}",
            subject.name,
            i + 1,
            ctx.runs,
            s.rate,
            s.p99_us,
            s.errors,
            s.cpu_us_per_req
                .map(|c| format!(" cpu {c:.1}µs/req"))
                .unwrap_or_default()
        );
        runs.push(s);
    }
    drop(proc);
    Ok(Row {
        subject: subject.name.clone(),
        runs,
    })
}

fn warmup(ctx: &Ctx) -> Duration {
    if ctx.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(2)
    }
}
