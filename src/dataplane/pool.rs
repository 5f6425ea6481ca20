//! The relay's pool of ready tunnel data connections for one service, and the visitors
//! waiting for one.
//!
//! A ready data connection is represented by a [`Slot`]: the sending half of a oneshot whose
//! receiver is held by the task that owns the connection. Handing a visitor to a connection
//! is sending the visitor into its slot; if that task has died (the agent closed the
//! connection), the send fails, the visitor comes back, and the next slot is tried. Nothing
//! here does I/O; it only decides who gets paired with whom and how many tickets to ask for.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::gate::{self, Admission, End, Gate};
use super::sock;
use crate::protocol::chunk::ANSWER_IF_PARKED;
use crate::protocol::http::requests::Requests;

/// Most visitors that may wait for a data connection per service; more are turned away
/// at once rather than queued without bound.
pub const MAX_WAITING_VISITORS: usize = 1024;
/// Most tickets outstanding (issued, not yet redeemed) per service.
pub const MAX_OUTSTANDING_TICKETS: usize = 1024;

/// A visitor connection accepted on a public port. The socket is a plain std one (non-blocking)
/// so either backend's runtime can adopt it.
#[derive(Debug)]
pub struct Visitor {
    /// The visitor's socket.
    pub stream: TcpStream,
    /// The visitor's address.
    pub addr: SocketAddr,
    /// Bytes to send down the tunnel before the visitor's own: a PROXY header, and whatever
    /// a shared port already read to route the visitor (request head, ClientHello).
    pub prefix: Vec<u8>,
    /// The visitor's counted place in its service (idle timeout, max visitors); `None` only
    /// for visitors made outside a listener (tests).
    pub admission: Option<Admission>,
    /// For an HTTP visitor whose service wants forwarding headers: the reader that rewrites
    /// every later request head on its way up the tunnel (the first is in `prefix`).
    pub requests: Option<Box<Requests>>,
    /// An HTTP visitor (shared HTTP port): told with a 502 page, not a reset, when the agent
    /// cannot reach its local service.
    pub http: bool,
    /// Visitor bytes already read (rewritten, for HTTP) that reached no agent: a data
    /// connection that never answered `Start` took them. Sent after `prefix`.
    pub early: Vec<u8>,
    /// Data connections this visitor was handed that never answered `Start`.
    pub unanswered: u8,
    /// Set by the pool when it hands the visitor a connection that had been parked for at
    /// least [`ANSWER_IF_PARKED`]: the relay waits for that connection's `STARTED` before
    /// forwarding (an agent that sends it). One parked more recently carried a visitor or was
    /// opened moments ago and is taken as alive.
    pub ask_first: bool,
}

/// Most data connections a visitor is handed that do not answer `Start` before it is
/// closed: each costs it up to [`crate::protocol::chunk::START_WAIT`].
pub const MAX_UNANSWERED: u8 = 2;

impl Visitor {
    /// Admits a visitor accepted on a service's own port: limits first, then the PROXY header
    /// the service wants. `None`: refused (and counted by the gate); dropping the stream closes it.
    pub fn admit(gate: &Arc<Gate>, stream: TcpStream, addr: SocketAddr) -> Option<Visitor> {
        let admission = gate.admit(addr).ok()?;
        let prefix = if gate.wants_proxy_header() {
            gate.proxy_header(addr, gate::local_addr_of(stream.as_fd()))
        } else {
            Vec::new()
        };
        Some(Visitor {
            requests: None,
            http: false,
            stream,
            addr,
            prefix,
            admission: Some(admission),
            early: Vec::new(),
            unanswered: 0,
            ask_first: false,
        })
    }

    /// Says how the visit ended, for its access line.
    pub fn end_as(&self, end: End) {
        if let Some(a) = &self.admission {
            a.end_as(end);
        }
    }

    /// Reads what the visitor has sent by now, without waiting, into [`Self::early`] (through
    /// an HTTP visitor's `requests` reader), using `buf` to read into: a client-first
    /// protocol's request is usually here by the time the visitor reaches a data connection,
    /// and then travels with `Start`. `Ok(true)`: the visitor has nothing more to read now (its
    /// next read should wait); `false` after EOF or a full `buf`.
    pub fn read_early(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let (n, quiet) = match sock::recv_now(self.stream.as_fd(), buf)? {
            None => (0, true),
            Some(0) => (0, false), // EOF: the forwarder sees it at once and sends END
            Some(n) => (n, n < buf.len()),
        };
        match self.requests.as_deref_mut() {
            Some(requests) if n > 0 => requests
                .feed(&buf[..n], &mut self.early)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            _ => self.early.extend_from_slice(&buf[..n]),
        }
        Ok(quiet)
    }

    /// The visitor's own bytes that travel with `Start`: what it sent early and, for an
    /// HTTP visitor, the first request head (rewritten) held in `prefix` (a PROXY header is
    /// not the visitor's).
    pub fn sent_with_start(&self) -> usize {
        self.early.len() + if self.http { self.prefix.len() } else { 0 }
    }

    /// Idle timeout that applies to this visitor.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.admission.as_ref().and_then(|a| a.gate.idle_timeout())
    }
}

/// Where a visitor is sent to be paired with one ready data connection.
pub type Slot = oneshot::Sender<Visitor>;

/// Why a visitor could not be paired.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// No data connection became ready in time (agent offline or slow).
    #[error("no tunnel connection became ready within {0:?}")]
    Timeout(Duration),
    /// Too many visitors are already waiting.
    #[error("{MAX_WAITING_VISITORS} visitors are already waiting")]
    Full,
    /// The service closed (retired, or the relay stopped) while the visitor waited.
    #[error("the service closed while the visitor waited")]
    Closed,
}

/// How long a pool may hold more idle connections than its target before the extra ones are
/// closed ([`Pool::trim`]): long enough that a steady load which uses them keeps them.
pub const TRIM_AFTER: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Inner {
    /// Parked connections, with when each was parked.
    idle: VecDeque<(Slot, Instant)>,
    waiters: VecDeque<oneshot::Sender<Slot>>,
    outstanding: usize,
    /// Connections kept for good by their service (a `udp` service's channels, see
    /// [`Held`]): they count toward the target as idle ones do.
    held: usize,
    target: usize,
    wake: Option<Arc<Notify>>,
    /// Bumped whenever the owner changes, so a connection of a previous owner that finishes
    /// a visitor is not parked again for the new one.
    generation: u64,
    /// Since when more than `target` connections have been idle (see [`Pool::trim`]).
    over_since: Option<Instant>,
}

impl Inner {
    /// Refill when the pool (counting tickets in flight) falls to half its target, then top
    /// it up in one batch: one Tickets frame per several visitors instead of one per visitor.
    fn want_more(&self) -> bool {
        let low_water = self.target.div_ceil(2);
        self.idle.len() + self.held + self.outstanding < low_water + self.waiters.len()
            && self.outstanding < MAX_OUTSTANDING_TICKETS
    }

    /// Sends `visitor` to the first idle connection still alive, or gives it back.
    fn hand_to_idle(&mut self, mut visitor: Visitor) -> Result<(), Visitor> {
        while let Some((slot, parked)) = self.idle.pop_front() {
            // A connection parked a while may have died quietly since: ask it first.
            visitor.ask_first = parked.elapsed() >= ANSWER_IF_PARKED;
            match slot.send(visitor) {
                Ok(()) => {
                    self.nudge();
                    return Ok(());
                }
                Err(back) => visitor = back, // that connection died while idle
            }
        }
        Err(visitor)
    }

    fn offer(&mut self, mut slot: Slot) {
        while let Some(waiter) = self.waiters.pop_front() {
            match waiter.send(slot) {
                Ok(()) => {
                    self.nudge();
                    return;
                }
                Err(back) => slot = back, // that visitor gave up; try the next
            }
        }
        self.idle.push_back((slot, Instant::now()));
    }

    fn detach(&mut self) {
        self.idle.clear();
        self.outstanding = 0;
        self.held = 0;
        self.wake = None;
        self.generation += 1;
    }

    fn nudge(&self) {
        if self.want_more() {
            if let Some(w) = &self.wake {
                w.notify_one();
            }
        }
    }
}

/// Ready data connections and waiting visitors for one service.
#[derive(Default)]
pub struct Pool {
    inner: Mutex<Inner>,
}

impl Pool {
    /// An empty pool with no owner.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves only counters and queues behind; they stay
        // consistent enough to keep serving, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new owner (agent session) takes the pool: idle connections of any previous owner
    /// are dropped (closing them), `target` idle connections are wanted, and `wake` is
    /// notified whenever more tickets should be issued.
    pub fn attach(&self, target: usize, wake: Arc<Notify>) {
        let mut g = self.lock();
        g.idle.clear();
        g.outstanding = 0;
        g.held = 0;
        g.target = target;
        g.wake = Some(wake);
        g.generation += 1;
        g.nudge();
    }

    /// The owner went away: drop its idle connections and stop asking for tickets. Waiting
    /// visitors keep waiting (bounded) in case a new owner attaches soon.
    pub fn detach(&self) {
        self.lock().detach();
    }

    /// The service is closing for good: detach, and tell every waiting visitor at once
    /// ([`TakeError::Closed`]) instead of letting it wait out its deadline.
    pub fn close(&self) {
        let mut g = self.lock();
        g.detach();
        g.waiters.clear();
    }

    /// Visitors waiting here for a data connection (some may have given up since).
    pub fn waiting_count(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Data connections parked here waiting for a visitor (some may have died since; they
    /// are skipped when tried).
    pub fn idle_count(&self) -> usize {
        self.lock().idle.len()
    }

    /// The current owner's generation; pass it to [`Self::offer`]. Read it before checking
    /// that a connection's owner still owns the service: if the owner leaves after the check,
    /// the generation has moved on and the offer is refused.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// A data connection of the owner of `generation` is ready (fresh, or done with a visitor
    /// and still usable): it goes to the oldest waiting visitor, or parks. Refused (the caller
    /// closes it) if the owner changed since `generation` — a visitor must never be handed a
    /// connection of an agent that is gone — or if no one waits and the pool already holds
    /// twice its target idle: the relay keeps what its load needs, not every connection a
    /// burst made.
    pub fn offer(&self, slot: Slot, generation: u64) -> bool {
        let mut g = self.lock();
        if g.generation != generation || g.wake.is_none() {
            return false;
        }
        if g.waiters.is_empty() && g.idle.len() >= (2 * g.target).max(1) {
            return false;
        }
        g.offer(slot);
        true
    }

    /// Closes the idle connections beyond the target once the pool has held more than its
    /// target idle for `after` (a burst's connections, parked when it ended, are not kept
    /// for ever): the longest parked go first. Called periodically with the time; returns
    /// how many it closed.
    pub fn trim(&self, now: Instant, after: Duration) -> usize {
        let mut g = self.lock();
        let extra = g.idle.len().saturating_sub(g.target);
        if extra == 0 || g.wake.is_none() {
            g.over_since = None;
            return 0;
        }
        let since = *g.over_since.get_or_insert(now);
        if now.saturating_duration_since(since) < after {
            return 0;
        }
        g.idle.drain(..extra);
        g.over_since = None;
        extra
    }

    /// Pairs `visitor` with an idle data connection if there is one, without waiting;
    /// otherwise gives the visitor back.
    pub fn try_take(&self, visitor: Visitor) -> Result<(), Visitor> {
        self.lock().hand_to_idle(visitor)
    }

    /// Pairs `visitor` with a ready data connection, waiting until `deadline` completes (a
    /// sleep of `wait` from the caller's runtime; the pool itself knows no clock). On failure
    /// the visitor comes back, so the caller can tell it why.
    pub async fn take(
        &self,
        mut visitor: Visitor,
        deadline: impl Future<Output = ()>,
        wait: Duration,
    ) -> Result<(), (TakeError, Visitor)> {
        let mut deadline = pin!(deadline);
        loop {
            let mut rx = {
                let mut g = self.lock();
                visitor = match g.hand_to_idle(visitor) {
                    Ok(()) => return Ok(()),
                    Err(back) => back,
                };
                if g.waiters.len() >= MAX_WAITING_VISITORS {
                    visitor.end_as(End::Unserved);
                    return Err((TakeError::Full, visitor));
                }
                let (tx, rx) = oneshot::channel();
                g.waiters.push_back(tx);
                g.nudge();
                rx
            };
            let got = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = std::pin::Pin::new(&mut rx).poll(cx) {
                    // A dropped sender: the pool closed and let go of its waiters.
                    return Poll::Ready(r.map_err(|_| TakeError::Closed));
                }
                deadline
                    .as_mut()
                    .poll(cx)
                    .map(|()| Err(TakeError::Timeout(wait)))
            })
            .await;
            match got {
                Ok(slot) => match slot.send(visitor) {
                    Ok(()) => return Ok(()),
                    Err(back) => visitor = back,
                },
                Err(e) => {
                    visitor.end_as(End::Unserved);
                    return Err((e, visitor));
                }
            }
        }
    }

    /// Hands a visitor that arrived off the service's own listener (a shared port, a
    /// terminated HTTPS visitor, one handed over by another relay) to `pools`: an idle
    /// connection of any worker's pool, else waiting on the first for up to `wait` (an agent
    /// reconnecting). On failure the visitor comes back with the reason.
    pub async fn hand(
        pools: &[Arc<Pool>],
        visitor: Visitor,
        wait: Duration,
    ) -> Result<(), (TakeError, Visitor)> {
        let visitor = match Pool::try_take_any(pools, 0, visitor) {
            Ok(()) => return Ok(()),
            Err(v) => v,
        };
        pools[0].take(visitor, tokio::time::sleep(wait), wait).await
    }

    /// Pairs `visitor` with an idle connection from any of `pools` (one per worker), starting
    /// at `first`, without waiting; gives the visitor back if every pool is empty.
    pub fn try_take_any(
        pools: &[Arc<Pool>],
        first: usize,
        mut visitor: Visitor,
    ) -> Result<(), Visitor> {
        for i in 0..pools.len() {
            match pools[(first + i) % pools.len()].try_take(visitor) {
                Ok(()) => return Ok(()),
                Err(back) => visitor = back,
            }
        }
        Err(visitor)
    }

    /// How many tickets to issue now to reach the target, counted as outstanding at once.
    /// Zero until the pool has fallen to its low-water mark.
    pub fn claim_tickets(&self) -> usize {
        let mut g = self.lock();
        if g.wake.is_none() || !g.want_more() {
            return 0;
        }
        let want = g.target + g.waiters.len();
        let have = g.idle.len() + g.held + g.outstanding;
        let n = want
            .saturating_sub(have)
            .min(MAX_OUTSTANDING_TICKETS - g.outstanding.min(MAX_OUTSTANDING_TICKETS));
        g.outstanding += n;
        n
    }

    /// `n` tickets claimed with [`Self::claim_tickets`] were not issued (a quota was out):
    /// forget them without asking again at once; the session retries later.
    pub fn tickets_withheld(&self, n: usize) {
        let mut g = self.lock();
        g.outstanding = g.outstanding.saturating_sub(n);
    }

    /// An outstanding ticket was redeemed or expired.
    pub fn ticket_done(&self) {
        let mut g = self.lock();
        g.outstanding = g.outstanding.saturating_sub(1);
        g.nudge();
    }

    /// Keeps a data connection of the owner of `generation` for good, outside the idle
    /// queue (a `udp` service's channel): it counts toward the target until the [`Held`]
    /// is dropped, when a replacement is asked for. `None` if the owner changed since
    /// `generation` (the caller closes the connection).
    pub fn hold(self: &Arc<Self>, generation: u64) -> Option<Held> {
        let mut g = self.lock();
        if g.generation != generation || g.wake.is_none() {
            return None;
        }
        g.held += 1;
        Some(Held {
            pool: self.clone(),
            generation,
        })
    }
}

/// A data connection its pool counts as kept (see [`Pool::hold`]).
pub struct Held {
    pool: Arc<Pool>,
    generation: u64,
}

impl Held {
    /// Whether the owner the connection came from still owns the pool; a connection of one
    /// that left must carry nothing more.
    pub fn is_current(&self) -> bool {
        let g = self.pool.lock();
        g.generation == self.generation && g.wake.is_some()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut g = self.pool.lock();
        if g.generation == self.generation {
            g.held = g.held.saturating_sub(1);
            g.nudge();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    async fn visitor() -> (Visitor, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, addr) = l.accept().unwrap();
        (
            Visitor {
                requests: None,
                http: false,
                stream: s,
                addr,
                prefix: Vec::new(),
                admission: None,
                early: Vec::new(),
                unanswered: 0,
                ask_first: false,
            },
            c,
        )
    }

    fn wait(d: Duration) -> (tokio::time::Sleep, Duration) {
        (tokio::time::sleep(d), d)
    }

    #[tokio::test]
    async fn tickets_follow_target_and_waiters() {
        let pool = Arc::new(Pool::new());
        assert_eq!(pool.claim_tickets(), 0, "no owner, no tickets");
        let wake = Arc::new(Notify::new());
        pool.attach(4, wake.clone());
        assert_eq!(pool.claim_tickets(), 4);
        assert_eq!(pool.claim_tickets(), 0);

        // Ready connections park; visitors take them at once. The pool refills only when it
        // falls below half its target, and then in one batch.
        let mut assigned = Vec::new();
        for _ in 0..4 {
            pool.ticket_done();
            let (slot, rx) = oneshot::channel();
            assert!(pool.offer(slot, pool.generation()));
            assigned.push(rx);
        }
        let mut clients = Vec::new();
        for expected in [0, 0, 3] {
            let (v, c) = visitor().await;
            clients.push(c);
            let (sleep, d) = wait(Duration::from_secs(5));
            pool.take(v, sleep, d).await.unwrap();
            assert_eq!(pool.claim_tickets(), expected);
        }
        for rx in assigned.drain(..3) {
            assert!(rx.await.is_ok());
        }

        // The fourth parked connection dies while idle: its slot is skipped, and the visitor
        // waits for a fresh connection.
        drop(assigned);
        let p2 = pool.clone();
        let (v, _c2) = visitor().await;
        let waiting = tokio::spawn(async move {
            let (sleep, d) = wait(Duration::from_secs(30));
            p2.take(v, sleep, d).await
        });
        wake.notified().await;
        let (slot, rx) = oneshot::channel();
        assert!(pool.offer(slot, pool.generation()));
        waiting.await.unwrap().unwrap();
        assert!(rx.await.is_ok());
    }

    #[tokio::test]
    async fn closing_the_pool_tells_waiting_visitors_at_once() {
        let pool = Arc::new(Pool::new());
        let (v, _c) = visitor().await;
        let p2 = pool.clone();
        let waiting = tokio::spawn(async move {
            // A deadline that never fires: only the close can end this wait.
            p2.take(v, std::future::pending(), Duration::MAX).await
        });
        // The visitor is queued once the pool wants a ticket for it.
        let wake = Arc::new(Notify::new());
        let notified = wake.notified();
        pool.attach(0, wake.clone());
        notified.await;
        pool.close();
        let (err, _back) = waiting.await.unwrap().unwrap_err();
        assert!(matches!(err, TakeError::Closed), "{err}");
    }

    #[tokio::test]
    async fn waiting_is_bounded_in_time() {
        let pool = Pool::new();
        let (v, _c) = visitor().await;
        let (sleep, d) = wait(Duration::from_millis(10));
        let (err, _back) = pool.take(v, sleep, d).await.unwrap_err();
        assert!(matches!(err, TakeError::Timeout(_)));
    }

    #[tokio::test]
    async fn only_a_connection_parked_a_while_is_asked_first() {
        let pool = Pool::new();
        pool.attach(2, Arc::new(Notify::new()));
        let (fresh, mut fresh_rx) = oneshot::channel();
        let (old, mut old_rx) = oneshot::channel();
        assert!(pool.offer(old, pool.generation()));
        assert!(pool.offer(fresh, pool.generation()));
        // The first one has been parked longer than ANSWER_IF_PARKED.
        pool.lock().idle[0].1 -= ANSWER_IF_PARKED;
        for (rx, ask) in [(&mut old_rx, true), (&mut fresh_rx, false)] {
            let (v, _c) = visitor().await;
            assert!(pool.try_take(v).is_ok());
            assert_eq!(rx.try_recv().unwrap().ask_first, ask);
        }
    }

    #[tokio::test]
    async fn a_connection_of_a_departed_owner_is_never_handed_out() {
        let pool = Arc::new(Pool::new());
        pool.attach(2, Arc::new(Notify::new()));
        // Read before the owner's check, as the relay does; then the owner leaves and a new
        // one attaches while a visitor waits.
        let stale = pool.generation();
        pool.detach();
        pool.attach(2, Arc::new(Notify::new()));
        let p2 = pool.clone();
        let (v, _c) = visitor().await;
        let waiting = tokio::spawn(async move {
            let (sleep, d) = wait(Duration::from_secs(30));
            p2.take(v, sleep, d).await
        });
        while pool.lock().waiters.is_empty() {
            tokio::task::yield_now().await;
        }
        let (slot, mut rx) = oneshot::channel();
        assert!(!pool.offer(slot, stale), "a stale generation is refused");
        assert!(rx.try_recv().is_err(), "and no visitor was sent to it");
        // The current owner's connection serves the waiting visitor.
        let (slot, rx) = oneshot::channel();
        assert!(pool.offer(slot, pool.generation()));
        waiting.await.unwrap().unwrap();
        assert!(rx.await.is_ok());
        // A detached pool takes nothing.
        pool.detach();
        let (slot, _rx) = oneshot::channel();
        assert!(!pool.offer(slot, pool.generation()));
    }

    /// A pool with a target of 2 and four connections parked (their receiving ends).
    fn pool_with_four_parked() -> (Pool, Vec<oneshot::Receiver<Visitor>>) {
        let pool = Pool::new();
        pool.attach(2, Arc::new(Notify::new()));
        let mut parked = Vec::new();
        for _ in 0..4 {
            let (slot, rx) = oneshot::channel();
            assert!(pool.offer(slot, pool.generation()));
            parked.push(rx);
        }
        (pool, parked)
    }

    #[test]
    fn idle_connections_are_capped_at_twice_the_target() {
        let (pool, _parked) = pool_with_four_parked();
        let (slot, _rx) = oneshot::channel();
        assert!(
            !pool.offer(slot, pool.generation()),
            "a fifth is one too many"
        );
        assert_eq!(pool.idle_count(), 4);
    }

    #[test]
    fn idle_connections_beyond_the_target_are_closed_after_a_while() {
        let (pool, mut parked) = pool_with_four_parked();
        let after = Duration::from_secs(30);
        let t0 = Instant::now();
        assert_eq!(pool.trim(t0, after), 0, "the clock starts");
        assert_eq!(pool.trim(t0 + Duration::from_secs(29), after), 0);
        assert_eq!(pool.trim(t0 + Duration::from_secs(30), after), 2);
        assert_eq!(pool.idle_count(), 2, "the target stays");
        // The two parked longest were closed (their tasks see the sender dropped).
        assert!(parked[0].try_recv().is_err() && parked[1].try_recv().is_err());
        for still in &mut parked[2..] {
            assert!(matches!(
                still.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            ));
        }

        // Back over the target only briefly: the clock starts again, nothing closes.
        let (slot, _rx) = oneshot::channel();
        assert!(pool.offer(slot, pool.generation()));
        let t1 = t0 + Duration::from_secs(40);
        assert_eq!(pool.trim(t1, after), 0);
        let visitor_took_one = pool.lock().idle.pop_front().map(|(slot, _)| slot);
        drop(visitor_took_one);
        assert_eq!(
            pool.trim(t1 + Duration::from_secs(31), after),
            0,
            "at the target again"
        );
        assert_eq!(pool.idle_count(), 2);
    }
}
