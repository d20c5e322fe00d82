//! Entry points for the `fuzz/` targets and the corpus-replay tests: arbitrary bytes in, never a
//! panic, the properties checked with `assert!`.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::time::Duration;

use http::HeaderMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;
use crate::config::{Config, LimitsConfig};
use crate::env::MapEnv;
use crate::lb::LbConfig;
use crate::route::{
    Action, Case, Condition, FixedResponse, HostPattern, Matched, PathPattern, Priority,
    RequestView, Rule, RuleIndex, Wildcard,
};
use crate::server::{HttpMode, builder, serve};

/// Pattern texts the rule generator draws from (first-segment buckets, wildcards, edge cases).
const PATTERN_PARTS: &[&str] = &[
    "/", "api", "img", "a", "*", "?", "v1", ".png", "x", "", "/b",
];

/// Bytes as a stream of small choices; exhausted input yields zeros.
struct Choices<'a>(&'a [u8]);

impl Choices<'_> {
    fn next(&mut self, n: usize) -> usize {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        usize::from(b) % n.max(1)
    }

    fn text(&mut self, max_parts: usize) -> String {
        let parts = 1 + self.next(max_parts);
        (0..parts)
            .map(|_| PATTERN_PARTS[self.next(PATTERN_PARTS.len())])
            .collect()
    }
}

/// The wildcard semantics, written the slow obvious way: `*` any characters, `?` exactly one
/// character (not byte: ALB counts characters).
fn reference_glob(p: &str, s: &str, case: Case) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (p.chars().collect(), s.chars().collect());
    let eq = |a: char, b: char| match case {
        Case::Sensitive => a == b,
        Case::Insensitive => a.eq_ignore_ascii_case(&b),
    };
    // Dynamic programming over (pattern prefix, input prefix).
    let mut row = vec![false; s.len() + 1];
    row[0] = true;
    for &pc in &p {
        let mut next = vec![false; s.len() + 1];
        if pc == '*' {
            let mut any = false;
            for j in 0..=s.len() {
                any |= row[j];
                next[j] = any;
            }
        } else {
            for j in 1..=s.len() {
                next[j] = row[j - 1] && (pc == '?' || eq(pc, s[j - 1]));
            }
        }
        row = next;
    }
    row[s.len()]
}

fn fixed(status: u16) -> Option<Action> {
    FixedResponse::new(status, None, "")
        .ok()
        .map(Action::FixedResponse)
}

/// The ALB pattern compiler and the route matcher. Part 1: the input as a pattern and a subject
/// (split at the first `\n`): compiling never panics and a compiled wildcard matches exactly as
/// the reference glob. Part 2 (differential): the bytes drive a random rule set and requests;
/// the compiled index picks the same rule as a plain priority-ordered scan.
pub fn route_match(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (pattern, subject) = text.split_once('\n').unwrap_or((&text, "/"));
    for case in [Case::Sensitive, Case::Insensitive] {
        if let Ok(w) = Wildcard::new(pattern, case) {
            assert_eq!(
                w.matches(subject),
                reference_glob(w.as_str(), subject, case),
                "pattern {pattern:?} on {subject:?} ({case:?})"
            );
        }
    }
    if let Ok(p) = PathPattern::from_str(pattern) {
        let _ = p.matches(subject);
        let _ = p.literal_first_segment();
    }
    if let Ok(h) = HostPattern::from_str(pattern) {
        let _ = h.matches(subject);
    }

    let mut c = Choices(data);
    let (Some(default), Some(hit)) = (fixed(404), fixed(200)) else {
        return;
    };
    let n = c.next(24);
    let mut priorities: Vec<u32> = (1..=64).collect();
    let mut rules = Vec::with_capacity(n);
    for i in 0..n {
        let prio = priorities.swap_remove(c.next(priorities.len()));
        let mut conditions = Vec::new();
        if c.next(5) != 0 {
            let k = 1 + c.next(3);
            let ps: Vec<PathPattern> = (0..k).filter_map(|_| c.text(4).parse().ok()).collect();
            if !ps.is_empty() {
                conditions.push(Condition::PathPattern(ps));
            }
        }
        if c.next(4) == 0 {
            let m = [http::Method::GET, http::Method::POST][c.next(2)].clone();
            conditions.push(Condition::HttpRequestMethod(vec![m]));
        }
        if c.next(6) == 0
            && let Ok(h) = format!("{}.example.com", c.text(2)).parse::<HostPattern>()
        {
            conditions.push(Condition::HostHeader(vec![h]));
        }
        let Ok(priority) = Priority::try_from(prio) else {
            return;
        };
        rules.push(Rule {
            name: format!("r{i}").into(),
            priority,
            conditions,
            action: hit.clone(),
        });
    }
    let Ok(index) = RuleIndex::new(rules, default) else {
        return;
    };
    let headers = HeaderMap::new();
    let name = |m: Matched<'_>| match m {
        Matched::Rule(i, _) => Some(i),
        Matched::Default(_) => None,
    };
    for _ in 0..16 {
        let path = format!("/{}", c.text(4));
        let host = format!("{}.example.com", c.text(2));
        let req = RequestView {
            method: ["GET", "POST", "PUT"][c.next(3)],
            host: Some(&host),
            path: &path,
            query: None,
            headers: &headers,
            source_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        assert_eq!(
            name(index.route(&req)),
            name(index.scan(&req)),
            "index and scan disagree on {path:?}"
        );
    }
}

/// Sidecar config loading: the input is a TOML document, then after a NUL byte `TRELLIS_*`
/// environment lines (`NAME=value`). Properties: a loaded config serialises back to TOML that
/// loads again.
pub fn sidecar_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (toml_text, env_text) = text.split_once('\0').unwrap_or((&text, ""));
    let env = MapEnv(
        env_text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (format!("TRELLIS_{k}"), v.to_owned()))
            .collect(),
    );
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("trellis-fuzz-{}-{n}", std::process::id()));
    let path = dir.join("sidecar.toml");
    let written = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, toml_text));
    let loaded = written.ok().map(|()| Config::load(Some(&path), &env));
    let _ = std::fs::remove_dir_all(&dir);
    let Some(Ok(config)) = loaded else {
        return;
    };
    let _ = config.redacted_json();
    let again = toml::to_string(&config).map(|t| Config::from_toml(&t));
    assert!(
        matches!(again, Ok(Ok(_))),
        "a loaded config must round-trip through TOML: {again:?}"
    );
}

/// LB config loading and rule compilation (TOML).
pub fn lb_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = LbConfig::from_str(text) {
        let _ = cfg.compile();
    }
}

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// HTTP protocol detection and parsing: the input is what a client sends on a fresh connection
/// to a sidecar/LB listener (auto-detect HTTP/1.x or the HTTP/2 preface). Properties: the server
/// finishes within a bounded time, and anything it answers is an HTTP/1.x status line or HTTP/2
/// frames (starting with a SETTINGS frame). Returns the bytes the server wrote.
pub fn http_detect(data: &[u8]) -> Vec<u8> {
    RUNTIME.with(|cell| {
        let mut slot = cell.borrow_mut();
        let rt = match slot.as_ref() {
            Some(rt) => rt,
            None => {
                let built = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match built {
                    Ok(rt) => slot.insert(rt),
                    Err(e) => panic!("runtime: {e}"),
                }
            }
        };
        rt.block_on(detect(data))
    })
}

async fn detect(data: &[u8]) -> Vec<u8> {
    let limits = LimitsConfig {
        header_read_timeout: Duration::from_millis(200),
        ..LimitsConfig::default()
    };
    let b = builder(&limits);
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let stop = CancellationToken::new();
    let conn = tokio::spawn({
        let stop = stop.clone();
        async move {
            serve(server, &b, HttpMode::Auto, stop, |_req| async {
                http::Response::new(ProxyBody::full("ok"))
            })
            .await;
        }
    });
    let mut out = Vec::new();
    let exchange = async {
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let _ = client.read_to_end(&mut out).await;
    };
    let finished = tokio::time::timeout(Duration::from_secs(5), exchange).await;
    stop.cancel();
    conn.abort();
    assert!(finished.is_ok(), "connection did not finish");
    if !out.is_empty() {
        // HTTP/1.x status line (an HTTP/1.0 request gets an HTTP/1.0 answer).
        let h1 = out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 ");
        // An HTTP/2 server speaks first with a SETTINGS frame (type 4).
        let h2 = out.len() >= 9 && out[3] == 4;
        assert!(
            h1 || h2,
            "unexpected answer {:?}",
            String::from_utf8_lossy(&out)
        );
    }
    out
}

/// What an upstream response decodes to: status, header fields, framing, body bytes, trailers,
/// whether the body was complete. `Err` carries the rejection.
type Decoded = Result<Option<(u16, Vec<(String, Vec<u8>)>, String, Vec<u8>, usize, bool)>, String>;

/// The upstream HTTP/1.1 response codec (`h1`: head parser, framing rules, chunked decoder): `data`
/// is what an upstream sends back to a GET, its first byte choosing where the bytes are split
/// into two reads. Properties: nothing panics, and the result is the same whether the bytes
/// arrive in one read or in two.
pub fn h1_response(data: &[u8]) {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut) * data.len() / 256;
    let whole = decode_response(&[data]);
    let split = decode_response(&[&data[..cut], &data[cut..]]);
    assert_eq!(whole, split, "one read vs split at {cut}");
}

fn decode_response(pieces: &[&[u8]]) -> Decoded {
    use bytes::BytesMut;

    use crate::h1::chunked::{Decoder, Step};
    use crate::h1::head::{RespFraming, parse_response};

    let mut pieces = pieces.iter();
    let mut buf = BytesMut::new();
    let head = loop {
        match parse_response(&mut buf) {
            Ok(Some(head)) => break head,
            Ok(None) => match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return Ok(None),
            },
            Err(e) => return Err(e.to_string()),
        }
    };
    let (framing, _keep_alive) = head
        .framing(&http::Method::GET)
        .map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    let mut trailers = 0;
    let complete = match framing {
        RespFraming::Empty => true,
        RespFraming::Length(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            for p in pieces.by_ref() {
                buf.extend_from_slice(p);
            }
            let take = n.min(buf.len());
            body.extend_from_slice(&buf.split_to(take));
            take == n
        }
        RespFraming::UntilEof => {
            for p in pieces.by_ref() {
                buf.extend_from_slice(p);
            }
            body.extend_from_slice(&buf);
            true
        }
        RespFraming::Chunked => {
            let mut dec = Decoder::new();
            loop {
                match dec.step(&mut buf).map_err(|e| e.to_string())? {
                    Step::Data(n) => {
                        body.extend_from_slice(&buf.split_to(n));
                        dec.consumed(n);
                        if dec.try_finish(&mut buf) {
                            break true;
                        }
                    }
                    Step::NeedMore => match pieces.next() {
                        Some(p) => buf.extend_from_slice(p),
                        None => break false,
                    },
                    Step::Trailers(t) => {
                        trailers = t.len();
                        break true;
                    }
                    Step::End => break true,
                }
            }
        }
    };
    let fields = head
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    Ok(Some((
        head.status.as_u16(),
        fields,
        format!("{framing:?}"),
        body,
        trailers,
        complete,
    )))
}
