//! Where a forwarder counts a visitor's bytes as they move: its service's byte counters on
//! the relay, nowhere on the agent.

use crate::admin::Sharded;
use crate::dataplane::gate::Admission;

/// One direction's counter, or none. Copied into each direction of a forwarder.
#[derive(Debug, Clone, Copy, Default)]
pub struct Count<'a>(Option<&'a Sharded>);

impl Count<'_> {
    /// `n` more bytes moved this way.
    #[inline]
    pub fn add(self, n: usize) {
        if let Some(c) = self.0 {
            c.add(n as u64);
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
        match admission {
            Some(a) => Tally {
                up: Count(Some(&a.gate.stats().bytes_in)),
                down: Count(Some(&a.gate.stats().bytes_out)),
            },
            None => Tally::default(),
        }
    }

    /// Counts into `up` and `down` (benchmarks: the relay side's cost, without a gate).
    pub fn into(up: &'a Sharded, down: &'a Sharded) -> Self {
        Tally {
            up: Count(Some(up)),
            down: Count(Some(down)),
        }
    }

    /// Counts nothing (the agent's side of a tunnel).
    pub fn none() -> Self {
        Tally::default()
    }
}
