//! Throttling of failed attempts per address. A wrong secret or an unknown ticket costs the
//! relay a TLS handshake, a MAC check and a log line; an address that fails often is slowed
//! down: its failures are answered only after [`PENALTY`], and it may hold only
//! [`THROTTLED_PER_ADDRESS`] unauthenticated connections. Its successes are never delayed or
//! refused, so an agent that shares a NAT address with an attacker still gets in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::cap::AddrKey;

/// The window failures are counted in.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Failures from one address in one window before it is throttled.
pub const FREE_FAILURES: u32 = 16;

/// How long a throttled address waits for the answer to each failure.
pub const PENALTY: Duration = Duration::from_secs(2);

/// Unauthenticated connections a throttled address may hold at once: with [`PENALTY`], at
/// most this many attempts per penalty.
pub const THROTTLED_PER_ADDRESS: usize = 4;

/// Addresses tracked before expired entries are swept (bounds memory under a spread flood;
/// past twice this, new addresses are not tracked until the sweep frees room).
const SWEEP_AT: usize = 8192;

/// Failures per address, per window.
#[derive(Default)]
pub struct FailureThrottle {
    by_key: Mutex<HashMap<AddrKey, (Instant, u32)>>,
}

impl FailureThrottle {
    /// Whether `ip` failed more than [`FREE_FAILURES`] times in the window ending `now`.
    pub fn is_throttled(&self, ip: IpAddr, now: Instant) -> bool {
        let m = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&AddrKey::of(ip))
            .is_some_and(|(start, n)| now.duration_since(*start) < WINDOW && *n >= FREE_FAILURES)
    }

    /// Counts one failure of `ip` at `now`; returns whether the address is now throttled.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> bool {
        let mut m = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        let key = AddrKey::of(ip);
        if m.len() >= SWEEP_AT && !m.contains_key(&key) {
            m.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        if m.len() >= 2 * SWEEP_AT && !m.contains_key(&key) {
            return false;
        }
        let entry = m.entry(key).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 > FREE_FAILURES
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.by_key.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_past_the_allowance_throttle_until_the_window_ends() {
        let t = FailureThrottle::default();
        let t0 = Instant::now();
        let a: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..FREE_FAILURES {
            assert!(!t.failed(a, t0));
        }
        assert!(!t.is_throttled([10, 0, 0, 2].into(), t0));
        assert!(t.failed(a, t0));
        assert!(t.is_throttled(a, t0 + WINDOW / 2));
        assert!(!t.is_throttled(a, t0 + WINDOW), "a new window forgives");
        assert!(!t.failed(a, t0 + WINDOW));
    }

    #[test]
    fn the_table_stays_bounded() {
        let t = FailureThrottle::default();
        let t0 = Instant::now();
        for i in 0..(3 * SWEEP_AT as u32) {
            t.failed(IpAddr::V4(i.into()), t0);
        }
        assert!(t.tracked() <= 2 * SWEEP_AT);
        t.failed([1, 2, 3, 4].into(), t0 + WINDOW);
        assert!(t.tracked() <= 1);
    }
}
