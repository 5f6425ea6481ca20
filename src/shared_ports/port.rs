//! Which shared port a visitor came in on, how its first bytes are read and decided on, and
//! how many visitors one address may have in that state at once.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use super::conn::{read_head, VisitorConn};
use super::route::{Decision, Router};
use super::{http, tls};
use crate::net::cap::ConnCap;
use crate::protocol::sni::{HelloScanner, Sni};

/// Most visitors from one address (an IPv6 /64) that may be between accept and hand-off
/// (sending their head, or waiting for an offline agent) at once on one shared port. Each is
/// bounded in time and size already; this keeps one address from holding thousands of them
/// (slowloris).
pub const MAX_ROUTING_PER_ADDRESS: usize = 64;

/// Most visitors from all addresses being routed at once on one shared port, at most: a
/// slowloris from many addresses stops here, with descriptors left for everyone else.
pub const MAX_ROUTING: usize = 4096;

/// The cap on visitors being routed on one shared port: [`MAX_ROUTING`], or a quarter of
/// the file-descriptor limit if that is lower.
pub fn routing_cap() -> Arc<ConnCap> {
    let by_fds = usize::try_from(crate::net::fds::fd_limit() / 4).unwrap_or(usize::MAX);
    ConnCap::new(MAX_ROUTING.min(by_fds).max(1), MAX_ROUTING_PER_ADDRESS)
}

/// Which shared port a visitor came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The shared HTTP port, routed by `Host` and path.
    Http,
    /// The shared TLS port, routed by SNI.
    Tls,
}

impl Port {
    /// The port's name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Port::Http => "http",
            Port::Tls => "tls",
        }
    }

    /// Reads a visitor's first bytes from `conn` (bounded by the port's size limit, and in
    /// time by `deadline`, which should fire after the port's head timeout), then decides
    /// what happens to the visitor. The same for every runtime.
    pub(crate) async fn read_and_decide(
        self,
        router: &Router,
        conn: &mut impl VisitorConn,
        addr: SocketAddr,
        deadline: impl Future<Output = ()>,
    ) -> Decision {
        match self {
            Port::Http => {
                http::read_and_decide(router, conn, addr, deadline, http::Scheme::Http).await
            }
            Port::Tls => {
                let mut scanner = HelloScanner::new();
                let parse = |b: &[u8]| match scanner.feed(b) {
                    Ok(Sni::NeedMore) => Ok(None),
                    Ok(found) => Ok(Some(found)),
                    Err(e) => Err(e),
                };
                let read = read_head(conn, deadline, parse).await;
                tls::decide(router, read, addr, || conn.local_addr())
            }
        }
    }
}
