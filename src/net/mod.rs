//! Sockets every part of the relay binds the same way: listeners (`SO_REUSEADDR`, optional
//! `SO_REUSEPORT`, `TCP_NODELAY` inherited by accepted sockets), and what an accept loop does
//! when `accept` fails; how long dialing may take; caps on connections that have not
//! earned their place yet; the file-descriptor limit; throttling and summarising refusals;
//! handing listeners over in an upgrade, and telling systemd how the relay is doing.

pub mod accept;
pub mod cap;
pub mod fds;
pub mod handover;
pub mod refusals;
pub mod sdnotify;
pub mod throttle;

use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};

/// Deadline for dialing: a TCP connect plus, where there is one, the TLS handshake (agent to
/// relay, on control and data connections), or a TCP connect to the local service.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub use accept::{AcceptErrors, ACCEPT_BACKOFF};

/// Makes closing the socket send an RST instead of a FIN (`SO_LINGER` 0), so its peer sees an
/// error rather than a clean end of stream. Closing never waits with a zero linger. Errors
/// are ignored, as with `shutdown`.
pub fn reset_on_close(fd: BorrowedFd<'_>) {
    let _ = rustix::net::sockopt::set_socket_linger(fd, Some(std::time::Duration::ZERO));
}

/// A duplicate of a listening socket's descriptor that ends the listening when dropped,
/// whoever holds the original: from then on new connections are refused and those queued but
/// not accepted are reset, even while the accept loop that owns the listener has not ended
/// yet (an aborted tokio task, a worker's accept still in flight on its ring). Released (for
/// a handover, where another process keeps listening on the same socket), it ends nothing.
#[derive(Debug)]
pub struct StopListening(Option<std::os::fd::OwnedFd>);

impl StopListening {
    /// A stop for `listener`.
    pub fn new(listener: BorrowedFd<'_>) -> io::Result<Self> {
        Ok(Self(Some(listener.try_clone_to_owned()?)))
    }

    /// The listening socket, unless released.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.0.as_ref().map(std::os::fd::AsFd::as_fd)
    }

    /// Closes this duplicate without ending the listening: the socket lives on in whoever
    /// else holds it (a process it was handed to).
    pub fn release(&mut self) {
        self.0 = None;
    }
}

impl Drop for StopListening {
    fn drop(&mut self) {
        // On a listening socket SHUT_RDWR stops listening; errors (already shut) are moot.
        if let Some(fd) = &self.0 {
            let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
        }
    }
}

/// Listen backlog for public ports.
const BACKLOG: u32 = 1024;

/// Binds a listener with `SO_REUSEADDR` (so a restarted relay can rebind ports with
/// connections in TIME_WAIT), and `SO_REUSEPORT` when each worker gets its own socket.
/// Connections it accepts have `TCP_NODELAY` already: Linux copies it from the listener, which
/// saves a `setsockopt` per visitor.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every accept path relies on this instead of setting `TCP_NODELAY` per connection:
    /// small responses must not wait behind Nagle.
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay() {
        for reuse_port in [false, true] {
            let l = bind("127.0.0.1:0".parse().unwrap(), reuse_port).unwrap();
            let addr = l.local_addr().unwrap();
            let _client = std::net::TcpStream::connect(addr).unwrap();
            let (accepted, _) = l.accept().await.unwrap();
            assert!(accepted.nodelay().unwrap(), "reuse_port={reuse_port}");
        }
    }
}
