//! Raw TCP bulk throughput: a client streams bytes through the subject to a sink that discards them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::{Subject, measure, peers};
use crate::Ctx;
use crate::load::Sample;
use crate::report::ScenarioResult;

/// A sink thread: accepts connections and reads until EOF, discarding.
fn spawn_sink() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Pushes bytes through `addr` over 4 connections for `d`; the rate is MB/s.
fn push(addr: SocketAddr, d: Duration) -> Result<Sample> {
    let start = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || -> std::io::Result<u64> {
                let mut s = TcpStream::connect(addr)?;
                let buf = vec![0x5au8; 256 * 1024];
                let mut sent = 0u64;
                let t0 = Instant::now();
                while t0.elapsed() < d {
                    s.write_all(&buf)?;
                    sent += buf.len() as u64;
                }
                s.shutdown(std::net::Shutdown::Write)?;
                Ok(sent)
            })
        })
        .collect();
    let mut total = 0u64;
    let mut errors = 0u64;
    for h in handles {
        match h.join() {
            Ok(Ok(n)) => total += n,
            _ => errors += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Sample {
        rate: total as f64 / secs / 1e6,
        errors,
        // CPU per request is reported per MiB moved for throughput runs.
        total: total / (1 << 20),
        bytes_per_sec: Some(total as f64 / secs),
        ..Sample::default()
    })
}

pub fn standard_subjects<'a>(extra: Vec<Subject<'a>>) -> Vec<Subject<'a>> {
    let mut v = extra;
    v.push(Subject::direct());
    v.push(Subject::new("haproxy (splice)", |ctx, port, origin| {
        peers::haproxy(ctx, port, origin, true).map(|(p, a)| (Some(p), a))
    }));
    v.push(Subject::new("nginx stream", |ctx, port, origin| {
        peers::nginx_stream(ctx, port, origin).map(|(p, a)| (Some(p), a))
    }));
    v
}

pub fn run(ctx: &Ctx, ours: &str, subjects: Vec<Subject<'_>>) -> Result<ScenarioResult> {
    eprintln!("scenario tcp-bulk");
    let sink = spawn_sink()?;
    let load = |_: &Ctx, addr: SocketAddr, d: Duration| push(addr, d);
    let mut rows = Vec::new();
    for s in &subjects {
        rows.push(measure(ctx, s, sink, &load)?);
    }
    Ok(ScenarioResult {
        name: "tcp-bulk".into(),
        title: "Raw TCP bulk throughput (4 streams)".into(),
        unit: "MB/s".into(),
        ours: ours.into(),
        rows,
        notes: vec![
            "CPU µs/req column is CPU µs per MiB relayed; the sink runs in the harness process."
                .into(),
        ],
    })
}
