//! HTTP scenarios through a reverse proxy in front of an nginx origin: keep-alive small responses,
//! a new connection per request, 1 MiB bodies, and HTTP/2 (h2load, where the subject speaks it).

use std::net::SocketAddr;

use anyhow::Result;

use super::{
    CappedRun, Subject, ceiling_note, kernel_note, load_cpu_note, measure_all, measure_capped,
    peers,
};
use crate::Ctx;
use crate::load;
use crate::proc::free_port;
use crate::report::ScenarioResult;

/// The subjects every HTTP/1.1 scenario compares: direct, nginx, HAProxy, plus `extra` (trellis).
pub fn standard_subjects<'a>(extra: Vec<Subject<'a>>) -> Vec<Subject<'a>> {
    let mut v = extra;
    v.push(Subject::direct());
    v.push(Subject::new("nginx", |ctx, port, origin| {
        peers::nginx_proxy(ctx, port, origin).map(|(p, a)| (Some(p), a))
    }));
    v.push(Subject::new("haproxy", |ctx, port, origin| {
        peers::haproxy(ctx, port, origin, false).map(|(p, a)| (Some(p), a))
    }));
    v
}

#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// Small responses over keep-alive connections.
    KeepAlive,
    /// `Connection: close`: a new TCP connection per request.
    NewConnection,
    /// 1 MiB response bodies.
    Large,
}

pub fn run(
    ctx: &Ctx,
    shape: Shape,
    ours: &str,
    subjects: Vec<Subject<'_>>,
) -> Result<ScenarioResult> {
    let (name, title, path, headers, conns): (&str, &str, &str, &[&str], usize) = match shape {
        Shape::KeepAlive => (
            "http1-keepalive",
            "HTTP/1.1 keep-alive, small responses",
            "/",
            &[],
            ctx.connections,
        ),
        Shape::NewConnection => (
            "http1-newconn",
            "HTTP/1.1, new connection per request",
            "/",
            &["Connection: close"],
            16,
        ),
        Shape::Large => (
            "http1-large",
            "HTTP/1.1, 1 MiB responses",
            "/large",
            &[],
            16,
        ),
    };
    eprintln!("scenario {name}");
    let (_origin_proc, origin) = peers::nginx_origin(ctx, free_port()?)?;
    let load = move |ctx: &Ctx, addr: SocketAddr, d| {
        load::wrk(ctx, &format!("http://{addr}{path}"), conns, d, headers)
    };
    let rows = measure_all(ctx, name, &subjects, origin, &load)?;
    let mut notes = vec![format!(
        "wrk: 1 thread, {conns} connections, {}s × {} rounds (subjects side by side, measured in alternating rounds); every proxy {} worker(s){}",
        ctx.duration.as_secs(),
        ctx.runs,
        ctx.workers,
        if ctx.pin {
            "; subject pinned to CPU 1, load and origin to CPU 0"
        } else {
            ""
        }
    )];
    notes.extend(kernel_note(&rows));
    notes.extend(load_cpu_note(&rows));
    notes.extend(ceiling_note(&rows, "trellis", "haproxy", 1.2));
    Ok(ScenarioResult {
        name: name.into(),
        title: title.into(),
        unit: "req/s".into(),
        ours: ours.into(),
        rows,
        notes,
    })
}

/// Keep-alive small responses again with every proxy capped at `percent`% of its core (the
/// `direct` subject, which has no proxy, is left out): on two cores wrk and the origin share
/// CPU 0 and set a ceiling that the fastest proxies all reach uncapped (see the `floor` subject),
/// so only with the same CPU for each do their rates tell their speed apart. `None` (with the
/// reason printed) where cgroups are not writable.
pub fn run_keepalive_capped(
    ctx: &Ctx,
    percent: u32,
    subjects: Vec<Subject<'_>>,
) -> Result<Option<ScenarioResult>> {
    let subjects: Vec<_> = subjects
        .into_iter()
        .filter(|s| s.name != "direct")
        .collect();
    let (_origin_proc, origin) = peers::nginx_origin(ctx, free_port()?)?;
    let conns = ctx.connections;
    let load = move |ctx: &Ctx, addr: SocketAddr, d| {
        load::wrk(ctx, &format!("http://{addr}/"), conns, d, &[])
    };
    measure_capped(
        ctx,
        percent,
        CappedRun {
            name: "http1-keepalive-capped",
            title: format!(
                "HTTP/1.1 keep-alive, small responses, every proxy capped at {percent}% of its core"
            ),
            subjects: &subjects,
            origin,
            load: &load,
            load_note: format!(
                "wrk: 1 thread, {conns} connections, {}s × {} rounds (subjects side by side, measured in alternating rounds); every proxy {} worker(s)",
                ctx.duration.as_secs(),
                ctx.runs,
                ctx.workers,
            ),
        },
    )
}

/// The subjects of the HTTP/2 scenario: `extra` (trellis), direct (an nginx h2c origin), nginx and
/// HAProxy, each accepting cleartext HTTP/2 with prior knowledge and proxying over HTTP/1.1.
pub fn h2_subjects<'a>(extra: Vec<Subject<'a>>) -> Vec<Subject<'a>> {
    let mut v = extra;
    v.push(Subject::new("direct", |ctx, port, _| {
        peers::nginx_origin_h2(ctx, port).map(|(p, a)| (Some(p), a))
    }));
    v.push(Subject::new("nginx", |ctx, port, origin| {
        peers::nginx_proxy_h2(ctx, port, origin).map(|(p, a)| (Some(p), a))
    }));
    v.push(Subject::new("haproxy", |ctx, port, origin| {
        peers::haproxy_h2(ctx, port, origin).map(|(p, a)| (Some(p), a))
    }));
    v
}

/// HTTP/2 (cleartext, prior knowledge) with h2load: 16 connections × 16 concurrent streams, small
/// responses; the proxies talk HTTP/1.1 keep-alive to the nginx origin.
pub fn run_h2(ctx: &Ctx, ours: &str, subjects: Vec<Subject<'_>>) -> Result<ScenarioResult> {
    const CLIENTS: usize = 16;
    const STREAMS: usize = 16;
    eprintln!("scenario http2");
    let (_origin_proc, origin) = peers::nginx_origin(ctx, free_port()?)?;
    let load = |ctx: &Ctx, addr: SocketAddr, d| {
        load::h2load(ctx, &format!("http://{addr}/"), CLIENTS, STREAMS, d)
    };
    let rows = measure_all(ctx, "http2", &subjects, origin, &load)?;
    Ok(ScenarioResult {
        name: "http2".into(),
        title: "HTTP/2 (h2c), small responses".into(),
        unit: "req/s".into(),
        ours: ours.into(),
        rows,
        notes: vec![format!(
            "h2load: 1 thread, {CLIENTS} connections × {STREAMS} streams, {}s × {} runs; every proxy {} worker(s), HTTP/1.1 to the origin. h2load reports mean (p50 column) and max (p99.9 column) only. The direct row's CPU is the h2c origin's own.",
            ctx.duration.as_secs(),
            ctx.runs,
            ctx.workers,
        )],
    })
}
