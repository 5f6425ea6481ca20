//! Socket I/O on a worker: non-blocking calls that wait on the ring (a `POLL_ADD`) only when
//! the socket has nothing to give or no room to take, and the worker's scratch buffer small
//! transfers are copied through.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use monoio::net::TcpStream;

use crate::dataplane::sock::{recv_now, send_now};

/// A worker socket's descriptor, lent for as long as the socket is (monoio 0.2's `TcpStream`
/// has `AsRawFd` but not `AsFd`; this is that missing impl, the one place that vouches for it).
pub fn fd(s: &TcpStream) -> BorrowedFd<'_> {
    // SAFETY: `s` owns the descriptor and keeps it open for the lifetime of the borrow.
    unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) }
}

/// Writes all of `buf` to a non-blocking socket, waiting on the ring when it is full.
pub async fn write_all(s: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match send_now(fd(s), buf)? {
            0 => s.writable(false).await?,
            n => buf = &buf[n..],
        }
    }
    Ok(())
}

/// Reads what is available (at least one byte, or 0 at EOF) from a non-blocking socket.
pub async fn read_some(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        if let Some(n) = recv_now(fd(s), buf)? {
            return Ok(n);
        }
        s.readable(false).await?;
    }
}

/// Bytes of the per-worker scratch buffer small transfers are copied through. A direction
/// starts by copying and switches to splice for good once one read fills this buffer: small
/// request/response traffic gains nothing from splice, bulk transfers do.
const SCRATCH_LEN: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// Runs `f` on the worker's scratch buffer. `f` must not await (it cannot: it is sync), so
/// tasks on one worker never see each other's bytes in it.
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|buf| f(&mut buf.borrow_mut()))
}
