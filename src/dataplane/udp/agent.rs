//! The agent's end of a `udp` service's channels: each flow the relay numbers gets a UDP
//! socket of its own, connected to the local service, so the service sees one peer per
//! visitor and its replies go back to the right one.
//!
//! The flows are the service's, shared by all its channels: a flow the relay moves to another
//! channel (one died) keeps its socket, and replies go out on the channel that last brought
//! the flow a datagram.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

use super::{mmsg, transient};
use super::{queue, write_queue, Queue, READ_BUF};
use crate::protocol::datagram::{self, At, Decoder, CHANNEL_OPEN};

/// Most flows (local sockets) one service keeps at once; the relay is told to end any more.
pub const MAX_FLOWS: usize = 4096;

/// A flow silent this long is ended here even if the relay never said so (it went away):
/// well above any relay's flow timeout, so the relay's word normally comes first.
pub const FLOW_IDLE: Duration = Duration::from_secs(600);

/// How long a failed resolution of the local address stands before it is tried again.
const RESOLVE_RETRY: Duration = Duration::from_secs(5);

/// Least time between two warnings of one service.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Where replies of one flow go: the queue of the channel that last carried it.
type ReplyTo = Arc<Mutex<Queue>>;

fn current(reply: &ReplyTo) -> MutexGuard<'_, Queue> {
    reply.lock().unwrap_or_else(|e| e.into_inner())
}

struct Flow {
    socket: Arc<UdpSocket>,
    reply: ReplyTo,
    /// Milliseconds since the service's epoch at the last datagram either way.
    last: Arc<AtomicU64>,
    task: AbortHandle,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The flows of one `udp` service on the agent.
pub struct Service {
    name: String,
    local: String,
    flows: Mutex<HashMap<u32, Flow>>,
    epoch: Instant,
    /// `now_ms` of the last warning (0: none yet).
    warned: AtomicU64,
}

impl Service {
    /// The flows of service `name`, whose local UDP service listens at `local`.
    pub fn new(name: &str, local: &str) -> Arc<Service> {
        Arc::new(Service {
            name: name.to_string(),
            local: local.to_string(),
            flows: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            warned: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Flow>> {
        self.flows.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Logs `what` unless something was logged in the last [`WARN_EVERY`]: a flood of new
    /// flows toward a broken local service is one line, not one per flow.
    fn warn(&self, what: &str) {
        let now = self.now_ms();
        let last = self.warned.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < WARN_EVERY.as_millis() as u64 {
            return;
        }
        self.warned.store(now.max(1), Ordering::Relaxed);
        tracing::warn!(service = %self.name, "{what}");
    }

    /// Ends the flows silent for [`FLOW_IDLE`].
    fn expire(&self) {
        let now = self.now_ms();
        let idle = FLOW_IDLE.as_millis() as u64;
        self.lock()
            .retain(|_, f| now.saturating_sub(f.last.load(Ordering::Relaxed)) < idle);
    }

    /// Serves one channel: `tunnel` is a data connection whose `DataHello` was sent. Waits for
    /// the relay to accept it as a channel, then carries datagrams both ways until either end
    /// closes it. Returns why it ended.
    pub async fn serve_channel<S>(self: &Arc<Self>, tunnel: S) -> Result<(), ChannelEnd>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut reader, mut writer) = tokio::io::split(tunnel);
        let mut first = [0u8; 4];
        let mut got = 0;
        while got < first.len() {
            match reader.read(&mut first[got..]).await {
                Ok(0) => return Err(ChannelEnd::Refused(refusal(&first[..got]))),
                Ok(n) => got += n,
                Err(e) => return Err(ChannelEnd::Io(e)),
            }
        }
        if u32::from_be_bytes(first) != CHANNEL_OPEN {
            // Most likely an `Error` frame (a spent ticket): read what follows for its words.
            let mut rest = first.to_vec();
            let mut more = [0u8; 512];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(1), reader.read(&mut more)).await
            {
                rest.extend_from_slice(&more[..n]);
            }
            return Err(ChannelEnd::Refused(refusal(&rest)));
        }
        let (tx, rx) = queue();
        let writing = write_queue(&mut writer, rx);
        let reading = self.read_channel(&mut reader, tx);
        let sweeping = async {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                self.expire();
            }
        };
        tokio::select! {
            r = writing => r.map_err(ChannelEnd::Io),
            r = reading => r,
            _ = sweeping => Ok(()),
        }
    }

    async fn read_channel(
        self: &Arc<Self>,
        reader: &mut (impl AsyncRead + Unpin),
        sender: Queue,
    ) -> Result<(), ChannelEnd> {
        let mut buf = vec![0u8; READ_BUF];
        let mut decoder = Decoder::new();
        // Resolved on the first datagram, and again (at most every few seconds) while it
        // fails: a channel stays up whatever `--local` says, or the relay would replace it
        // at once, again and again.
        let mut local: Option<SocketAddr> = None;
        let mut retry_at = Instant::now();
        loop {
            let n = reader.read(&mut buf).await.map_err(ChannelEnd::Io)?;
            if n == 0 {
                return Ok(());
            }
            decoder.feed(&buf[..n]);
            if local.is_none() && Instant::now() >= retry_at {
                match resolve(&self.local).await {
                    Ok(a) => local = Some(a),
                    Err(e) => {
                        retry_at = Instant::now() + RESOLVE_RETRY;
                        self.warn(&format!("local service {}: {e}", self.local));
                    }
                }
            }
            // Runs of one flow's datagrams go out in one `sendmmsg` each.
            let mut run: Option<(u32, Arc<UdpSocket>)> = None;
            let mut places: Vec<Range<usize>> = Vec::new();
            while let Some(at) = decoder.next_at().map_err(ChannelEnd::Bad)? {
                match at {
                    At::Datagram { flow, payload } => {
                        if run.as_ref().is_some_and(|(f, _)| *f != flow)
                            || places.len() == mmsg::BATCH
                        {
                            flush(&decoder, run.take(), &mut places);
                        }
                        if run.is_none() {
                            match self.route(flow, local, &sender) {
                                Some(socket) => run = Some((flow, socket)),
                                None => continue,
                            }
                        }
                        places.push(payload);
                    }
                    At::Close { flow } => {
                        flush(&decoder, run.take(), &mut places);
                        self.lock().remove(&flow);
                    }
                }
            }
            flush(&decoder, run.take(), &mut places);
        }
    }

    /// The socket of `flow` (opened now if it is new) for its next datagram, with
    /// the flow touched and its replies sent to `sender`'s channel; `None` if the flow cannot
    /// be opened (the relay is told to end it).
    fn route(
        self: &Arc<Self>,
        flow: u32,
        local: Option<SocketAddr>,
        sender: &Queue,
    ) -> Option<Arc<UdpSocket>> {
        let now = self.now_ms();
        let mut flows = self.lock();
        if !flows.contains_key(&flow) {
            let Some(local) = local.filter(|_| flows.len() < MAX_FLOWS) else {
                sender.push(datagram::close_item(flow).to_vec());
                return None;
            };
            match self.open(flow, local, sender.clone()) {
                Ok(f) => {
                    flows.insert(flow, f);
                }
                Err(e) => {
                    self.warn(&format!("udp flow not opened toward {local}: {e}"));
                    sender.push(datagram::close_item(flow).to_vec());
                    return None;
                }
            }
        }
        let f = flows.get(&flow)?;
        f.last.store(now, Ordering::Relaxed);
        // Replies follow the flow to the channel that carried it last.
        let mut to = current(&f.reply);
        if !to.same_channel(sender) {
            *to = sender.clone();
        }
        drop(to);
        Some(f.socket.clone())
    }

    fn open(self: &Arc<Self>, flow: u32, local: SocketAddr, sender: Queue) -> io::Result<Flow> {
        let any: SocketAddr = match local {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let std = std::net::UdpSocket::bind(any)?;
        std.connect(local)?;
        std.set_nonblocking(true)?;
        super::widen_buffers(std.as_fd());
        let socket = Arc::new(UdpSocket::from_std(std)?);
        let reply = Arc::new(Mutex::new(sender));
        let last = Arc::new(AtomicU64::new(self.now_ms()));
        let task = tokio::spawn(replies(
            self.clone(),
            flow,
            socket.clone(),
            reply.clone(),
            last.clone(),
        ));
        Ok(Flow {
            socket,
            reply,
            last,
            task: task.abort_handle(),
        })
    }
}

/// Whether this kernel segments UDP sends (`UDP_SEGMENT`); cleared by the first send it
/// refuses, and the agent sends datagram by datagram from then on.
static SEGMENTS: AtomicBool = AtomicBool::new(true);

/// Sends a run of one flow's datagrams (`places` in `decoder`) from its socket and empties
/// `places`: equal-sized ones (the common case of a bulk flow) in one segmented send, the
/// rest in one `sendmmsg`. Not waiting: what a full socket buffer refuses is dropped, as UDP
/// would, and so is a datagram an ICMP error stops (the local service is not up).
fn flush(decoder: &Decoder, run: Option<(u32, Arc<UdpSocket>)>, places: &mut Vec<Range<usize>>) {
    if let Some((_, socket)) = run {
        let datagrams: Vec<&[u8]> = places.iter().map(|p| decoder.slice(p.clone())).collect();
        let mut from = 0;
        while from < datagrams.len() {
            from += match segmentable(&datagrams[from..]) {
                Some((count, segment)) if SEGMENTS.load(Ordering::Relaxed) => {
                    let joined: Vec<u8> = datagrams[from..from + count].concat();
                    match mmsg::send_segmented(socket.as_fd(), &joined, segment) {
                        Ok(_) => count,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if transient(&e) => count,
                        Err(e) => {
                            tracing::debug!(
                                "udp segmentation refused ({e}): sending datagram by datagram"
                            );
                            SEGMENTS.store(false, Ordering::Relaxed);
                            0
                        }
                    }
                }
                _ => {
                    let batch: Vec<(&[u8], Option<SocketAddr>)> =
                        datagrams[from..].iter().map(|d| (*d, None)).collect();
                    match mmsg::send_batch(socket.as_fd(), &batch) {
                        Ok(k) => k,
                        Err(e) if transient(&e) => 1,
                        Err(_) => break,
                    }
                }
            };
        }
    }
    places.clear();
}

/// How many datagrams at the head of `datagrams` one segmented send can carry (at least
/// two, all of one size but the last, which may be shorter but not empty), and that size.
fn segmentable(datagrams: &[&[u8]]) -> Option<(usize, u16)> {
    let segment = datagrams.first()?.len();
    if segment == 0 || segment > mmsg::MAX_SEGMENTED / 2 {
        return None;
    }
    let most = mmsg::MAX_SEGMENTS.min(mmsg::MAX_SEGMENTED / segment);
    let mut count = 0;
    for d in datagrams.iter().take(most) {
        if d.len() == segment {
            count += 1;
        } else {
            if !d.is_empty() && d.len() < segment {
                count += 1; // a shorter one may end the send
            }
            break;
        }
    }
    (count >= 2).then_some((count, segment as u16))
}

/// Reads the local service's replies on one flow's socket and queues them on the flow's
/// current channel.
async fn replies(
    service: Arc<Service>,
    flow: u32,
    socket: Arc<UdpSocket>,
    reply: ReplyTo,
    last: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; datagram::HEADER_LEN + datagram::MAX_DATAGRAM];
    loop {
        let n = match socket.recv(&mut buf[datagram::HEADER_LEN..]).await {
            Ok(n) => n,
            Err(e) if transient(&e) => continue, // the local service is not up (yet)
            Err(e) => {
                tracing::debug!(service = %service.name, flow, "udp flow ended: {e}");
                return;
            }
        };
        last.store(service.now_ms(), Ordering::Relaxed);
        buf[..datagram::HEADER_LEN].copy_from_slice(&datagram::datagram_header(flow, n));
        let to = current(&reply).clone();
        // A full channel drops the reply, as a congested link would.
        to.push(buf[..datagram::HEADER_LEN + n].to_vec());
    }
}

/// Why a channel ended on the agent.
#[derive(Debug, thiserror::Error)]
pub enum ChannelEnd {
    /// The relay did not take the connection as a channel.
    #[error("relay refused the udp channel: {0}")]
    Refused(String),
    /// The connection failed.
    #[error("{0}")]
    Io(io::Error),
    /// The relay sent bytes that are no channel item.
    #[error("{0}")]
    Bad(datagram::BadItem),
}

/// The relay's words in an `Error` frame, or what the bytes were.
fn refusal(bytes: &[u8]) -> String {
    let mut conn = crate::protocol::lifecycle::AgentDataConn::open(crate::protocol::auth::Ticket(
        [0; crate::protocol::auth::TICKET_LEN],
    ))
    .0;
    match conn.on_pooled_input(bytes) {
        crate::protocol::lifecycle::AgentEvent::Refused { message, .. } => message,
        _ if bytes.is_empty() => "connection closed".to_string(),
        _ => "unexpected answer".to_string(),
    }
}

async fn resolve(local: &str) -> io::Result<SocketAddr> {
    tokio::net::lookup_host(local)
        .await?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{local}: no address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_equal_datagrams_are_segmented_and_others_are_not() {
        let a = [1u8; 1400];
        let short = [2u8; 10];
        assert_eq!(segmentable(&[&a, &a, &a]), Some((3, 1400)));
        assert_eq!(
            segmentable(&[&a, &a, &short, &a]),
            Some((3, 1400)),
            "a shorter one ends it"
        );
        assert_eq!(
            segmentable(&[&a, &[]]),
            None,
            "an empty datagram is never a segment"
        );
        assert_eq!(
            segmentable(&[&short, &a]),
            None,
            "a longer one cannot follow"
        );
        assert_eq!(segmentable(&[&a]), None, "one alone goes out plainly");
        let many: Vec<&[u8]> = vec![&a; 100];
        assert_eq!(
            segmentable(&many),
            Some((46, 1400)),
            "within the kernel's bytes limit"
        );
        let small = [3u8; 100];
        let many: Vec<&[u8]> = vec![&small; 100];
        assert_eq!(
            segmentable(&many),
            Some((64, 100)),
            "within its segment limit"
        );
    }
}
