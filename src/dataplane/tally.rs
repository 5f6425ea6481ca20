//! Where a forwarder counts a visitor's bytes as they move: on the relay, its service's byte
//! counters (and the visitor's own, for its access line, while access lines are on);
//! nowhere on the agent.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::admin::Sharded;
use crate::dataplane::gate::Admission;

/// One direction's counters, or none. Copied into each direction of a forwarder.
#[derive(Debug, Clone, Copy, Default)]
pub struct Count<'a> {
    service: Option<&'a Sharded>,
    visitor: Option<&'a AtomicU64>,
}

impl Count<'_> {
    /// `n` more bytes moved this way.
    #[inline]
    pub fn add(self, n: usize) {
        if let Some(c) = self.service {
            c.add(n as u64);
        }
        if let Some(c) = self.visitor {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Both directions of one visitor: `up` toward the service, `down` toward the visitor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally<'a> {
    /// Visitor → service.
    pub up: Count<'a>,
    /// Service → visitor.
    pub down: Count<'a>,
}

impl<'a> Tally<'a> {
    /// Counts into the service of the visitor `admission` let in (nothing without one).
    pub fn of(admission: &'a Option<Admission>) -> Self {
        let Some(a) = admission else {
            return Tally::default();
        };
        let own = a.bytes();
        Tally {
            up: Count {
                service: Some(&a.gate.stats().bytes_in),
                visitor: own.map(|b| &b[0]),
            },
            down: Count {
                service: Some(&a.gate.stats().bytes_out),
                visitor: own.map(|b| &b[1]),
            },
        }
    }

    /// Counts into `up` and `down` (benchmarks: the relay side's cost, without a gate).
    pub fn into(up: &'a Sharded, down: &'a Sharded) -> Self {
        let count = |c| Count {
            service: Some(c),
            visitor: None,
        };
        Tally {
            up: count(up),
            down: count(down),
        }
    }

    /// Counts nothing (the agent's side of a tunnel).
    pub fn none() -> Self {
        Tally::default()
    }
}
