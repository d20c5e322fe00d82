//! Forwarding one HTTP request to a cluster: circuit breaker → balance → per-try timeout → retry
//! (idempotent, bodiless requests; connect failure, reset, 5xx; within the budget) → response.
//! Bodies stream through; nothing is buffered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::client::{UpstreamClient, endpoint_uri};
use crate::clock;
use crate::cluster::Cluster;
use crate::error::ProxyError;
use crate::retry::is_idempotent;

/// Timeouts and retry limits of one forwarding path.
#[derive(Debug, Clone, Copy)]
pub struct ForwardPolicy {
    pub connect_timeout: Duration,
    pub per_try_timeout: Duration,
    pub request_timeout: Duration,
    pub max_retries: u32,
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Forwards `req` to `cluster` and returns the response (or the error page for why not).
pub async fn forward(
    client: &UpstreamClient,
    cluster: &Cluster,
    policy: ForwardPolicy,
    mut req: Request<ProxyBody>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let Some(_slot) = cluster.breaker.try_acquire() else {
        cluster.metrics.overflow.inc();
        cluster.metrics.response(Some(503));
        return error_response(&ProxyError::Overflow);
    };
    cluster.budget.deposit();
    // One pass over the names says which hop-by-hop fields there are, and `Host`.
    let present = scan_names(req.headers());
    let downstream_upgrade =
        (present & UPGRADE_BIT != 0 && is_upgrade(&req)).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let upgrade_value = downstream_upgrade
        .as_ref()
        .and_then(|_| parts.headers.get(header::UPGRADE).cloned());
    let seen = strip_present(&mut parts.headers, present);
    if let Some(v) = upgrade_value {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, v);
    }
    host_from_uri(&mut parts, &seen);
    let replayable = downstream_upgrade.is_none()
        && policy.max_retries > 0
        && is_idempotent(&parts.method)
        && http_body::Body::is_end_stream(&body);
    let mut body = Some(body);
    let deadline = start + policy.request_timeout;
    let mut avoid: Option<SocketAddr> = None;
    let mut attempt = 0u32;

    loop {
        // One clock read per try (the first try starts when the request did); the pick, the
        // timeout and the latency sample all use it.
        let now = if attempt == 0 { start } else { Instant::now() };
        let now_ms = clock::ms_at(now);
        let snapshot = cluster.snapshot();
        let Some(ep) = cluster.pick_at(&snapshot, avoid, now_ms) else {
            cluster.metrics.response(None);
            return error_response(&ProxyError::NoEndpoint);
        };
        let req_body = if replayable {
            ProxyBody::empty()
        } else {
            body.take().unwrap_or_else(ProxyBody::empty)
        };

        // Clock arithmetic is a few dozen instructions a step: the first try knows its budget.
        let left = if attempt == 0 {
            policy.request_timeout
        } else {
            deadline.saturating_duration_since(now)
        };
        let budget = left.min(policy.per_try_timeout);
        let guard = ep.start();
        // The exchange is pinned where it is built: the timeout then wraps a pointer instead of
        // moving the exchange future twice more (into `Timeout`, then into this state). The
        // rare upgrade path is boxed so it adds nothing to every request's state. The head
        // stays in `parts` (borrowed by the exchange), ready for another try.
        let sent = if downstream_upgrade.is_some() {
            let mut up = Request::new(req_body);
            *up.method_mut() = parts.method.clone();
            *up.uri_mut() = endpoint_uri(&ep.authority, parts.uri.path_and_query());
            *up.headers_mut() = std::mem::take(&mut parts.headers);
            let upgrade =
                Box::pin(async { Ok(client.send_upgrade(up).await?.map(ProxyBody::from)) });
            client
                .timer()
                .within((now + budget).into_std(), upgrade)
                .await
        } else {
            let exchange = std::pin::pin!(client.send_parts(
                ep.addr,
                &ep.authority,
                &mut parts,
                b"",
                req_body,
                replayable
            ));
            client
                .timer()
                .within((now + budget).into_std(), exchange)
                .await
        };
        let result = match sent {
            Ok(r) => r,
            Err(_) if now + budget >= deadline => Err(ProxyError::RequestTimeout),
            Err(_) => Err(ProxyError::UpstreamTimeout),
        };
        drop(guard);
        let end = Instant::now();
        let took = end.saturating_duration_since(now);
        let can_retry = replayable && attempt < policy.max_retries && took < left;
        match result {
            Ok(mut resp) => {
                let status = resp.status();
                let end_ms =
                    now_ms.saturating_add(u64::try_from(took.as_millis()).unwrap_or(u64::MAX));
                ep.observe_latency_at(took, end_ms);
                cluster.record(&ep, status.is_server_error(), &snapshot);
                if status.is_server_error() && can_retry && cluster.budget.withdraw() {
                    cluster.metrics.retries.inc();
                    avoid = Some(ep.addr);
                    attempt += 1;
                    continue;
                }
                cluster.metrics.response(Some(status.as_u16()));
                let total = if attempt == 0 {
                    took
                } else {
                    end.saturating_duration_since(start)
                };
                cluster.metrics.latency.observe(total.as_secs_f64());
                match downstream_upgrade {
                    Some(down) if status == StatusCode::SWITCHING_PROTOCOLS => {
                        let up = hyper::upgrade::on(&mut resp);
                        tokio::spawn(splice_upgraded(down, up));
                    }
                    // The upgrade client's refusal; `send_to` answers arrive already stripped.
                    Some(_) => strip_hop_by_hop(resp.headers_mut()),
                    None => {}
                }
                return resp;
            }
            Err(e) => {
                cluster.record(&ep, true, &snapshot);
                if e.retryable() && can_retry && cluster.budget.withdraw() {
                    cluster.metrics.retries.inc();
                    avoid = Some(ep.addr);
                    attempt += 1;
                    continue;
                }
                tracing::debug!(cluster = cluster.name(), endpoint = %ep.addr, error = %e, "upstream failed");
                cluster.metrics.response(None);
                return error_response(&e);
            }
        }
    }
}

/// A local response for a proxy error, with the status from the one error table.
pub fn error_response(e: &ProxyError) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(format!("{e}\n")));
    *resp.status_mut() = e.status();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp.headers_mut().insert(
        HeaderName::from_static("x-trellis-error"),
        HeaderValue::from_static("1"),
    );
    resp
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
///
/// On the hot path: one pass over the names finds which hop-by-hop headers are present (standard
/// names compare as enum tags, without hashing); only those are removed, so a message without any
/// costs no hash lookup at all.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_present(headers, scan_names(headers));
}

/// What [`strip_hop_by_hop_seen`]'s pass saw besides the hop-by-hop fields.
pub(crate) struct Seen {
    pub host: bool,
    pub forwarded_proto: bool,
}

/// [`strip_hop_by_hop`], saying whether there are `Host` and `X-Forwarded-Proto` fields (found
/// by the same pass over the names).
pub(crate) fn strip_hop_by_hop_seen(headers: &mut HeaderMap) -> Seen {
    strip_present(headers, scan_names(headers))
}

/// A `Host` field from the URI's authority (absolute-form or HTTP/2 requests) when the head,
/// as [`Seen`] after stripping, has none.
pub(crate) fn host_from_uri(parts: &mut http::request::Parts, seen: &Seen) {
    if !seen.host
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
}

/// `scan_names` bit of `upgrade`.
const UPGRADE_BIT: u16 = 1 << HOP_BY_HOP.len();
/// `scan_names` bit of `host`.
const HOST_BIT: u16 = 1 << (HOP_BY_HOP.len() + 1);
/// `scan_names` bit of `x-forwarded-proto`.
const FORWARDED_PROTO_BIT: u16 = 1 << (HOP_BY_HOP.len() + 2);

/// Bit `i` for `HOP_BY_HOP[i]` present, then [`UPGRADE_BIT`], [`HOST_BIT`] and
/// [`FORWARDED_PROTO_BIT`].
fn scan_names(headers: &HeaderMap) -> u16 {
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_index(name) {
            present |= 1 << i;
        }
    }
    present
}

/// [`strip_hop_by_hop`] with the names already scanned. Says whether `Host` and
/// `X-Forwarded-Proto` are still there afterwards (a `Connection` field may list either).
fn strip_present(headers: &mut HeaderMap, present: u16) -> Seen {
    let mut kept = present & (HOST_BIT | FORWARDED_PROTO_BIT);
    let present = present & !(HOST_BIT | FORWARDED_PROTO_BIT);
    let seen = |kept: u16| Seen {
        host: kept & HOST_BIT != 0,
        forwarded_proto: kept & FORWARDED_PROTO_BIT != 0,
    };
    if present == 0 {
        return seen(kept);
    }
    // Names listed in `Connection` (beyond the fixed set, which is removed below).
    if present & 1 != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .map(str::trim)
            // The usual tokens name headers removed below anyway: skip parsing them.
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("upgrade"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| !HOP_BY_HOP.contains(n) && n != header::UPGRADE)
            .collect();
        for h in named {
            match h.as_str() {
                "host" => kept &= !HOST_BIT,
                "x-forwarded-proto" => kept &= !FORWARDED_PROTO_BIT,
                _ => {}
            }
            headers.remove(h);
        }
    }
    // `te: trailers` is end-to-end in practice (gRPC needs it); every other TE value is hop-by-hop.
    let keep_te = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for (i, h) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 && !(keep_te && h == header::TE) {
            headers.remove(h);
        }
    }
    if present & UPGRADE_BIT != 0 {
        headers.remove(header::UPGRADE);
    }
    seen(kept)
}

/// Index of a hop-by-hop name in `HOP_BY_HOP` (`HOP_BY_HOP.len()` for `upgrade`, one more for
/// `host` and two for `x-forwarded-proto`, which are not hop-by-hop but wanted by the same scan).
/// A string match
/// compiles to a length switch and at most two compares, cheaper than comparing the name with each
/// of them.
fn hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => HOP_BY_HOP.len(),
        "host" => HOP_BY_HOP.len() + 1,
        "x-forwarded-proto" => HOP_BY_HOP.len() + 2,
        _ => return None,
    })
}

/// Copy buffer per direction of an upgraded connection (tokio's default size).
const UPGRADE_BUF_SIZE: usize = 8 * 1024;

async fn splice_upgraded(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (Ok(down), Ok(up)) = (down.await, up.await) else {
        return;
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    // Small buffers: upgraded connections (WebSockets) are many and mostly idle.
    let _bufs = crate::buffered::Held::new(2 * UPGRADE_BUF_SIZE);
    let _ = tokio::io::copy_bidirectional_with_sizes(
        &mut down,
        &mut up,
        UPGRADE_BUF_SIZE,
        UPGRADE_BUF_SIZE,
    )
    .await;
}

/// A shared handle to a cluster plus how to reach it; what listeners route to.
#[derive(Debug, Clone)]
pub struct Target {
    pub cluster: Arc<Cluster>,
    pub client: UpstreamClient,
    pub policy: ForwardPolicy,
    /// mTLS for raw TCP upstreams (`None`: plaintext with splice).
    pub tcp_tls: Option<crate::tls::MtlsConnector>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert!(h.contains_key(header::TE), "te: trailers survives for gRPC");
        // Any name `Connection` lists goes, even one spelled like an option.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert("close", HeaderValue::from_static("1"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key("close") && !h.contains_key(header::UPGRADE));
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn hop_index_matches_the_table() {
        for (i, h) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_index(h), Some(i), "{h}");
        }
        assert_eq!(hop_index(&header::UPGRADE), Some(HOP_BY_HOP.len()));
        assert_eq!(hop_index(&header::HOST), Some(HOP_BY_HOP.len() + 1));
        // `Host` is scanned for, never stripped.
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        assert_eq!(scan_names(&h), HOST_BIT | 1 << 5);
        strip_hop_by_hop(&mut h);
        assert!(h.contains_key(header::HOST) && !h.contains_key(header::TE));
        // A `Connection` field that lists `Host` takes it along, and the caller is told.
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("host, x-forwarded-proto"),
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let seen = strip_hop_by_hop_seen(&mut h);
        assert!(!seen.host && !seen.forwarded_proto && h.is_empty());
        assert_eq!(hop_index(&header::USER_AGENT), None);
        assert_eq!(hop_index(&HeaderName::from_static("x-te")), None);
    }

    #[test]
    fn errors_map_to_statuses() {
        assert_eq!(
            error_response(&ProxyError::NoEndpoint).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            error_response(&ProxyError::UpstreamReset).status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            error_response(&ProxyError::Forbidden).status(),
            StatusCode::FORBIDDEN
        );
    }
}
