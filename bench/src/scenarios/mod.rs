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

use anyhow::{Context, Result};

use crate::load::Sample;
use crate::proc::{Proc, free_port};
use crate::report::Row;
use crate::{Ctx, Role, resources};

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
    load: &Load<'_>,
) -> Result<Row> {
    let entry = Entry {
        ctx: ctx.clone(),
        subject,
        origin,
        load,
    };
    let mut rows = measure_interleaved(std::slice::from_ref(&entry))?;
    rows.pop().context("one subject measured, no row")
}

fn warmup(ctx: &Ctx) -> Duration {
    if ctx.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(2)
    }
}

/// The load a subject is measured with: `(ctx, address, duration)`.
pub type Load<'a> = dyn Fn(&Ctx, SocketAddr, Duration) -> Result<Sample> + 'a;

/// One subject of an interleaved measurement, with its own context (e.g. its own work dir) and
/// load.
pub struct Entry<'a> {
    pub ctx: Ctx,
    pub subject: &'a Subject<'a>,
    pub origin: SocketAddr,
    pub load: &'a Load<'a>,
}

/// Like [`measure`] for several subjects at once, measured in alternating rounds: every subject
/// is started and warmed up, then each round runs the load once against each subject (the order
/// rotates from round to round). A burst of noise on this shared machine then lands on every
/// subject alike instead of on whichever was measured last. Idle subjects wait on the same CPU
/// and use none of it.
pub fn measure_interleaved(entries: &[Entry<'_>]) -> Result<Vec<Row>> {
    let mut started = Vec::with_capacity(entries.len());
    for e in entries {
        let port = free_port()?;
        let (proc, addr) = (e.subject.start)(&e.ctx, port, e.origin)?;
        started.push((proc, addr));
    }
    for (e, (_, addr)) in entries.iter().zip(&started) {
        eprintln!("  {}: warm-up", e.subject.name);
        (e.load)(&e.ctx, *addr, warmup(&e.ctx))?;
    }
    let runs = entries.first().map_or(0, |e| e.ctx.runs);
    let mut rows: Vec<Row> = entries
        .iter()
        .map(|e| Row {
            subject: e.subject.name.clone(),
            runs: Vec::with_capacity(runs),
        })
        .collect();
    for round in 0..runs {
        for k in 0..entries.len() {
            let i = (round + k) % entries.len();
            let (e, (proc, addr)) = (&entries[i], &started[i]);
            let load_cpu = e.ctx.cpu_for(Role::Load);
            let s = run_once(proc.as_ref(), load_cpu, &|| {
                (e.load)(&e.ctx, *addr, e.ctx.duration)
            })?;
            eprintln!(
                "  {}: round {}/{runs}: {}",
                e.subject.name,
                round + 1,
                describe(&s)
            );
            rows[i].runs.push(s);
        }
    }
    drop(started);
    Ok(rows)
}

/// [`measure_interleaved`] for `subjects` behind one origin with one load; each subject gets its
/// own work dir (`<work>/<label>`), so that configs, logs and pid files of subjects running side
/// by side never meet.
pub fn measure_all(
    ctx: &Ctx,
    label: &str,
    subjects: &[Subject<'_>],
    origin: SocketAddr,
    load: &Load<'_>,
) -> Result<Vec<Row>> {
    let entries = subjects
        .iter()
        .map(|subject| {
            Ok(Entry {
                ctx: ctx.in_subdir(&format!("{label}-{}", subject.name))?,
                subject,
                origin,
                load,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    measure_interleaved(&entries)
}

/// One measured run: the load's sample plus the subject's CPU per request and RSS, and how busy
/// the load generator's CPU (`load_cpu`, when pinned) was.
fn run_once(
    proc: Option<&Proc>,
    load_cpu: Option<&str>,
    load: &dyn Fn() -> Result<Sample>,
) -> Result<Sample> {
    let pids = proc.map(Proc::pids);
    let cpu_of = |pids: &[u32]| {
        pids.iter()
            .map(|p| resources::cpu_split(*p))
            .fold((0.0, 0.0), |(u, s), (pu, ps)| (u + pu, s + ps))
    };
    let cpu0 = pids.as_deref().map(cpu_of);
    let jiffies = || load_cpu.and_then(resources::cpu_jiffies);
    let load0 = jiffies();
    let mut s = load()?;
    if let (Some(before), Some(after)) = (load0, jiffies()) {
        s.load_cpu_busy = resources::busy_between(before, after);
    }
    if let (Some(pids), Some((user0, sys0))) = (&pids, cpu0) {
        let (user, sys) = cpu_of(pids);
        if s.total > 0 {
            let per_req = 1e6 / s.total as f64;
            s.cpu_us_per_req = Some((user - user0 + sys - sys0) * per_req);
            s.sys_us_per_req = Some((sys - sys0) * per_req);
        }
        s.rss_kib = Some(pids.iter().map(|p| resources::rss_kib(*p)).sum());
    }
    Ok(s)
}

fn describe(s: &Sample) -> String {
    format!(
        "{:.0}/s p99 {:.0}µs errors {}{}",
        s.rate,
        s.p99_us,
        s.errors,
        s.cpu_us_per_req
            .map(|c| format!(" cpu {c:.1}µs/req"))
            .unwrap_or_default()
    )
}

/// Where each subject's CPU per request went: user space vs the kernel (medians over the runs).
/// Proxies that make the same syscalls per request pay about the same kernel time, so the
/// kernel's share bounds how far user-space work can move the ratio.
pub fn kernel_note(rows: &[Row]) -> Option<String> {
    let parts: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let cpu = r.cpu_median()?;
            if !r.runs.iter().all(|s| s.sys_us_per_req.is_some()) || cpu <= 0.0 {
                return None;
            }
            let sys = r.median(|s| s.sys_us_per_req.unwrap_or(0.0));
            Some(format!(
                "{} {:.1} user + {sys:.1} kernel ({:.0}% kernel)",
                r.subject,
                (cpu - sys).max(0.0),
                sys * 100.0 / cpu
            ))
        })
        .collect();
    (!parts.is_empty()).then(|| format!("CPU µs per request: {}.", parts.join("; ")))
}

/// How busy the load generator's CPU was behind each subject (medians over the runs), when the
/// processes are pinned.
pub fn load_cpu_note(rows: &[Row]) -> Option<String> {
    let parts: Vec<String> = rows
        .iter()
        .filter(|r| r.runs.iter().all(|s| s.load_cpu_busy.is_some()))
        .filter(|r| !r.runs.is_empty())
        .map(|r| {
            let busy = r.median(|s| s.load_cpu_busy.unwrap_or(0.0));
            format!("{} {:.0}%", r.subject, busy * 100.0)
        })
        .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "Load CPU (wrk and the origin, CPU 0) busy: {}.",
            parts.join(", ")
        )
    })
}

/// The ceiling the topology sets, from the `floor` subject: a pass-through that does almost
/// nothing per request, so its rate is what the load generator and origin allow. Says how close
/// `ours` came to it and whether `target` × `peer` was within reach in this run.
pub fn ceiling_note(rows: &[Row], ours: &str, peer: &str, target: f64) -> Option<String> {
    let row = |name: &str| rows.iter().find(|r| r.subject == name);
    let floor = row(FLOOR)?;
    let (f, p) = (floor.rate(), row(peer)?.rate());
    if p <= 0.0 || f <= 0.0 {
        return None;
    }
    let busy = floor.median(|s| s.load_cpu_busy.unwrap_or(0.0));
    let goal = target * p;
    let mut note = format!(
        "Ceiling: `{FLOOR}` (trellis-bench-floor: one pinned upstream connection per client, heads relayed raw, no routing, metrics or timeouts) reached {f:.0} req/s = {:.2}× {peer}{}: no proxy in the subject's seat goes faster than the load generator and origin that feed it.",
        f / p,
        if busy > 0.0 {
            format!(", with the load CPU {:.0}% busy", busy * 100.0)
        } else {
            String::new()
        },
    );
    if let Some(o) = row(ours).map(Row::rate) {
        note.push_str(&format!(
            " {ours} reached {:.0}% of the floor.",
            o * 100.0 / f
        ));
    }
    if goal > f {
        note.push_str(&format!(
            " The target, {target:.1}× {peer} ({goal:.0} req/s), was above this run's ceiling."
        ));
    } else {
        note.push_str(&format!(
            " The target, {target:.1}× {peer} ({goal:.0} req/s), needed {ours} at ≥ {:.0}% of the floor.",
            goal * 100.0 / f
        ));
    }
    Some(note)
}

/// Runs `measure` with every subject process in a cgroup capped at `percent`% of one core
/// ([`crate::cgroup`]), where the load generator cannot saturate an uncapped subject: with the
/// same CPU for each, the subjects are the bottleneck and their rates compare their own speed.
/// `Ok(Err(reason))` where cgroups are not writable (no root, a container).
pub fn with_cpu_cap<T>(
    ctx: &Ctx,
    percent: u32,
    measure: impl FnOnce(&Ctx) -> Result<T>,
) -> Result<std::result::Result<T, String>> {
    let cap = match crate::cgroup::CpuCap::create(percent) {
        Ok(cap) => cap,
        Err(e) => return Ok(Err(format!("{e:#}"))),
    };
    let capped = Ctx {
        cpu_cap: Some(cap.procs_file()),
        ..ctx.clone()
    };
    measure(&capped).map(Ok)
}

/// How busy each subject was, as a share of the CPU it may use (`allowed_percent` of its core),
/// and its `unit` per CPU-second: a subject well below its allowance was held back by the load
/// generator, not by its own speed, and its rate understates what it can serve.
pub fn busy_note(rows: &[Row], allowed_percent: u32, unit: &str) -> String {
    let parts: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let cpu = r.cpu_median().filter(|c| *c > 0.0)?;
            let busy = r.median(|s| s.rate) * cpu / 1e4 * 100.0 / f64::from(allowed_percent);
            Some(format!(
                "{} {busy:.0}% busy, {:.0}k {unit} per CPU-second",
                r.subject,
                1e3 / cpu
            ))
        })
        .collect();
    let of = if allowed_percent == 100 {
        "its core".to_owned()
    } else {
        format!("its {allowed_percent}% cap")
    };
    format!(
        "Use of {of}: {}. A subject well below 100% busy was limited by the load generator, not by itself.",
        parts.join("; ")
    )
}

/// What a capped HTTP measurement is: its result name and title, the subjects and origin, the
/// load and the note that describes it.
pub struct CappedRun<'a, 's> {
    pub name: &'a str,
    pub title: String,
    pub subjects: &'a [Subject<'s>],
    pub origin: SocketAddr,
    pub load: &'a Load<'a>,
    pub load_note: String,
}

/// Measures `run`'s subjects with every proxy capped at `percent`% of its core, with the notes
/// of [`capped_notes`] (trellis against HAProxy, target 1.2×). `None` (with the reason printed)
/// where cgroups are not writable.
pub fn measure_capped(
    ctx: &Ctx,
    percent: u32,
    run: CappedRun<'_, '_>,
) -> Result<Option<crate::report::ScenarioResult>> {
    let name = run.name;
    eprintln!("scenario {name}, every proxy capped at {percent}% of its core");
    let rows = match with_cpu_cap(ctx, percent, |capped| {
        measure_all(capped, name, run.subjects, run.origin, run.load)
    })? {
        Ok(rows) => rows,
        Err(why) => {
            eprintln!("  {name}: skipped ({why})");
            return Ok(None);
        }
    };
    let mut notes = vec![run.load_note];
    notes.extend(capped_notes(&rows, percent, "trellis", "haproxy", 1.2));
    Ok(Some(crate::report::ScenarioResult {
        name: name.into(),
        title: run.title,
        unit: "req/s".into(),
        ours: "trellis".into(),
        rows,
        notes,
    }))
}

/// The notes of a run with every proxy capped at `percent`% of its core: what the cap means, how
/// busy each was, and `ours` ÷ `peer` against `target`.
pub fn capped_notes(
    rows: &[Row],
    percent: u32,
    ours: &str,
    peer: &str,
    target: f64,
) -> Vec<String> {
    let mut notes = vec![format!(
        "The same proxies and load, each proxy in a cgroup capped at {percent}% of one core (CFS quota, 10 ms period), so that the proxies, not wrk and the origin on CPU 0, are the bottleneck: req/s compares what each proxy serves with the same CPU. Throttling holds a proxy for up to {} ms at a time, so latency percentiles here compare nothing (the uncapped table's do).",
        10 * (100 - percent) / 100
    )];
    notes.push(busy_note(rows, percent, "requests"));
    let rate = |name: &str| rows.iter().find(|r| r.subject == name).map(Row::rate);
    if let (Some(o), Some(p)) = (rate(ours), rate(peer))
        && p > 0.0
    {
        let ratio = o / p;
        notes.push(format!(
            "{ours} ÷ {peer} with the same CPU = {ratio:.2}× (target ≥ {target:.1}×: {})",
            if ratio >= target { "met" } else { "MISSED" }
        ));
    }
    notes
}

/// The name of the floor subject.
pub const FLOOR: &str = "floor";

impl Subject<'_> {
    /// `trellis-bench-floor` in front of the origin (see `bench/src/floor.rs`).
    pub fn floor() -> Self {
        Subject::new(FLOOR, |ctx, port, origin| {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut p = Proc::spawn_env(
                ctx,
                Role::Subject,
                FLOOR,
                &ctx.bin("trellis-bench-floor"),
                &[&addr.to_string(), &origin.to_string()],
                &[],
            )?;
            p.wait_tcp(ctx, addr)?;
            Ok((Some(p), addr))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(subject: &str, rate: f64) -> Row {
        Row {
            subject: subject.into(),
            runs: vec![Sample {
                rate,
                load_cpu_busy: Some(0.99),
                ..Sample::default()
            }],
        }
    }

    #[test]
    fn ceiling_note_says_whether_the_target_was_reachable() {
        let rows = vec![row("trellis", 81.0), row("haproxy", 76.0), row(FLOOR, 88.0)];
        let note = ceiling_note(&rows, "trellis", "haproxy", 1.2).unwrap_or_default();
        assert!(note.contains("1.16× haproxy"), "{note}");
        assert!(note.contains("load CPU 99% busy"), "{note}");
        assert!(note.contains("trellis reached 92% of the floor"), "{note}");
        assert!(note.contains("above this run's ceiling"), "{note}");

        let rows = vec![row("trellis", 80.0), row("haproxy", 72.0), row(FLOOR, 90.0)];
        let note = ceiling_note(&rows, "trellis", "haproxy", 1.2).unwrap_or_default();
        assert!(
            note.contains("needed trellis at ≥ 96% of the floor"),
            "{note}"
        );

        assert!(ceiling_note(&rows[..2], "trellis", "haproxy", 1.2).is_none());
    }
}
