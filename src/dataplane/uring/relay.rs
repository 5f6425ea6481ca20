//! Relay-side worker tasks: accept visitors on this worker's own listener, park authenticated
//! data connections in this worker's pool, and splice each pair.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use monoio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot::{self, error::TryRecvError};

use super::load::{self, Copying};
use super::pipe::PipePool;
use super::sockio::{self, fd, with_scratch};
use super::tls::TlsStream;
use super::tunnel::Tunnel;
use crate::admin::Metrics;
use crate::dataplane::forwarded::{origin_unreachable, ANSWER_WAIT};
use crate::dataplane::gate::{count_cut, Admission, End, Gate};
use crate::dataplane::idle::{self, idle_closed};
use crate::dataplane::pool::{Pool, Visitor};
use crate::dataplane::retry::hand_on;
use crate::dataplane::sock::{arm_reset, cut, disarm_reset, shutdown, Half};
use crate::dataplane::tally::Tally;
use crate::dataplane::wait::{agent_ready, agent_started, race, NoAnswer, ReadSome};
use crate::net::AcceptErrors;
use crate::protocol::chunk;
use crate::protocol::http::requests::Requests;
use crate::protocol::lifecycle::{RelayDataConn, RelayNext};

/// Accepts visitors until `stop` fires (or its sender is dropped). A visitor pairs with a
/// connection from this worker's pool; if that is empty it takes an idle one from another
/// worker (forwarded there) rather than wait for the agent to open a new one; only if every
/// pool is empty does it wait on this worker's, for up to `wait`.
pub async fn serve_listener(
    listener: std::net::TcpListener,
    gate: Arc<Gate>,
    pools: Vec<Arc<Pool>>,
    worker: usize,
    wait: std::time::Duration,
    stop: oneshot::Receiver<()>,
) {
    let service = gate.service().to_string();
    let metrics = gate.metrics().clone();
    accept_until(listener, &metrics, &service, stop, |stream, addr| {
        // SAFETY: the fd comes straight from the stream we own and give up here.
        let stream = unsafe { std::net::TcpStream::from_raw_fd(stream.into_raw_fd()) };
        let Some(visitor) = Visitor::admit(&gate, stream, addr) else {
            return;
        };
        // Starting at the worker copying fewest TLS visitors (this one unless it copies more).
        let first = load::least_busy(worker, pools.len());
        let Err(visitor) = Pool::try_take_any(&pools, first, visitor) else {
            return;
        };
        let (pool, gate, service) = (pools[worker].clone(), gate.clone(), service.clone());
        monoio::spawn(async move {
            let deadline = monoio::time::sleep(wait);
            if let Err((e, _)) = pool.take(visitor, deadline, wait).await {
                gate.count_unserved();
                tracing::warn!(service, visitor = %addr, "visitor closed: {e}");
            }
        });
    })
    .await;
}

/// A worker's accept loop on its own listener (a service's port or a shared port): counts
/// and hands every visitor to `accepted` until `stop` fires or its sender is dropped, and
/// backs off briefly on errors (EMFILE and friends) instead of spinning. `what` names the
/// listener in logs.
pub async fn accept_until(
    listener: std::net::TcpListener,
    metrics: &Metrics,
    what: &str,
    mut stop: oneshot::Receiver<()>,
    mut accepted: impl FnMut(TcpStream, SocketAddr),
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listener = what, "worker cannot adopt listener: {e}");
            return;
        }
    };
    let mut errors = AcceptErrors::new(what);
    // One for the loop: a handle per accept is a reference count, not an allocation.
    let mut canceller = monoio::io::Canceller::new();
    loop {
        let mut accept = std::pin::pin!(listener.cancelable_accept(canceller.handle()));
        let (got, stopping) = monoio::select! {
            _ = &mut stop => {
                // The accept in flight on the ring is cancelled, and its result awaited: the
                // kernel may have completed it with a connection first (the listener handed
                // to another process stays open), and that visitor is served, not dropped.
                let _ = std::mem::take(&mut canceller).cancel();
                (accept.await, true)
            }
            got = &mut accept => (got, false),
        };
        match got {
            Ok((stream, addr)) => {
                metrics.visitors_accepted.inc();
                if let Some(stream) = errors.admit(stream, Instant::now()) {
                    accepted(stream, addr);
                }
            }
            // A stopped listener is shut down as its stop fires (see `ListenerStop`), which
            // fails the accept in flight: that is the stop, not an error.
            Err(_) if stopping || !matches!(stop.try_recv(), Err(TryRecvError::Empty)) => break,
            Err(e) => {
                let pause = errors.failed(&e, Instant::now());
                if !pause.is_zero() {
                    monoio::time::sleep(pause).await;
                }
            }
        }
        if stopping {
            break;
        }
    }
}

/// Parks a data connection in `pool`; when a visitor is assigned, announces it and forwards
/// (splicing a plain or kTLS connection, sealing records of a TLS one). `ticket`: the pool's
/// generation when the connection's ticket was settled (see [`Pool::offer`]), and whether
/// its agent answers `Start` with `STARTED` (protocol 4; then a silent connection hands its
/// visitor on), and whether the kernel holds its TLS keys (kTLS; `tls` is then `None`).
pub async fn serve_data(
    stream: std::net::TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
    service: String,
    pool: Arc<Pool>,
    ticket: (u64, bool, bool),
    metrics: Arc<Metrics>,
    pipes: Rc<PipePool>,
) {
    let parked = park_and_forward(stream, tls, &service, &pool, ticket, &metrics, &pipes);
    if let Err(e) = parked.await {
        tracing::debug!(service, "data connection ended: {e}");
    }
}

async fn park_and_forward(
    stream: std::net::TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
    service: &str,
    pool: &Pool,
    (generation, answers, kernel): (u64, bool, bool),
    metrics: &Metrics,
    pipes: &PipePool,
) -> std::io::Result<()> {
    stream.set_nonblocking(true)?;
    let socket = TcpStream::from_std(stream)?;
    let tunnel = match tls {
        None if kernel => Tunnel::Ktls(socket),
        None => Tunnel::Plain(socket),
        Some(conn) => {
            // Boxed before the first await: rustls' state is large (and over-aligned), and
            // held inline it would bloat every connection's task, TLS or not.
            let tls = Box::new(TlsStream::new(socket, *conn));
            // Records the handshake left queued (session tickets) go out before parking, and
            // before the keys are taken over.
            tls.flush().await?;
            Tunnel::after_handshake(*tls)?
        }
    };
    let mut conn = RelayDataConn::new();
    let (slot, mut assigned) = oneshot::channel::<Visitor>();
    if !pool.offer(slot, generation) {
        return Ok(()); // its agent left (or the pool is full) since the ticket was checked
    }
    loop {
        // Idle until a visitor is assigned; the agent sends nothing meanwhile, so readability
        // means EOF or misbehaviour, and the connection leaves the pool.
        let visitor = monoio::select! {
            v = assigned => match v {
                Ok(v) => v,
                Err(_) => return Ok(()), // pool dropped us: owner changed or service closed
            },
            _ = tunnel.socket().readable(false) => {
                conn.on_parked_input();
                return Ok(());
            }
        };
        // Counted while this worker encrypts the visitor (see `load`), from
        // the moment it arrives: visitors accepted meanwhile see it.
        let copying = tunnel.copies().then(Copying::start);
        let (addr, http) = (visitor.addr, visitor.http);
        let idle = visitor.idle_timeout();
        // Only a connection parked a while may have died quietly meanwhile.
        let wait = answers && visitor.ask_first;
        // Boxed, with the visitor moved in: what only starting needs is not kept in the task
        // (every parked connection is one) for as long as the visitor is forwarded.
        let begun = begin(&mut conn, &tunnel, visitor, wait, (pool, service, metrics));
        let Some(Begun {
            stream,
            admission,
            mut requests,
            answer,
            quiet,
            sent: sent_early,
        }) = Box::pin(begun).await?
        else {
            return Ok(()); // handed on to another connection: this one is closed
        };
        let stream = TcpStream::from_std(stream)?;
        // Until its stream ends whole: a relay that dies meanwhile resets the visitor.
        arm_reset(fd(&stream));
        let answer = answer.as_ref().map_or(&[][..], |h| &h[..]);
        Tally::of(&admission).up.add(sent_early as usize);
        let outcome = monoio::select! {
            o = tunnel.forward(&stream, pipes, answer, quiet, requests.as_deref_mut(), Tally::of(&admission)) => o,
            _ = idle::monoio_idle(fd(&stream), idle) => {
                idle_closed(service, addr, fd(&stream), &admission);
                return Ok(());
            }
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(service, visitor = %addr, "visitor ended: {e}");
                // The forwarder already set the visitor to be reset if the tunnel failed.
                if e.tunnel_lost() {
                    count_cut(metrics, &admission);
                } else if let (false, Some(a)) = (e.origin_unreachable(), &admission) {
                    a.end_as(End::VisitorError);
                }
                if e.origin_unreachable() {
                    match origin_unreachable(service, addr, http, &admission) {
                        Some(page) => {
                            disarm_reset(fd(&stream));
                            let wrote = sockio::write_all(&stream, &page);
                            // Boxed: a timer inline would over-align every connection's task.
                            let _ = Box::pin(monoio::time::timeout(ANSWER_WAIT, wrote)).await;
                            shutdown(fd(&stream), Half::Write);
                        }
                        None => cut(fd(&stream)),
                    }
                }
                return Ok(());
            }
        };
        let reusable = outcome.reusable && tunnel.keys_fresh();
        let (up, down) = (outcome.up + sent_early, outcome.down);
        tracing::debug!(service, visitor = %addr, up, down, reusable, "visitor done");
        disarm_reset(fd(&stream));
        drop((stream, admission, copying));
        let next = conn.on_visitor_done(reusable, outcome.leftover, Instant::now());
        if next == RelayNext::Close {
            return Ok(()); // not reusable: no READY to wait for, no timer to arm
        }
        // Boxed: a timer is cache-line aligned, and inline it would pad every task.
        let deadline = monoio::time::sleep(chunk::READY_WAIT);
        let later = &mut ReadLater(&tunnel);
        if !Box::pin(agent_ready(&mut conn, next, later, deadline)).await {
            return Ok(());
        }
        let (slot, next) = oneshot::channel::<Visitor>();
        if !pool.offer(slot, generation) {
            return Ok(());
        }
        metrics.data_reused.inc();
        assigned = next;
    }
}

/// A visitor whose data connection answered `Start`, ready to forward.
struct Begun {
    stream: std::net::TcpStream,
    admission: Option<Admission>,
    requests: Option<Box<Requests>>,
    /// A header the forwarder decodes first (not `STARTED`).
    answer: Option<[u8; chunk::HEADER_LEN]>,
    /// The visitor had nothing more to read when `Start` went out.
    quiet: bool,
    /// Visitor bytes that went with `Start` (for HTTP, the first request head too).
    sent: u64,
}

/// Sends `Start` for `visitor` and, when told to `wait`, waits for the agent's `STARTED`
/// (otherwise the forwarder's decoder skips it). `None`: the connection gave no answer and
/// the visitor was handed to another (`pool`, with `service` and `metrics` for its counts),
/// so this one is closed.
async fn begin(
    conn: &mut RelayDataConn,
    tunnel: &Tunnel,
    mut visitor: Visitor,
    wait: bool,
    (pool, service, metrics): (&Pool, &str, &Metrics),
) -> std::io::Result<Option<Begun>> {
    visitor.stream.set_nonblocking(true)?;
    let (start, quiet) = start_frame(conn, &mut visitor)?;
    let answer = match wait {
        true => match send_start(tunnel, &start).await {
            Ok(answer) => answer,
            Err(why) => {
                let deadline = monoio::time::sleep(chunk::START_WAIT);
                hand_on(pool, visitor, &why, service, metrics, deadline).await;
                return Ok(None);
            }
        },
        false => {
            tunnel.write_all(&start).await?;
            None
        }
    };
    let sent = visitor.sent_with_start();
    Ok(Some(Begun {
        stream: visitor.stream,
        admission: visitor.admission,
        requests: visitor.requests,
        answer,
        quiet,
        sent: sent as u64,
    }))
}

/// The bytes that start a visitor on the tunnel: `Start`, the bytes held for it (its
/// `prefix`), and what the visitor has sent already (a client-first protocol's request,
/// usually here by the time the visitor reaches its data connection), so they travel in one
/// send and reach the agent in one read. What is read now joins [`Visitor::early`] (rewritten
/// by an HTTP visitor's `requests` reader first), so a visitor handed on sends it again.
/// Also returns whether the visitor has nothing more to read now (its next read should wait
/// on the ring).
fn start_frame(
    conn: &mut RelayDataConn,
    visitor: &mut Visitor,
) -> std::io::Result<(Vec<u8>, bool)> {
    let quiet = with_scratch(|buf| visitor.read_early(buf))?;
    let start = conn.on_visitor(visitor.addr, &visitor.prefix, &visitor.early);
    Ok((start, quiet))
}

/// Sends `start` and waits for the agent's `STARTED` (see [`agent_started`]).
async fn send_start(tunnel: &Tunnel, start: &[u8]) -> Result<Option<[u8; 4]>, NoAnswer> {
    let deadline = monoio::time::sleep(chunk::START_WAIT);
    let mut deadline = std::pin::pin!(deadline);
    // A write waits only when the socket's buffer is full, which a parked connection's is
    // not; the deadline covers it anyway.
    match race(tunnel.write_all(start), deadline.as_mut()).await {
        None => return Err(NoAnswer::Silent),
        Some(Err(e)) => return Err(NoAnswer::Lost(e)),
        Some(Ok(())) => {}
    }
    agent_started(&mut ReadLater(tunnel), deadline).await
}

/// A data connection read when the agent is expected to send only later (`READY`).
struct ReadLater<'a>(&'a Tunnel);

impl ReadSome for ReadLater<'_> {
    async fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read_some_later(buf).await
    }
}

#[cfg(test)]
mod tests {
    /// Whether this process still holds a descriptor for the socket with `inode`.
    fn holds_socket(inode: u64) -> bool {
        let want = format!("socket:[{inode}]");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .any(|target| target.to_string_lossy() == want)
    }

    /// A stopped accept loop must close its listener even though an accept was in flight
    /// on the ring when the stop came (the ring holds the descriptor until the cancelled
    /// accept completes).
    #[test]
    fn a_stopped_accept_loop_closes_its_listener() {
        if !crate::dataplane::probe::uring_for_tests() {
            return;
        }
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proc_fd = format!("/proc/self/fd/{}", listener.as_raw_fd());
        let inode = std::fs::metadata(proc_fd).unwrap().ino();
        let (stop, rx) = super::super::ListenerStop::new(&listener).unwrap();
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let closed = rt.block_on(async move {
            let metrics = crate::admin::Metrics::default();
            let accepting = super::accept_until(listener, &metrics, "test", rx, |_, _| {});
            let stopper = async move {
                // Let the accept reach the ring, then stop.
                monoio::time::sleep(std::time::Duration::from_millis(20)).await;
                drop(stop);
            };
            monoio::join!(accepting, stopper);
            for _ in 0..200 {
                if !holds_socket(inode) {
                    return true;
                }
                monoio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            false
        });
        assert!(
            closed,
            "the listener's descriptor is still open after its loop ended"
        );
    }

    /// A parked or forwarding data connection is one task per idle visitor, so its size is
    /// per-visitor memory. A timer or rustls state held inline once made it 128-byte aligned
    /// and padded (1.8 KiB more relay RSS per idle visitor); they are boxed now.
    #[test]
    fn connection_task_stays_small() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        super::super::assert_task_small(|| {
            super::serve_data(
                std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap(),
                None,
                "x".into(),
                std::sync::Arc::new(crate::dataplane::pool::Pool::new()),
                (0, true, false),
                std::sync::Arc::new(crate::admin::Metrics::default()),
                std::rc::Rc::new(super::PipePool::default()),
            )
        });
    }
}
