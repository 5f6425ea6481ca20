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
use super::{queue, write_queue, Drain, Queue, READ_BUF};
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

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.socket.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Flows open now.
    pub fn flows(&self) -> usize {
        self.lock().flows.len()
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
                        None => return self.dropped(),
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
                    self.metrics.visitors_unserved.inc();
                    return self.dropped();
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

/// Errors a UDP socket reports for one datagram (an ICMP error from an earlier send, a full
/// buffer), after which it keeps working.
pub(super) fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::ENOBUFS
                | libc::EMSGSIZE
        )
    ) || e.kind() == io::ErrorKind::Interrupted
}
