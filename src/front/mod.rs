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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::control::registry::Service;
use crate::control::Shared;
use crate::dataplane::pool::{Pool, TakeError, Visitor};
use crate::dataplane::DataPlane;

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
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                shared.metrics.visitors_accepted.inc();
                tokio::spawn(serve(shared.clone(), stream, addr));
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
