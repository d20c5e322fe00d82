//! The UDP fast path of the DNS server. hickory-server's `ServerFuture` spawns a task and goes
//! through a channel per UDP request; for a cache-less authoritative server that overhead
//! dominates, so UDP is served by one receive loop per socket that answers local names inline
//! (same resolver as the hickory `RequestHandler`, which still serves TCP). Foreign names
//! (forwarding) get their own task.

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::dns::{Answer, DnsHandler, truncate};

/// Largest UDP payload we accept or send (EDNS clients may ask for more; we cap).
const MAX_UDP: usize = 4096;

pub async fn serve(
    sock: Arc<UdpSocket>,
    handler: Arc<DnsHandler>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let (n, src) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "dns udp receive failed");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Some(reply) = reply(&handler, &buf[..n], &sock, src) else {
            continue;
        };
        let _ = sock.send_to(&reply, src).await;
    }
}

/// The reply to one datagram, or `None` when there is nothing to send now (not a query, or handed
/// to a forwarding task).
fn reply(
    handler: &Arc<DnsHandler>,
    datagram: &[u8],
    sock: &Arc<UdpSocket>,
    src: SocketAddr,
) -> Option<Vec<u8>> {
    let req = match Message::from_vec(datagram) {
        Ok(m) => m,
        Err(_) => return formerr(datagram),
    };
    if req.message_type() != MessageType::Query {
        return None;
    }
    let [query] = req.queries() else {
        return error(&req, ResponseCode::FormErr);
    };
    if req.op_code() != OpCode::Query {
        return error(&req, ResponseCode::NotImp);
    }
    match handler.local(query) {
        Some(answer) => {
            handler.count(query.query_type(), &answer);
            encode(&req, answer, false)
        }
        None => {
            let (handler, sock, req) = (handler.clone(), sock.clone(), req.clone());
            tokio::spawn(async move {
                let Some(query) = req.queries().first() else {
                    return;
                };
                let (answer, ra) = handler.foreign(query, req.recursion_desired()).await;
                handler.count(query.query_type(), &answer);
                if let Some(bytes) = encode(&req, answer, ra) {
                    let _ = sock.send_to(&bytes, src).await;
                }
            });
            None
        }
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

fn encode(req: &Message, mut answer: Answer, ra: bool) -> Option<Vec<u8>> {
    let limit = req
        .extensions()
        .as_ref()
        .map(|e| usize::from(e.max_payload().max(512)).min(MAX_UDP))
        .unwrap_or(512);
    let truncated = req
        .queries()
        .first()
        .is_some_and(|q| truncate(q, &mut answer, limit));
    let mut m = response_to(req);
    m.set_authoritative(answer.authoritative)
        .set_recursion_available(ra)
        .set_truncated(truncated)
        .set_response_code(answer.rcode.unwrap_or(ResponseCode::NoError));
    m.add_answers(answer.answers);
    m.add_name_servers(answer.authority);
    m.add_additionals(answer.additionals);
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
