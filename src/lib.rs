//! ringtunnel: expose services behind NAT through a public relay.
//!
//! The **agent** runs next to a service and dials out to the **relay** on a VPS; visitors
//! connect to the relay's public ports and their bytes travel through a pre-opened,
//! authenticated tunnel data connection to the agent, which forwards them to the service.
//!
//! # Layout
//! - [`protocol`] — the wire format, sans-IO: frames, messages, HMAC auth, heartbeat timer.
//! - [`relay`] — the relay: starts and wires every part, owns their tasks, stops them.
//! - [`control`] — the relay's agent-facing control plane: control port, agent sessions,
//!   service registry, routes, tickets.
//! - [`shared_ports`] — the shared HTTP and TLS ports: routing visitors by Host and SNI.
//! - [`access`] — who may visit a service: address lists, HTTP basic auth.
//! - [`acme`] — certificates from an ACME CA for the hosts the relay terminates HTTPS for.
//! - [`agent`] — the agent: control session, data connections, reconnect backoff.
//! - [`dataplane`] — visitor listeners, admission limits, the per-service connection pool,
//!   forwarding.
//! - [`tls`] — rustls configs, the relay's (self-signed) certificate, fingerprint pinning.
//! - [`net`] — binding listeners the same way everywhere; the accept back-off.
//! - [`transport`] — type-erased plain/TLS streams and framed message I/O.
//! - [`config`] — TOML files, merged settings, validation, the masked [`config::Secret`].
//! - [`cli`] — the command line (clap), merged into configs.
//! - [`demo`] — relay + agent + origin on loopback in one process.
//! - [`admin`] — counters, the admin endpoint (`/`, `/health`, `/metrics`, `/api/...`) and
//!   `ringtunnel status`.
//! - [`logging`] — the log's format and filter (reloadable), and access lines.

pub mod access;
pub mod acme;
pub mod admin;
pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod demo;
pub mod fleet;
pub mod logging;
pub mod net;
pub mod protocol;
pub mod relay;
pub mod shared_ports;
pub mod tls;
pub mod transport;

use std::io::Write;

/// Prints one user-facing line (`ready ...`, `online ...`) on stdout and flushes it at once,
/// so scripts and tests reading a pipe see it immediately. These lines are a stable interface.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
