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
use std::sync::atomic::{AtomicUsize, Ordering};
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

    /// Counts the visitor among those `carrying` counts (an agent's, in its pool) for as
    /// long as its visit lasts.
    fn count_in(&mut self, carrying: &Arc<AtomicUsize>) {
        if let Some(a) = self.admission.as_mut() {
            a.count_in(carrying);
        }
    }

    /// Undoes [`Self::count_in`]: the connection it was sent to was gone.
    fn uncount(&mut self) {
        if let Some(a) = self.admission.as_mut() {
            a.uncount();
        }
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

/// Most agents one pool serves at once: a service's group ([`Pool::attach`]).
pub const MAX_MEMBERS: usize = 64;

/// One agent session's share of a pool: its parked connections, its tickets in flight and
/// the visitors it carries now.
struct Member {
    /// The agent session (the pool's callers name members by it).
    session: u64,
    /// Unique per attach: a connection offered with another member's (or an earlier
    /// attach's) generation is refused.
    generation: u64,
    /// Parked connections, with when each was parked.
    idle: VecDeque<(Slot, Instant)>,
    outstanding: usize,
    /// Connections kept for good by their service (a `udp` service's channels, see
    /// [`Held`]): they count toward the target as idle ones do.
    held: usize,
    target: usize,
    wake: Arc<Notify>,
    /// Since when more than `target` connections have been idle (see [`Pool::trim`]).
    over_since: Option<Instant>,
    /// Visitors its connections carry now: a new visitor goes to the member carrying
    /// fewest (least connections).
    carrying: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Inner {
    /// Usually one; several for a service a group of agents serves.
    members: Vec<Member>,
    /// Visitors waiting, each for any member's next ready connection.
    waiters: VecDeque<oneshot::Sender<(Slot, Arc<AtomicUsize>)>>,
    /// The last generation given out.
    generation: u64,
}

impl Inner {
    fn member(&mut self, session: u64) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.session == session)
    }

    fn by_generation(&mut self, generation: u64) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.generation == generation)
    }

    /// Refill when a member (counting tickets in flight) falls to half its target, then top
    /// it up in one batch: one Tickets frame per several visitors instead of one per
    /// visitor. Waiting visitors are shared out among the members.
    fn want_more(&self, m: &Member) -> bool {
        let low_water = m.target.div_ceil(2);
        m.idle.len() + m.held + m.outstanding < low_water + self.waiting_share()
            && m.outstanding < MAX_OUTSTANDING_TICKETS
    }

    /// How many of the waiting visitors each member should bring a connection for.
    fn waiting_share(&self) -> usize {
        self.waiters.len().div_ceil(self.members.len().max(1))
    }

    /// Sends `visitor` to the first live idle connection of the member carrying the fewest
    /// visitors, or gives it back.
    fn hand_to_idle(&mut self, mut visitor: Visitor) -> Result<(), Visitor> {
        loop {
            let Some(m) = self
                .members
                .iter_mut()
                .filter(|m| !m.idle.is_empty())
                .min_by_key(|m| m.carrying.load(Ordering::Relaxed))
            else {
                return Err(visitor);
            };
            let (slot, parked) = m.idle.pop_front().expect("a member with idle connections");
            // A connection parked a while may have died quietly since: ask it first.
            visitor.ask_first = parked.elapsed() >= ANSWER_IF_PARKED;
            visitor.count_in(&m.carrying);
            match slot.send(visitor) {
                Ok(()) => {
                    self.nudge();
                    return Ok(());
                }
                Err(back) => {
                    // That connection died while idle.
                    visitor = back;
                    visitor.uncount();
                }
            }
        }
    }

    /// Gives a ready connection of member `i` to the oldest visitor still waiting, or parks
    /// it with that member.
    fn offer(&mut self, i: usize, mut slot: Slot) {
        while let Some(waiter) = self.waiters.pop_front() {
            match waiter.send((slot, self.members[i].carrying.clone())) {
                Ok(()) => {
                    self.nudge();
                    return;
                }
                Err((back, _)) => slot = back, // that visitor gave up; try the next
            }
        }
        self.members[i].idle.push_back((slot, Instant::now()));
    }

    fn nudge(&self) {
        for m in &self.members {
            if self.want_more(m) {
                m.wake.notify_one();
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

    /// Agent session `session` serves the pool (beside any others attached: a group):
    /// `target` idle connections are wanted from it, and `wake` is notified whenever it
    /// should issue more tickets. `carrying` counts the visitors it carries (shared by a
    /// service's pools, one per worker, so the count is the agent's, not the worker's).
    /// Attaching again starts afresh: the session's parked connections are dropped
    /// (closing them) and its earlier generation is refused. A pool takes [`MAX_MEMBERS`]
    /// at most; beyond that the session is not attached (the caller keeps groups smaller).
    pub fn attach(
        &self,
        session: u64,
        target: usize,
        wake: Arc<Notify>,
        carrying: Arc<AtomicUsize>,
    ) {
        let mut g = self.lock();
        g.generation += 1;
        let member = Member {
            session,
            generation: g.generation,
            idle: VecDeque::new(),
            outstanding: 0,
            held: 0,
            target,
            wake,
            over_since: None,
            carrying,
        };
        let room = g.members.len() < MAX_MEMBERS;
        match g.member(session) {
            Some(m) => *m = member,
            None if room => g.members.push(member),
            None => return,
        }
        g.nudge();
    }

    /// The count of visitors `session` carries, if it serves the pool (see [`Self::attach`]).
    pub fn carrying(&self, session: u64) -> Option<Arc<AtomicUsize>> {
        self.lock().member(session).map(|m| m.carrying.clone())
    }

    /// Session `session` no longer serves the pool: its idle connections are dropped and no
    /// more tickets are asked of it. Waiting visitors keep waiting (bounded) for another
    /// member, or a new owner that attaches soon.
    pub fn detach(&self, session: u64) {
        self.lock().members.retain(|m| m.session != session);
    }

    /// Every agent leaves the pool at once (the service changes hands).
    pub fn detach_all(&self) {
        self.lock().members.clear();
    }

    /// The service is closing for good: detach everyone, and tell every waiting visitor at
    /// once ([`TakeError::Closed`]) instead of letting it wait out its deadline.
    pub fn close(&self) {
        let mut g = self.lock();
        g.members.clear();
        g.waiters.clear();
    }

    /// Visitors waiting here for a data connection (some may have given up since).
    pub fn waiting_count(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Data connections parked here waiting for a visitor (some may have died since; they
    /// are skipped when tried).
    pub fn idle_count(&self) -> usize {
        self.lock().members.iter().map(|m| m.idle.len()).sum()
    }

    /// The generation of `session`'s membership, to pass to [`Self::offer`]; `None` if it
    /// does not serve the pool. If the session leaves after this, the offer is refused.
    pub fn generation(&self, session: u64) -> Option<u64> {
        self.lock().member(session).map(|m| m.generation)
    }

    /// A data connection of the member of `generation` is ready (fresh, or done with a
    /// visitor and still usable): it goes to the oldest waiting visitor, or parks. Refused
    /// (the caller closes it) if that member left since — a visitor must never be handed a
    /// connection of an agent that is gone — or if no one waits and the member already parks
    /// twice its target: the relay keeps what its load needs, not every connection a burst
    /// made.
    pub fn offer(&self, slot: Slot, generation: u64) -> bool {
        let mut g = self.lock();
        let Some(i) = g.members.iter().position(|m| m.generation == generation) else {
            return false;
        };
        let m = &g.members[i];
        if g.waiters.is_empty() && m.idle.len() >= (2 * m.target).max(1) {
            return false;
        }
        g.offer(i, slot);
        true
    }

    /// Closes each member's idle connections beyond its target once it has held more than
    /// its target idle for `after` (a burst's connections, parked when it ended, are not
    /// kept for ever): the longest parked go first. Called periodically with the time;
    /// returns how many it closed.
    pub fn trim(&self, now: Instant, after: Duration) -> usize {
        let mut g = self.lock();
        let mut closed = 0;
        for m in &mut g.members {
            let extra = m.idle.len().saturating_sub(m.target);
            if extra == 0 {
                m.over_since = None;
                continue;
            }
            let since = *m.over_since.get_or_insert(now);
            if now.saturating_duration_since(since) < after {
                continue;
            }
            m.idle.drain(..extra);
            m.over_since = None;
            closed += extra;
        }
        closed
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
                Ok((slot, carrying)) => {
                    visitor.count_in(&carrying);
                    match slot.send(visitor) {
                        Ok(()) => return Ok(()),
                        Err(back) => {
                            visitor = back;
                            visitor.uncount();
                        }
                    }
                }
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

    /// How many tickets to issue to `session` now to reach its target, counted as
    /// outstanding at once. Zero until it has fallen to its low-water mark.
    pub fn claim_tickets(&self, session: u64) -> usize {
        let mut g = self.lock();
        let share = g.waiting_share();
        let Some(i) = g.members.iter().position(|m| m.session == session) else {
            return 0;
        };
        if !g.want_more(&g.members[i]) {
            return 0;
        }
        let m = &mut g.members[i];
        let want = m.target + share;
        let have = m.idle.len() + m.held + m.outstanding;
        let n = want
            .saturating_sub(have)
            .min(MAX_OUTSTANDING_TICKETS - m.outstanding.min(MAX_OUTSTANDING_TICKETS));
        m.outstanding += n;
        n
    }

    /// `n` tickets claimed with [`Self::claim_tickets`] were not issued (a quota was out):
    /// forget them without asking again at once; the session retries later.
    pub fn tickets_withheld(&self, session: u64, n: usize) {
        if let Some(m) = self.lock().member(session) {
            m.outstanding = m.outstanding.saturating_sub(n);
        }
    }

    /// An outstanding ticket of `session` was redeemed or expired.
    pub fn ticket_done(&self, session: u64) {
        let mut g = self.lock();
        if let Some(m) = g.member(session) {
            m.outstanding = m.outstanding.saturating_sub(1);
            g.nudge();
        }
    }

    /// Keeps a data connection of the member of `generation` for good, outside the idle
    /// queue (a `udp` service's channel): it counts toward the member's target until the
    /// [`Held`] is dropped, when a replacement is asked for. `None` if that member left
    /// since (the caller closes the connection).
    pub fn hold(self: &Arc<Self>, generation: u64) -> Option<Held> {
        let mut g = self.lock();
        g.by_generation(generation)?.held += 1;
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
    /// Whether the agent the connection came from still serves the pool; a connection of
    /// one that left must carry nothing more.
    pub fn is_current(&self) -> bool {
        self.pool.lock().by_generation(self.generation).is_some()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut g = self.pool.lock();
        if let Some(m) = g.by_generation(self.generation) {
            m.held = m.held.saturating_sub(1);
            g.nudge();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// The agent session the tests attach.
    const S: u64 = 7;

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
        assert_eq!(pool.claim_tickets(S), 0, "no owner, no tickets");
        let wake = Arc::new(Notify::new());
        pool.attach(S, 4, wake.clone(), Default::default());
        assert_eq!(pool.claim_tickets(S), 4);
        assert_eq!(pool.claim_tickets(S), 0);

        // Ready connections park; visitors take them at once. The pool refills only when it
        // falls below half its target, and then in one batch.
        let mut assigned = Vec::new();
        for _ in 0..4 {
            pool.ticket_done(S);
            let (slot, rx) = oneshot::channel();
            assert!(pool.offer(slot, pool.generation(S).unwrap()));
            assigned.push(rx);
        }
        let mut clients = Vec::new();
        for expected in [0, 0, 3] {
            let (v, c) = visitor().await;
            clients.push(c);
            let (sleep, d) = wait(Duration::from_secs(5));
            pool.take(v, sleep, d).await.unwrap();
            assert_eq!(pool.claim_tickets(S), expected);
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
        assert!(pool.offer(slot, pool.generation(S).unwrap()));
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
        pool.attach(S, 0, wake.clone(), Default::default());
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
        pool.attach(S, 2, Arc::new(Notify::new()), Default::default());
        let (fresh, mut fresh_rx) = oneshot::channel();
        let (old, mut old_rx) = oneshot::channel();
        assert!(pool.offer(old, pool.generation(S).unwrap()));
        assert!(pool.offer(fresh, pool.generation(S).unwrap()));
        // The first one has been parked longer than ANSWER_IF_PARKED.
        pool.lock().members[0].idle[0].1 -= ANSWER_IF_PARKED;
        for (rx, ask) in [(&mut old_rx, true), (&mut fresh_rx, false)] {
            let (v, _c) = visitor().await;
            assert!(pool.try_take(v).is_ok());
            assert_eq!(rx.try_recv().unwrap().ask_first, ask);
        }
    }

    #[tokio::test]
    async fn a_connection_of_a_departed_owner_is_never_handed_out() {
        let pool = Arc::new(Pool::new());
        pool.attach(S, 2, Arc::new(Notify::new()), Default::default());
        // Read before the owner's check, as the relay does; then the owner leaves and a new
        // one attaches while a visitor waits.
        let stale = pool.generation(S).unwrap();
        pool.detach(S);
        pool.attach(S, 2, Arc::new(Notify::new()), Default::default());
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
        assert!(pool.offer(slot, pool.generation(S).unwrap()));
        waiting.await.unwrap().unwrap();
        assert!(rx.await.is_ok());
        // A detached pool takes nothing.
        let last = pool.generation(S).unwrap();
        pool.detach(S);
        assert_eq!(pool.generation(S), None);
        let (slot, _rx) = oneshot::channel();
        assert!(!pool.offer(slot, last));
    }

    /// A visitor admitted through `gate`, so the pool can count it against an agent.
    async fn admitted(gate: &Arc<Gate>) -> (Visitor, TcpStream) {
        let (mut v, c) = visitor().await;
        v.admission = Some(gate.admit(v.addr).unwrap());
        (v, c)
    }

    /// A gate to admit visitors through, and a pool served by agents 1 and 2, each wanting
    /// `target` connections.
    fn two_agents(target: usize) -> (Arc<Gate>, Pool) {
        let gate = Gate::new("t", &Default::default(), Default::default());
        let pool = Pool::new();
        for session in [1, 2] {
            pool.attach(session, target, Arc::new(Notify::new()), Default::default());
        }
        (gate, pool)
    }

    fn park(pool: &Pool, session: u64) -> oneshot::Receiver<Visitor> {
        let (slot, rx) = oneshot::channel();
        assert!(pool.offer(slot, pool.generation(session).unwrap()));
        rx
    }

    #[tokio::test]
    async fn a_group_spreads_visitors_to_the_agent_carrying_fewest() {
        let (gate, pool) = two_agents(4);
        let (a, b) = (1, 2);
        let mut a_parked: Vec<_> = (0..4).map(|_| park(&pool, a)).collect();
        let mut b_parked: Vec<_> = (0..4).map(|_| park(&pool, b)).collect();
        // Four visitors alternate between the agents: each goes to the one carrying fewer.
        let mut carried = Vec::new();
        for _ in 0..4 {
            let (v, c) = admitted(&gate).await;
            assert!(pool.try_take(v).is_ok());
            carried.push(c);
        }
        let got = |parked: &mut Vec<oneshot::Receiver<Visitor>>| {
            parked
                .iter_mut()
                .filter_map(|rx| rx.try_recv().ok())
                .collect::<Vec<_>>()
        };
        let mut on_a = got(&mut a_parked);
        let on_b = got(&mut b_parked);
        assert_eq!((on_a.len(), on_b.len()), (2, 2));
        // Two of a's visitors end: the next two go to a, which now carries fewer.
        on_a.clear();
        for _ in 0..2 {
            let (v, c) = admitted(&gate).await;
            assert!(pool.try_take(v).is_ok());
            carried.push(c);
        }
        assert_eq!(
            got(&mut a_parked).len(),
            2,
            "both went to the agent carrying fewer"
        );
        assert_eq!(got(&mut b_parked).len(), 0);
        drop(on_b);
    }

    #[tokio::test]
    async fn one_agent_of_a_group_leaving_leaves_the_others_serving() {
        let (gate, pool) = two_agents(2);
        let (a, b) = (1, 2);
        let a_gen = pool.generation(a).unwrap();
        let _a_parked = park(&pool, a);
        let mut b_parked = park(&pool, b);
        pool.detach(a);
        assert_eq!(pool.idle_count(), 1, "a's parked connection is dropped");
        let (slot, _rx) = oneshot::channel();
        assert!(
            !pool.offer(slot, a_gen),
            "a's connections are refused once it left"
        );
        // b still serves, and asks for a's share of what waits.
        let (v, _c) = admitted(&gate).await;
        assert!(pool.try_take(v).is_ok());
        assert!(b_parked.try_recv().is_ok());
        assert_eq!(
            pool.claim_tickets(a),
            0,
            "no tickets for an agent that left"
        );
        assert!(pool.claim_tickets(b) > 0);
        // Attaching again is a fresh member; a group is bounded.
        for s in 10..10 + MAX_MEMBERS as u64 {
            pool.attach(s, 1, Arc::new(Notify::new()), Default::default());
        }
        assert_eq!(pool.lock().members.len(), MAX_MEMBERS);
        assert_eq!(pool.generation(a), None);
    }

    #[tokio::test]
    async fn waiting_visitors_are_counted_against_the_agent_that_serves_them() {
        let gate = Gate::new("t", &Default::default(), Default::default());
        let pool = Arc::new(Pool::new());
        let (a, b) = (1, 2);
        let (wake_a, wake_b) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        pool.attach(a, 0, wake_a.clone(), Default::default());
        pool.attach(b, 0, wake_b.clone(), Default::default());
        let p2 = pool.clone();
        let (v, _c) = admitted(&gate).await;
        let waiting = tokio::spawn(async move {
            let (sleep, d) = wait(Duration::from_secs(30));
            p2.take(v, sleep, d).await
        });
        // Both agents are asked for a connection for the waiting visitor.
        wake_a.notified().await;
        wake_b.notified().await;
        assert_eq!((pool.claim_tickets(a), pool.claim_tickets(b)), (1, 1));
        let mut rx = park(&pool, b);
        waiting.await.unwrap().unwrap();
        let v = rx.try_recv().unwrap();
        assert_eq!(pool.lock().members[1].carrying.load(Ordering::Relaxed), 1);
        drop(v);
        assert_eq!(pool.lock().members[1].carrying.load(Ordering::Relaxed), 0);
    }

    /// A pool with a target of 2 and four connections parked (their receiving ends).
    fn pool_with_four_parked() -> (Pool, Vec<oneshot::Receiver<Visitor>>) {
        let pool = Pool::new();
        pool.attach(S, 2, Arc::new(Notify::new()), Default::default());
        let mut parked = Vec::new();
        for _ in 0..4 {
            let (slot, rx) = oneshot::channel();
            assert!(pool.offer(slot, pool.generation(S).unwrap()));
            parked.push(rx);
        }
        (pool, parked)
    }

    #[test]
    fn idle_connections_are_capped_at_twice_the_target() {
        let (pool, _parked) = pool_with_four_parked();
        let (slot, _rx) = oneshot::channel();
        assert!(
            !pool.offer(slot, pool.generation(S).unwrap()),
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
        assert!(pool.offer(slot, pool.generation(S).unwrap()));
        let t1 = t0 + Duration::from_secs(40);
        assert_eq!(pool.trim(t1, after), 0);
        let visitor_took_one = pool.lock().members[0]
            .idle
            .pop_front()
            .map(|(slot, _)| slot);
        drop(visitor_took_one);
        assert_eq!(
            pool.trim(t1 + Duration::from_secs(31), after),
            0,
            "at the target again"
        );
        assert_eq!(pool.idle_count(), 2);
    }
}
