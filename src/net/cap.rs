//! Caps on connections that have not earned their place yet (unauthenticated agent
//! connections, visitors still sending their first bytes): a global cap, so a flood from many
//! addresses cannot take every file descriptor, and a per-address cap, so one address cannot
//! take the global one. IPv6 addresses count by their /64: one host usually holds a whole
//! /64, and keying on the full address would give it 2^64 separate allowances.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// The part of an address that one party controls: an IPv4 address whole (IPv4-mapped IPv6
/// addresses count as their IPv4 address), an IPv6 address by its /64 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddrKey(IpAddr);

impl AddrKey {
    /// The key `ip` counts under.
    pub fn of(ip: IpAddr) -> AddrKey {
        match ip {
            IpAddr::V4(v4) => AddrKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddrKey(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    AddrKey(IpAddr::V6(bits.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for AddrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => v4.fmt(f),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Why [`ConnCap::enter`] refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapFull {
    /// Every place is taken.
    #[error("{0} connections are already waiting (global cap)")]
    Global(usize),
    /// The address (or /64) has its share.
    #[error("{0} connections from this address are already waiting")]
    PerAddress(usize),
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_key: HashMap<AddrKey, usize>,
}

/// A global and a per-address cap on connections in one state.
pub struct ConnCap {
    global: usize,
    per_address: usize,
    counts: Mutex<Counts>,
}

/// One connection's place in a [`ConnCap`]; dropping it frees the place.
pub struct CapPlace {
    cap: Arc<ConnCap>,
    key: AddrKey,
}

impl ConnCap {
    /// A cap of `global` connections in all, `per_address` from one [`AddrKey`].
    pub fn new(global: usize, per_address: usize) -> Arc<ConnCap> {
        Arc::new(ConnCap {
            global,
            per_address,
            counts: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place for a connection from `ip`, or says which cap is full.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Result<CapPlace, CapFull> {
        self.enter_within(ip, self.per_address)
    }

    /// [`Self::enter`] with a tighter per-address cap for this address (never a looser one):
    /// for an address that is being throttled.
    pub fn enter_within(
        self: &Arc<Self>,
        ip: IpAddr,
        per_address: usize,
    ) -> Result<CapPlace, CapFull> {
        let per_address = per_address.min(self.per_address);
        let key = AddrKey::of(ip);
        let mut g = self.lock();
        if g.total >= self.global {
            return Err(CapFull::Global(self.global));
        }
        let n = g.by_key.entry(key).or_insert(0);
        if *n >= per_address {
            if *n == 0 {
                g.by_key.remove(&key);
            }
            return Err(CapFull::PerAddress(per_address));
        }
        *n += 1;
        g.total += 1;
        Ok(CapPlace {
            cap: self.clone(),
            key,
        })
    }

    /// Connections holding a place now.
    pub fn len(&self) -> usize {
        self.lock().total
    }

    /// Whether no connection holds a place.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Addresses (or /64s) holding a place now.
    pub fn addresses(&self) -> usize {
        self.lock().by_key.len()
    }

    /// The per-address cap.
    pub fn per_address(&self) -> usize {
        self.per_address
    }
}

impl Drop for CapPlace {
    fn drop(&mut self) {
        let mut g = self.cap.lock();
        g.total -= 1;
        if let Some(n) = g.by_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                g.by_key.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(AddrKey::of(a), AddrKey::of(b));
        assert_ne!(AddrKey::of(a), AddrKey::of(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(AddrKey::of(mapped), AddrKey::of([10, 0, 0, 1].into()));
        assert_eq!(AddrKey::of(a).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn both_caps_hold_and_places_are_released() {
        let cap = ConnCap::new(5, 3);
        let a: IpAddr = [10, 0, 0, 1].into();
        let held: Vec<_> = (0..3).map(|_| cap.enter(a).unwrap()).collect();
        assert_eq!(cap.enter(a).err(), Some(CapFull::PerAddress(3)));
        // Another address of the same /64 is the same party.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let _x = cap.enter(v6("2001:db8::1")).unwrap();
        let _y = cap.enter(v6("2001:db8::2")).unwrap();
        assert_eq!(cap.enter(v6("2001:db9::1")).err(), Some(CapFull::Global(5)));
        drop(held);
        assert_eq!(cap.len(), 2);
        assert_eq!(cap.addresses(), 1, "no entry outlives its connections");
        assert!(cap.enter(a).is_ok());
    }
}
