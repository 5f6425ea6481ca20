//! Heartbeat bookkeeping for one side of a control connection, as a small state machine with
//! time passed in: the caller reports what it sent and heard, and asks what to do next.

use std::time::{Duration, Instant};

/// What the connection owner should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send a heartbeat now (then call [`Liveness::sent`]).
    SendHeartbeat,
    /// The peer has been silent too long: drop the connection.
    PeerDead,
    /// Nothing to do until this instant.
    WaitUntil(Instant),
}

/// Tracks when we last sent and last heard anything on a control connection.
#[derive(Debug, Clone)]
pub struct Liveness {
    interval: Duration,
    timeout: Duration,
    last_sent: Instant,
    last_heard: Instant,
}

impl Liveness {
    /// Starts tracking at `now`: send every `interval`, give up after `timeout` of silence.
    pub fn new(now: Instant, interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            timeout,
            last_sent: now,
            last_heard: now,
        }
    }

    /// Any frame arrived from the peer.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// We sent a frame (any frame counts as a sign of life).
    pub fn sent(&mut self, now: Instant) {
        self.last_sent = now;
    }

    /// What to do at `now`.
    pub fn poll(&self, now: Instant) -> Action {
        let dead_at = self.last_heard + self.timeout;
        if now >= dead_at {
            return Action::PeerDead;
        }
        let send_at = self.last_sent + self.interval;
        if now >= send_at {
            return Action::SendHeartbeat;
        }
        Action::WaitUntil(send_at.min(dead_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_on_interval_and_declares_silence_dead() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = Liveness::new(t0, 10 * s, 30 * s);
        assert_eq!(l.poll(t0), Action::WaitUntil(t0 + 10 * s));
        assert_eq!(l.poll(t0 + 10 * s), Action::SendHeartbeat);
        l.sent(t0 + 10 * s);
        l.heard(t0 + 15 * s);
        assert_eq!(l.poll(t0 + 16 * s), Action::WaitUntil(t0 + 20 * s));
        l.sent(t0 + 20 * s);
        l.sent(t0 + 40 * s);
        assert_eq!(l.poll(t0 + 44 * s), Action::WaitUntil(t0 + 45 * s));
        assert_eq!(l.poll(t0 + 45 * s), Action::PeerDead);
    }
}
