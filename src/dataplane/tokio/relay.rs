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
use crate::dataplane::gate::{count_cut, Admission, End, Gate};
use crate::dataplane::idle::{self, idle_closed};
use crate::dataplane::pool::{Pool, Visitor};
use crate::dataplane::retry::hand_on;
use crate::dataplane::sock;
use crate::dataplane::tally::Tally;
use crate::dataplane::wait::{agent_ready, agent_started, race, NoAnswer};
use crate::net::AcceptErrors;
use crate::protocol::chunk;
use crate::protocol::http::requests::Requests;
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
/// connection's ticket was settled (see [`Pool::offer`]); `answers`: its agent answers
/// `Start` with `STARTED` (protocol 4), so a silent connection hands its visitor on. The
/// tokio driver of [`RelayDataConn`].
pub async fn park_and_forward(
    mut tunnel: Conn,
    service: &str,
    pool: &Pool,
    generation: u64,
    answers: bool,
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
        // Only a connection parked a while may have died quietly meanwhile.
        let wait = answers && visitor.ask_first;
        // Boxed, with the visitor moved in: what only starting needs is not kept in the task
        // (every parked connection is one) for as long as the visitor is forwarded.
        let begun = begin(
            &mut conn,
            &mut tunnel,
            visitor,
            wait,
            (pool, service, metrics),
        );
        let Some(Begun {
            stream,
            admission,
            mut requests,
            answer,
            start,
            sent,
        }) = Box::pin(begun).await
        else {
            return; // handed on to another connection, or the visitor failed: closed
        };
        let Ok(mut stream) = TcpStream::from_std(stream) else {
            return;
        };
        let raw = stream.as_raw_fd();
        // SAFETY: `stream` stays open (it is only lent to the forwarder) for as long as the
        // select below lives, and the watcher borrowing the fd lives no longer than that.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        // Until its stream ends whole: a relay that dies meanwhile resets the visitor.
        sock::arm_reset(fd);
        let tally = Tally::of(&admission);
        tally.up.add(sent);
        let answer = answer.as_ref().map_or(&[][..], |h| &h[..]);
        let outcome = tokio::select! {
            o = chunked::forward(&mut stream, &mut tunnel, &start, answer, requests.as_deref_mut(), tally) => o,
            _ = idle::tokio_idle(fd, idle) => {
                idle_closed(service, addr, fd, &admission);
                return;
            }
        };
        match outcome {
            Ok(o) => {
                let (up, down) = (o.up, o.down);
                tracing::debug!(service, visitor = %addr, up, down, reusable = o.reusable, "visitor done");
                sock::disarm_reset(fd);
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
                            sock::disarm_reset(socket);
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

/// A visitor whose data connection answered `Start` (or whose agent does not answer it),
/// ready to forward.
struct Begun {
    stream: std::net::TcpStream,
    admission: Option<Admission>,
    requests: Option<Box<Requests>>,
    /// A header the forwarder decodes first (not `STARTED`).
    answer: Option<[u8; chunk::HEADER_LEN]>,
    /// What the forwarder still has to send first (`Start`, for an agent that does not
    /// answer it).
    start: Vec<u8>,
    /// Visitor bytes that went with `Start` (for HTTP, the first request head too).
    sent: usize,
}

/// Sends `Start` for `visitor` and, when told to `wait`, waits for the agent's `STARTED`
/// (otherwise the forwarder's decoder skips it). `None`: the visitor failed, or the
/// connection gave no answer and the visitor was handed to another (`pool`, with `service`
/// and `metrics` for its counts); this one is closed.
async fn begin(
    conn: &mut RelayDataConn,
    tunnel: &mut Conn,
    mut visitor: Visitor,
    wait: bool,
    (pool, service, metrics): (&Pool, &str, &Metrics),
) -> Option<Begun> {
    // What the visitor sent already travels with `Start` (and a visitor handed on sends it
    // again); the buffer is on the stack of this call only.
    if visitor.read_early(&mut [0u8; EARLY_READ]).is_err() {
        return None; // the visitor reset its connection or sent a request head too large
    }
    let start = conn.on_visitor(visitor.addr, &visitor.prefix, &visitor.early);
    let (answer, start) = match wait {
        true => match send_start(tunnel, &start).await {
            Ok(answer) => (answer, Vec::new()),
            Err(why) => {
                let deadline = tokio::time::sleep(chunk::START_WAIT);
                hand_on(pool, visitor, &why, service, metrics, deadline).await;
                return None;
            }
        },
        false => (None, start),
    };
    let sent = visitor.sent_with_start();
    Some(Begun {
        stream: visitor.stream,
        admission: visitor.admission,
        requests: visitor.requests,
        answer,
        start,
        sent,
    })
}

/// Most visitor bytes read before `Start` is sent.
const EARLY_READ: usize = 16 * 1024;

/// Sends `start` and waits for the agent's `STARTED` (see [`agent_started`]).
async fn send_start(tunnel: &mut Conn, start: &[u8]) -> Result<Option<[u8; 4]>, NoAnswer> {
    let deadline = tokio::time::sleep(chunk::START_WAIT);
    let sent = async {
        tunnel.write_all(start).await?;
        tunnel.flush().await
    };
    // A write waits only when the socket's buffer is full, which a parked connection's is
    // not; the deadline covers it anyway.
    let mut deadline = std::pin::pin!(deadline);
    match race(sent, deadline.as_mut()).await {
        None => return Err(NoAnswer::Silent),
        Some(Err(e)) => return Err(NoAnswer::Lost(e)),
        Some(Ok(())) => {}
    }
    agent_started(tunnel, deadline).await
}
