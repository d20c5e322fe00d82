//! Raw TCP relaying for bytes that need no change: `splice(2)` zero-copy on Linux plaintext hops,
//! a buffered copy otherwise (TLS streams, or when splice is unavailable).

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::buffered::Held;

/// Buffer per direction for the copying fallback (reused for the connection's lifetime).
pub const COPY_BUF_SIZE: usize = 64 * 1024;

/// Relays two plaintext sockets until both sides close. Returns (a→b, b→a) bytes.
pub async fn relay_tcp(mut a: TcpStream, mut b: TcpStream) -> io::Result<(u64, u64)> {
    match crate::splice::relay(&a, &b).await {
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {
            let _bufs = Held::new(2 * COPY_BUF_SIZE);
            tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUF_SIZE, COPY_BUF_SIZE)
                .await
        }
        r => r,
    }
}

/// Relays any two streams (e.g. TLS) with reused buffers.
pub async fn relay_copy<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let _bufs = Held::new(2 * COPY_BUF_SIZE);
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUF_SIZE, COPY_BUF_SIZE).await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A relay in front of an echo server moves 8 MiB both ways intact, then closes cleanly.
    #[tokio::test]
    async fn splice_relays_large_streams() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let relay = tokio::spawn(async move {
            let (a, _) = front.accept().await.unwrap();
            let b = TcpStream::connect(echo_addr).await.unwrap();
            relay_tcp(a, b).await.unwrap()
        });
        let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let c = TcpStream::connect(front_addr).await.unwrap();
        let (mut r, mut w) = c.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data);
        let (up, down) = relay.await.unwrap();
        assert_eq!((up, down), (data.len() as u64, data.len() as u64));
    }
}
