//! Single-use, short-lived data-connection tickets, with time as a parameter.
//!
//! A ticket is 128 random bits handed to an authenticated agent over its control connection.
//! Redeeming removes it, so a replayed ticket is unknown; an unredeemed one expires.
//!
//! The store is shared by every agent, so no one of them may fill it: each session and each
//! secret has a quota, and a session's tickets go with it when it ends.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::config::SecretId;
use crate::protocol::auth::{new_ticket, Ticket};

/// How long a ticket stays valid after it is issued. Agents dial at once, so this only has
/// to cover a slow TLS handshake on a bad link.
pub const TICKET_TTL: Duration = Duration::from_secs(30);

/// Most tickets outstanding across the relay; bounds memory whatever agents do.
pub const MAX_TICKETS: usize = 1 << 16;

/// Most tickets one session may hold: a full agent (64 services, each with a pool of 64)
/// filling every pool at once.
pub const MAX_TICKETS_PER_SESSION: usize = 4096;

/// Most tickets the sessions of one secret may hold together: half the store, so the holders
/// of one secret can never take it all from the others.
pub const MAX_TICKETS_PER_SECRET: usize = MAX_TICKETS / 2;

/// Who a ticket is charged to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The control session it was issued to.
    pub session: u64,
    /// The secret that authenticated the service it is for.
    pub secret: SecretId,
}

/// Why [`TicketStore::issue`] withheld a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withheld {
    /// The session holds its quota.
    Session,
    /// The secret's sessions hold its quota.
    Secret,
    /// The store is full.
    Store,
}

/// What redeeming a ticket found.
#[derive(Debug, PartialEq, Eq)]
pub enum Redeemed<T> {
    /// Valid: the grant it was issued for.
    Valid(T),
    /// Known but too old; the grant is returned so its bookkeeping can be undone.
    Expired(T),
    /// Issued to a session that has since ended: the agent was still dialling when it went.
    /// Routine, not a sign of guessing.
    Retired,
    /// Never issued, or already used.
    Unknown,
}

/// Outstanding tickets, each mapped to the grant `T` it was issued for.
#[derive(Debug)]
pub struct TicketStore<T> {
    live: HashMap<Ticket, (Instant, Owner, T)>,
    /// Tickets of ended sessions, until they would have expired (at most [`MAX_TICKETS`]).
    retired: HashMap<Ticket, Instant>,
    per_session: HashMap<u64, usize>,
    per_secret: HashMap<SecretId, usize>,
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
            retired: HashMap::new(),
            per_session: HashMap::new(),
            per_secret: HashMap::new(),
            ttl,
        }
    }

    /// Issues a fresh ticket for `grant`, charged to `owner`, or says which quota is out.
    pub fn issue(&mut self, now: Instant, owner: Owner, grant: T) -> Result<Ticket, Withheld> {
        if self.live.len() >= MAX_TICKETS {
            return Err(Withheld::Store);
        }
        let session = self.per_session.get(&owner.session).copied().unwrap_or(0);
        if session >= MAX_TICKETS_PER_SESSION {
            return Err(Withheld::Session);
        }
        let secret = self.per_secret.get(&owner.secret).copied().unwrap_or(0);
        if secret >= MAX_TICKETS_PER_SECRET {
            return Err(Withheld::Secret);
        }
        *self.per_session.entry(owner.session).or_insert(0) += 1;
        *self.per_secret.entry(owner.secret.clone()).or_insert(0) += 1;
        let ticket = new_ticket();
        self.live.insert(ticket, (now + self.ttl, owner, grant));
        Ok(ticket)
    }

    fn remove(&mut self, ticket: &Ticket) -> Option<(Instant, T)> {
        let (expiry, owner, grant) = self.live.remove(ticket)?;
        uncharge(&mut self.per_session, &owner.session);
        uncharge(&mut self.per_secret, &owner.secret);
        Some((expiry, grant))
    }

    /// Redeems `ticket` (once).
    pub fn redeem(&mut self, now: Instant, ticket: &Ticket) -> Redeemed<T> {
        match self.remove(ticket) {
            Some((expiry, grant)) if now < expiry => Redeemed::Valid(grant),
            Some((_, grant)) => Redeemed::Expired(grant),
            None => match self.retired.remove(ticket) {
                Some(expiry) if now < expiry => Redeemed::Retired,
                _ => Redeemed::Unknown,
            },
        }
    }

    /// Removes and returns the grants of every ticket expired at `now`.
    pub fn purge(&mut self, now: Instant) -> Vec<T> {
        self.retired.retain(|_, expiry| now < *expiry);
        let expired: Vec<Ticket> = self
            .live
            .iter()
            .filter(|(_, (expiry, _, _))| now >= *expiry)
            .map(|(t, _)| *t)
            .collect();
        expired
            .iter()
            .filter_map(|t| self.remove(t).map(|(_, g)| g))
            .collect()
    }

    /// Drops every ticket of `session` (it ended: they can only be refused now). They are
    /// remembered as retired until they would have expired, so that a data connection still
    /// on its way is told apart from a guess; when that memory is full they are forgotten.
    pub fn drop_session(&mut self, session: u64) {
        let theirs: Vec<Ticket> = self
            .live
            .iter()
            .filter(|(_, (_, owner, _))| owner.session == session)
            .map(|(t, _)| *t)
            .collect();
        for t in &theirs {
            if let Some((expiry, _)) = self.remove(t) {
                if self.retired.len() < MAX_TICKETS {
                    self.retired.insert(*t, expiry);
                }
            }
        }
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

fn uncharge<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(session: u64) -> Owner {
        Owner {
            session,
            secret: SecretId::Default,
        }
    }

    #[test]
    fn single_use_and_expiry() {
        let t0 = Instant::now();
        let mut store = TicketStore::new(Duration::from_secs(30));
        let a = store.issue(t0, owner(1), "a").unwrap();
        let b = store.issue(t0, owner(1), "b").unwrap();
        assert_eq!(store.redeem(t0, &a), Redeemed::Valid("a"));
        assert_eq!(store.redeem(t0, &a), Redeemed::Unknown, "replay");
        assert_eq!(
            store.redeem(t0 + Duration::from_secs(31), &b),
            Redeemed::Expired("b")
        );
        assert_eq!(store.redeem(t0, &Ticket([0; 16])), Redeemed::Unknown);

        let c = store.issue(t0, owner(1), "c").unwrap();
        assert!(store.purge(t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(store.purge(t0 + Duration::from_secs(30)), vec!["c"]);
        assert_eq!(store.redeem(t0, &c), Redeemed::Unknown);
        assert!(store.is_empty());
    }

    #[test]
    fn quotas_hold_per_session_and_per_secret_and_end_with_the_session() {
        let t0 = Instant::now();
        let mut store = TicketStore::new(Duration::from_secs(30));
        for _ in 0..MAX_TICKETS_PER_SESSION {
            store.issue(t0, owner(1), ()).unwrap();
        }
        assert_eq!(store.issue(t0, owner(1), ()), Err(Withheld::Session));
        // The same secret's other sessions fill the secret's quota, then stop...
        let per_secret_sessions = MAX_TICKETS_PER_SECRET / MAX_TICKETS_PER_SESSION;
        for s in 2..=per_secret_sessions as u64 {
            for _ in 0..MAX_TICKETS_PER_SESSION {
                store.issue(t0, owner(s), ()).unwrap();
            }
        }
        assert_eq!(store.issue(t0, owner(99), ()), Err(Withheld::Secret));
        // ...while another secret still gets tickets.
        let other = Owner {
            session: 100,
            secret: SecretId::Service("billing".into()),
        };
        assert!(store.issue(t0, other.clone(), ()).is_ok());
        // A session's tickets go when it ends, and its quota with them.
        store.drop_session(1);
        assert_eq!(
            store.len(),
            MAX_TICKETS_PER_SECRET - MAX_TICKETS_PER_SESSION + 1
        );
        assert!(store.issue(t0, owner(99), ()).is_ok());
        store.drop_session(100);
        assert!(!store.per_secret.contains_key(&other.secret));
    }

    #[test]
    fn tickets_of_an_ended_session_are_retired_until_they_would_expire() {
        let t0 = Instant::now();
        let mut store = TicketStore::new(Duration::from_secs(30));
        let a = store.issue(t0, owner(1), "a").unwrap();
        let b = store.issue(t0, owner(1), "b").unwrap();
        let c = store.issue(t0, owner(1), "c").unwrap();
        store.drop_session(1);
        assert!(store.is_empty(), "retired tickets are not outstanding");
        assert_eq!(store.redeem(t0, &a), Redeemed::Retired);
        assert_eq!(store.redeem(t0, &a), Redeemed::Unknown, "once only");
        assert_eq!(
            store.redeem(t0 + Duration::from_secs(30), &b),
            Redeemed::Unknown,
            "past its expiry a retired ticket is unknown"
        );
        assert!(store.purge(t0 + Duration::from_secs(30)).is_empty());
        assert_eq!(store.redeem(t0, &c), Redeemed::Unknown, "purged");
        assert!(store.retired.is_empty());
    }
}
