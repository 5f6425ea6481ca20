//! The relay's shared public ports, where many services share one port and each visitor is
//! routed by what it says first:
//!
//! - [`port`]: which port a visitor came in on; reading its first bytes and deciding; the
//!   per-address bound on visitors being routed.
//! - [`conn`]: a visitor's socket on either runtime; reading the head under a deadline.
//! - [`route`]: what routing decides ([`route::Decision`]) and what it reads ([`Router`]).
//! - [`http`]: the shared HTTP port, routed by `Host` and path prefix.
//! - [`tls`]: the shared TLS port, routed by SNI, passed through without decrypting.
//! - [`https`]: with `--https`, the TLS port terminates `http` services' hosts itself.
//! - [`reply`]: the short HTTP error pages and clean closes a visitor gets when it cannot
//!   be routed.
//! - [`tokio`]: the ports on the tokio backend; [`uring`]: the same ports on the uring workers.
//!
//! Reading the head runs under a deadline and a size limit, and what to do with the visitor
//! ([`route::Decision`]) is decided the same way on either backend. On tokio one accept loop serves
//! a port; on uring every worker accepts on its own `SO_REUSEPORT` listener and hands routed
//! visitors to its own pool, exactly as for a `tcp` service's port (measured: the shared
//! HTTP port's `Connection: close` rate went from about 0.93× to 1.00× of a `tcp` port's).
//! Once routed, a visitor is handed with the bytes already read to the service's pools, so
//! the rest of the connection takes the same data-plane path as a `tcp` visitor.

pub mod conn;
pub mod http;
pub mod https;
pub mod port;
pub mod reply;
pub mod route;
pub mod tls;
pub mod tokio;
pub mod uring;

pub use port::Port;
pub use route::Router;
