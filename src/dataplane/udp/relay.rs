//! The relay's side of one `udp` service: its public UDP socket, its flows and the channels
//! (data connections of the agent) the flows travel on.
//!
//! One task reads the public socket and queues each datagram on its flow's channel; one task
//! per channel writes the queued datagrams in batches and sends the agent's replies to their
//! visitors; one task expires silent flows and drops channels of an agent that has left.
//! A channel's queue is bounded and a full one drops the datagram, as a congested link would:
//! the socket is never left unread behind a slow channel, so one flow cannot stall the others
//! and nothing queues behind the TCP transfers of the same agent (those travel on their own
//! data connections).

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

use super::flows::Flows;
use super::mmsg::{self, Slots};
use super::{queue, transient, write_queue, Drain, Queue, READ_BUF};
use crate::admin::Metrics;
use crate::dataplane::gate::{Admission, Gate};
use crate::dataplane::pool::{Held, Pool};
use crate::protocol::datagram::{self, At, Decoder, CHANNEL_OPEN};
use crate::transport::Conn;

/// Most flows one service holds at once whatever its limits say: each costs the agent a
/// socket, and UDP source addresses cost an attacker nothing.
pub const MAX_FLOWS: usize = 16_384;

/// How often silent flows are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

struct Channel {
    id: u64,
    tx: Queue,
    held: Held,
    task: AbortHandle,
}

struct State {
    flows: Flows<Admission>,
    channels: Vec<Channel>,
    next_channel: u64,
    /// Which channel the next new flow goes to.
    turn: usize,
    stopped: bool,
    /// Datagrams that came while the service had no channel (its agent just came online, or
    /// is reconnecting), with when they came: sent on when a channel arrives, if it arrives
    /// within [`HOLD`].
    waiting: Waiting,
}

/// How long a datagram may wait for a channel.
const HOLD: Duration = Duration::from_secs(2);

/// Datagrams held for a channel, bounded in count and bytes.
#[derive(Default)]
struct Waiting {
    queue: std::collections::VecDeque<(Instant, SocketAddr, Vec<u8>)>,
    bytes: usize,
}

/// Most datagrams, and bytes, a service holds for a channel.
const WAITING_MAX: usize = 256;
const WAITING_BYTES: usize = 1 << 20;

impl Waiting {
    /// Holds a datagram if there is room; `false` if it was dropped.
    fn hold(&mut self, at: Instant, from: SocketAddr, payload: &[u8]) -> bool {
        if self.queue.len() >= WAITING_MAX || self.bytes + payload.len() > WAITING_BYTES {
            return false;
        }
        self.bytes += payload.len();
        self.queue.push_back((at, from, payload.to_vec()));
        true
    }

    /// Takes every held datagram still within [`HOLD`] of `now`; returns them and how many
    /// were too old.
    fn take(&mut self, now: Instant) -> (Vec<(SocketAddr, Vec<u8>)>, usize) {
        self.bytes = 0;
        let mut stale = 0;
        let fresh = self
            .queue
            .drain(..)
            .filter_map(|(at, from, d)| {
                let ok = now.saturating_duration_since(at) < HOLD;
                stale += usize::from(!ok);
                ok.then_some((from, d))
            })
            .collect();
        (fresh, stale)
    }

    /// Drops the held datagrams older than [`HOLD`]; returns how many.
    fn expire(&mut self, now: Instant) -> usize {
        let before = self.queue.len();
        while let Some((at, _, d)) = self.queue.front() {
            if now.saturating_duration_since(*at) < HOLD {
                break;
            }
            self.bytes -= d.len();
            self.queue.pop_front();
        }
        before - self.queue.len()
    }
}

/// One `udp` service's public port and flows. Dropping the last handle does not stop it:
/// [`Hub::stop`] does (its [`super::super::ListenerGuard`] calls it).
pub struct Hub {
    service: String,
    socket: Arc<UdpSocket>,
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Hub {
    /// Binds `addr` for the service behind `gate` and starts reading it; flows silent for
    /// `idle` end. Must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        service: &str,
        gate: Arc<Gate>,
        metrics: Arc<Metrics>,
        idle: Duration,
    ) -> io::Result<Arc<Hub>> {
        let std = std::net::UdpSocket::bind(addr)?;
        std.set_nonblocking(true)?;
        super::widen_buffers(std.as_fd());
        let socket = Arc::new(UdpSocket::from_std(std)?);
        let hub = Arc::new(Hub {
            service: service.to_string(),
            socket,
            gate,
            metrics,
            state: Mutex::new(State {
                flows: Flows::new(idle),
                channels: Vec::new(),
                next_channel: 0,
                turn: 0,
                stopped: false,
                waiting: Waiting::default(),
            }),
            tasks: Mutex::new(Vec::new()),
        });
        let reading = tokio::spawn(hub.clone().read_public());
        let sweeping = tokio::spawn(hub.clone().sweep());
        let mut tasks = hub.tasks();
        tasks.push(reading.abort_handle());
        tasks.push(sweeping.abort_handle());
        drop(tasks);
        Ok(hub)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tasks(&self) -> MutexGuard<'_, Vec<AbortHandle>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Flows silent for `idle` end from now on (a reload changed it).
    pub fn set_idle(&self, idle: Duration) {
        self.lock().flows.set_idle(idle);
    }

    /// Stops reading the port and every channel, ends every flow (their places in the
    /// service are given back) and drops the channels (closing them).
    pub fn stop(&self) {
        for t in self.tasks().drain(..) {
            t.abort();
        }
        let mut st = self.lock();
        st.stopped = true;
        st.flows.clear();
        st.waiting = Waiting::default();
        for ch in st.channels.drain(..) {
            ch.task.abort();
        }
    }

    /// Takes `conn`, a data connection of the owner of `generation` just redeemed for this
    /// service, as a channel: tells the agent so, and carries flows on it until either end
    /// closes it or its agent leaves.
    pub fn attach(self: &Arc<Self>, conn: Conn, pool: &Arc<Pool>, generation: u64) {
        let Some(held) = pool.hold(generation) else {
            return; // its agent left while it was dialling
        };
        let (tx, rx) = queue();
        let mut st = self.lock();
        if st.stopped {
            return;
        }
        let id = st.next_channel;
        st.next_channel += 1;
        let task = tokio::spawn(self.clone().run_channel(id, conn, rx));
        st.channels.push(Channel {
            id,
            tx,
            held,
            task: task.abort_handle(),
        });
        // What came while there was no channel goes on now, in order.
        let now = Instant::now();
        let (fresh, stale) = st.waiting.take(now);
        self.metrics.udp_dropped.add(stale as u64);
        for (from, payload) in fresh {
            self.on_visitor_datagram(&mut st, &payload, from, now);
        }
    }

    /// Reads the public socket, a batch at a time: each datagram goes to its flow's channel.
    async fn read_public(self: Arc<Self>) {
        // Boxed: 2 MiB reserved (see `Slots`), not on the task's stack.
        let mut slots = Box::<Slots>::default();
        loop {
            if let Err(e) = self.socket.readable().await {
                tracing::warn!(service = %self.service, "udp port failed: {e}");
                return;
            }
            let fd = self.socket.as_fd();
            let got = self
                .socket
                .try_io(Interest::READABLE, || mmsg::recv_batch(fd, &mut slots));
            let n = match got {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || transient(&e) => continue,
                Err(e) => {
                    tracing::warn!(service = %self.service, "udp port failed: {e}");
                    return;
                }
            };
            let now = Instant::now();
            let mut st = self.lock();
            for i in 0..n {
                if let (payload, Some(from)) = slots.get(i) {
                    self.on_visitor_datagram(&mut st, payload, from, now);
                }
            }
        }
    }

    fn on_visitor_datagram(&self, st: &mut State, payload: &[u8], from: SocketAddr, now: Instant) {
        let flow = match st.flows.touch_addr(from, now) {
            Some((id, flow)) => {
                // Its channel may have gone: move the flow to a live one.
                if !st.channels.iter().any(|c| c.id == flow.channel) {
                    match pick(&st.channels, &mut st.turn) {
                        Some(c) => flow.channel = c,
                        None => {
                            if !st.waiting.hold(now, from, payload) {
                                self.dropped();
                            }
                            return;
                        }
                    }
                }
                flow.admission.count_bytes(true, payload.len() as u64);
                Some((id, flow.channel))
            }
            None => None,
        };
        let (id, channel) = match flow {
            Some(f) => f,
            None => {
                let Some(channel) = pick(&st.channels, &mut st.turn) else {
                    if !st.waiting.hold(now, from, payload) {
                        self.metrics.visitors_unserved.inc();
                        self.dropped();
                    }
                    return;
                };
                if st.flows.len() >= MAX_FLOWS {
                    return self.dropped();
                }
                // Refusals (address lists, limits, draining) are counted and logged there.
                let Ok(admission) = self.gate.admit(from) else {
                    return self.dropped();
                };
                self.metrics.visitors_accepted.inc();
                admission.count_bytes(true, payload.len() as u64);
                (st.flows.open(from, channel, admission, now), channel)
            }
        };
        let Some(ch) = st.channels.iter().find(|c| c.id == channel) else {
            return self.dropped();
        };
        let mut item = Vec::with_capacity(datagram::HEADER_LEN + payload.len());
        item.extend_from_slice(&datagram::datagram_header(id, payload.len()));
        item.extend_from_slice(payload);
        if !ch.tx.push(item) {
            self.dropped();
        }
    }

    fn dropped(&self) {
        self.metrics.udp_dropped.inc();
    }

    /// One channel: writes its queue to the agent, sends the agent's datagrams on to their
    /// visitors; ends when either fails, and takes the channel out of the hub.
    async fn run_channel(self: Arc<Self>, id: u64, conn: Conn, rx: Drain) {
        let (mut reader, mut writer) = tokio::io::split(conn);
        let writing = async {
            writer.write_all(&CHANNEL_OPEN.to_be_bytes()).await?;
            writer.flush().await?;
            write_queue(&mut writer, rx).await
        };
        let reading = self.read_channel(&mut reader);
        let why = tokio::select! {
            r = writing => r,
            r = reading => r,
        };
        match why {
            Ok(()) => tracing::debug!(service = %self.service, "udp channel closed"),
            Err(e) => tracing::debug!(service = %self.service, "udp channel ended: {e}"),
        }
        self.lock().channels.retain(|c| c.id != id);
    }

    /// Reads the agent's items and sends each read's datagrams on to their visitors in
    /// batches.
    async fn read_channel(&self, reader: &mut (impl AsyncReadExt + Unpin)) -> io::Result<()> {
        let mut buf = vec![0u8; READ_BUF];
        let mut decoder = Decoder::new();
        let mut items = Vec::new();
        let mut out: Vec<(Range<usize>, SocketAddr)> = Vec::new();
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            decoder.feed(&buf[..n]);
            items.clear();
            while let Some(at) = decoder
                .next_at()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            {
                items.push(at);
            }
            out.clear();
            {
                let now = Instant::now();
                let mut st = self.lock();
                for at in items.drain(..) {
                    match at {
                        // A reply for a flow that just expired has nowhere to go.
                        At::Datagram { flow, payload } => {
                            if let Some(f) = st.flows.touch_id(flow, now) {
                                f.admission.count_bytes(false, payload.len() as u64);
                                out.push((payload, f.addr));
                            }
                        }
                        At::Close { flow } => {
                            st.flows.remove(flow);
                        }
                    }
                }
            }
            self.to_visitors(&decoder, &out).await?;
        }
    }

    /// Sends `out` (places in `decoder`, each with its visitor) from the public socket.
    async fn to_visitors(
        &self,
        decoder: &Decoder,
        out: &[(Range<usize>, SocketAddr)],
    ) -> io::Result<()> {
        let fd = self.socket.as_fd();
        let mut sent = 0;
        while sent < out.len() {
            let batch: Vec<(&[u8], Option<SocketAddr>)> = out[sent..]
                .iter()
                .take(mmsg::BATCH)
                .map(|(place, to)| (decoder.slice(place.clone()), Some(*to)))
                .collect();
            match self
                .socket
                .try_io(Interest::WRITABLE, || mmsg::send_batch(fd, &batch))
            {
                Ok(k) => sent += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.socket.writable().await?;
                }
                // That one datagram is lost (an ICMP error of an earlier one); go on.
                Err(e) if transient(&e) => {
                    sent += 1;
                    self.dropped();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Every second: ends silent flows (telling their agent) and drops the channels of an
    /// agent that no longer owns the service.
    async fn sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut st = self.lock();
            let stale = st.waiting.expire(Instant::now());
            self.metrics.udp_dropped.add(stale as u64);
            for (flow, channel) in st.flows.expire(Instant::now()) {
                if let Some(c) = st.channels.iter().find(|c| c.id == channel) {
                    c.tx.push(datagram::close_item(flow).to_vec());
                }
            }
            st.channels.retain(|c| {
                let keep = c.held.is_current();
                if !keep {
                    c.task.abort();
                }
                keep
            });
        }
    }
}

/// The next channel in turn, if there is one.
fn pick(channels: &[Channel], turn: &mut usize) -> Option<u64> {
    if channels.is_empty() {
        return None;
    }
    *turn = turn.wrapping_add(1);
    Some(channels[*turn % channels.len()].id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn datagrams_wait_for_a_channel_in_order_within_bounds_and_not_for_ever() {
        let t0 = Instant::now();
        let mut w = Waiting::default();
        assert!(w.hold(t0, addr(1), b"one"));
        assert!(w.hold(t0 + Duration::from_secs(1), addr(2), b"two"));
        let (fresh, stale) = w.take(t0 + Duration::from_millis(2500));
        assert_eq!(
            fresh,
            vec![(addr(2), b"two".to_vec())],
            "the older one waited too long"
        );
        assert_eq!(stale, 1);
        assert_eq!(w.bytes, 0);

        for i in 0..WAITING_MAX {
            assert!(w.hold(t0, addr(3), &[i as u8]), "{i}");
        }
        assert!(!w.hold(t0, addr(3), b"x"), "bounded in count");
        assert_eq!(w.expire(t0 + HOLD), WAITING_MAX, "all expired at once");
        assert_eq!(w.bytes, 0);

        let big = vec![0u8; 60_000];
        let fit = (0..100).take_while(|_| w.hold(t0, addr(4), &big)).count();
        assert_eq!(fit, WAITING_BYTES / big.len(), "bounded in bytes");
    }
}
