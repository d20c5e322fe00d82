//! The authoritative DNS server over every DNS namespace (hickory-server `RequestHandler`).
//!
//! `<service>.<namespace>`: A/AAAA of serving instances (MULTIVALUE: up to 8 random; WEIGHTED: one),
//! SRV → `<instance>.<service>.<namespace>` plus its address records, CNAME from
//! `AWS_INSTANCE_CNAME`. SOA/NS at the apex, NXDOMAIN + SOA for unknown names, NODATA + SOA for a
//! name without the type. Every instance unhealthy: answer with all (fail open) and count it.
//! Foreign names: REFUSED, or forwarded to `--dns-forward`.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType as QType};
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use rand::seq::{IndexedRandom, SliceRandom};

use crate::metrics::Metrics;
use crate::model::{Namespace, RecordType, RoutingPolicy, attr};
use crate::registry::{InstanceEntry, Registry, ServiceEntry, State};

/// SOA TTL (and negative-caching minimum) when the namespace sets none.
pub const DEFAULT_SOA_TTL: u32 = 15;
/// Most address records in one MULTIVALUE answer, as Route 53.
pub const MULTIVALUE_MAX: usize = 8;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

pub struct DnsHandler {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    forward: Option<SocketAddr>,
}

impl DnsHandler {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        forward: Option<SocketAddr>,
    ) -> Self {
        DnsHandler {
            registry,
            metrics,
            forward,
        }
    }
}

impl DnsHandler {
    /// Resolves one question: from the registry, else forwarded, else REFUSED. Also returns
    /// whether recursion was available (a forwarded answer).
    pub(crate) async fn answer(&self, query: &Query, rd: bool) -> (Answer, bool) {
        if let Some(a) = self.local(query) {
            return (a, false);
        }
        self.foreign(query, rd).await
    }

    /// The answer for a name outside our zones.
    pub(crate) async fn foreign(&self, query: &Query, rd: bool) -> (Answer, bool) {
        let Some(up) = self.forward else {
            let refused = Answer {
                rcode: Some(ResponseCode::Refused),
                ..Answer::default()
            };
            return (refused, false);
        };
        match forward(up, query.clone(), rd).await {
            Some(m) => {
                let a = Answer {
                    rcode: Some(m.response_code()),
                    authoritative: false,
                    answers: m.answers().to_vec(),
                    authority: m.name_servers().to_vec(),
                    additionals: m
                        .additionals()
                        .iter()
                        .filter(|r| r.record_type() != QType::OPT)
                        .cloned()
                        .collect(),
                    fail_open: false,
                    random: true,
                };
                (a, true)
            }
            None => {
                let failed = Answer {
                    rcode: Some(ResponseCode::ServFail),
                    ..Answer::default()
                };
                (failed, false)
            }
        }
    }

    /// Only the registry: `None` for a name outside our zones.
    pub(crate) fn local(&self, query: &Query) -> Option<Answer> {
        let st = self.registry.read();
        resolve(
            &st,
            self.registry.serial(),
            query.name(),
            query.query_type(),
        )
    }

    pub(crate) fn count(&self, qtype: QType, answer: &Answer) {
        self.counter(qtype, answer).inc();
        if answer.fail_open {
            self.fail_open_counter().inc();
        }
    }

    /// The query counter for this answer (resolved once, kept by the UDP answer cache).
    pub(crate) fn counter(&self, qtype: QType, answer: &Answer) -> prometheus::IntCounter {
        let rcode = answer.rcode.unwrap_or(ResponseCode::NoError);
        self.metrics
            .dns_queries
            .with_label_values(&[qtype_label(qtype), rcode_label(rcode)])
    }

    pub(crate) fn count_tcp_refused(&self) {
        self.metrics
            .dns_limited
            .with_label_values(&["tcp_connections"])
            .inc();
    }

    pub(crate) fn count_rate_limited(&self) {
        self.metrics
            .dns_limited
            .with_label_values(&["rate_limit"])
            .inc();
    }

    pub(crate) fn fail_open_counter(&self) -> &prometheus::IntCounter {
        &self.metrics.dns_fail_open
    }

    pub(crate) fn serial(&self) -> u32 {
        self.registry.serial()
    }
}

fn qtype_label(q: QType) -> &'static str {
    match q {
        QType::A => "A",
        QType::AAAA => "AAAA",
        QType::SRV => "SRV",
        QType::SOA => "SOA",
        QType::NS => "NS",
        QType::CNAME => "CNAME",
        QType::TXT => "TXT",
        QType::PTR => "PTR",
        QType::MX => "MX",
        QType::ANY => "ANY",
        _ => "OTHER",
    }
}

/// What one query resolves to.
#[derive(Default)]
pub(crate) struct Answer {
    pub(crate) rcode: Option<ResponseCode>,
    pub(crate) authoritative: bool,
    pub(crate) answers: Vec<Record>,
    pub(crate) authority: Vec<Record>,
    pub(crate) additionals: Vec<Record>,
    pub(crate) fail_open: bool,
    /// Chosen at random per query (not cacheable).
    pub(crate) random: bool,
}

fn name(s: &str) -> Option<Name> {
    Name::from_str(&format!("{}.", s.trim_end_matches('.'))).ok()
}

fn soa_record(ns: &Namespace, serial: u32) -> Option<Record> {
    let zone = name(&ns.name)?;
    let ttl = ns.soa_ttl.unwrap_or(DEFAULT_SOA_TTL);
    let soa = SOA::new(
        name(&format!("ns1.{}", ns.name))?,
        name(&format!("hostmaster.{}", ns.name))?,
        serial,
        7200,
        900,
        1_209_600,
        ttl,
    );
    Some(Record::from_rdata(zone, ttl, RData::SOA(soa)))
}

fn address_records(owner: &Name, i: &InstanceEntry, qtype: QType, ttl: u32) -> Option<Record> {
    let a = &i.instance.attributes;
    match qtype {
        QType::A => a
            .get(attr::IPV4)
            .and_then(|s| s.parse().ok())
            .map(|ip| Record::from_rdata(owner.clone(), ttl, RData::A(A(ip)))),
        QType::AAAA => a
            .get(attr::IPV6)
            .and_then(|s| s.parse().ok())
            .map(|ip| Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(ip)))),
        _ => None,
    }
}

/// Serving instances, or all of them when none is (fail open).
fn serving(e: &ServiceEntry) -> (Vec<&InstanceEntry>, bool) {
    let all: Vec<&InstanceEntry> = e.instances.values().collect();
    let healthy: Vec<&InstanceEntry> = all
        .iter()
        .copied()
        .filter(|i| i.health.is_serving())
        .collect();
    if healthy.is_empty() && !all.is_empty() {
        (all, true)
    } else {
        (healthy, false)
    }
}

fn pick<'a>(e: &ServiceEntry, mut set: Vec<&'a InstanceEntry>) -> Vec<&'a InstanceEntry> {
    let policy = e
        .service
        .dns_config
        .as_ref()
        .and_then(|d| d.routing_policy)
        .unwrap_or(RoutingPolicy::Multivalue);
    let mut rng = rand::rng();
    match policy {
        RoutingPolicy::Weighted => set.choose(&mut rng).map(|i| vec![*i]).unwrap_or_default(),
        RoutingPolicy::Multivalue => {
            set.shuffle(&mut rng);
            set.truncate(MULTIVALUE_MAX);
            set
        }
    }
}

/// Whether `qname` is `zone` or below it (ASCII case-insensitive, no trailing dots).
fn in_zone(qname: &str, zone: &str) -> bool {
    let (q, z) = (qname.as_bytes(), zone.as_bytes());
    q.len() >= z.len()
        && q[q.len() - z.len()..].eq_ignore_ascii_case(z)
        && (q.len() == z.len() || q[q.len() - z.len() - 1] == b'.')
}

fn resolve(st: &State, serial: u32, query_name: &Name, qtype: QType) -> Option<Answer> {
    let mut qname = query_name.to_ascii();
    if qname.ends_with('.') {
        qname.pop();
    }
    qname.make_ascii_lowercase();
    let ns = st
        .namespaces
        .values()
        .filter(|n| n.kind.is_dns() && in_zone(&qname, &n.name))
        .max_by_key(|n| n.name.len())?;
    let mut out = Answer {
        authoritative: true,
        ..Answer::default()
    };
    let soa = || soa_record(ns, serial);
    let owner = query_name.clone();
    let nodata = |mut out: Answer| {
        out.authority.extend(soa());
        out
    };
    if qname.len() == ns.name.len() {
        match qtype {
            QType::SOA => out.answers.extend(soa()),
            QType::NS => {
                let ns1 = name(&format!("ns1.{}", ns.name))?;
                out.answers.push(Record::from_rdata(
                    owner,
                    ns.soa_ttl.unwrap_or(DEFAULT_SOA_TTL),
                    RData::NS(NS(ns1)),
                ));
            }
            _ => return Some(nodata(out)),
        }
        return Some(out);
    }
    let rel = &qname[..qname.len() - ns.name.len() - 1];
    let labels: Vec<&str> = rel.split('.').collect();
    let nxdomain = |mut out: Answer| {
        out.rcode = Some(ResponseCode::NXDomain);
        out.authority.extend(soa());
        out
    };
    let (svc_label, inst_label) = match labels.as_slice() {
        [s] => (*s, None),
        [i, s] => (*s, Some(*i)),
        _ => return Some(nxdomain(out)),
    };
    let Some(e) = st.service_by_name(&ns.id, svc_label) else {
        return Some(nxdomain(out));
    };
    let Some(dns) = e.service.dns_config.as_ref() else {
        return Some(nxdomain(out));
    };
    if let Some(inst) = inst_label {
        // `<instance>.<service>.<namespace>`: the SRV target names.
        let Some(i) = e
            .instances
            .values()
            .find(|i| i.instance.id.eq_ignore_ascii_case(inst))
        else {
            return Some(nxdomain(out));
        };
        let ttl = dns
            .ttl(RecordType::Srv)
            .or(dns.ttl(RecordType::A))
            .unwrap_or(60);
        out.answers.extend(address_records(&owner, i, qtype, ttl));
        return Some(if out.answers.is_empty() {
            nodata(out)
        } else {
            out
        });
    }
    let (set, fail_open) = serving(e);
    out.fail_open = fail_open;
    // A random choice per query: the UDP answer cache must not pin one.
    let weighted = dns.routing_policy == Some(RoutingPolicy::Weighted);
    out.random = set.len() > MULTIVALUE_MAX || (weighted && set.len() > 1);
    match qtype {
        QType::A | QType::AAAA => {
            let kind = if qtype == QType::A {
                RecordType::A
            } else {
                RecordType::Aaaa
            };
            if let Some(ttl) = dns.ttl(kind) {
                let with_addr: Vec<_> = set
                    .into_iter()
                    .filter(|i| address_records(&owner, i, qtype, ttl).is_some())
                    .collect();
                for i in pick(e, with_addr) {
                    out.answers.extend(address_records(&owner, i, qtype, ttl));
                }
            } else if let Some(ttl) = dns.ttl(RecordType::Cname) {
                cname(&mut out, &owner, e, set, ttl);
            }
        }
        QType::SRV => {
            if let Some(ttl) = dns.ttl(RecordType::Srv) {
                for i in pick(e, set) {
                    let Some(port) = i
                        .instance
                        .attributes
                        .get(attr::PORT)
                        .and_then(|p| p.parse().ok())
                    else {
                        continue;
                    };
                    let Some(target) = name(&format!("{}.{}", i.instance.id, qname)) else {
                        continue;
                    };
                    out.answers.push(Record::from_rdata(
                        owner.clone(),
                        ttl,
                        RData::SRV(SRV::new(1, 1, port, target.clone())),
                    ));
                    let attl = dns.ttl(RecordType::A).unwrap_or(ttl);
                    out.additionals
                        .extend(address_records(&target, i, QType::A, attl));
                    let attl = dns.ttl(RecordType::Aaaa).unwrap_or(ttl);
                    out.additionals
                        .extend(address_records(&target, i, QType::AAAA, attl));
                }
            }
        }
        QType::CNAME => {
            if let Some(ttl) = dns.ttl(RecordType::Cname) {
                cname(&mut out, &owner, e, set, ttl);
            }
        }
        _ => {}
    }
    Some(if out.answers.is_empty() {
        nodata(out)
    } else {
        out
    })
}

fn cname(out: &mut Answer, owner: &Name, e: &ServiceEntry, set: Vec<&InstanceEntry>, ttl: u32) {
    let target = pick(e, set)
        .into_iter()
        .find_map(|i| i.instance.attributes.get(attr::CNAME).and_then(|c| name(c)));
    if let Some(t) = target {
        out.answers.push(Record::from_rdata(
            owner.clone(),
            ttl,
            RData::CNAME(CNAME(t)),
        ));
    }
}

async fn forward(upstream: SocketAddr, query: Query, rd: bool) -> Option<Message> {
    let bind: SocketAddr = match upstream.ip() {
        IpAddr::V4(_) => "0.0.0.0:0",
        IpAddr::V6(_) => "[::]:0",
    }
    .parse()
    .ok()?;
    let sock = tokio::net::UdpSocket::bind(bind).await.ok()?;
    let mut msg = Message::new();
    let id: u16 = rand::random();
    msg.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(rd)
        .add_query(query);
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    msg.set_edns(edns);
    let bytes = msg.to_vec().ok()?;
    sock.send_to(&bytes, upstream).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
    loop {
        let (n, from) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        if from != upstream {
            continue;
        }
        if let Ok(m) = Message::from_vec(&buf[..n])
            && m.id() == id
        {
            return Some(m);
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut header = Header::response_from_request(request.header());
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(req_edns) = request.edns() {
            let mut e = Edns::new();
            e.set_max_payload(req_edns.max_payload().max(512));
            builder.edns(e);
        }
        let query = match request.queries() {
            [q] if request.op_code() == OpCode::Query
                && request.message_type() == MessageType::Query =>
            {
                q.clone()
            }
            _ => {
                header.set_response_code(ResponseCode::FormErr);
                self.metrics
                    .dns_queries
                    .with_label_values(&["none", "FORMERR"])
                    .inc();
                return send(&mut response_handle, builder.build_no_records(header)).await;
            }
        };
        let qtype = query.query_type();
        let (answer, ra) = self
            .answer(query.original(), request.recursion_desired())
            .await;
        header.set_recursion_available(ra);
        let mut answer = answer;
        if request.protocol() == hickory_proto::xfer::Protocol::Udp {
            let limit = request
                .edns()
                .map(|e| e.max_payload().max(512))
                .unwrap_or(512) as usize;
            if truncate(query.original(), &mut answer, limit) {
                header.set_truncated(true);
            }
        }
        self.count(qtype, &answer);
        let rcode = answer.rcode.unwrap_or(ResponseCode::NoError);
        header.set_response_code(rcode);
        header.set_authoritative(answer.authoritative);
        let response = builder.build(
            header,
            answer.answers.iter(),
            std::iter::empty(),
            answer.authority.iter(),
            answer.additionals.iter(),
        );
        send(&mut response_handle, response).await
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::authority::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    let header = *response.header();
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "dns response not sent");
            let mut h = header;
            h.set_response_code(ResponseCode::ServFail);
            h.into()
        }
    }
}

fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::NotImp => "NOTIMP",
        _ => "OTHER",
    }
}

/// Size of the encoded response (with an OPT record's 11 bytes when EDNS is used).
fn encoded_len(query: &Query, a: &Answer) -> usize {
    let mut m = Message::new();
    m.add_query(query.clone());
    m.add_answers(a.answers.iter().cloned());
    m.add_name_servers(a.authority.iter().cloned());
    m.add_additionals(a.additionals.iter().cloned());
    m.to_vec().map(|v| v.len() + 11).unwrap_or(usize::MAX)
}

/// Fits a UDP answer in `limit` bytes (RFC 1035 512 without EDNS): drops additionals, then
/// answers, and reports whether the client must retry over TCP.
pub(crate) fn truncate(query: &Query, a: &mut Answer, limit: usize) -> bool {
    // Cheap bound first: most answers are far below the limit.
    let bound: usize = 64
        + a.answers
            .iter()
            .chain(&a.authority)
            .chain(&a.additionals)
            .map(|r| r.name().len() + 80)
            .sum::<usize>();
    if bound <= limit || encoded_len(query, a) <= limit {
        return false;
    }
    a.additionals.clear();
    while !a.answers.is_empty() && encoded_len(query, a) > limit {
        a.answers.pop();
    }
    true
}
