//! Resident memory of each proxy: idle (after start and one request), and while holding 1,000
//! keep-alive client connections that have each completed one request.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{Subject, peers};
use crate::load::Sample;
use crate::proc::free_port;
use crate::report::{Row, ScenarioResult};
use crate::{Ctx, resources};

/// Open connections for the loaded measurement.
pub const CONNECTIONS: usize = 1000;

/// One GET with keep-alive on `s`; reads the (small, Content-Length) response.
fn one_request(s: &mut TcpStream) -> Result<()> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("connection closed before a response");
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(end) = text.find("\r\n\r\n") {
            let head = &text[..end];
            if !head.starts_with("HTTP/1.1 200") {
                bail!("unexpected response: {head}");
            }
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .context("no content-length")?;
            if got.len() >= end + 4 + len {
                return Ok(());
            }
        }
    }
}

fn sample(rss_kib: u64, conns: u64, errors: u64) -> Sample {
    Sample {
        rate: rss_kib as f64 / 1024.0,
        rss_kib: Some(rss_kib),
        total: conns,
        errors,
        ..Sample::default()
    }
}

/// Returns (idle, loaded) results with one row per subject; `rate` is RSS in MiB.
pub fn run(ctx: &Ctx, subjects: Vec<Subject<'_>>) -> Result<Vec<ScenarioResult>> {
    eprintln!("scenario resources");
    let (_origin_proc, origin) = peers::nginx_origin(ctx, free_port()?)?;
    let mut idle_rows = Vec::new();
    let mut loaded_rows = Vec::new();
    for subject in &subjects {
        let (proc, addr) = (subject.start)(ctx, free_port()?, origin)?;
        let Some(proc) = proc else { continue };
        let pid = proc.pid();
        let mut first = TcpStream::connect(addr)?;
        one_request(&mut first)?;
        drop(first);
        std::thread::sleep(Duration::from_secs(1));
        let idle = resources::rss_kib(pid);
        let mut conns = Vec::with_capacity(CONNECTIONS);
        let mut errors = 0u64;
        for _ in 0..CONNECTIONS {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(mut s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    match one_request(&mut s) {
                        Ok(()) => conns.push(s),
                        Err(_) => errors += 1,
                    }
                }
                Err(_) => errors += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let loaded = resources::rss_kib(pid);
        eprintln!(
            "  {}: RSS idle {:.1} MiB, with {} connections {:.1} MiB ({errors} failed)",
            subject.name,
            idle as f64 / 1024.0,
            conns.len(),
            loaded as f64 / 1024.0
        );
        idle_rows.push(Row {
            subject: subject.name.clone(),
            runs: vec![sample(idle, 0, 0)],
        });
        loaded_rows.push(Row {
            subject: subject.name.clone(),
            runs: vec![sample(loaded, conns.len() as u64, errors)],
        });
        drop(conns);
        drop(proc);
    }
    let note = format!(
        "Lower is better: the ratio column is trellis RSS ÷ the peer's (below 1.00 means trellis uses less). RSS of the whole process tree (nginx master + workers, HAProxy, the sidecar), {} worker(s) each.",
        ctx.workers
    );
    let idle_rss = idle_rows
        .iter()
        .find(|r| r.subject == "trellis")
        .map(|r| r.rate());
    let mut idle_notes = vec![note.clone()];
    if let Some(mib) = idle_rss {
        idle_notes.push(format!(
            "Target: sidecar RSS ≤ 15 MB idle: {mib:.1} MiB, {}",
            if mib * 1.048_576 <= 15.0 {
                "met"
            } else {
                "MISSED"
            }
        ));
    }
    Ok(vec![
        ScenarioResult {
            name: "rss-idle".into(),
            title: "Resident memory, idle (after one request)".into(),
            unit: "RSS MiB".into(),
            ours: "trellis".into(),
            rows: idle_rows,
            notes: idle_notes,
        },
        ScenarioResult {
            name: "rss-1000-conns".into(),
            title: format!("Resident memory holding {CONNECTIONS} keep-alive connections"),
            unit: "RSS MiB".into(),
            ours: "trellis".into(),
            rows: loaded_rows,
            notes: vec![note],
        },
    ])
}
