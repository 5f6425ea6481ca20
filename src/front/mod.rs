//! The relay's shared public ports, where many services share one port and each visitor is
//! routed by what it says first:
//!
//! - [`http`]: the shared HTTP port, routed by `Host` and path prefix.
//! - [`tls`]: the shared TLS port, routed by SNI, passed through without decrypting.
//! - [`reply`]: the short HTTP error pages and clean closes a visitor gets when it cannot
//!   be routed.
//! - [`worker`]: the same ports on the uring workers.
//!
//! Reading the head runs under a deadline and a size limit, and what to do with the visitor
//! ([`Decision`]) is decided the same way on either backend. On tokio one accept loop serves
//! a port; on uring every worker accepts on its own `SO_REUSEPORT` listener and hands routed
//! visitors to its own pool, exactly as for a `tcp` service's port (measured: the shared
//! HTTP port's `Connection: close` rate went from about 0.93× to 1.00× of a `tcp` port's).
//! Once routed, a visitor is handed with the bytes already read to the service's pools, so
//! the rest of the connection takes the same data-plane path as a `tcp` visitor.

pub mod http;
pub mod reply;
pub mod tls;
pub mod worker;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::control::registry::Service;
use crate::control::Shared;
use crate::dataplane::gate::{local_addr_of, Admission};
use crate::dataplane::pool::{Pool, TakeError, Visitor};
use crate::dataplane::wait::{race, ReadSome};
use crate::protocol::http::HeadScanner;
use crate::protocol::sni::{HelloScanner, Sni};
use reply::{answer_and_close, Page, CLOSE_GRACE};

/// Most visitors from one address that may be between accept and hand-off (sending their
/// head, or waiting for an offline agent) at once on one shared port. Each is bounded in time
/// and size already; this keeps one address from holding thousands of them (slowloris).
pub const MAX_PENDING_PER_IP: u32 = 64;

/// Visitors per address still being routed on one shared port.
#[derive(Default)]
pub struct Pending {
    by_ip: Mutex<HashMap<IpAddr, u32>>,
}

/// One visitor's place in [`Pending`]; dropping it frees the place.
pub struct PendingGuard {
    pending: Arc<Pending>,
    ip: IpAddr,
}

impl Pending {
    /// Takes a place for a visitor from `ip`, or `None` if that address has
    /// [`MAX_PENDING_PER_IP`] visitors being routed already.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<PendingGuard> {
        let mut m = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_PENDING_PER_IP {
            return None;
        }
        *n += 1;
        Some(PendingGuard {
            pending: self.clone(),
            ip,
        })
    }

    /// Addresses with visitors being routed right now.
    pub fn addresses(&self) -> usize {
        self.by_ip.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut m = self.pending.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Which shared port a visitor came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The shared HTTP port, routed by `Host` and path.
    Http,
    /// The shared TLS port, routed by SNI.
    Tls,
}

impl Port {
    /// The port's name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Port::Http => "http",
            Port::Tls => "tls",
        }
    }

    /// Reads a visitor's first bytes from `conn` (bounded by the front's size limit, and in
    /// time by `deadline`, which should fire after the front's head timeout), then decides
    /// what happens to the visitor. The same for every runtime.
    pub(crate) async fn read_and_decide(
        self,
        shared: &Shared,
        conn: &mut impl VisitorConn,
        addr: SocketAddr,
        local: impl FnOnce() -> SocketAddr,
        deadline: impl Future<Output = ()>,
    ) -> Decision {
        match self {
            Port::Http => {
                let mut scanner = HeadScanner::new(shared.cfg.front.max_head);
                let read = read_head(conn, deadline, |b| scanner.feed(b)).await;
                http::decide(shared, read, addr)
            }
            Port::Tls => {
                let mut scanner = HelloScanner::new();
                let parse = |b: &[u8]| match scanner.feed(b) {
                    Ok(Sni::NeedMore) => Ok(None),
                    Ok(found) => Ok(Some(found)),
                    Err(e) => Err(e),
                };
                let read = read_head(conn, deadline, parse).await;
                tls::decide(shared, read, addr, local)
            }
        }
    }
}

/// A visitor's socket on whichever runtime accepted it (tokio's, or a worker's).
pub(crate) trait VisitorConn: ReadSome {
    /// Writes all of `buf`.
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Sends FIN (errors ignored: the visitor may be gone).
    fn shutdown_write(&mut self);
}

impl VisitorConn for TcpStream {
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        AsyncWriteExt::write_all(self, buf).await
    }

    fn shutdown_write(&mut self) {
        crate::dataplane::uring::splice::shutdown(self.as_raw_fd(), libc::SHUT_WR);
    }
}

/// The local address of a socket the caller keeps open (for a PROXY header), asked only when
/// needed: it costs a `getsockname`.
fn local_addr_of_fd(fd: RawFd) -> SocketAddr {
    // SAFETY: borrows the open fd for one getsockname; ManuallyDrop never closes it.
    let stream = ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    local_addr_of(&stream)
}

/// What a shared port does with a visitor once its first bytes are read.
pub enum Decision {
    /// Hand it to a service.
    Dispatch(Routed),
    /// Answer these bytes (an error page, a TLS alert), then close.
    Answer(Vec<u8>),
    /// Close without a word.
    Close,
}

/// A visitor routed to a service, not yet handed to its pools.
pub struct Routed {
    /// The service.
    pub svc: Arc<Service>,
    /// Bytes to send down the tunnel before the visitor's own (what was read to route it,
    /// with added headers).
    pub prefix: Vec<u8>,
    /// The visitor's counted place in the service.
    pub admission: Admission,
    /// What the visitor hears if no tunnel connection takes it.
    pub unserved: Unserved,
}

/// How a routed visitor that no tunnel connection took is told.
pub enum Unserved {
    /// An HTTP error page naming the host.
    HttpPage {
        /// The host the visitor asked for.
        host: String,
    },
    /// A plain close (the TLS port: the visitor expects TLS, which only the origin speaks).
    Close,
}

impl Routed {
    /// The visitor, ready for the service's pools.
    pub fn visitor(
        self,
        stream: std::net::TcpStream,
        addr: SocketAddr,
    ) -> (Visitor, Unserved, Arc<Service>) {
        let visitor = Visitor {
            stream,
            addr,
            prefix: self.prefix,
            admission: Some(self.admission),
        };
        (visitor, self.unserved, self.svc)
    }
}

impl Unserved {
    /// Counts and logs a visitor no tunnel connection took; returns what it hears, if anything.
    pub fn answer(
        &self,
        shared: &Shared,
        svc: &Service,
        addr: SocketAddr,
        e: &TakeError,
    ) -> Option<Vec<u8>> {
        let metrics = &shared.metrics;
        metrics.visitors_unserved.inc();
        match self {
            Unserved::Close => {
                tracing::warn!(service = %svc.name, visitor = %addr, "TLS visitor closed: {e}");
                None
            }
            Unserved::HttpPage { host } => Some(match e {
                TakeError::Timeout(_) => {
                    metrics.http_agent_offline.inc();
                    tracing::warn!(service = %svc.name, visitor = %addr, "HTTP visitor answered 502: {e}");
                    Page::AgentOffline.response(&format!("the service for {host} is offline"))
                }
                TakeError::Full => {
                    tracing::warn!(service = %svc.name, visitor = %addr, "HTTP visitor answered 503: {e}");
                    Page::OverLimit.response("too many visitors are waiting for this service")
                }
            }),
        }
    }
}

/// Tokio: accepts visitors on a shared port forever, one task each.
pub async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, port: Port) {
    let pending = Arc::new(Pending::default());
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                shared.metrics.visitors_accepted.inc();
                let Some(place) = pending.enter(addr.ip()) else {
                    shared.metrics.visitors_shed.inc();
                    tracing::debug!(port = port.name(), visitor = %addr, "visitor closed: {MAX_PENDING_PER_IP} from this address are already being routed");
                    continue; // dropping the stream closes it
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    serve(&shared, port, stream, addr).await;
                    drop(place);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(port = port.name(), error = %e, "accepting visitor failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Tokio: routes one visitor of a shared port and hands it on (or answers it).
async fn serve(shared: &Shared, port: Port, mut stream: TcpStream, addr: SocketAddr) {
    let fd = stream.as_raw_fd();
    let local = || local_addr_of_fd(fd);
    let deadline = tokio::time::sleep(shared.cfg.front.head_timeout);
    let routed = match port
        .read_and_decide(shared, &mut stream, addr, local, deadline)
        .await
    {
        Decision::Dispatch(r) => r,
        Decision::Answer(bytes) => return answer(&mut stream, &bytes).await,
        Decision::Close => return,
    };
    let Ok(std_stream) = stream.into_std() else {
        return;
    };
    let (visitor, unserved, svc) = routed.visitor(std_stream, addr);
    let wait = shared.cfg.front.agent_wait;
    if let Err((e, visitor)) = dispatch(&svc, visitor, wait).await {
        if let Some(bytes) = unserved.answer(shared, &svc, addr, &e) {
            if let Ok(mut stream) = reclaim(visitor) {
                answer(&mut stream, &bytes).await;
            }
        }
    }
}

/// Tokio: answers a visitor and closes (see [`reply::answer_and_close`]).
async fn answer(stream: &mut TcpStream, bytes: &[u8]) {
    answer_and_close(stream, bytes, tokio::time::sleep(CLOSE_GRACE)).await;
}

/// What reading a visitor's first bytes ended with.
pub enum Head<T> {
    /// The parser is satisfied: its answer, and every byte read so far.
    Done(T, Vec<u8>),
    /// The visitor closed before saying enough.
    Closed,
    /// The deadline passed first.
    TimedOut,
}

/// Reads from `conn` until `parse` gives an answer (`Ok(Some)`) or an error, the visitor
/// closes, or `deadline` fires. `parse` sees all bytes read so far and owns the size limit.
pub(crate) async fn read_head<T, E>(
    conn: &mut impl VisitorConn,
    deadline: impl Future<Output = ()>,
    mut parse: impl FnMut(&[u8]) -> Result<Option<T>, E>,
) -> Result<Head<T>, E> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = match conn.read_some(&mut chunk).await {
                Ok(0) | Err(_) => return Ok(Head::Closed),
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            if let Some(t) = parse(&buf)? {
                return Ok(Head::Done(t, std::mem::take(&mut buf)));
            }
        }
    };
    race(read, deadline).await.unwrap_or(Ok(Head::TimedOut))
}

/// Tokio: hands a routed visitor to `svc`'s pool (the tokio data plane has one per service),
/// waiting up to `wait` for a tunnel connection (an agent reconnecting). On failure the
/// visitor comes back with the reason.
async fn dispatch(
    svc: &Service,
    visitor: Visitor,
    wait: Duration,
) -> Result<(), (TakeError, Visitor)> {
    let visitor = match Pool::try_take_any(&svc.pools, 0, visitor) {
        Ok(()) => return Ok(()),
        Err(v) => v,
    };
    svc.pools[0]
        .take(visitor, tokio::time::sleep(wait), wait)
        .await
}

/// The visitor's socket back on tokio, to answer it after a failed dispatch.
fn reclaim(visitor: Visitor) -> io::Result<TcpStream> {
    visitor.stream.set_nonblocking(true)?;
    TcpStream::from_std(visitor.stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_places_are_per_address_and_released() {
        let p = Arc::new(Pending::default());
        let a: IpAddr = [10, 0, 0, 1].into();
        let held: Vec<_> = (0..MAX_PENDING_PER_IP)
            .map(|_| p.enter(a).unwrap())
            .collect();
        assert!(p.enter(a).is_none());
        let other = p.enter([10, 0, 0, 2].into()).unwrap();
        drop(held);
        drop(other);
        assert_eq!(p.addresses(), 0, "no entry outlives its visitors");
        assert!(p.enter(a).is_some());
    }
}
