//! Zero-copy forwarding between two non-blocking sockets through kernel pipes.
//!
//! `IORING_OP_SPLICE` is always punted to an io-wq kernel thread (one per idle direction), so
//! the ring is used only to *wait*: a `POLL_ADD` for readiness, then plain `splice(2)` with
//! `SPLICE_F_NONBLOCK` on `O_NONBLOCK` sockets (HAProxy's scheme). A direction takes a pipe
//! from the worker's pool only while it has bytes in flight and returns it empty, so idle
//! connections hold no pipe: pipes count against a per-user budget (64 MiB unprivileged).

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use monoio::net::TcpStream;
use rustix::pipe::{self, PipeFlags, SpliceFlags};

use super::sockio::fd;
use crate::dataplane::forwarded::{ForwardError, Forwarded, Side};
use crate::dataplane::tally::Count;
use crate::tls::ktls::{self, Control};

/// Pipe size asked for with `F_SETPIPE_SZ`, in bytes. Measured on 2 cores, one iperf3 stream
/// relay → agent → origin: 1 MiB pipes gave 14.2–15.2 Gbit/s against 11.1 with 256 KiB
/// (`scripts/loadtest/run --paths rt-uring-plain`). Only directions with bytes in flight hold
/// a pipe, so the unprivileged 64 MiB pipe budget covers 64 concurrent bulk directions.
pub const PIPE_SIZE: usize = 1024 * 1024;
/// A pipe's size when it could not be asked (Linux's default), in bytes.
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;
/// Empty pipes kept per worker for reuse (each counts 1 MiB against the pipe budget).
const MAX_FREE_PIPES: usize = 16;

/// A kernel pipe: read end, write end, capacity in bytes.
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) = pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // A pipe holds a fixed number of chunks, not bytes; resizing raises the slot count.
        // Over the per-user budget the kernel refuses (EPERM) and the default size stays.
        let _ = pipe::fcntl_setpipe_size(&w, PIPE_SIZE);
        let cap = pipe::fcntl_getpipe_size(&w).unwrap_or(DEFAULT_PIPE_SIZE);
        Ok(Pipe { r, w, cap })
    }
}

/// Empty pipes for reuse on one worker thread.
#[derive(Default)]
pub struct PipePool {
    free: RefCell<Vec<Pipe>>,
}

impl PipePool {
    fn get(&self) -> io::Result<Pipe> {
        match self.free.borrow_mut().pop() {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Only empty pipes may come back; a pipe with bytes left in it is dropped instead.
    fn put(&self, pipe: Pipe) {
        let mut free = self.free.borrow_mut();
        if free.len() < MAX_FREE_PIPES {
            free.push(pipe);
        }
    }
}

/// One non-blocking `splice(2)` of up to `len` bytes; `EAGAIN` is `WouldBlock`.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    Ok(pipe::splice(from, None, to, None, len, flags)?)
}

/// Splices `src → dst` through a pooled pipe until `src`'s EOF; returns the bytes moved. The
/// caller decides what EOF means for `dst` (FIN, or nothing). On error the pipe may still
/// hold bytes and is dropped, not pooled. `from` is the end `src` is: errors reading it (or
/// getting a pipe) are charged to it, errors writing `dst` to the other end. Each splice's
/// bytes are counted in `count` once they are written.
pub async fn splice_to_eof<const UP: bool>(
    src: &TcpStream,
    dst: &TcpStream,
    pipes: &PipePool,
    from: Side,
    count: Count<'_, UP>,
) -> Forwarded<u64> {
    let to = from.other();
    let at = |side: Side| move |e| ForwardError::new(side, e);
    let (sfd, dfd) = (fd(src), fd(dst));
    let mut total = 0u64;
    loop {
        let pipe = pipes.get().map_err(at(from))?;
        let n = match splice(sfd, pipe.w.as_fd(), pipe.cap) {
            Ok(0) => {
                pipes.put(pipe);
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // EAGAIN here means the socket is empty: the pipe was empty when taken.
                pipes.put(pipe);
                src.readable(false).await.map_err(at(from))?;
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // A kTLS socket whose next record is not data (`tls::ktls`).
                pipes.put(pipe);
                match ktls::after_read_error(sfd, e).map_err(at(from))? {
                    Control::Closed => return Ok(total),
                    Control::Skipped => continue,
                }
            }
            Err(e) => return Err(at(from)(e)),
        };
        let mut left = n;
        while left > 0 {
            match splice(pipe.r.as_fd(), dfd, left) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable(false).await.map_err(at(to))?
                }
                Err(e) => return Err(at(to)(e)), // the pipe still holds bytes: it is dropped
            }
        }
        pipes.put(pipe);
        count.add(n);
        total += n as u64;
    }
}
