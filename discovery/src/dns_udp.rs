//! The UDP fast path of the DNS server. hickory-server's `ServerFuture` spawns a task and goes
//! through a channel per UDP request; for a cache-less authoritative server that overhead
//! dominates, so UDP is served by one receive loop per socket that answers local names inline
//! (same resolver as the hickory `RequestHandler`, which still serves TCP). Foreign names
//! (forwarding) get their own task.

use std::collections::HashMap;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::dns::{Answer, DnsHandler, truncate};
use crate::mmsg::Batch;
use crate::throttle::{Throttle, subnet};

/// Largest UDP payload we accept or send (EDNS clients may ask for more; we cap).
pub(crate) const MAX_UDP: usize = 4096;

/// Most cached answers; the cache is dropped whenever the registry changes.
const CACHE_MAX: usize = 16_384;

struct Cached {
    bytes: Vec<u8>,
    counter: prometheus::IntCounter,
    fail_open: bool,
}

/// Encoded answers by request shape (lowercased question, EDNS, flags), valid for one registry
/// serial. A hit costs a hash lookup and a copy: the id and the question (with the client's
/// letter case) are patched in.
#[derive(Default)]
pub(crate) struct Cache {
    serial: u32,
    map: HashMap<Box<[u8]>, Cached>,
    key: Vec<u8>,
}

impl Cache {
    /// Writes the cached answer to `d` into `out` (its id and question patched in) and returns its
    /// length; `None` on a miss (or when `out` is too small).
    pub(crate) fn hit(&mut self, handler: &DnsHandler, d: &[u8], out: &mut [u8]) -> Option<usize> {
        let serial = handler.serial();
        if serial != self.serial {
            self.map.clear();
            self.serial = serial;
        }
        let qend = cache_key(d, &mut self.key)?;
        let c = self.map.get(self.key.as_slice())?;
        let len = c.bytes.len();
        let out = out.get_mut(..len)?;
        c.counter.inc();
        if c.fail_open {
            handler.fail_open_counter().inc();
        }
        out.copy_from_slice(&c.bytes);
        out[..2].copy_from_slice(&d[..2]);
        out[12..qend].copy_from_slice(&d[12..qend]);
        Some(len)
    }

    pub(crate) fn insert(
        &mut self,
        bytes: &[u8],
        counter: prometheus::IntCounter,
        fail_open: bool,
    ) {
        // `key` still holds the shape of the request that missed (empty: not cacheable).
        if self.key.is_empty() {
            return;
        }
        if self.map.len() >= CACHE_MAX {
            self.map.clear();
        }
        self.map.insert(
            self.key.as_slice().into(),
            Cached {
                bytes: bytes.to_vec(),
                counter,
                fail_open,
            },
        );
    }
}

/// The cache key of a plain query (one question, no compression, at most a bare OPT record), and
/// the end offset of its question. `None` (and an empty key): not cacheable.
fn cache_key(d: &[u8], key: &mut Vec<u8>) -> Option<usize> {
    key.clear();
    let qend = shape(d, key);
    if qend.is_none() {
        key.clear();
    }
    qend
}

fn shape(d: &[u8], key: &mut Vec<u8>) -> Option<usize> {
    if d.len() < 17 || d[2] & 0xF8 != 0 || d[4..10] != [0, 1, 0, 0, 0, 0] || d[10] != 0 || d[11] > 1
    {
        return None;
    }
    let mut pos = 12;
    loop {
        let len = usize::from(*d.get(pos)?);
        if len & 0xC0 != 0 {
            return None;
        }
        key.push(len as u8);
        pos += 1;
        if len == 0 {
            break;
        }
        key.extend(d.get(pos..pos + len)?.iter().map(u8::to_ascii_lowercase));
        pos += len;
        if key.len() > 255 {
            return None;
        }
    }
    let qend = pos + 4;
    key.extend_from_slice(d.get(pos..qend)?);
    // RD and CD are echoed.
    key.push(d[2] & 0x01);
    key.push(d[3] & 0x10);
    if d[11] == 1 {
        // A bare OPT: root name, TYPE 41, payload, extended rcode 0, version 0, no options.
        let opt = d.get(qend..)?;
        if opt.len() != 11
            || opt[0] != 0
            || opt[1..3] != [0, 41]
            || opt[5] != 0
            || opt[6] != 0
            || opt[9..11] != [0, 0]
        {
            return None;
        }
        key.extend_from_slice(&opt[3..5]);
        key.push(opt[7] & 0x80);
    } else if d.len() != qend {
        return None;
    }
    Some(qend)
}

/// Serves UDP until `stop`: receives a batch of datagrams in one call ([`mmsg`]), answers each
/// inline (cache first), sends the answers in one call. With `rrl`, each client subnet gets that
/// many responses per second; beyond it a query gets a bare truncated reply (no records, TC set:
/// a real resolver retries over TCP, a spoofed victim receives nothing larger than the query).
pub async fn serve(
    sock: Arc<UdpSocket>,
    handler: Arc<DnsHandler>,
    rrl: Option<Arc<Throttle>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Batch::new(MAX_UDP);
    let mut cache = Cache::default();
    loop {
        let n = tokio::select! {
            r = batch.recv(&sock) => match r {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(error = %e, "dns udp receive failed");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        for i in 0..n {
            answer(&mut batch, i, &mut cache, &handler, rrl.as_deref(), &sock);
        }
        batch.send(&sock).await;
    }
}

/// Answers datagram `i` of the batch: queues the reply in its send slot, or hands a foreign name
/// to a forwarding task, or stays silent.
fn answer(
    batch: &mut Batch,
    i: usize,
    cache: &mut Cache,
    handler: &Arc<DnsHandler>,
    rrl: Option<&Throttle>,
    sock: &Arc<UdpSocket>,
) {
    if let Some(rrl) = rrl {
        let Some(src) = batch.peer(i) else {
            return;
        };
        if !rrl.admit(subnet(src.ip())) {
            handler.count_rate_limited();
            if let Some(tc) = slip(batch.datagram(i)) {
                queue(batch, i, &tc);
            }
            return;
        }
    }
    let (datagram, out) = batch.slot(i);
    let query_len = datagram.len();
    if let Some(len) = cache.hit(handler, datagram, out) {
        batch.commit(i, len);
        return;
    }
    match decide(handler, datagram) {
        Reply::Now(bytes, cacheable) => {
            if let Some((counter, fail_open)) = cacheable {
                cache.insert(&bytes, counter, fail_open);
            }
            queue(batch, i, &bytes);
        }
        Reply::Nothing => {}
        Reply::Foreign(req) => {
            let Some(src) = batch.peer(i) else {
                return;
            };
            let (handler, sock) = (handler.clone(), sock.clone());
            tokio::spawn(async move {
                let Some(query) = req.queries().first() else {
                    return;
                };
                let (answer, ra) = handler.foreign(query, req.recursion_desired()).await;
                handler.count(query.query_type(), &answer);
                if let Some(bytes) = encode(&req, answer, ra, query_len, udp_limit(&req)) {
                    let _ = sock.send_to(&bytes, src).await;
                }
            });
        }
    }
}

/// Copies a reply into datagram `i`'s send slot and queues it (replies never exceed
/// [`MAX_UDP`], the slot size; a larger one would be dropped by `commit`).
fn queue(batch: &mut Batch, i: usize, bytes: &[u8]) {
    let (_, out) = batch.slot(i);
    if let Some(slot) = out.get_mut(..bytes.len()) {
        slot.copy_from_slice(bytes);
        batch.commit(i, bytes.len());
    }
}

type Cacheable = Option<(prometheus::IntCounter, bool)>;

/// What to do with one datagram.
pub(crate) enum Reply {
    /// Send these bytes now (and cache them when the counter is given).
    Now(Vec<u8>, Cacheable),
    /// A name outside our zones: resolve off the receive loop.
    Foreign(Message),
    /// Not a query: stay silent.
    Nothing,
}

/// Everything the receive loop decides without waiting: parse, local answer, errors.
pub(crate) fn decide(handler: &DnsHandler, datagram: &[u8]) -> Reply {
    decide_within(handler, datagram, None)
}

/// [`decide`] with an explicit answer size limit (`None`: the query's UDP size).
pub(crate) fn decide_within(handler: &DnsHandler, datagram: &[u8], limit: Option<usize>) -> Reply {
    let req = match Message::from_vec(datagram) {
        Ok(m) => m,
        Err(_) => return formerr(datagram).map_or(Reply::Nothing, |r| Reply::Now(r, None)),
    };
    if req.message_type() != MessageType::Query {
        return Reply::Nothing;
    }
    let now = |r: Option<Vec<u8>>| r.map_or(Reply::Nothing, |r| Reply::Now(r, None));
    let [query] = req.queries() else {
        return now(error(&req, ResponseCode::FormErr));
    };
    if req.op_code() != OpCode::Query {
        return now(error(&req, ResponseCode::NotImp));
    }
    match handler.local(query) {
        Some(answer) => {
            let counter = handler.counter(query.query_type(), &answer);
            counter.inc();
            if answer.fail_open {
                handler.fail_open_counter().inc();
            }
            let cacheable = (!answer.random).then_some((counter, answer.fail_open));
            let limit = limit.unwrap_or_else(|| udp_limit(&req));
            encode(&req, answer, false, datagram.len(), limit)
                .map_or(Reply::Nothing, |r| Reply::Now(r, cacheable))
        }
        None => Reply::Foreign(req),
    }
}

fn response_to(req: &Message) -> Message {
    let mut m = Message::new();
    m.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(req.op_code())
        .set_recursion_desired(req.recursion_desired())
        .set_checking_disabled(req.checking_disabled());
    m.add_queries(req.queries().iter().cloned());
    if let Some(e) = req.extensions() {
        let mut edns = Edns::new();
        edns.set_max_payload(e.max_payload().max(512));
        m.set_edns(edns);
    }
    m
}

/// The size a query allows for its UDP answer: its EDNS payload size (at least 512, at most our
/// cap), else 512 (RFC 1035).
pub(crate) fn udp_limit(req: &Message) -> usize {
    req.extensions()
        .as_ref()
        .map(|e| usize::from(e.max_payload().max(512)).min(MAX_UDP))
        .unwrap_or(512)
}

/// Encodes an answer in at most `limit` bytes (else truncated with TC). A negative answer (no
/// records) keeps its SOA only while the reply stays within twice the query's `query_len`: an
/// unknown name must not amplify (clients that send EDNS cookies, like real resolvers, still get
/// it; over TCP it is always there).
pub(crate) fn encode(
    req: &Message,
    mut answer: Answer,
    ra: bool,
    query_len: usize,
    limit: usize,
) -> Option<Vec<u8>> {
    let truncated = req
        .queries()
        .first()
        .is_some_and(|q| truncate(q, &mut answer, limit));
    let mut m = response_to(req);
    m.set_authoritative(answer.authoritative)
        .set_recursion_available(ra)
        .set_truncated(truncated)
        .set_response_code(answer.rcode.unwrap_or(ResponseCode::NoError));
    let negative = answer.answers.is_empty();
    m.add_answers(answer.answers);
    m.add_name_servers(answer.authority);
    m.add_additionals(answer.additionals);
    let bytes = m.to_vec().ok()?;
    if negative && limit <= MAX_UDP && bytes.len() > 2 * query_len {
        m.take_name_servers();
        m.take_additionals();
        return m.to_vec().ok();
    }
    Some(bytes)
}

/// The reply to a rate-limited query: its header and question, TC set, nothing else.
fn slip(datagram: &[u8]) -> Option<Vec<u8>> {
    let req = Message::from_vec(datagram).ok()?;
    if req.message_type() != MessageType::Query || req.queries().len() != 1 {
        return None;
    }
    let mut m = response_to(&req);
    m.set_truncated(true);
    m.to_vec().ok()
}

fn error(req: &Message, rcode: ResponseCode) -> Option<Vec<u8>> {
    let mut m = response_to(req);
    m.set_response_code(rcode);
    m.to_vec().ok()
}

/// FORMERR for an unparsable query that at least has a header and is not a response.
fn formerr(datagram: &[u8]) -> Option<Vec<u8>> {
    if datagram.len() < 12 || datagram[2] & 0x80 != 0 {
        return None;
    }
    let mut h = [0u8; 12];
    h[..2].copy_from_slice(&datagram[..2]);
    h[2] = 0x80 | (datagram[2] & 0x79); // QR, keep opcode and RD
    h[3] = ResponseCode::FormErr.low();
    Some(h.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str, edns: bool) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(7).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn cache_key_ignores_case_and_id_but_not_edns() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let qa = query("Api.Example.local.", false);
        let mut qb = query("api.example.LOCAL.", false);
        qb[0] = 99;
        assert_eq!(cache_key(&qa, &mut a), cache_key(&qb, &mut b));
        assert_eq!(a, b);
        let qe = query("api.example.local.", true);
        assert!(cache_key(&qe, &mut b).is_some());
        assert_ne!(a, b);
        // Garbage and truncated datagrams are not cacheable (and do not panic).
        assert!(cache_key(&qa[..15], &mut b).is_none());
        assert!(b.is_empty());
        assert!(cache_key(&[0xff; 40], &mut b).is_none());
    }

    #[test]
    fn formerr_only_for_queries_with_a_header() {
        assert!(formerr(&[0; 5]).is_none());
        let r = formerr(&[1, 2, 0x01, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0xff]).unwrap();
        assert_eq!(r[..2], [1, 2]);
        assert_eq!(r[2], 0x81);
        assert_eq!(r[3] & 0x0f, 1);
    }
}
