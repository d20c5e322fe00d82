//! HTTP/2 abuse against the sidecar, with hand-written frames over a real socket (a well-behaved
//! client library would never send them): a rapid-reset flood (HEADERS then RST_STREAM, thousands
//! of streams) and opening more streams than SETTINGS_MAX_CONCURRENT_STREAMS. Both must be bounded
//! (GOAWAY, or REFUSED_STREAM) while another client keeps being served.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use trellis_test_support::memory::rss_kib;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// HPACK for `GET http <path>`: indexed :method GET, :scheme http, then :path as a literal
/// (indexed name 4, not added to the table), so no dynamic state is involved.
fn get_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x04, path.len() as u8];
    b.extend_from_slice(path.as_bytes());
    b.push(0x01); // :authority, literal, indexed name 1
    b.push(b"api".len() as u8);
    b.extend_from_slice(b"api");
    b
}

struct Frame {
    kind: u8,
    flags: u8,
    payload: Vec<u8>,
}

async fn read_frame(r: &mut OwnedReadHalf) -> Option<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        payload,
    })
}

fn code(payload: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([
        payload[at],
        payload[at + 1],
        payload[at + 2],
        payload[at + 3],
    ])
}

/// Connects with prior knowledge and completes the SETTINGS exchange (so the server's limits apply).
async fn h2_raw(addr: std::net::SocketAddr) -> (OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    w.write_all(&out).await.unwrap();
    loop {
        let f = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut r))
            .await
            .unwrap()
            .unwrap();
        if f.kind == SETTINGS && f.flags & ACK == 0 {
            let mut ack = Vec::new();
            frame(&mut ack, SETTINGS, ACK, 0, &[]);
            w.write_all(&ack).await.unwrap();
            break;
        }
    }
    (r, w)
}

fn config(app: std::net::SocketAddr, limits: &str) -> String {
    format!(
        "{}\n[limits]\n{limits}\n[outbound]\nupstreams = [{{ service = \"api\", local_port = 0, danger_plaintext = true }}]\n\n[[clusters]]\nservice = \"api\"\nendpoints = [{{ address = \"{app}\" }}]\n",
        base()
    )
}

/// Another, well-behaved client (HTTP/2 and HTTP/1.1) is served.
async fn others_served(port: std::net::SocketAddr) {
    assert_eq!(get(&h2_client(), &format!("http://{port}/")).await.0, 200);
    assert_eq!(get(&h1_client(), &format!("http://{port}/")).await.0, 200);
}

#[tokio::test]
async fn rapid_reset_flood_gets_goaway_and_others_are_served() {
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&config(a.addr, "h2_max_pending_resets = 20")).await;
    let port = sc.upstream_addrs["api"];
    others_served(port).await;
    let hits_before = a.hits.load(Ordering::SeqCst);

    let (mut r, mut w) = h2_raw(port).await;
    let block = get_block("/slow");
    let flood = tokio::spawn(async move {
        let mut sent = 0u32;
        for batch in 0..100u32 {
            let mut out = Vec::new();
            for i in 0..100u32 {
                let id = 2 * (batch * 100 + i) + 1;
                frame(&mut out, HEADERS, END_HEADERS, id, &block);
                frame(&mut out, RST_STREAM, 0, id, &CANCEL.to_be_bytes());
            }
            if w.write_all(&out).await.is_err() {
                break;
            }
            sent += 100;
        }
        sent
    });
    let during = tokio::spawn(others_served(port));
    let mut goaway = None;
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(f) = read_frame(&mut r).await {
            if f.kind == GOAWAY {
                goaway = Some(code(&f.payload, 4));
                break;
            }
        }
    })
    .await;
    during.await.unwrap();
    assert!(read.is_ok(), "the server ends the flood within 10 s");
    let sent = flood.await.unwrap();
    eprintln!(
        "rapid reset: sent={sent} goaway={goaway:?} hits={}",
        a.hits.load(Ordering::SeqCst) - hits_before
    );
    // GOAWAY ENHANCE_YOUR_CALM once more than h2_max_pending_resets streams were reset unaccepted.
    assert_eq!(goaway, Some(0xb), "sent {sent} streams");
    let forwarded = a.hits.load(Ordering::SeqCst) - hits_before;
    assert!(
        forwarded < 100,
        "{forwarded} of {sent} reset streams reached the app"
    );
    others_served(port).await;
    stop.cancel();
    sc.wait().await;
}

/// Opens `n` concurrent `/slow` (400 ms) streams at once on one connection; returns the responses
/// seen, the streams refused, and the GOAWAY code if the server closed the connection.
async fn open_streams(port: std::net::SocketAddr, n: u32) -> (u32, u32, Option<u32>) {
    let (mut r, mut w) = h2_raw(port).await;
    let block = get_block("/slow");
    let mut out = Vec::new();
    for i in 0..n {
        frame(
            &mut out,
            HEADERS,
            END_HEADERS | END_STREAM,
            2 * i + 1,
            &block,
        );
    }
    w.write_all(&out).await.unwrap();
    let (mut ok, mut refused, mut goaway) = (0, 0, None);
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while ok + refused < n {
            let Some(f) = read_frame(&mut r).await else {
                break;
            };
            match f.kind {
                HEADERS => ok += 1,
                RST_STREAM if code(&f.payload, 0) == REFUSED_STREAM => refused += 1,
                GOAWAY => {
                    goaway = Some(code(&f.payload, 4));
                    break;
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(read.is_ok(), "answered within 10 s");
    (ok, refused, goaway)
}

#[tokio::test]
async fn streams_beyond_the_concurrency_limit_are_refused() {
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&config(a.addr, "h2_max_streams = 8")).await;
    let port = sc.upstream_addrs["api"];

    // A little over the limit (a client racing the SETTINGS): the excess is refused
    // (REFUSED_STREAM, safe to retry), the admitted streams complete, the connection lives on.
    let (ok, refused, goaway) = open_streams(port, 12).await;
    assert_eq!((ok, refused, goaway), (8, 4, None));

    // Far over the limit, while another client is served: more refusals than
    // h2_max_pending_resets (20) end the connection with GOAWAY ENHANCE_YOUR_CALM; never more
    // than 8 streams reach the app from it.
    let hits_before = a.hits.load(Ordering::SeqCst);
    let during = tokio::spawn(others_served(port));
    let (ok, refused, goaway) = open_streams(port, 200).await;
    during.await.unwrap();
    eprintln!("concurrency flood: ok={ok} refused={refused} goaway={goaway:?}");
    assert!(ok <= 8, "{ok} streams served beyond the limit of 8");
    assert!(refused > 0, "excess streams refused");
    assert_eq!(goaway, Some(0xb));
    // The h2 client + h1 client from `others_served` count 2; the flood at most 8.
    assert!(a.hits.load(Ordering::SeqCst) - hits_before <= 10);
    others_served(port).await;
    stop.cancel();
    sc.wait().await;
}

const CONTINUATION: u8 = 0x9;
const PING: u8 = 0x6;

/// Writes `frames` (already encoded) `times` times or until the server stops reading/closes;
/// meanwhile reads frames and returns the GOAWAY code if one came within 10 s.
async fn flood(
    port: std::net::SocketAddr,
    head: Vec<u8>,
    repeat: Vec<u8>,
    times: usize,
) -> Option<u32> {
    let (mut r, mut w) = h2_raw(port).await;
    let writer = tokio::spawn(async move {
        if w.write_all(&head).await.is_err() {
            return;
        }
        for _ in 0..times {
            let write = tokio::time::timeout(Duration::from_secs(2), w.write_all(&repeat)).await;
            if !matches!(write, Ok(Ok(()))) {
                // Closed, or the server stopped reading (backpressure): the flood is bounded.
                return;
            }
        }
    });
    let mut goaway = None;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(f) = read_frame(&mut r).await {
            if f.kind == GOAWAY {
                goaway = Some(code(&f.payload, 4));
                break;
            }
        }
    })
    .await;
    writer.abort();
    goaway
}

/// CONTINUATION flood (CVE-2024-27316 class): HEADERS without END_HEADERS, then endless
/// CONTINUATION frames. The header block is bounded by max_header_bytes: the connection ends with
/// GOAWAY, nothing reaches the app, memory stays flat and other clients are served.
#[tokio::test]
async fn continuation_flood_is_cut_off() {
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&config(a.addr, "max_header_bytes = 16384")).await;
    let port = sc.upstream_addrs["api"];
    others_served(port).await;
    let (hits, rss) = (a.hits.load(Ordering::SeqCst), rss_kib());
    let mut head = Vec::new();
    frame(&mut head, HEADERS, 0, 1, &get_block("/"));
    // Each CONTINUATION carries one more literal header (name "x", 1000-byte value, not indexed).
    let mut lit = vec![0x00, 0x01, b'x', 0x7f, 0xe9, 0x06];
    lit.extend(std::iter::repeat_n(b'v', 1000));
    let mut repeat = Vec::new();
    frame(&mut repeat, CONTINUATION, 0, 1, &lit);
    let goaway = flood(port, head, repeat, 100_000).await;
    eprintln!(
        "continuation flood: goaway={goaway:?} rss +{} KiB",
        rss_kib().saturating_sub(rss)
    );
    assert!(goaway.is_some(), "the connection must end with GOAWAY");
    assert_eq!(a.hits.load(Ordering::SeqCst), hits, "nothing forwarded");
    assert!(rss_kib() < rss + 64 * 1024, "memory stays bounded");
    others_served(port).await;
    stop.cancel();
    sc.wait().await;
}

/// SETTINGS and PING floods from a client that never reads the ACKs: the server answers each, so
/// its writes back up; it must stop reading (bounded buffers) or close, never grow without bound.
#[tokio::test]
async fn settings_and_ping_floods_stay_bounded() {
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&config(a.addr, "")).await;
    let port = sc.upstream_addrs["api"];
    let rss = rss_kib();
    for kind in [SETTINGS, PING] {
        let mut repeat = Vec::new();
        for _ in 0..1000 {
            if kind == SETTINGS {
                // SETTINGS_MAX_CONCURRENT_STREAMS = 100: valid, and each needs an ACK.
                frame(&mut repeat, SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
            } else {
                frame(&mut repeat, PING, 0, 0, b"12345678");
            }
        }
        let during = tokio::spawn(others_served(port));
        let goaway = flood(port, Vec::new(), repeat, 2_000).await;
        during.await.unwrap();
        let grown = rss_kib().saturating_sub(rss);
        eprintln!("flood kind {kind}: goaway={goaway:?} rss +{grown} KiB");
        assert!(grown < 64 * 1024, "memory stays bounded (+{grown} KiB)");
    }
    others_served(port).await;
    stop.cancel();
    sc.wait().await;
}

/// Zero-window stall: the client advertises an initial window of 0 and opens streams, so the
/// server can never send a body. Work stays bounded (h2_max_streams per connection), memory flat,
/// and other clients are served.
#[tokio::test]
async fn zero_window_stall_is_bounded() {
    let a = app("a", None).await;
    let (sc, stop) = sidecar(&config(a.addr, "h2_max_streams = 8")).await;
    let port = sc.upstream_addrs["api"];
    let rss = rss_kib();
    let mut conns = Vec::new();
    for _ in 0..20 {
        let s = TcpStream::connect(port).await.unwrap();
        let (r, mut w) = s.into_split();
        let mut out = PREFACE.to_vec();
        // SETTINGS_INITIAL_WINDOW_SIZE = 0.
        frame(&mut out, SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0]);
        for i in 0..50u32 {
            frame(
                &mut out,
                HEADERS,
                END_HEADERS | END_STREAM,
                2 * i + 1,
                &get_block("/"),
            );
        }
        w.write_all(&out).await.unwrap();
        conns.push((r, w));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    others_served(port).await;
    let grown = rss_kib().saturating_sub(rss);
    eprintln!("zero-window stall: 20 connections x 50 streams, rss +{grown} KiB");
    assert!(grown < 64 * 1024);
    // At most h2_max_streams (8) per connection reach the app.
    assert!(a.hits.load(Ordering::SeqCst) <= 20 * 8 + 4);
    drop(conns);
    stop.cancel();
    sc.wait().await;
}
