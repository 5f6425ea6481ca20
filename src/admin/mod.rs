//! Operational visibility: counters the relay keeps and reports in its log.
//!
//! Counters only for now; the JSON/health endpoint builds on [`Metrics::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Connections closed for malformed frames, wrong version or a timeout in the handshake.
    pub bad_connections: Counter,
    /// Data connections accepted into a pool.
    pub data_accepted: Counter,
    /// Data connections refused: unknown, expired or replayed ticket, or plain when TLS is required.
    pub data_rejected: Counter,
    /// Visitors accepted on public ports.
    pub visitors_accepted: Counter,
    /// Visitors closed without a tunnel (agent offline, queue full).
    pub visitors_unserved: Counter,
}

impl Metrics {
    /// All counters as `(name, value)` pairs, in a stable order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("sessions_accepted", self.sessions_accepted.get()),
            ("auth_failures", self.auth_failures.get()),
            ("bad_connections", self.bad_connections.get()),
            ("data_accepted", self.data_accepted.get()),
            ("data_rejected", self.data_rejected.get()),
            ("visitors_accepted", self.visitors_accepted.get()),
            ("visitors_unserved", self.visitors_unserved.get()),
        ]
    }
}
