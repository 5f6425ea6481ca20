//! Exponential backoff with jitter for reconnecting to the relay: never a hot loop, never
//! longer than the cap, and many agents restarted together do not retry in lockstep.

use std::time::Duration;

use crate::protocol::auth::random_bytes;

/// Delay sequence `base, 2·base, 4·base, … ≤ cap`, each scaled by a random factor in [0.5, 1].
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// Back to `base` (after a connection that worked for a while).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = exp.min(self.cap);
        let mut r = [0u8; 2];
        random_bytes(&mut r);
        let frac = 0.5 + f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX) / 2.0;
        ceiling.mul_f64(frac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_jitters_and_caps() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        let mut b = Backoff::new(base, cap);
        let mut ceiling = base;
        for _ in 0..40 {
            let d = b.next_delay();
            assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
            ceiling = (ceiling * 2).min(cap);
        }
        b.reset();
        assert!(b.next_delay() <= base);
    }
}
