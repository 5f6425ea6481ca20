//! Refusal lines that cannot flood the log. A public relay refuses garbage all day, and an
//! attacker can make it refuse thousands of connections a second; one line each would fill
//! the disk and bury what matters. The first few refusals of every interval are logged as
//! they happen; the rest are counted by reason and logged as one summary line when the
//! interval ends.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::cap::AddrKey;

/// How long one interval lasts.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Refusals logged one by one in each interval before the rest are only counted.
pub const LINES_PER_INTERVAL: u32 = 5;

/// Distinct addresses remembered per interval for the summary (bounds its memory).
const MAX_ADDRESSES: usize = 4096;

struct Window {
    start: Instant,
    logged: u32,
    /// Refusals not logged one by one, by reason.
    held: BTreeMap<&'static str, u64>,
    addresses: HashSet<AddrKey>,
}

/// Rate-limited refusal logging for one listener (`what` names it in the summary).
pub struct RefusalLog {
    what: &'static str,
    window: Mutex<Window>,
}

impl RefusalLog {
    /// An empty log for the listener named `what`.
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            window: Mutex::new(Window {
                start: Instant::now(),
                logged: 0,
                held: BTreeMap::new(),
                addresses: HashSet::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one refusal of `peer` for `reason` (a short fixed phrase, the summary's key)
    /// with `detail`: logged as a warning if few were this interval, else counted.
    pub fn note(&self, peer: SocketAddr, reason: &'static str, detail: &str) {
        self.note_at(Instant::now(), peer, reason, detail)
    }

    fn note_at(&self, now: Instant, peer: SocketAddr, reason: &'static str, detail: &str) {
        let mut w = self.lock();
        self.roll(&mut w, now);
        if w.logged < LINES_PER_INTERVAL {
            w.logged += 1;
            drop(w);
            tracing::warn!(%peer, "{reason}: {detail}");
            return;
        }
        *w.held.entry(reason).or_insert(0) += 1;
        if w.addresses.len() < MAX_ADDRESSES {
            w.addresses.insert(AddrKey::of(peer.ip()));
        }
    }

    /// Logs the summary of an interval that has ended by `now`, if it held anything. Called
    /// by the relay's sweeper, so a flood that stopped is still reported.
    pub fn flush(&self, now: Instant) {
        let mut w = self.lock();
        self.roll(&mut w, now);
    }

    /// Ends the interval if it is over: logs its summary and starts a new one.
    fn roll(&self, w: &mut Window, now: Instant) {
        if now.duration_since(w.start) < INTERVAL {
            return;
        }
        if let Some(line) = summary(self.what, w) {
            tracing::warn!("{line}");
        }
        w.start = now;
        w.logged = 0;
        w.held.clear();
        w.addresses.clear();
    }

    /// Refusals counted but not logged in the current interval.
    pub fn held(&self) -> u64 {
        self.lock().held.values().sum()
    }
}

fn summary(what: &str, w: &Window) -> Option<String> {
    let total: u64 = w.held.values().sum();
    if total == 0 {
        return None;
    }
    let reasons: Vec<String> = w.held.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    let many = if w.addresses.len() >= MAX_ADDRESSES {
        "at least "
    } else {
        ""
    };
    Some(format!(
        "{what}: {total} more refusals in the last {}s, not logged one by one ({}; from {many}{} addresses)",
        INTERVAL.as_secs(),
        reasons.join(", "),
        w.addresses.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_becomes_a_few_lines_and_one_summary() {
        let log = RefusalLog::new("control port");
        let t0 = Instant::now();
        let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        for i in 0..1000u32 {
            let reason = if i % 2 == 0 {
                "wrong secret"
            } else {
                "bad ticket"
            };
            log.note_at(t0, peer, reason, "detail");
        }
        assert_eq!(log.held(), 1000 - u64::from(LINES_PER_INTERVAL));
        let w = log.lock();
        let line = summary("control port", &w).unwrap();
        assert!(line.contains("995 more refusals"), "{line}");
        assert!(
            line.contains("bad ticket: 498, wrong secret: 497"),
            "{line}"
        );
        assert!(line.contains("from 1 addresses"), "{line}");
        drop(w);
        log.flush(t0 + INTERVAL);
        assert_eq!(log.held(), 0, "the next interval starts empty");
    }
}
