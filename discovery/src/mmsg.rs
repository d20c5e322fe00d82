//! Batched UDP I/O with `recvmmsg(2)` / `sendmmsg(2)`: under load one system call moves up to
//! [`BATCH`] datagrams each way, where `recv_from`/`send_to` pay one per datagram. The only module
//! of the DNS server that needs `unsafe` (raw msghdr arrays and libc calls); everything it hands
//! out is safe slices.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams per system call.
pub(crate) const BATCH: usize = 32;

/// Receive and send buffers for [`BATCH`] datagrams of up to `size` bytes each, with the peers'
/// raw addresses (a reply goes back to the address its query came from, never parsed on the hot
/// path).
pub(crate) struct Batch {
    size: usize,
    rx: Vec<u8>,
    rx_len: [usize; BATCH],
    addrs: Vec<libc::sockaddr_storage>,
    addr_len: [libc::socklen_t; BATCH],
    tx: Vec<u8>,
    /// Per outgoing reply: its length and the index of the query (hence address) it answers.
    out: Vec<(usize, usize)>,
    iov: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iov`/`hdrs` are scratch space, rebuilt from the owned buffers
// before every call and never dereferenced outside it; the batch is owned by one task.
unsafe impl Send for Batch {}

impl Batch {
    pub(crate) fn new(size: usize) -> Self {
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for which all-zero bytes
        // are a valid value.
        let (addr, iov, hdr) = unsafe {
            (
                zeroed::<libc::sockaddr_storage>(),
                zeroed::<libc::iovec>(),
                zeroed::<libc::mmsghdr>(),
            )
        };
        Batch {
            size,
            rx: vec![0; size * BATCH],
            rx_len: [0; BATCH],
            addrs: vec![addr; BATCH],
            addr_len: [0; BATCH],
            tx: vec![0; size * BATCH],
            out: Vec::with_capacity(BATCH),
            iov: vec![iov; BATCH],
            hdrs: vec![hdr; BATCH],
        }
    }

    /// Datagram `i` of the last receive.
    pub(crate) fn datagram(&self, i: usize) -> &[u8] {
        let start = i * self.size;
        &self.rx[start..start + self.rx_len[i].min(self.size)]
    }

    /// The sender of datagram `i` (IPv4 or IPv6; `None` for any other family).
    pub(crate) fn peer(&self, i: usize) -> Option<SocketAddr> {
        sockaddr_to_std(&self.addrs[i], self.addr_len[i])
    }

    /// Datagram `i` and a send slot to write its reply into (call [`Batch::commit`] with the
    /// length written to queue it).
    pub(crate) fn slot(&mut self, i: usize) -> (&[u8], &mut [u8]) {
        let start = i * self.size;
        let len = self.rx_len[i].min(self.size);
        (
            &self.rx[start..start + len],
            &mut self.tx[start..start + self.size],
        )
    }

    /// Queues the reply written in slot `i` (`len` bytes) for the next [`Batch::send`].
    pub(crate) fn commit(&mut self, i: usize, len: usize) {
        if len <= self.size {
            self.out.push((len, i));
        }
    }

    /// Waits for at least one datagram and receives up to [`BATCH`] in one call.
    pub(crate) async fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        self.out.clear();
        loop {
            sock.readable().await?;
            match sock.try_io(Interest::READABLE, || self.recv_now(sock)) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn recv_now(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iov[i] = libc::iovec {
                iov_base: self.rx[i * self.size..].as_mut_ptr().cast(),
                iov_len: self.size,
            };
            let namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            point(
                &mut self.hdrs[i],
                &mut self.addrs[i],
                namelen,
                &mut self.iov[i],
            );
        }
        // SAFETY: `hdrs` holds BATCH initialised headers whose name and iovec pointers point into
        // buffers owned by `self` (each iovec covers exactly one `size`-byte region of `rx`) and
        // outlive the call; the fd is open (borrowed from `sock`).
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            self.rx_len[i] = self.hdrs[i].msg_len as usize;
            self.addr_len[i] = self.hdrs[i].msg_hdr.msg_namelen;
        }
        Ok(n)
    }

    /// Sends every queued reply, as few calls as the socket allows. A reply the kernel refuses
    /// (e.g. an unreachable peer) is dropped, as `send_to` would have failed it alone.
    pub(crate) async fn send(&mut self, sock: &UdpSocket) {
        let mut done = 0;
        while done < self.out.len() {
            match sock.try_io(Interest::WRITABLE, || self.send_now(sock, done)) {
                Ok(n) => done += n.max(1).min(self.out.len() - done),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sock.writable().await.is_err() {
                        return;
                    }
                }
                // The first queued message failed: skip it, keep the rest.
                Err(_) => done += 1,
            }
        }
        self.out.clear();
    }

    fn send_now(&mut self, sock: &UdpSocket, from: usize) -> io::Result<usize> {
        let pending = &self.out[from..];
        for (k, &(len, i)) in pending.iter().enumerate() {
            self.iov[k] = libc::iovec {
                iov_base: self.tx[i * self.size..].as_mut_ptr().cast(),
                iov_len: len,
            };
            point(
                &mut self.hdrs[k],
                &mut self.addrs[i],
                self.addr_len[i],
                &mut self.iov[k],
            );
        }
        // SAFETY: the first `pending.len()` (≤ BATCH) headers were just initialised with pointers
        // into `tx` (each within one `size`-byte slot, `len ≤ size` checked by `commit`) and
        // `addrs`, all owned by `self` and alive for the call; the fd is open.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                pending.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Points one message header at one peer address and one iovec (no control data, flags cleared).
fn point(
    h: &mut libc::mmsghdr,
    addr: &mut libc::sockaddr_storage,
    namelen: libc::socklen_t,
    iov: &mut libc::iovec,
) {
    h.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
    h.msg_hdr.msg_namelen = namelen;
    h.msg_hdr.msg_iov = iov;
    h.msg_hdr.msg_iovlen = 1;
    h.msg_hdr.msg_control = std::ptr::null_mut();
    h.msg_hdr.msg_controllen = 0;
    h.msg_hdr.msg_flags = 0;
    h.msg_len = 0;
}

/// A raw socket address as the kernel filled it in, as a `SocketAddr`.
fn sockaddr_to_std(addr: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(addr.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large and
            // aligned enough for, and the kernel wrote at least that many bytes.
            let a =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_receives_several_datagrams_and_answers_each_sender() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("[::1]:0").await;
        a.send_to(b"one", addr).await.unwrap();
        a.send_to(b"two", addr).await.unwrap();
        let mut batch = Batch::new(512);
        let mut got = 0;
        while got < 2 {
            let n = batch.recv(&server).await.unwrap();
            for i in 0..n {
                assert_eq!(batch.peer(i), Some(a.local_addr().unwrap()));
                let (q, out) = batch.slot(i);
                let len = q.len();
                out[..len].copy_from_slice(q);
                out[..len].make_ascii_uppercase();
                batch.commit(i, len);
            }
            batch.send(&server).await;
            got += n;
        }
        let mut buf = [0u8; 16];
        let mut replies = Vec::new();
        for _ in 0..2 {
            let (n, from) = a.recv_from(&mut buf).await.unwrap();
            assert_eq!(from, addr);
            replies.push(buf[..n].to_vec());
        }
        replies.sort();
        assert_eq!(replies, [b"ONE".to_vec(), b"TWO".to_vec()]);
        // IPv6 peers parse too (when the machine has ::1).
        if let Ok(b) = b {
            let server6 = UdpSocket::bind("[::1]:0").await.unwrap();
            b.send_to(b"x", server6.local_addr().unwrap())
                .await
                .unwrap();
            let n = batch.recv(&server6).await.unwrap();
            assert_eq!(n, 1);
            assert_eq!(batch.peer(0), Some(b.local_addr().unwrap()));
        }
    }
}
