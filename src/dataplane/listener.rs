//! Public per-service listeners: accept visitors and hand each to the service's pool, each in
//! its own task so a slow pairing never stalls the accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::gate::{self, Gate};
use super::pool::{Pool, Visitor};
use crate::net::accept_failed;

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
/// A visitor waits up to `wait` for a tunnel connection (the relay's `agent_wait_secs`).
pub fn spawn(
    listener: TcpListener,
    gate: Arc<Gate>,
    pool: Arc<Pool>,
    wait: Duration,
) -> JoinHandle<()> {
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
                let deadline = tokio::time::sleep(wait);
                if let Err((e, _)) = pool.take(visitor, deadline, wait).await {
                    metrics.visitors_unserved.inc();
                    tracing::warn!(service, visitor = %addr, "visitor closed: {e}");
                }
            });
        }
    })
}
