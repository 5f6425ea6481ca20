//! Single-use, short-lived data-connection tickets, with time as a parameter.
//!
//! A ticket is 128 random bits handed to an authenticated agent over its control connection.
//! Redeeming removes it, so a replayed ticket is unknown; an unredeemed one expires.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::protocol::auth::{new_ticket, Ticket};

/// How long a ticket stays valid after it is issued. Agents dial at once, so this only has
/// to cover a slow TLS handshake on a bad link.
pub const TICKET_TTL: Duration = Duration::from_secs(30);

/// Most tickets outstanding across the relay; bounds memory whatever agents do.
pub const MAX_TICKETS: usize = 1 << 16;

/// What redeeming a ticket found.
#[derive(Debug, PartialEq, Eq)]
pub enum Redeemed<T> {
    /// Valid: the grant it was issued for.
    Valid(T),
    /// Known but too old; the grant is returned so its bookkeeping can be undone.
    Expired(T),
    /// Never issued, or already used.
    Unknown,
}

/// Outstanding tickets, each mapped to the grant `T` it was issued for.
#[derive(Debug)]
pub struct TicketStore<T> {
    live: HashMap<Ticket, (Instant, T)>,
    ttl: Duration,
}

impl<T> Default for TicketStore<T> {
    fn default() -> Self {
        Self::new(TICKET_TTL)
    }
}

impl<T> TicketStore<T> {
    /// An empty store whose tickets live for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            live: HashMap::new(),
            ttl,
        }
    }

    /// Issues a fresh ticket for `grant`, or gives the grant back if the store is full.
    pub fn issue(&mut self, now: Instant, grant: T) -> Result<Ticket, T> {
        if self.live.len() >= MAX_TICKETS {
            return Err(grant);
        }
        let ticket = new_ticket();
        self.live.insert(ticket, (now + self.ttl, grant));
        Ok(ticket)
    }

    /// Redeems `ticket` (once).
    pub fn redeem(&mut self, now: Instant, ticket: &Ticket) -> Redeemed<T> {
        match self.live.remove(ticket) {
            Some((expiry, grant)) if now < expiry => Redeemed::Valid(grant),
            Some((_, grant)) => Redeemed::Expired(grant),
            None => Redeemed::Unknown,
        }
    }

    /// Removes and returns the grants of every ticket expired at `now`.
    pub fn purge(&mut self, now: Instant) -> Vec<T> {
        let expired: Vec<Ticket> = self
            .live
            .iter()
            .filter(|(_, (expiry, _))| now >= *expiry)
            .map(|(t, _)| *t)
            .collect();
        expired
            .iter()
            .filter_map(|t| self.live.remove(t).map(|(_, g)| g))
            .collect()
    }

    /// Tickets outstanding.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether no ticket is outstanding.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use_and_expiry() {
        let t0 = Instant::now();
        let mut store = TicketStore::new(Duration::from_secs(30));
        let a = store.issue(t0, "a").unwrap();
        let b = store.issue(t0, "b").unwrap();
        assert_eq!(store.redeem(t0, &a), Redeemed::Valid("a"));
        assert_eq!(store.redeem(t0, &a), Redeemed::Unknown, "replay");
        assert_eq!(
            store.redeem(t0 + Duration::from_secs(31), &b),
            Redeemed::Expired("b")
        );
        assert_eq!(store.redeem(t0, &Ticket([0; 16])), Redeemed::Unknown);

        let c = store.issue(t0, "c").unwrap();
        assert!(store.purge(t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(store.purge(t0 + Duration::from_secs(30)), vec!["c"]);
        assert_eq!(store.redeem(t0, &c), Redeemed::Unknown);
        assert!(store.is_empty());
    }
}
