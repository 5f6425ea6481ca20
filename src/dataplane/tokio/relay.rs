//! Relay-side tokio tasks: accept visitors on a service's own port, and park authenticated
//! data connections in the service's pool until a visitor is assigned, then forward.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::chunked;
use crate::admin::Metrics;
use crate::dataplane::forwarded::{origin_unreachable, ANSWER_WAIT};
use crate::dataplane::gate::{count_cut, End, Gate};
use crate::dataplane::idle::{self, idle_closed};
use crate::dataplane::pool::{Pool, Visitor};
use crate::dataplane::sock;
use crate::dataplane::tally::Tally;
use crate::dataplane::wait::agent_ready;
use crate::net::AcceptErrors;
use crate::protocol::chunk;
use crate::protocol::lifecycle::{RelayDataConn, RelayNext};
use crate::transport::Conn;

/// Accepts visitors on `listener` for the service behind `gate`; abort the
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
        let mut errors = AcceptErrors::new(&service);
        loop {
            let (stream, addr) = match listener.accept().await {
                Ok(v) => v,
                Err(e) => {
                    errors.back_off(&e).await;
                    continue;
                }
            };
            metrics.visitors_accepted.inc();
            let Some(stream) = errors.admit(stream, Instant::now()) else {
                continue;
            };
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            let Some(visitor) = Visitor::admit(&gate, stream, addr) else {
                continue;
            };
            let pool = pool.clone();
            let service = service.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::sleep(wait);
                if let Err((e, _)) = pool.take(visitor, deadline, wait).await {
                    gate.count_unserved();
                    tracing::warn!(service, visitor = %addr, "visitor closed: {e}");
                }
            });
        }
    })
}

/// Idles in the pool until a visitor is assigned, then forwards; parks again for the next
/// visitor while both directions keep ending cleanly. `generation`: the pool's when the
/// connection's ticket was settled (see [`Pool::offer`]). The tokio driver of
/// [`RelayDataConn`].
pub async fn park_and_forward(
    mut tunnel: Conn,
    service: &str,
    pool: &Pool,
    generation: u64,
    metrics: &Metrics,
) {
    let mut conn = RelayDataConn::new();
    let (slot, mut assigned) = oneshot::channel::<Visitor>();
    if !pool.offer(slot, generation) {
        return; // its agent left (or the pool is full) since the ticket was checked
    }
    loop {
        let mut probe = [0u8; 1];
        // Any byte or EOF from the agent while idle means the connection is gone or
        // misbehaving, and it leaves the pool.
        let visitor = tokio::select! {
            v = assigned => match v {
                Ok(v) => v,
                Err(_) => return, // pool dropped us: owner changed or service closed
            },
            _ = tunnel.read(&mut probe) => {
                conn.on_parked_input();
                return;
            }
        };
        let (addr, http) = (visitor.addr, visitor.http);
        let idle = visitor.idle_timeout();
        let admission = visitor.admission;
        let mut requests = visitor.requests;
        let Ok(mut stream) = TcpStream::from_std(visitor.stream) else {
            return;
        };
        let raw = stream.as_raw_fd();
        // SAFETY: `stream` stays open (it is only lent to the forwarder) for as long as the
        // select below lives, and the watcher borrowing the fd lives no longer than that.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        let start = conn.on_visitor(addr, &visitor.prefix, &[]);
        let tally = Tally::of(&admission);
        if http {
            // The first request head, as rewritten, travels in `start`.
            tally.up.add(visitor.prefix.len());
        }
        let outcome = tokio::select! {
            o = chunked::forward(&mut stream, &mut tunnel, &start, &[], requests.as_deref_mut(), tally) => o,
            _ = idle::tokio_idle(fd, idle) => {
                idle_closed(service, addr, fd, &admission);
                return;
            }
        };
        match outcome {
            Ok(o) => {
                let (up, down) = (o.up, o.down);
                tracing::debug!(service, visitor = %addr, up, down, reusable = o.reusable, "visitor done");
                drop((stream, admission));
                let next = conn.on_visitor_done(o.reusable, o.leftover, Instant::now());
                if next == RelayNext::Close {
                    return; // not reusable: no READY to wait for, no timer to arm
                }
                // Boxed: a timer is cache-line aligned, and inline it would pad every task.
                let deadline = tokio::time::sleep(chunk::READY_WAIT);
                if !Box::pin(agent_ready(&mut conn, next, &mut tunnel, deadline)).await {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(service, visitor = %addr, "visitor ended: {e}");
                let socket = std::os::fd::AsFd::as_fd(&stream);
                if e.origin_unreachable() {
                    match origin_unreachable(service, addr, http, &admission) {
                        Some(page) => {
                            let wrote = tokio::time::timeout(ANSWER_WAIT, stream.write_all(&page));
                            let _ = wrote.await;
                            sock::shutdown(std::os::fd::AsFd::as_fd(&stream), sock::Half::Write);
                        }
                        None => sock::cut(socket),
                    }
                } else if e.tunnel_lost() {
                    sock::cut(socket);
                    count_cut(metrics, &admission);
                } else if let Some(a) = &admission {
                    a.end_as(End::VisitorError);
                }
                return;
            }
        }
        let (slot, next) = oneshot::channel::<Visitor>();
        if !pool.offer(slot, generation) {
            return;
        }
        metrics.data_reused.inc();
        assigned = next;
    }
}
