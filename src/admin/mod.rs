//! Operational visibility: counters the relay keeps, reports in its log when it stops, and
//! serves on the admin endpoint ([`http`]: `/health`, `/metrics`, `/api/...`), and the
//! client that prints them ([`status`]: `ringtunnel status`).

pub mod http;
mod sharded;
pub mod status;

pub use sharded::Sharded;

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Declares a struct of counters (each a [`Counter`] unless another type with `get()` is
/// named) and its `snapshot()`: every counter as `(name, help, value)` in declaration order, the help being the field's documentation (served as the
/// Prometheus `# HELP` line), so names, docs and the exported list cannot drift apart.
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[doc = $doc:literal])* pub $field:ident $(: $ty:ty)?, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: counters!(@type $($ty)?), )*
        }

        impl $name {
            /// Every counter as `(name, help, value)`, in a stable order.
            pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$( (stringify!($field), concat!($($doc),*), self.$field.get()) ),*]
            }
        }
    };
    (@type) => { Counter };
    (@type $ty:ty) => { $ty };
}

counters! {
    /// Relay-wide counters. Everything refused or dropped is counted, so an operator can tell an
    /// attack or a misconfigured agent from a quiet day.
    #[derive(Debug, Default)]
    pub struct Metrics {
        /// Agent control sessions authenticated.
        pub sessions_accepted,
        /// Control connections that failed authentication (wrong secret).
        pub auth_failures,
        /// Agents refused because their secret had its maximum of agents connected.
        pub agents_over_limit,
        /// Connections closed for malformed frames, wrong version or a timeout in the handshake.
        pub bad_connections,
        /// Data connections accepted into a pool.
        pub data_accepted,
        /// Data connections parked again after carrying a visitor (each one a TCP, and with data
        /// TLS a TLS, handshake saved).
        pub data_reused,
        /// Data connections refused: unknown, expired or replayed ticket, or plain when TLS is required.
        pub data_rejected,
        /// Idle data connections closed because their pool held more than it needs for 30 s
        /// (what a burst left behind).
        pub data_trimmed,
        /// Data connections that gave no answer to `Start` within 5 s, or ended first (a link
        /// cut without a reset): closed, and their visitor handed to another connection.
        pub data_unanswered,
        /// Visitors accepted on public ports.
        pub visitors_accepted,
        /// Visitors closed without a tunnel (agent offline, queue full).
        pub visitors_unserved,
        /// Visitors refused because their service had its maximum connected.
        pub visitors_over_limit,
        /// Visitors refused for opening connections too fast from one address.
        pub visitors_rate_limited,
        /// Visitors refused because the operator is draining their service.
        pub visitors_draining,
        /// Visitors refused by their service's address lists (`[access]` allow/deny).
        pub visitors_denied,
        /// Shared HTTP port: requests answered 401 (no or wrong password), 429 (an address
        /// that failed too often) or 503 (too many password checks waiting) by basic auth.
        pub http_unauthorized,
        /// Visitors closed by their service's idle timeout.
        pub visitors_idle_closed,
        /// Visitors reset because their data connection failed mid-stream (agent gone, link cut,
        /// broken framing): an RST, so no client takes the truncated stream for a whole one.
        pub visitors_cut,
        /// Visitors moved to another data connection because theirs did not answer `Start`
        /// (nothing had been answered to them yet, so they never notice but for the wait).
        pub visitors_retried,
        /// Visitors turned away because their agent could not reach its local service (HTTP
        /// visitors get a 502, others a reset).
        pub origin_unreachable,
        /// Shared HTTP port: requests answered 400, 408 or 431 (malformed, too slow, too large).
        pub http_bad_requests,
        /// Shared HTTP port: requests for a host (and path) no service claims (404).
        pub http_unknown_host,
        /// Shared HTTP port: requests whose service stayed offline (502).
        pub http_agent_offline,
        /// Shared TLS port: connections without SNI, with an unknown one, or not TLS at all.
        pub tls_unroutable,
        /// Shared TLS port with `--https`: visitors whose TLS the relay terminated (handshake
        /// done) for an `http` service.
        pub https_terminated,
        /// Shared TLS port with `--https`: visitors closed because their host had no
        /// certificate in time (first issuance pending or failing), their handshake failed,
        /// or too many were being terminated.
        pub https_refused,
        /// Fleet: visitors another relay handed over to this one.
        pub handovers_received,
        /// Fleet: relay-to-relay connections another relay opened to hand visitors over (each
        /// carries one visitor after another).
        pub peer_connections,
        /// Certificates issued or renewed by the ACME CA.
        pub acme_issued,
        /// Issuance attempts that failed (each host then backs off).
        pub acme_failed,
        /// Shared ports: visitors closed at once because their address had too many still being
        /// routed.
        pub visitors_shed,
        /// Control port: connections closed at accept because too many from their address (or
        /// from all addresses) had not authenticated yet.
        pub unauthenticated_shed,
        /// Control port: failed attempts (wrong secret, unknown ticket) answered late because
        /// their address failed too often.
        pub failures_throttled,
        /// `udp` services: datagrams dropped at the relay (no channel to the agent, a flow
        /// refused by limits or address lists, a channel's queue full).
        pub udp_dropped,
        /// Tickets not issued because a session, a secret or the whole relay had its quota out.
        pub tickets_withheld,
    }
}

counters! {
    /// What happened to one service's visitors since the relay published it (the counts survive
    /// its agent reconnecting). Counts are written once per visitor event (admitted, refused,
    /// ended); bytes as they move, each thread into its own shard ([`Sharded`]), so no cache
    /// line is written by every worker on the hot path.
    #[derive(Debug, Default)]
    pub struct ServiceStats {
        /// Visitors let in.
        pub visitors,
        /// Bytes from visitors to the service, counted as they move (a rewritten HTTP request
        /// head counts as the visitor sent it; a PROXY header does not count).
        pub bytes_in: Sharded,
        /// Bytes from the service to visitors, counted as they move.
        pub bytes_out: Sharded,
        /// Visitors refused: the service had its maximum connected.
        pub refused_full,
        /// Visitors refused: their address opened connections too fast.
        pub refused_rate,
        /// Visitors refused: the operator is draining the service.
        pub refused_draining,
        /// Visitors refused by the service's address lists.
        pub refused_denied,
        /// HTTP requests refused by basic auth (401, 429, or 503 with checks queued).
        pub refused_login,
        /// Visitors closed without a tunnel (agent offline past the wait, queue full).
        pub unserved,
        /// Visitors reset because their tunnel failed mid-stream.
        pub cut,
        /// Visitors closed by the idle timeout.
        pub idle_closed,
        /// Visitors turned away because the agent could not reach its local service.
        pub origin_unreachable,
    }
}

/// One service as the admin endpoint reports it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ServiceSnapshot {
    /// Name.
    pub name: String,
    /// Kind: `tcp`, `http` or `tls`.
    pub kind: String,
    /// `tcp`: its public port; `http`/`tls`: the shared port.
    pub port: u16,
    /// `http`/`tls`: the host names it claims.
    pub hosts: Vec<String>,
    /// `http`: the path prefix it claims (empty: the whole host).
    pub path: String,
    /// Whether an agent session owns it now (false while it lingers).
    pub online: bool,
    /// Whether the operator is draining it (new visitors refused).
    #[serde(default)]
    pub draining: bool,
    /// The owning agent's address as the relay saw it, while online.
    pub agent: Option<String>,
    /// Since when (Unix seconds) the owning agent has held it, while online.
    pub connected_since: Option<u64>,
    /// The group its agents joined as, if they did (`--group`).
    #[serde(default)]
    pub group: Option<String>,
    /// How many agent sessions serve it now (more than one only for a group; `agent` is
    /// the first of them).
    #[serde(default)]
    pub agents: usize,
    /// Visitors connected right now.
    pub visitors_now: usize,
    /// Data connections parked, waiting for a visitor (all of the service's pools).
    pub idle_connections: usize,
    /// [`ServiceStats`] by name.
    pub counts: std::collections::BTreeMap<String, u64>,
}

/// One connected agent (control session) as the admin endpoint reports it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AgentSnapshot {
    /// The session's number, as in the relay's log lines (`session=`).
    pub session: u64,
    /// The agent's address as the relay saw it.
    pub address: String,
    /// When (Unix seconds) it authenticated.
    pub connected_since: u64,
    /// The services it owns now.
    pub services: Vec<String>,
}
