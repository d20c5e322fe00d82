//! `trellis-bench-floor`: the least work an HTTP/1.1 keep-alive proxy can do per request on
//! tokio, measured beside the real proxies to show the ceiling of the benchmark's topology.
//!
//! It is not a proxy anyone should run: every client connection gets its own upstream
//! connection for life (no pool, no balancing), heads go through byte for byte (no hop-by-hop
//! handling, no routing, no metrics, no timeouts), and only `Content-Length` framing is
//! understood (anything else closes the connection). What is left is the floor every real
//! proxy stands on: the same four system calls per request, an `httparse` pass over each head,
//! and a tokio task per connection. When this binary cannot go faster than the load generator
//! and origin on the other CPU let it, no proxy in the same seat can either.
//!
//! Usage: `trellis-bench-floor LISTEN_ADDR UPSTREAM_ADDR` (current-thread runtime).

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEADERS: usize = 64;
const MAX_MESSAGE: usize = 1 << 20;

/// Why a connection ends early (never a panic: both sides are the network).
#[derive(Debug)]
enum End {
    Io,
    Closed,
    Malformed,
    Unsupported,
}

impl From<std::io::Error> for End {
    fn from(_: std::io::Error) -> Self {
        End::Io
    }
}

/// A head parser: `Some((head length, body length))` once the head is whole.
type Parse = fn(&[u8]) -> Result<Option<(usize, usize)>, End>;

/// `Content-Length` of a head (0 when absent); `Transfer-Encoding` is unsupported here.
fn body_length(headers: &[httparse::Header<'_>]) -> Result<usize, End> {
    let mut len = 0;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(End::Unsupported);
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or(End::Malformed)?;
        }
    }
    Ok(len)
}

/// Reads from `io` into `buf` until it holds one whole message whose head `parse` measures;
/// returns the message's length.
async fn read_message(io: &mut TcpStream, buf: &mut Vec<u8>, parse: Parse) -> Result<usize, End> {
    loop {
        if let Some((head, body)) = parse(buf)? {
            let total = head.checked_add(body).ok_or(End::Malformed)?;
            if total > MAX_MESSAGE {
                return Err(End::Unsupported);
            }
            while buf.len() < total {
                fill(io, buf).await?;
            }
            return Ok(total);
        }
        if buf.len() >= MAX_MESSAGE {
            return Err(End::Malformed);
        }
        fill(io, buf).await?;
    }
}

async fn fill(io: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), End> {
    buf.reserve(4096);
    match io.read_buf(buf).await? {
        0 => Err(End::Closed),
        _ => Ok(()),
    }
}

fn parse_request(buf: &[u8]) -> Result<Option<(usize, usize)>, End> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(n)) => Ok(Some((n, body_length(req.headers)?))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(End::Malformed),
    }
}

fn parse_response(buf: &[u8]) -> Result<Option<(usize, usize)>, End> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(n)) => Ok(Some((n, body_length(resp.headers)?))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(End::Malformed),
    }
}

async fn relay(mut down: TcpStream, upstream: SocketAddr) -> Result<(), End> {
    down.set_nodelay(true)?;
    let mut up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let mut req = Vec::with_capacity(16 * 1024);
    let mut resp = Vec::with_capacity(16 * 1024);
    loop {
        let n = read_message(&mut down, &mut req, parse_request).await?;
        up.write_all(&req[..n]).await?;
        req.drain(..n);
        let n = read_message(&mut up, &mut resp, parse_response).await?;
        down.write_all(&resp[..n]).await?;
        resp.drain(..n);
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(upstream)) = (
        args.first().and_then(|a| a.parse::<SocketAddr>().ok()),
        args.get(1).and_then(|a| a.parse::<SocketAddr>().ok()),
    ) else {
        eprintln!("usage: trellis-bench-floor LISTEN_ADDR UPSTREAM_ADDR");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trellis-bench-floor: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served: std::io::Result<()> = runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        eprintln!("trellis-bench-floor: {listen} -> {upstream}");
        loop {
            match listener.accept().await {
                Ok((socket, _)) => {
                    tokio::spawn(async move {
                        let _ = relay(socket, upstream).await;
                    });
                }
                // Out of descriptors and the like: back off, the next accept may succeed.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-bench-floor: {listen}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_measured_or_refused() {
        let req = b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
        assert!(matches!(parse_request(req), Ok(Some((46, 3)))));
        assert!(matches!(parse_request(&req[..20]), Ok(None)));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(parse_response(chunked), Err(End::Unsupported)));
        let bad_len = b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n";
        assert!(matches!(parse_response(bad_len), Err(End::Malformed)));
        assert!(matches!(
            parse_request(b"\x01\x02 junk\r\n\r\n"),
            Err(End::Malformed)
        ));
    }
}
