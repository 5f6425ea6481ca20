//! Which shared port a visitor came in on, how its first bytes are read and decided on, and
//! how many visitors one address may have in that state at once.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use super::conn::{read_head, VisitorConn};
use super::route::{Decision, Router};
use super::{http, tls};
use crate::protocol::http::HeadScanner;
use crate::protocol::sni::{HelloScanner, Sni};

/// Most visitors from one address that may be between accept and hand-off (sending their
/// head, or waiting for an offline agent) at once on one shared port. Each is bounded in time
/// and size already; this keeps one address from holding thousands of them (slowloris).
pub const MAX_PENDING_PER_IP: u32 = 64;

/// Visitors per address still being routed on one shared port.
#[derive(Default)]
pub struct Pending {
    by_ip: Mutex<HashMap<IpAddr, u32>>,
}

/// One visitor's place in [`Pending`]; dropping it frees the place.
pub struct PendingGuard {
    pending: Arc<Pending>,
    ip: IpAddr,
}

impl Pending {
    /// Takes a place for a visitor from `ip`, or `None` if that address has
    /// [`MAX_PENDING_PER_IP`] visitors being routed already.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<PendingGuard> {
        let mut m = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_PENDING_PER_IP {
            return None;
        }
        *n += 1;
        Some(PendingGuard {
            pending: self.clone(),
            ip,
        })
    }

    /// Addresses with visitors being routed right now.
    pub fn addresses(&self) -> usize {
        self.by_ip.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut m = self.pending.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
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
                let mut scanner = HeadScanner::new(router.cfg.max_head);
                let read = read_head(conn, deadline, |b| scanner.feed(b)).await;
                http::decide(router, read, addr)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_places_are_per_address_and_released() {
        let p = Arc::new(Pending::default());
        let a: IpAddr = [10, 0, 0, 1].into();
        let held: Vec<_> = (0..MAX_PENDING_PER_IP)
            .map(|_| p.enter(a).unwrap())
            .collect();
        assert!(p.enter(a).is_none());
        let other = p.enter([10, 0, 0, 2].into()).unwrap();
        drop(held);
        drop(other);
        assert_eq!(p.addresses(), 0, "no entry outlives its visitors");
        assert!(p.enter(a).is_some());
    }
}
