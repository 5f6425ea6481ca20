//! What the agent-facing control plane reads and keeps: settings, the registry, the ticket
//! store, the TLS acceptor and the data plane it hands data connections to.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_rustls::TlsAcceptor;

use super::registry::{Registry, SessionId};
use super::service::Service;
use super::tickets::TicketStore;
use crate::admin::Metrics;
use crate::config::{LiveConfig, RelayConfig, SecretId};
use crate::dataplane::DataPlane;
use crate::net::refusals::RefusalLog;
use crate::net::throttle::{FailureThrottle, PENALTY};

/// Deadline for an agent connection's TLS handshake and first frames, up to its `Register`:
/// short, because every connection in that state holds a place in the unauthenticated cap.
/// A handshake takes two round trips; 5 s covers a congested intercontinental link.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for writing one control frame to an agent.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Relay-to-relay connections kept between handed-over visitors, in all and per address:
/// a sending relay keeps 8 per receiving relay, so these leave room for 32 relays behind
/// one address and a fleet of 512.
pub const MAX_PEER_CONNECTIONS: usize = 4096;
/// See [`MAX_PEER_CONNECTIONS`].
pub const MAX_PEER_CONNECTIONS_PER_ADDRESS: usize = 256;

/// Serves a visitor another relay handed over for an `http` or `tls` service: routed by its
/// request head or ClientHello through this relay's shared ports, to services of the secret
/// `only` alone (the one the hand-over proved). Implemented by the shared ports.
pub trait HostVisitors: Send + Sync {
    /// Takes `stream` (this relay's end of the visitor's bytes) of the visitor at `addr`.
    fn serve(&self, stream: std::net::TcpStream, addr: SocketAddr, only: SecretId);
}

/// What a ticket was issued for.
pub struct Grant {
    /// The session it was issued to; only valid while that session owns the service.
    pub session: SessionId,
    /// The service whose pool the connection joins.
    pub service: Arc<Service>,
    /// Which of the service's pools (data-plane worker) the connection joins.
    pub worker: usize,
}

impl Grant {
    /// The ticket is spent (redeemed or expired): gives its place back to the pool, so the
    /// pool may ask for another, if the session still owns the service. Returns the
    /// session's generation in the pool if it does, for [`crate::dataplane::pool::Pool::offer`]; `None` refuses a
    /// redeemed ticket of an ended session.
    pub fn settle(&self) -> Option<u64> {
        let pool = &self.service.pools[self.worker];
        // Generation first: if the session ends right after the check below, the generation
        // has moved on by the time the connection is offered, and the offer is refused.
        let generation = pool.generation(self.session)?;
        if !self.service.is_owned_by(self.session) {
            return None;
        }
        pool.ticket_done(self.session);
        Some(generation)
    }
}

/// State shared by every control-plane task of one relay.
pub struct ControlPlane {
    /// Settings.
    live: Arc<LiveConfig>,
    /// Services and sessions.
    pub registry: Arc<Registry>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// TLS for control and data connections.
    pub acceptor: TlsAcceptor,
    /// Where visitor bytes are forwarded.
    pub dataplane: DataPlane,
    /// Refusal lines, rate-limited.
    pub refusals: RefusalLog,
    /// Failed attempts per address.
    pub throttle: FailureThrottle,
    tickets: Mutex<TicketStore<Grant>>,
    /// Set once when the relay starts draining: the control port stops accepting.
    drain: tokio::sync::watch::Sender<bool>,
    /// When this process took over from another (an upgrade), if it did.
    took_over_at: Mutex<Option<Instant>>,
    /// The fleet's namespace services are claimed in first, if this relay is in a fleet.
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    /// Relay-to-relay connections that proved a visitor and may wait for the next one.
    pub peers: Arc<crate::net::cap::ConnCap>,
    /// Where handed-over visitors of `http` and `tls` services are routed (the shared
    /// ports), if the relay has them.
    pub hosts: Option<Arc<dyn HostVisitors>>,
}

impl ControlPlane {
    /// A control plane with no ticket outstanding.
    pub fn new(
        live: Arc<LiveConfig>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        acceptor: TlsAcceptor,
        dataplane: DataPlane,
    ) -> Self {
        Self {
            live,
            registry,
            metrics,
            acceptor,
            dataplane,
            refusals: RefusalLog::new("control port"),
            throttle: FailureThrottle::default(),
            tickets: Mutex::new(TicketStore::default()),
            drain: tokio::sync::watch::Sender::new(false),
            took_over_at: Mutex::new(None),
            fleet: None,
            peers: crate::net::cap::ConnCap::new(
                MAX_PEER_CONNECTIONS,
                MAX_PEER_CONNECTIONS_PER_ADDRESS,
            ),
            hosts: None,
        }
    }

    /// The same control plane, routing handed-over visitors of `http` and `tls` services
    /// through `hosts`.
    pub fn serving_hosts(mut self, hosts: Arc<dyn HostVisitors>) -> Self {
        self.hosts = Some(hosts);
        self
    }

    /// The same control plane, claiming services in `fleet` before publishing them.
    pub fn in_fleet(mut self, fleet: Option<Arc<crate::fleet::Fleet>>) -> Self {
        self.fleet = fleet;
        self
    }

    /// The settings in force now (a reload replaces them).
    pub fn cfg(&self) -> Arc<RelayConfig> {
        self.live.get()
    }

    /// This process took over the ports of another at `now` (an upgrade).
    pub fn took_over(&self, now: Instant) {
        *self.took_over_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
    }

    /// Whether an unknown ticket may be one the process this one took over from issued
    /// (until its tickets would have expired).
    pub fn predecessor_tickets_possible(&self, now: Instant) -> bool {
        self.took_over_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| now.saturating_duration_since(t) < super::tickets::TICKET_TTL)
    }

    /// The relay is draining: new agent connections are no longer accepted (sessions and
    /// data connections already open carry on).
    pub fn start_drain(&self) {
        self.drain.send_replace(true);
    }

    /// Changes when [`Self::start_drain`] is called.
    pub fn drain_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.drain.subscribe()
    }

    /// Counts a failed attempt (malformed handshake, wrong secret, bad ticket) from `peer`;
    /// if its address fails too often, waits [`PENALTY`] before the caller answers it.
    pub async fn failed(&self, peer: SocketAddr) {
        if self.throttle.failed(peer.ip(), Instant::now()) {
            self.metrics.failures_throttled.inc();
            tokio::time::sleep(PENALTY).await;
        }
    }

    pub(super) fn tickets(&self) -> MutexGuard<'_, TicketStore<Grant>> {
        self.tickets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the tickets expired at `now`, giving each one's place back to its pool (so the
    /// pool asks for a fresh one).
    pub fn sweep_tickets(&self, now: Instant) {
        let expired = self.tickets().purge(now);
        for g in expired {
            let _ = g.settle();
        }
    }
}
