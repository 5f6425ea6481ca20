//! The relay's shared public ports, where many services share one port and each visitor is
//! routed by what it says first:
//!
//! - [`http`]: the shared HTTP port, routed by `Host` and path prefix.
//! - [`tls`]: the shared TLS port, routed by SNI, passed through without decrypting.
//! - [`reply`]: the short HTTP error pages and clean closes a visitor gets when it cannot
//!   be routed.
//!
//! Reading the head runs on tokio under a deadline and a size limit; once a visitor is
//! routed it is handed, with the bytes already read, to the service's pools, so the rest of
//! the connection takes the same data-plane path (splice on the uring backend) as a visitor
//! of a `tcp` service.

pub mod http;
pub mod reply;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::control::registry::Service;
use crate::control::Shared;
use crate::dataplane::pool::{Pool, TakeError, Visitor};
use crate::dataplane::DataPlane;

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

/// Accepts visitors on a shared port forever, one task each, `serve` deciding their fate.
pub async fn accept_loop<F, Fut>(
    shared: Arc<Shared>,
    listener: TcpListener,
    what: &'static str,
    serve: F,
) where
    F: Fn(Arc<Shared>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let pending = Arc::new(Pending::default());
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                shared.metrics.visitors_accepted.inc();
                let Some(place) = pending.enter(addr.ip()) else {
                    shared.metrics.visitors_shed.inc();
                    tracing::debug!(port = what, visitor = %addr, "visitor closed: {MAX_PENDING_PER_IP} from this address are already being routed");
                    continue; // dropping the stream closes it
                };
                let fut = serve(shared.clone(), stream, addr);
                tokio::spawn(async move {
                    fut.await;
                    drop(place);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(port = what, error = %e, "accepting visitor failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
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

/// Reads from `stream` until `parse` gives an answer (`Ok(Some)`) or an error, the visitor
/// closes, or `timeout` passes. `parse` sees all bytes read so far and owns the size limit.
pub async fn read_head<T, E>(
    stream: &mut TcpStream,
    timeout: Duration,
    mut parse: impl FnMut(&[u8]) -> Result<Option<T>, E>,
) -> Result<Head<T>, E> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Ok(Head::Closed),
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            if let Some(t) = parse(&buf)? {
                return Ok(Head::Done(t, std::mem::take(&mut buf)));
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => Ok(Head::TimedOut),
    }
}

/// Hands a routed visitor to `svc`'s pools, waiting up to `wait` for a tunnel connection
/// (an agent reconnecting). On failure the visitor comes back with the reason.
pub async fn dispatch(
    dataplane: &DataPlane,
    svc: &Service,
    visitor: Visitor,
    wait: Duration,
) -> Result<(), (TakeError, Visitor)> {
    let first = match dataplane {
        DataPlane::Tokio => 0,
        DataPlane::Uring(w) => w.next_worker(),
    };
    let visitor = match Pool::try_take_any(&svc.pools, first, visitor) {
        Ok(()) => return Ok(()),
        Err(v) => v,
    };
    let pool = &svc.pools[first % svc.pools.len()];
    pool.take(visitor, tokio::time::sleep(wait), wait).await
}

/// The visitor's socket back on tokio, to answer it after a failed dispatch.
pub fn reclaim(visitor: Visitor) -> io::Result<TcpStream> {
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
