//! Zero-copy TCP relay with `splice(2)` through a pipe: bytes move socket → pipe → socket inside the
//! kernel, never copied to user space. The one module that needs `unsafe` (raw fds and libc calls).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::buffered::Held;

/// Bytes moved per splice call; the pipe is grown to this size when the kernel allows.
const PIPE_SIZE: usize = 1 << 20;

/// A non-blocking pipe; both ends close on drop.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid, writable array of two c_ints as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Best effort: a bigger pipe means fewer syscalls; failure keeps the 64 KiB default.
        // SAFETY: F_SETPIPE_SZ on an open pipe fd with an int argument.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        Ok(Pipe { read, write })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call (borrowed from live owners); null
    // offsets are required for pipes and sockets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves bytes from `from` to `to` until EOF, then shuts `to`'s write side. Returns bytes moved.
/// Bytes in the pipe (read, not yet written: a slow reader on `to`) count as buffered.
async fn one_way(from: &TcpStream, to: &TcpStream, pipe: Pipe) -> io::Result<u64> {
    let mut total = 0u64;
    let mut in_pipe = Held::new(0);
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_SIZE)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e)
                    if total == 0
                        && matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) =>
                {
                    return Err(io::Error::new(io::ErrorKind::Unsupported, e));
                }
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return Ok(total);
        }
        in_pipe.grow(n);
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(m) => {
                    left -= m;
                    in_pipe.shrink(m);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// Relays both directions with splice. `Err(Unsupported)` (splice refused on the first read, before
/// any byte moved) means the caller should fall back to a buffered copy.
pub async fn relay(a: &TcpStream, b: &TcpStream) -> io::Result<(u64, u64)> {
    // Both pipes first, so a failure (EMFILE) happens before any byte moved and can fall back.
    let unsupported = |e| io::Error::new(io::ErrorKind::Unsupported, e);
    let (p1, p2) = (
        Pipe::new().map_err(unsupported)?,
        Pipe::new().map_err(unsupported)?,
    );
    tokio::try_join!(one_way(a, b, p1), one_way(b, a, p2))
}
