//! One listener's live state (the compiled rules behind `ArcSwap`) and the request path:
//! route → action → (pick group → pick target → forward).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::time::Instant;

use super::config::{LimitsConfig, ListenerConfig, ListenerProtocol};
use super::error::{ForwardError, WeightError};
use super::metrics::{Metrics, RuleMetrics};
use super::target::{InFlight, TargetGroup};
use crate::route::{Action, Matched, RequestView, RuleIndex, STICKY_COOKIE, Weight};
use crate::{BodyError, ProxyBody, ProxyError, UpstreamClient};

pub type ForwardClient = UpstreamClient;

pub struct ListenerState {
    pub config: ListenerConfig,
    /// Swapped whole on every change; a request keeps the one it started with.
    pub routes: ArcSwap<Routes>,
    writer: Mutex<()>,
    pub local: SocketAddr,
}

/// The compiled rules and their metric handles, by rule position.
pub struct Routes {
    pub index: RuleIndex,
    /// Per rule position, then one for the default action.
    metrics: Vec<RuleMetrics>,
}

impl Routes {
    fn new(index: RuleIndex, listener: &str, metrics: &Metrics) -> Self {
        let mut m: Vec<_> = index
            .rules()
            .iter()
            .map(|r| metrics.rule(listener, &r.name))
            .collect();
        m.push(metrics.rule(listener, "default"));
        Self { index, metrics: m }
    }
}

/// What the request path needs from the whole LB.
pub struct Shared {
    pub groups: Vec<Arc<TargetGroup>>,
    pub client: ForwardClient,
    pub limits: LimitsConfig,
}

impl ListenerState {
    pub fn new(
        config: ListenerConfig,
        index: RuleIndex,
        metrics: &Metrics,
        local: SocketAddr,
    ) -> Self {
        Self {
            routes: ArcSwap::from_pointee(Routes::new(index, &config.name, metrics)),
            writer: Mutex::new(()),
            local,
            config,
        }
    }

    /// Swap in new weights for `rule`'s forward action. In-flight requests keep the index they
    /// started with; nothing is dropped.
    pub fn set_weights(
        &self,
        rule: &str,
        weights: &[(&str, Weight)],
    ) -> Result<Vec<(String, u16)>, WeightError> {
        let _w = self.writer.lock();
        let routes = self.routes.load_full();
        let cur = &routes.index;
        let pos = cur
            .position(rule)
            .ok_or_else(|| WeightError::UnknownRule(rule.to_owned()))?;
        let Action::Forward(f) = &cur.rules()[pos].action else {
            return Err(WeightError::NotForward(rule.to_owned()));
        };
        if let Some((n, _)) = weights
            .iter()
            .find(|(n, _)| !f.groups().iter().any(|g| &*g.name == *n))
        {
            return Err(WeightError::UnknownGroup((*n).to_owned()));
        }
        let next = f
            .with_weights(weights)
            .map_err(|e| WeightError::Invalid(e.to_string()))?;
        let out = next
            .groups()
            .iter()
            .map(|g| (g.name.to_string(), g.weight.get()))
            .collect();
        self.routes.store(Arc::new(Routes {
            index: cur.with_action(pos, Action::Forward(next)),
            metrics: routes.metrics.clone(),
        }));
        Ok(out)
    }

    /// Replace all rules (config reload).
    pub fn replace_rules(&self, index: RuleIndex, metrics: &Metrics) {
        let _w = self.writer.lock();
        self.routes
            .store(Arc::new(Routes::new(index, &self.config.name, metrics)));
    }

    pub fn scheme(&self) -> &'static str {
        match self.config.protocol {
            ListenerProtocol::Http => "http",
            ListenerProtocol::Https => "https",
        }
    }
}

const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The downstream end of a connection, and the field lines every request from it gets on its
/// way to a target (`x-forwarded-for`, `x-forwarded-proto`), formatted once per connection and
/// written after the request's own fields rather than put into each request's header map.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    added: Bytes,
}

impl Peer {
    pub fn new(addr: SocketAddr, scheme: &'static str) -> Self {
        Peer {
            addr,
            added: Bytes::from(format!(
                "x-forwarded-for: {}\r\nx-forwarded-proto: {scheme}\r\n",
                addr.ip()
            )),
        }
    }
}

enum Decision {
    Respond(Response<LbBody>),
    Forward {
        slot: usize,
        cookie: Option<HeaderValue>,
    },
}

/// What every request of one downstream connection shares: one reference per request to clone.
pub struct Downstream {
    pub shared: Arc<Shared>,
    pub listener: Arc<ListenerState>,
    pub peer: Peer,
}

/// The request path. Never fails: every error becomes a response from the wire table.
pub async fn handle(
    conn: Arc<Downstream>,
    req: Request<ProxyBody>,
) -> Result<Response<LbBody>, Infallible> {
    let start = Instant::now();
    let (shared, l, peer) = (&conn.shared, &conn.listener, &conn.peer);
    let routes = l.routes.load_full();
    let index = &routes.index;
    let (pos, decision) = {
        let view = RequestView::reading_host(&req, peer.addr.ip(), index.reads_host());
        let matched = index.route(&view);
        let pos = match matched {
            Matched::Rule(i, _) => i,
            Matched::Default(_) => routes.metrics.len() - 1,
        };
        let decision = match matched.action() {
            Action::FixedResponse(f) => {
                let mut resp = Response::new(full(f.body.clone()));
                *resp.status_mut() = f.status;
                if let Some(ct) = f
                    .content_type
                    .as_deref()
                    .and_then(|c| HeaderValue::from_str(c).ok())
                {
                    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
                }
                Decision::Respond(resp)
            }
            Action::Redirect(r) => {
                let loc = r.location(&view, l.scheme(), l.local.port());
                let mut resp = Response::new(full(Bytes::new()));
                *resp.status_mut() = r.status;
                match HeaderValue::from_str(&loc) {
                    Ok(v) => {
                        resp.headers_mut().insert(header::LOCATION, v);
                    }
                    Err(_) => *resp.status_mut() = StatusCode::BAD_REQUEST,
                }
                Decision::Respond(resp)
            }
            Action::Forward(f) => {
                let pick = f.pick(req.headers(), rand::random());
                let cookie = match (pick.set_cookie, f.stickiness) {
                    (true, Some(ttl)) => HeaderValue::from_str(&format!(
                        "{STICKY_COOKIE}={}; Max-Age={}; Path=/; HttpOnly",
                        pick.group.name,
                        ttl.as_secs()
                    ))
                    .ok(),
                    _ => None,
                };
                Decision::Forward {
                    slot: pick.group.slot,
                    cookie,
                }
            }
        };
        (pos, decision)
    };
    let m = &routes.metrics[pos.min(routes.metrics.len() - 1)];
    m.requests.inc();
    // How long until the response head arrived (the last try's clock read), for the rule's
    // latency.
    let mut answered = None;
    let resp = match decision {
        Decision::Respond(r) => r,
        Decision::Forward { slot, cookie } => {
            // Forwarding is written out here rather than in an async helper: each async layer
            // is one more copy of its future (and of the request) per request.
            let result = match shared.groups.get(slot) {
                Some(group) => 'forward: {
                    let (mut parts, body) = req.into_parts();
                    // A bodiless request that never reached a target (connect failed) may go to
                    // another one.
                    let retryable = body.is_end_stream();
                    let mut body = Some(body);
                    prepare_headers(&mut parts);
                    let attempts = if retryable { MAX_ATTEMPTS } else { 1 };
                    let mut avoid = None;
                    let mut last_err = ForwardError::NoTarget(group.name.to_string());
                    for attempt in 1..=attempts {
                        let Some(inflight) = group.pick(rand::random(), avoid) else {
                            break 'forward Err(ForwardError::NoTarget(group.name.to_string()));
                        };
                        let addr = inflight.target().addr;
                        // The head stays in `parts` (borrowed by the exchange) for another try.
                        let exchange = std::pin::pin!(shared.client.send_parts(
                            addr,
                            &inflight.target().authority,
                            &mut parts,
                            &peer.added,
                            body.take().unwrap_or_else(ProxyBody::empty),
                            attempt < attempts,
                        ));

                        // One clock read per try (the first starts when the request did).
                        let t0 = if attempt == 1 { start } else { Instant::now() };
                        // Pinned in place: the timeout wraps a pointer instead of moving the
                        // exchange future.
                        let result = shared
                            .client
                            .timer()
                            .within((t0 + shared.limits.request_timeout).into_std(), exchange)
                            .await;
                        let (status, out) = match result {
                            Ok(Ok(resp)) => {
                                let status = resp.status().as_u16();
                                let resp = resp.map(|inner| LbBody {
                                    inner,
                                    inflight: Some(inflight),
                                });
                                (status, Ok(resp))
                            }
                            Ok(Err(
                                e @ (ProxyError::ConnectFailed | ProxyError::ConnectTimeout),
                            )) if attempt < attempts => {
                                tracing::debug!(target = %addr, error = %e, "connect failed; trying another target");
                                avoid = Some(addr);
                                last_err = ForwardError::Upstream(e.to_string());
                                continue;
                            }
                            Ok(Err(ProxyError::ConnectTimeout)) | Err(_) => {
                                (504, Err(ForwardError::UpstreamTimeout))
                            }
                            Ok(Err(e)) => (502, Err(ForwardError::Upstream(e.to_string()))),
                        };
                        let end = Instant::now();
                        let elapsed = end.saturating_duration_since(t0);
                        // The first try started with the request: one subtraction serves both.
                        answered = Some(if attempt == 1 {
                            elapsed
                        } else {
                            end.saturating_duration_since(start)
                        });
                        group.metrics.record_status(status);
                        group.metrics.latency.observe(elapsed.as_secs_f64());
                        group.window.record(end, status, elapsed);
                        break 'forward out;
                    }
                    Err(last_err)
                }
                None => Err(ForwardError::NoTarget(String::new())),
            };
            let mut resp = result.unwrap_or_else(|e| error_response(&e));
            if let Some(c) = cookie {
                resp.headers_mut().append(header::SET_COOKIE, c);
            }
            resp
        }
    };
    let took = answered.unwrap_or_else(|| start.elapsed());
    m.latency.observe(took.as_secs_f64());
    Ok(resp)
}

/// The request head as it goes to a target: hop-by-hop headers out, `Host` from the URI when
/// missing, the client's own `X-Forwarded-Proto` out (the peer's lines add ours; a client's
/// `X-Forwarded-For` stays, and ours follows it, which appends to the list).
fn prepare_headers(parts: &mut http::request::Parts) {
    let seen = crate::forward::strip_hop_by_hop_seen(&mut parts.headers);
    crate::forward::host_from_uri(parts, &seen);
    if seen.forwarded_proto {
        parts.headers.remove(X_FORWARDED_PROTO);
    }
}

/// Tries per request when a connect fails (bodiless requests only).
const MAX_ATTEMPTS: usize = 2;

pub fn full(b: Bytes) -> LbBody {
    local(ProxyBody::full(b))
}

/// A body the LB answers itself (no target, nothing in flight).
pub fn local(inner: ProxyBody) -> LbBody {
    LbBody {
        inner,
        inflight: None,
    }
}

pub fn error_response(e: &ForwardError) -> Response<LbBody> {
    tracing::debug!(error = %e, "answering with an error");
    let mut r = Response::new(full(Bytes::from(format!("{}\n", e.status()))));
    *r.status_mut() = e.status();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

pin_project_lite::pin_project! {
    /// A response body of the LB: a local one (fixed responses, errors, admin) or a target's,
    /// holding the target's in-flight count until it ends. A struct, not a boxed body: no
    /// allocation per request.
    pub struct LbBody {
        #[pin]
        inner: ProxyBody,
        inflight: Option<InFlight>,
    }
}

impl crate::h1::RawHeadSource for LbBody {
    fn take_raw_head(&mut self) -> Option<Box<crate::h1::RawHead>> {
        self.inner.take_raw_head()
    }
}

impl Body for LbBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
