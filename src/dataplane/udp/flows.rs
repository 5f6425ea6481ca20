//! The relay's flows of one `udp` service: which visitor address is which flow number, on
//! which channel, and since when it has been silent. Time is a parameter, so expiry is
//! unit-tested without sleeping; admission (limits, address lists) is the caller's, held in
//! each flow as `A` and dropped with it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// One visitor address's flow.
#[derive(Debug)]
pub struct Flow<A> {
    /// The visitor's address (where replies go).
    pub addr: SocketAddr,
    /// The channel the flow travels on (a channel's id, see [`super::relay`]).
    pub channel: u64,
    /// Last datagram either way.
    pub last: Instant,
    /// The visitor's counted place in its service, released when the flow ends.
    pub admission: A,
}

/// The flows of one service, by address and by number.
#[derive(Debug)]
pub struct Flows<A> {
    by_addr: HashMap<SocketAddr, u32>,
    by_id: HashMap<u32, Flow<A>>,
    next: u32,
    idle: Duration,
}

impl<A> Flows<A> {
    /// No flows; a flow silent both ways for `idle` ends at the next [`Self::expire`].
    pub fn new(idle: Duration) -> Self {
        Flows {
            by_addr: HashMap::new(),
            by_id: HashMap::new(),
            next: 0,
            idle,
        }
    }

    /// From now on, flows silent for `idle` end (a reload changed it).
    pub fn set_idle(&mut self, idle: Duration) {
        self.idle = idle;
    }

    /// How many flows are open.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no flow is open.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The flow of `addr` and its number, touched at `now`, if it has one.
    pub fn touch_addr(&mut self, addr: SocketAddr, now: Instant) -> Option<(u32, &mut Flow<A>)> {
        let id = *self.by_addr.get(&addr)?;
        let flow = self.by_id.get_mut(&id)?;
        flow.last = now;
        Some((id, flow))
    }

    /// The number of `addr`'s flow, if it has one.
    pub fn id_of(&self, addr: SocketAddr) -> Option<u32> {
        self.by_addr.get(&addr).copied()
    }

    /// Flow `id`, touched at `now` (a reply came back through it).
    pub fn touch_id(&mut self, id: u32, now: Instant) -> Option<&mut Flow<A>> {
        let flow = self.by_id.get_mut(&id)?;
        flow.last = now;
        Some(flow)
    }

    /// Opens a flow for `addr` on `channel` and returns its number. Numbers are not reused
    /// while a flow holds them (they wrap after 2³² flows).
    pub fn open(&mut self, addr: SocketAddr, channel: u64, admission: A, now: Instant) -> u32 {
        let mut id = self.next;
        while self.by_id.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next = id.wrapping_add(1);
        self.by_addr.insert(addr, id);
        self.by_id.insert(
            id,
            Flow {
                addr,
                channel,
                last: now,
                admission,
            },
        );
        id
    }

    /// Ends flow `id` (the agent said so); returns it.
    pub fn remove(&mut self, id: u32) -> Option<Flow<A>> {
        let flow = self.by_id.remove(&id)?;
        self.by_addr.remove(&flow.addr);
        Some(flow)
    }

    /// Ends every flow silent since `now - idle`; returns their numbers and channels.
    pub fn expire(&mut self, now: Instant) -> Vec<(u32, u64)> {
        let idle = self.idle;
        let gone: Vec<u32> = self
            .by_id
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last) >= idle)
            .map(|(id, _)| *id)
            .collect();
        gone.into_iter()
            .filter_map(|id| self.remove(id).map(|f| (id, f.channel)))
            .collect()
    }

    /// Ends every flow: the service closed.
    pub fn clear(&mut self) {
        self.by_addr.clear();
        self.by_id.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn each_address_gets_its_own_flow_and_keeps_it() {
        let t0 = Instant::now();
        let mut flows = Flows::new(Duration::from_secs(30));
        let a = flows.open(addr(1000), 1, (), t0);
        let b = flows.open(addr(1001), 1, (), t0);
        assert_ne!(a, b);
        assert_eq!(flows.id_of(addr(1000)), Some(a));
        assert_eq!(
            flows.touch_addr(addr(1001), t0).map(|(_, f)| f.addr),
            Some(addr(1001))
        );
        assert_eq!(flows.touch_id(a, t0).map(|f| f.addr), Some(addr(1000)));
        assert_eq!(flows.len(), 2);
    }

    #[test]
    fn silent_flows_expire_and_busy_ones_stay() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(30);
        let mut flows = Flows::new(idle);
        let quiet = flows.open(addr(1), 7, (), t0);
        let busy = flows.open(addr(2), 8, (), t0);
        flows.touch_id(busy, t0 + Duration::from_secs(20));
        assert!(flows.expire(t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(flows.expire(t0 + idle), vec![(quiet, 7)]);
        assert_eq!(flows.id_of(addr(1)), None);
        assert_eq!(flows.expire(t0 + Duration::from_secs(50)), vec![(busy, 8)]);
        assert!(flows.is_empty());
    }

    #[test]
    fn numbers_held_by_open_flows_are_not_reused_after_wrapping() {
        let t0 = Instant::now();
        let mut flows = Flows::new(Duration::from_secs(1));
        flows.next = u32::MAX;
        let a = flows.open(addr(1), 0, (), t0);
        let b = flows.open(addr(2), 0, (), t0);
        assert_eq!((a, b), (u32::MAX, 0));
        flows.next = u32::MAX;
        let c = flows.open(addr(3), 0, (), t0);
        assert_eq!(c, 1, "skips the numbers still held");
    }
}
