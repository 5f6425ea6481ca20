//! The wire format, sans-IO: plain data types and a codec that turns bytes into frames and
//! frames into bytes. Nothing here touches a socket, a runtime or a clock; time, where it
//! matters, is a parameter. See `docs/PROTOCOL.md` for the frame table.
//!
//! - [`frame`]: length-prefixed framing with a hard [`frame::MAX_FRAME_LEN`].
//! - [`msg`]: one message enum per direction, [`AgentMsg`] and [`RelayMsg`].
//! - [`auth`]: HMAC-SHA256 challenge–response and ticket types.
//! - [`chunk`]: chunked visitor bytes on a data connection, so connections can be reused.
//! - [`datagram`]: a `udp` service's datagrams, many flows on one data connection.
//! - [`lifecycle`]: one data connection's life on each side (park, `Start`, forward,
//!   `READY`), the state machines both backends drive.
//! - [`liveness`]: the heartbeat state machine both ends run on the control connection.
//! - [`http`]: HTTP/1.x request heads, for routing shared HTTP ports by host and path.
//! - [`sni`]: the server name in a TLS ClientHello, for routing shared TLS ports.
//! - [`proxy`]: PROXY protocol v1/v2 headers that tell an origin who the visitor is.
//! - [`http_proxy`]: reaching the relay through an HTTP proxy (`CONNECT`).

pub mod auth;
pub mod chunk;
pub mod datagram;
pub mod frame;
pub mod http;
pub mod http_proxy;
pub mod lifecycle;
pub mod liveness;
pub mod msg;
pub mod proxy;
pub mod sni;
mod wire;

pub use frame::{decode, encode, Decoded, MAX_FRAME_LEN};
pub use msg::{
    AgentMsg, ErrorCode, RelayMsg, ServiceKind, ServiceOutcome, ServiceRequest, ServiceResult,
};

/// The ALPN protocol an agent offers on every TLS connection to the relay. On the relay's
/// shared TLS port (443) it tells an agent's connection from a visitor's, so a relay can
/// take agents there and expose only ports 80 and 443; the control port ignores it.
pub const AGENT_ALPN: &[u8] = b"ringtunnel";

/// The protocol version this build speaks. Carried in the first frame of every connection, so
/// a peer from another version gets a clear error instead of misparsed bytes.
pub const PROTOCOL_VERSION: u16 = 5;

/// The oldest agent version a relay still serves: version 3 differs only in that its agents
/// do not answer `Start` with [`chunk::STARTED`], so the relay does not wait for it on their
/// data connections.
pub const OLDEST_AGENT_VERSION: u16 = 3;

/// Whether a relay serves an agent that speaks `version`.
pub fn relay_serves(version: u16) -> bool {
    (OLDEST_AGENT_VERSION..=PROTOCOL_VERSION).contains(&version)
}

/// Whether an agent of `version` answers each `Start` with [`chunk::STARTED`].
pub fn answers_start(version: u16) -> bool {
    version >= 4
}

/// Everything that can be wrong with bytes received from a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The length prefix announces a frame larger than [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Announced body length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// A frame with a zero-length body (no message type).
    #[error("empty frame")]
    EmptyFrame,
    /// The message type byte is not one this version knows.
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// The body ended before the message did.
    #[error("truncated {0} message")]
    Truncated(&'static str),
    /// The body had bytes left over after the message.
    #[error("{0} message has trailing bytes")]
    TrailingBytes(&'static str),
    /// A field held a value outside its domain.
    #[error("invalid {field} in {msg} message")]
    InvalidField {
        /// Message name.
        msg: &'static str,
        /// Field name.
        field: &'static str,
    },
}
