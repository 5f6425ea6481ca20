//! Zero-copy forwarding between two non-blocking sockets through kernel pipes.
//!
//! `IORING_OP_SPLICE` is always punted to an io-wq kernel thread (one per idle direction), so
//! the ring is used only to *wait*: a `POLL_ADD` for readiness, then plain `splice(2)` with
//! `SPLICE_F_NONBLOCK` on `O_NONBLOCK` sockets (HAProxy's scheme). A direction takes a pipe
//! from the worker's pool only while it has bytes in flight and returns it empty, so idle
//! connections hold no pipe: pipes count against a per-user budget (64 MiB unprivileged).

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use monoio::net::TcpStream;

/// Pipe size asked for with `F_SETPIPE_SZ`, in bytes. Measured on 2 cores, one iperf3 stream
/// relay → agent → origin: 1 MiB pipes gave 14.2–15.2 Gbit/s against 11.1 with 256 KiB
/// (`scripts/loadtest/run --paths rt-uring-plain`). Only directions with bytes in flight hold
/// a pipe, so the unprivileged 64 MiB pipe budget covers 64 concurrent bulk directions.
pub const PIPE_SIZE: usize = 1024 * 1024;
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
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two descriptors we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned only here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A pipe holds a fixed number of chunks, not bytes; resizing raises the slot count.
        // Over the per-user budget the kernel refuses (EPERM) and the default size stays.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        // SAFETY: as above.
        let cap = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) };
        Ok(Pipe {
            r,
            w,
            cap: if cap > 0 { cap as usize } else { 65536 },
        })
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

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between descriptors that stay open for the call; no user memory.
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

/// Puts a socket in non-blocking mode (accepted and connected sockets from the ring are not).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    let mut on: libc::c_int = 1;
    // SAFETY: FIONBIO on a descriptor the caller owns, with a live int (one syscall, where
    // F_GETFL + F_SETFL take two).
    if unsafe { libc::ioctl(fd, libc::FIONBIO, &mut on) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `shutdown(2)` on a socket the caller owns; errors (already closed) are ignored.
pub fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: shutdown on an open socket; errors (already closed) are irrelevant here.
    unsafe { libc::shutdown(fd, how) };
}

/// Writes all of `buf` to a non-blocking socket, waiting on the ring when it is full.
pub async fn write_all(s: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match send_now(s.as_raw_fd(), buf)? {
            0 => s.writable(false).await?,
            n => buf = &buf[n..],
        }
    }
    Ok(())
}

/// One `recv` on a non-blocking socket: `None` if it has nothing now, `Some(0)` at EOF.
pub(super) fn recv_now(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: recv into a live, writable buffer on an open socket.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(err)
    }
}

/// One `send` on a non-blocking socket: how much of `data` it took now (0 if it is full).
pub(super) fn send_now(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: send from a live buffer on an open socket.
    let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        Ok(0)
    } else {
        Err(err)
    }
}

/// Reads what is available (at least one byte, or 0 at EOF) from a non-blocking socket.
pub async fn read_some(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        if let Some(n) = recv_now(s.as_raw_fd(), buf)? {
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

/// Splices `src → dst` through a pooled pipe until `src`'s EOF; returns the bytes moved. The
/// caller decides what EOF means for `dst` (FIN, or nothing). On error the pipe may still
/// hold bytes and is dropped, not pooled.
pub async fn splice_to_eof(src: &TcpStream, dst: &TcpStream, pipes: &PipePool) -> io::Result<u64> {
    let (sfd, dfd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut total = 0u64;
    loop {
        let pipe = pipes.get()?;
        let n = match splice(sfd, pipe.w.as_raw_fd(), pipe.cap) {
            Ok(0) => {
                pipes.put(pipe);
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // EAGAIN here means the socket is empty: the pipe was empty when taken.
                pipes.put(pipe);
                src.readable(false).await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            match splice(pipe.r.as_raw_fd(), dfd, left) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable(false).await?,
                Err(e) => return Err(e), // the pipe still holds bytes: it is dropped
            }
        }
        pipes.put(pipe);
        total += n as u64;
    }
}
