//! Public per-service listeners: accept visitors and hand each to the service's pool, each in
//! its own task so a slow pairing never stalls the accept loop.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

use super::gate::{self, Gate};
use super::pool::{Pool, Visitor};

/// How long a visitor waits for a tunnel connection before being closed: long enough to ride
/// out an agent reconnecting, short enough that a client is not left hanging.
pub const VISITOR_WAIT: Duration = Duration::from_secs(10);

/// Pause after a failed accept (EMFILE and friends), so an accept loop backs off instead of
/// spinning on an error that persists for a while.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What every tokio accept loop does when `accept` fails: log it, naming the listener
/// (`what`), and back off for [`ACCEPT_BACKOFF`].
pub async fn accept_failed(what: &str, e: &io::Error) {
    tracing::warn!(listener = what, error = %e, "accept failed");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
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

/// Admits a visitor accepted on a service's own port: limits first, then the PROXY header
/// the service wants. `None`: refused (and counted by the gate); dropping the stream closes it.
pub fn admit(gate: &Arc<Gate>, stream: std::net::TcpStream, addr: SocketAddr) -> Option<Visitor> {
    let admission = gate.admit(addr.ip()).ok()?;
    let prefix = if gate.wants_proxy_header() {
        gate.proxy_header(addr, gate::local_addr_of(&stream))
    } else {
        Vec::new()
    };
    Some(Visitor {
        stream,
        addr,
        prefix,
        admission: Some(admission),
    })
}

/// Tokio backend: accepts visitors on `listener` for the service behind `gate`; abort the
/// handle to close it.
pub fn spawn(listener: TcpListener, gate: Arc<Gate>, pool: Arc<Pool>) -> JoinHandle<()> {
    let metrics = gate.metrics().clone();
    let service = gate.service().to_string();
    tokio::spawn(async move {
        loop {
            let (stream, addr) = match listener.accept().await {
                Ok(v) => v,
                Err(e) => {
                    accept_failed(&service, &e).await;
                    continue;
                }
            };
            metrics.visitors_accepted.inc();
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            let Some(visitor) = admit(&gate, stream, addr) else {
                continue;
            };
            let pool = pool.clone();
            let metrics = metrics.clone();
            let service = service.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::sleep(VISITOR_WAIT);
                if let Err((e, _)) = pool.take(visitor, deadline, VISITOR_WAIT).await {
                    metrics.visitors_unserved.inc();
                    tracing::warn!(service, visitor = %addr, "visitor closed: {e}");
                }
            });
        }
    })
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
