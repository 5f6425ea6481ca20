//! User-space TLS on a worker, for data connections that cannot be spliced (TLS without kTLS).
//!
//! rustls is driven over the same non-blocking socket the splice path uses: the ring is only
//! used to wait for readiness, and records are read and written with plain `recv`/`send`.
//! Plaintext moves through the worker's scratch buffer, so an idle connection holds no buffer
//! of its own beyond rustls' state.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use monoio::net::TcpStream;

use super::splice::{self, with_scratch};

/// `io::Read`/`io::Write` straight on a non-blocking socket, for `read_tls`/`write_tls`.
struct FdIo(RawFd);

impl Read for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv into a live, writable buffer on an open socket.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for FdIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: send from a live buffer on an open socket.
        let n = unsafe { libc::send(self.0, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    /// rustls hands over every queued record at once; one `sendmsg` sends them all (the
    /// default would send one record per syscall).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: a zeroed msghdr is valid; the iovecs point into live slices (IoSlice is
        // ABI-compatible with iovec) that outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len() as _;
        // SAFETY: as above, on an open socket.
        let n = unsafe { libc::sendmsg(self.0, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TLS connection (client or server side) on a non-blocking socket owned by one worker.
///
/// Both forwarding directions use it at once from one thread; the rustls state is borrowed only
/// between awaits, never across one.
pub struct TlsStream {
    sock: TcpStream,
    conn: RefCell<rustls::Connection>,
}

impl TlsStream {
    /// Wraps `sock` (already non-blocking) and a rustls connection that may still be
    /// handshaking or may hold records read by another runtime before the hand-over.
    pub fn new(sock: TcpStream, conn: impl Into<rustls::Connection>) -> TlsStream {
        TlsStream {
            sock,
            conn: RefCell::new(conn.into()),
        }
    }

    /// The socket, for readiness waits and the idle watcher.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Completes the handshake.
    pub async fn handshake(&self) -> io::Result<()> {
        loop {
            self.flush().await?;
            let (handshaking, wants_read) = {
                let c = self.conn.borrow();
                (c.is_handshaking(), c.wants_read())
            };
            if !handshaking {
                return Ok(());
            }
            if wants_read && !self.fill().await? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the TLS handshake",
                ));
            }
        }
    }

    /// Writes every queued TLS record to the socket.
    pub async fn flush(&self) -> io::Result<()> {
        let fd = self.sock.as_raw_fd();
        loop {
            let written = {
                let mut c = self.conn.borrow_mut();
                if !c.wants_write() {
                    return Ok(());
                }
                c.write_tls(&mut FdIo(fd))
            };
            match written {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sock.writable(false).await?
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes queued TLS records while the socket takes them, without waiting.
    fn try_flush(&self) -> io::Result<()> {
        let fd = self.sock.as_raw_fd();
        loop {
            let mut c = self.conn.borrow_mut();
            if !c.wants_write() {
                return Ok(());
            }
            match c.write_tls(&mut FdIo(fd)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads what the socket has into rustls and processes it. `false` at the peer's EOF.
    async fn fill(&self) -> io::Result<bool> {
        let fd = self.sock.as_raw_fd();
        loop {
            let read = self.conn.borrow_mut().read_tls(&mut FdIo(fd));
            match read {
                Ok(0) => return Ok(false),
                Ok(_) => {
                    let processed = self.conn.borrow_mut().process_new_packets().map(|_| ());
                    if let Err(e) = processed {
                        // rustls queued an alert for the peer; a failed send changes nothing.
                        let _ = self.flush().await;
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    // Whatever processing queued (an alert, a handshake reply) goes out if the
                    // socket takes it now. Waiting here would deadlock: when the other
                    // direction has filled the socket, this reader must keep reading so the
                    // peer can drain and make room. The writing direction flushes the rest.
                    self.try_flush()?;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sock.readable(false).await?
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads plaintext into `buf`: at least one byte, or 0 once the peer sent close_notify.
    /// A TCP close without close_notify is an `UnexpectedEof` error.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let got = self.conn.borrow_mut().reader().read(buf);
            match got {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // An EOF here makes the next read report it (clean or not).
                    self.fill().await?;
                }
                other => return other,
            }
        }
    }

    /// Encrypts and sends all of `data`.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.conn.borrow_mut().writer().write(data)?;
            data = &data[n..];
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends close_notify, then FIN: the peer sees a clean end of this direction.
    pub async fn close_write(&self) -> io::Result<()> {
        self.conn.borrow_mut().send_close_notify();
        self.flush().await?;
        splice::shutdown(self.sock.as_raw_fd(), libc::SHUT_WR);
        Ok(())
    }
}

/// What one synchronous step of the TLS → plain direction did.
enum Step {
    /// rustls has no plaintext: read more records.
    NeedRecords,
    /// The peer sent close_notify.
    Eof,
    /// Moved `n` bytes; `rest` did not fit into the plain socket yet.
    Moved(usize, Option<Vec<u8>>),
}

/// TLS → plain until close_notify, then FIN on `plain`.
async fn tls_to_plain(tls: &TlsStream, plain: &TcpStream) -> io::Result<u64> {
    let pfd = plain.as_raw_fd();
    let mut total = 0u64;
    loop {
        let step = with_scratch(|buf| -> io::Result<Step> {
            let n = match tls.conn.borrow_mut().reader().read(buf) {
                Ok(0) => return Ok(Step::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::NeedRecords),
                Err(e) => return Err(e),
            };
            let sent = match FdIo(pfd).write(&buf[..n]) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            Ok(Step::Moved(n, (sent < n).then(|| buf[sent..n].to_vec())))
        })?;
        match step {
            Step::NeedRecords => {
                tls.fill().await?;
            }
            Step::Eof => {
                splice::shutdown(pfd, libc::SHUT_WR);
                return Ok(total);
            }
            Step::Moved(n, rest) => {
                total += n as u64;
                if let Some(rest) = rest {
                    splice::write_all(plain, &rest).await?;
                }
            }
        }
    }
}

/// Plain → TLS until EOF, then close_notify and FIN on the TLS side.
async fn plain_to_tls(plain: &TcpStream, tls: &TlsStream) -> io::Result<u64> {
    let pfd = plain.as_raw_fd();
    let mut total = 0u64;
    loop {
        let read = with_scratch(|buf| -> io::Result<Option<(usize, Option<Vec<u8>>)>> {
            let n = match FdIo(pfd).read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            // rustls takes up to its buffer limit now; the rest waits on the heap.
            let taken = tls.conn.borrow_mut().writer().write(&buf[..n])?;
            Ok(Some((n, (taken < n).then(|| buf[taken..n].to_vec()))))
        })?;
        match read {
            None => plain.readable(false).await?,
            Some((0, _)) => {
                tls.close_write().await?;
                return Ok(total);
            }
            Some((n, rest)) => {
                total += n as u64;
                tls.flush().await?;
                if let Some(rest) = rest {
                    tls.write_all(&rest).await?;
                }
            }
        }
    }
}

/// Copies both ways between a plain socket and a TLS one until both directions end
/// (half-close propagated as close_notify + FIN one way, FIN the other) or either fails, in
/// which case both sockets are shut down. Returns bytes moved plain → TLS and TLS → plain.
pub async fn forward(plain: &TcpStream, tls: &TlsStream) -> io::Result<(u64, u64)> {
    let (up, down) = monoio::join!(
        async {
            let r = plain_to_tls(plain, tls).await;
            if r.is_err() {
                shut_both(plain, tls);
            }
            r
        },
        async {
            let r = tls_to_plain(tls, plain).await;
            if r.is_err() {
                shut_both(plain, tls);
            }
            r
        }
    );
    Ok((up?, down?))
}

fn shut_both(plain: &TcpStream, tls: &TlsStream) {
    splice::shutdown(plain.as_raw_fd(), libc::SHUT_RDWR);
    splice::shutdown(tls.sock.as_raw_fd(), libc::SHUT_RDWR);
}
