//! What forwarding one visitor over a data connection ends with, on either backend: the bytes
//! moved and whether the connection can carry another, or which end failed.
//!
//! The side matters to whoever holds the other end: a relay whose data connection failed in
//! the middle of a visitor must not let the visitor take the end for a clean close, and an
//! agent whose relay vanished must not let its local service take it for one either.

use std::fmt;
use std::io;

/// One visitor forwarded to its end.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Bytes from the peer (visitor or local service) into the tunnel.
    pub up: u64,
    /// Bytes from the tunnel to the peer.
    pub down: u64,
    /// Both directions ended with `END`: the connection may carry another visitor.
    pub reusable: bool,
    /// Tunnel bytes read after the `END` (on the agent: the start of the next `Start`).
    pub leftover: Vec<u8>,
}

/// An end of a forwarded pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The visitor (on the relay) or the local service (on the agent).
    Peer,
    /// The data connection between relay and agent.
    Tunnel,
    /// The agent's local service, which the agent said it could not reach
    /// ([`crate::protocol::chunk::UNREACHABLE`]): the tunnel itself is fine.
    Origin,
}

impl Side {
    /// The end across the forwarder from this one (the origin lies behind the tunnel).
    pub fn other(self) -> Side {
        match self {
            Side::Peer => Side::Tunnel,
            Side::Tunnel | Side::Origin => Side::Peer,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Peer => "peer",
            Side::Tunnel => "data connection",
            Side::Origin => "local service",
        })
    }
}

/// Why forwarding one visitor failed: the end whose read or write failed (or that broke the
/// framing), and whether the visitor may still be handed to another data connection.
#[derive(Debug, thiserror::Error)]
#[error("{side}: {source}")]
pub struct ForwardError {
    /// The end that failed first; what the other end saw after it is a consequence.
    pub side: Side,
    /// What failed.
    #[source]
    pub source: io::Error,
    /// The tunnel failed before a byte of this visitor moved either way past what the caller
    /// still holds (the `Start` frame): another data connection may serve it.
    pub retry: bool,
}

impl ForwardError {
    /// A failure of `side`, not (yet) known to be retryable.
    pub fn new(side: Side, source: io::Error) -> Self {
        Self {
            side,
            source,
            retry: false,
        }
    }

    /// A failure of the peer's socket.
    pub fn peer(source: io::Error) -> Self {
        Self::new(Side::Peer, source)
    }

    /// A failure of the data connection (I/O, or framing it broke).
    pub fn tunnel(source: io::Error) -> Self {
        Self::new(Side::Tunnel, source)
    }

    /// What the tunnel's chunks said was wrong: the agent's word that its local service is
    /// unreachable (the origin's fault), or a broken frame (the tunnel's).
    pub fn from_chunk(e: crate::protocol::chunk::BadChunk) -> Self {
        let side = match e.origin_unreachable() {
            true => Side::Origin,
            false => Side::Tunnel,
        };
        Self::new(side, io::Error::other(e))
    }

    /// The agent could not reach its local service: nothing of the visitor's was answered,
    /// so an HTTP visitor can be told so (502).
    pub fn origin_unreachable(&self) -> bool {
        self.side == Side::Origin
    }

    /// The tunnel failed mid-visitor: the peer must see an error (a reset), not a clean end.
    pub fn tunnel_lost(&self) -> bool {
        self.side == Side::Tunnel
    }

    /// Marks a tunnel failure as retryable when nothing moved yet (`up` and `down` are the
    /// bytes moved so far).
    pub fn with_progress(mut self, up: u64, down: u64) -> Self {
        self.retry = self.side == Side::Tunnel && up == 0 && down == 0;
        self
    }
}

/// Longest time spent writing a visitor its 502 page.
pub const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What a visitor whose agent could not reach its local service hears: a 502 page if it is
/// an HTTP visitor (`http`), else nothing (the caller resets it). Counted, and logged at most
/// once a second per service.
pub fn origin_unreachable(
    service: &str,
    visitor: std::net::SocketAddr,
    http: bool,
    admission: &Option<crate::dataplane::gate::Admission>,
) -> Option<Vec<u8>> {
    if let Some(a) = admission {
        a.end_as(crate::dataplane::gate::End::OriginUnreachable);
        a.gate.metrics().origin_unreachable.inc();
        a.gate.stats().origin_unreachable.inc();
        if a.gate.may_log(std::time::Instant::now()) {
            tracing::warn!(service, %visitor, "visitor turned away: the agent could not reach its local service");
        }
    }
    use crate::protocol::http::page::Page;
    http.then(|| {
        Page::OriginUnreachable.response(&format!("the local service of {service} is unreachable"))
    })
}

/// [`Result`] of forwarding.
pub type Forwarded<T> = Result<T, ForwardError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_untouched_tunnel_failure_is_retryable() {
        let e = || io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(ForwardError::tunnel(e()).with_progress(0, 0).retry);
        assert!(!ForwardError::tunnel(e()).with_progress(1, 0).retry);
        assert!(!ForwardError::tunnel(e()).with_progress(0, 7).retry);
        assert!(!ForwardError::peer(e()).with_progress(0, 0).retry);
        let lost = ForwardError::tunnel(e());
        assert!(lost.tunnel_lost());
        assert_eq!(lost.to_string(), "data connection: connection reset");
        assert!(!ForwardError::peer(e()).tunnel_lost());
        use crate::protocol::chunk::{BadChunk, UNREACHABLE};
        let down = ForwardError::from_chunk(BadChunk(UNREACHABLE));
        assert!(down.origin_unreachable() && !down.tunnel_lost());
        assert_eq!(
            down.to_string(),
            "local service: the agent could not reach its local service"
        );
        assert!(ForwardError::from_chunk(BadChunk(0x7f00_0000)).tunnel_lost());
    }
}
