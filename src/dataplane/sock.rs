//! Non-blocking socket calls on borrowed descriptors, for both backends: one `recv` or `send`
//! that never waits, `FIONBIO`, `shutdown`, reset on close, liveness. Safe wrappers over rustix; the caller keeps the
//! socket open for the call by lending it (`BorrowedFd`).

use std::io;
use std::os::fd::BorrowedFd;

use crate::tls::ktls::{self, Control};
use rustix::net::{RecvFlags, SendFlags, Shutdown};

/// Puts a socket in non-blocking mode (accepted and connected sockets from the ring are not).
/// One `ioctl(FIONBIO)`, where `F_GETFL` + `F_SETFL` take two system calls.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::io::ioctl_fionbio(fd, true)?)
}

/// Which side of a socket [`shutdown`] closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// Our writing side: the peer reads EOF (a FIN).
    Write,
    /// Our reading side: a reader waiting on it wakes to an end of stream; nothing is sent.
    Read,
    /// Both sides.
    Both,
}

/// `shutdown(2)`; errors (the peer already gone, the socket already shut) are ignored: the
/// caller is ending the connection either way.
pub fn shutdown(fd: BorrowedFd<'_>, half: Half) {
    let how = match half {
        Half::Write => Shutdown::Write,
        Half::Read => Shutdown::Read,
        Half::Both => Shutdown::Both,
    };
    let _ = rustix::net::shutdown(fd, how);
}

/// How long a data connection may stay silent, or leave data unacknowledged, before the
/// kernel declares it dead. Twice the control connection's default heartbeat timeout: a
/// stream in flight across a lossy link is given longer than the session, which costs only a
/// reconnect when it drops (streams outlive their control connection).
pub const DEAD_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// Liveness for a data connection, which may idle in a pool for hours: TCP keepalive probes
/// after 10 s of quiet, every 5 s, and `TCP_USER_TIMEOUT` at [`DEAD_AFTER`], so a connection
/// across a cut link (no RST ever arrives) fails — and leaves its pool, or fails its visitor —
/// within [`DEAD_AFTER`] instead of after minutes of retransmission backoff.
pub fn keep_alive(fd: BorrowedFd<'_>) -> io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_socket_keepalive(fd, true)?;
    sockopt::set_tcp_keepidle(fd, std::time::Duration::from_secs(10))?;
    sockopt::set_tcp_keepintvl(fd, std::time::Duration::from_secs(5))?;
    sockopt::set_tcp_keepcnt(fd, 4)?;
    sockopt::set_tcp_user_timeout(fd, DEAD_AFTER.as_millis() as u32)?;
    Ok(())
}

/// Ends the forwarding of a peer whose tunnel failed: a reader waiting on it wakes (to an end
/// of stream, `SHUT_RD` sends nothing) and closing it sends an RST, so the peer sees an error
/// and never takes a truncated stream for a whole one.
pub fn cut(fd: BorrowedFd<'_>) {
    reset_on_close(fd);
    shutdown(fd, Half::Read);
}

pub use crate::net::reset_on_close;

/// Arms a peer (a visitor, or the agent's connection to its local service) for the time its
/// stream is forwarded: should this process end first — killed, crashed, or its drain timed
/// out — the kernel closes the socket with an RST instead of a FIN, so the peer sees an error
/// and never takes the cut stream for a whole one. [`disarm_reset`] it once the stream ended
/// whole, before closing it, or the close would reset it too.
pub fn arm_reset(fd: BorrowedFd<'_>) {
    reset_on_close(fd);
}

/// Undoes [`arm_reset`]: closing the socket sends a FIN again. Errors are ignored, as with
/// `shutdown`.
pub fn disarm_reset(fd: BorrowedFd<'_>) {
    let _ = rustix::net::sockopt::set_socket_linger(fd, None);
}

/// One `recv` that does not wait (`MSG_DONTWAIT`, whatever the socket's mode): `None` if it
/// has nothing now, `Some(0)` at EOF.
/// On a kTLS socket a `close_notify` reads as EOF and a session ticket is skipped
/// (`tls::ktls::after_read_error`).
pub fn recv_now(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match rustix::net::recv(fd, &mut *buf, RecvFlags::DONTWAIT) {
            Ok((n, _)) => return Ok(Some(n)),
            Err(rustix::io::Errno::AGAIN) => return Ok(None),
            Err(e) if e == rustix::io::Errno::IO => match ktls::after_read_error(fd, e.into())? {
                Control::Closed => return Ok(Some(0)),
                Control::Skipped => {} // read again
            },
            Err(e) => return Err(e.into()),
        }
    }
}

/// One `send` on a non-blocking socket: how much of `data` it took now (0 if it is full).
/// `MSG_NOSIGNAL`: a vanished peer is an `EPIPE` error, not a signal that kills the process.
pub fn send_now(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    match rustix::net::send(fd, data, SendFlags::NOSIGNAL) {
        Ok(n) => Ok(n),
        Err(rustix::io::Errno::AGAIN) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// A connected Unix stream pair for a visitor that does not arrive on a TCP socket of its own
/// (a terminated HTTPS visitor, a visitor handed over by another relay of a fleet): ours
/// (for tokio), and theirs for the data plane. The data plane takes visitors as
/// `std::net::TcpStream`; everything it does to one (non-blocking I/O, splice, shutdown,
/// `SO_LINGER`) works the same on a Unix stream socket.
pub fn visitor_pair() -> io::Result<(std::os::unix::net::UnixStream, std::net::TcpStream)> {
    use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
    let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
    let (a, b) = socketpair(AddressFamily::UNIX, SocketType::STREAM, flags, None)?;
    Ok((a.into(), b.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn recv_and_send_never_wait() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        set_nonblocking(b.as_fd()).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            recv_now(b.as_fd(), &mut buf).unwrap(),
            None,
            "empty: no wait"
        );
        a.write_all(b"hi").unwrap();
        // Loopback delivers at once, but give the kernel a bounded number of chances.
        let got = (0..1000).find_map(|_| recv_now(b.as_fd(), &mut buf).unwrap());
        assert_eq!(got, Some(2));
        assert_eq!(&buf[..2], b"hi");
        // Fill b's send path until the kernel refuses: send_now says 0 rather than waiting.
        let chunk = vec![7u8; 1 << 16];
        let mut full = false;
        for _ in 0..10_000 {
            if send_now(b.as_fd(), &chunk).unwrap() == 0 {
                full = true;
                break;
            }
        }
        assert!(full, "a socket nobody reads fills up");
        shutdown(a.as_fd(), Half::Write);
        let mut eof = None;
        for _ in 0..1000 {
            if let Some(n) = recv_now(b.as_fd(), &mut buf).unwrap() {
                eof = Some(n);
                break;
            }
        }
        assert_eq!(eof, Some(0), "a FIN reads as EOF");
    }

    #[test]
    fn an_armed_socket_resets_when_dropped_and_a_disarmed_one_ends_cleanly() {
        use std::io::{ErrorKind, Read};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        for armed_at_close in [true, false] {
            let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (b, _) = l.accept().unwrap();
            arm_reset(b.as_fd());
            if !armed_at_close {
                disarm_reset(b.as_fd());
            }
            drop(b);
            let mut buf = [0u8; 8];
            let end = a.read(&mut buf);
            match (armed_at_close, end) {
                (true, Err(e)) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
                (false, Ok(0)) => {}
                (armed, other) => panic!("armed={armed}: {other:?}"),
            }
        }
    }

    #[test]
    fn data_connections_get_liveness() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        keep_alive(a.as_fd()).unwrap();
        use rustix::net::sockopt;
        assert!(sockopt::socket_keepalive(a.as_fd()).unwrap());
        assert_eq!(
            sockopt::tcp_user_timeout(a.as_fd()).unwrap(),
            DEAD_AFTER.as_millis() as u32
        );
        let probes = sockopt::tcp_keepidle(a.as_fd()).unwrap()
            + sockopt::tcp_keepintvl(a.as_fd()).unwrap() * sockopt::tcp_keepcnt(a.as_fd()).unwrap();
        assert!(probes <= DEAD_AFTER, "keepalive gives up by {probes:?}");
    }
}
