//! Operational visibility: counters the relay keeps, reports in its log when it stops, and
//! serves on the admin endpoint ([`http`]: `/health`, `/metrics`).

pub mod http;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::ServiceKind;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Relay-wide counters. Everything refused or dropped is counted, so an operator can tell an
/// attack or a misconfigured agent from a quiet day.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Agent control sessions authenticated.
    pub sessions_accepted: Counter,
    /// Control connections that failed authentication (wrong secret).
    pub auth_failures: Counter,
    /// Agents refused because their secret had its maximum of agents connected.
    pub agents_over_limit: Counter,
    /// Connections closed for malformed frames, wrong version or a timeout in the handshake.
    pub bad_connections: Counter,
    /// Data connections accepted into a pool.
    pub data_accepted: Counter,
    /// Data connections parked again after carrying a visitor (each one a TCP, and with data
    /// TLS a TLS, handshake saved).
    pub data_reused: Counter,
    /// Data connections refused: unknown, expired or replayed ticket, or plain when TLS is required.
    pub data_rejected: Counter,
    /// Visitors accepted on public ports.
    pub visitors_accepted: Counter,
    /// Visitors closed without a tunnel (agent offline, queue full).
    pub visitors_unserved: Counter,
    /// Visitors refused because their service had its maximum connected.
    pub visitors_over_limit: Counter,
    /// Visitors refused for opening connections too fast from one address.
    pub visitors_rate_limited: Counter,
    /// Visitors closed by their service's idle timeout.
    pub visitors_idle_closed: Counter,
    /// Visitors reset because their data connection failed mid-stream (agent gone, link cut,
    /// broken framing): an RST, so no client takes the truncated stream for a whole one.
    pub visitors_cut: Counter,
    /// Visitors turned away because their agent could not reach its local service (HTTP
    /// visitors get a 502, others a reset).
    pub origin_unreachable: Counter,
    /// Shared HTTP port: requests answered 400, 408 or 431 (malformed, too slow, too large).
    pub http_bad_requests: Counter,
    /// Shared HTTP port: requests for a host (and path) no service claims (404).
    pub http_unknown_host: Counter,
    /// Shared HTTP port: requests whose service stayed offline (502).
    pub http_agent_offline: Counter,
    /// Shared TLS port: connections without SNI, with an unknown one, or not TLS at all.
    pub tls_unroutable: Counter,
    /// Shared ports: visitors closed at once because their address had too many still being
    /// routed.
    pub visitors_shed: Counter,
    /// Control port: connections closed at accept because too many from their address (or
    /// from all addresses) had not authenticated yet.
    pub unauthenticated_shed: Counter,
    /// Control port: failed attempts (wrong secret, unknown ticket) answered late because
    /// their address failed too often.
    pub failures_throttled: Counter,
    /// Tickets not issued because a session, a secret or the whole relay had its quota out.
    pub tickets_withheld: Counter,
}

impl Metrics {
    /// All counters as `(name, value)` pairs, in a stable order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("sessions_accepted", self.sessions_accepted.get()),
            ("auth_failures", self.auth_failures.get()),
            ("agents_over_limit", self.agents_over_limit.get()),
            ("bad_connections", self.bad_connections.get()),
            ("data_accepted", self.data_accepted.get()),
            ("data_reused", self.data_reused.get()),
            ("data_rejected", self.data_rejected.get()),
            ("visitors_accepted", self.visitors_accepted.get()),
            ("visitors_unserved", self.visitors_unserved.get()),
            ("visitors_over_limit", self.visitors_over_limit.get()),
            ("visitors_rate_limited", self.visitors_rate_limited.get()),
            ("visitors_idle_closed", self.visitors_idle_closed.get()),
            ("visitors_cut", self.visitors_cut.get()),
            ("origin_unreachable", self.origin_unreachable.get()),
            ("http_bad_requests", self.http_bad_requests.get()),
            ("http_unknown_host", self.http_unknown_host.get()),
            ("http_agent_offline", self.http_agent_offline.get()),
            ("tls_unroutable", self.tls_unroutable.get()),
            ("visitors_shed", self.visitors_shed.get()),
            ("unauthenticated_shed", self.unauthenticated_shed.get()),
            ("failures_throttled", self.failures_throttled.get()),
            ("tickets_withheld", self.tickets_withheld.get()),
        ]
    }
}

/// One service as the admin endpoint reports it.
#[derive(Debug, Clone)]
pub struct ServiceSnapshot {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: ServiceKind,
    /// Whether an agent session owns it now (false while it lingers).
    pub online: bool,
    /// Visitors connected right now.
    pub visitors: usize,
    /// Data connections parked, waiting for a visitor (all of the service's pools).
    pub idle_connections: usize,
}
