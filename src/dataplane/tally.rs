//! Where a forwarder counts a visitor's bytes as they move: on the relay, into the visitor's
//! admission (its service's byte counters, and its own for its access line while access lines
//! are on); nowhere on the agent.

use crate::dataplane::gate::Admission;

/// One direction's counting (`UP`: toward the service), or none. One pointer, copied into
/// each part of a forwarder that moves bytes: it sits in every connection task, whose size
/// is watched.
#[derive(Debug, Clone, Copy, Default)]
pub struct Count<'a, const UP: bool>(Option<&'a Admission>);

impl<const UP: bool> Count<'_, UP> {
    /// `n` more bytes moved this way.
    #[inline]
    pub fn add(self, n: usize) {
        if let Some(a) = self.0 {
            a.count_bytes(UP, n as u64);
        }
    }
}

/// Both directions of one visitor: `up` toward the service, `down` toward the visitor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally<'a> {
    /// Visitor → service.
    pub up: Count<'a, true>,
    /// Service → visitor.
    pub down: Count<'a, false>,
}

impl<'a> Tally<'a> {
    /// Counts into the visitor `admission` let in (nothing without one).
    pub fn of(admission: &'a Option<Admission>) -> Self {
        Self::admitted(admission.as_ref())
    }

    /// Counts into `admission`, if any.
    pub fn admitted(admission: Option<&'a Admission>) -> Self {
        Tally {
            up: Count(admission),
            down: Count(admission),
        }
    }

    /// The admission counted into, if any (a forwarder that tells the directions apart at
    /// run time).
    pub fn admission(self) -> Option<&'a Admission> {
        self.up.0
    }

    /// Counts nothing (the agent's side of a tunnel).
    pub fn none() -> Self {
        Tally::default()
    }
}
