//! The tokio backend: the portable data plane and the yardstick for the uring one. Everything
//! runs on the relay's (or agent's) multi-threaded tokio runtime with ordinary buffered
//! copies.
//!
//! - [`chunked`]: forwarding one visitor over a reusable data connection (chunks, `END`
//!   instead of FIN), following a peer that switched a direction to raw.
//! - [`relay`]: relay-side tasks — a service port's accept loop, parked data connections.
//!
//! The agent's tokio data connection lives with the agent ([`crate::agent::data`]).

pub mod chunked;
pub mod relay;
