//! Chunked forwarding on a worker, so a plain data connection can carry visitor after visitor
//! ([`crate::protocol::chunk`]).
//!
//! Small transfers are copied through the worker's scratch buffer, each read sent as one chunk
//! (header and data in one `send`). A direction whose read fills the scratch buffer is a bulk
//! transfer: it sends `RAW` and splices the rest, and the connection ends with this visitor —
//! splice cannot frame, and a bulk transfer amortises a new connection anyway.

use std::future::Future;
use std::io;
use std::os::fd::BorrowedFd;
use std::pin::{pin, Pin};

use monoio::net::TcpStream;

use super::pipe::{self, PipePool};
use super::sockio::{self, fd, with_scratch};
use crate::dataplane::forwarded::{ForwardError, Forwarded, Outcome, Side};
use crate::dataplane::rewrite;
use crate::dataplane::sock::{cut, recv_now, send_now, shutdown, Half};
use crate::dataplane::tally::{Count, Tally};
use crate::protocol::chunk::{self, Unchunker, HEADER_LEN};
use crate::protocol::http::requests::Requests;

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// With an `END` chunk: the connection is still in step.
    Clean,
    /// Raw to the transport's end: the connection cannot carry another visitor.
    Raw,
}

/// Decoding state of the tunnel → peer direction, independent of where its bytes come from
/// (a socket, or plaintext out of rustls).
#[derive(Default)]
pub struct Unchunk<'a> {
    /// The chunk decoder.
    pub chunks: Unchunker,
    /// Visitor bytes delivered or queued.
    pub moved: u64,
    /// Where those bytes are counted as well.
    pub count: Count<'a, false>,
}

/// What [`Unchunk::feed`] could not finish because the peer was full.
pub struct Blocked {
    /// Visitor bytes to write (waiting) before anything else.
    pub pending: Vec<u8>,
    /// Input not decoded yet, to feed after `pending`.
    pub rest: Vec<u8>,
}

impl Unchunk<'_> {
    /// Decodes `input`, sending visitor bytes to `dfd` without waiting. Stops at `END` (the
    /// rest goes to `leftover`); returns what is left when `dfd` is full.
    /// A bad chunk is the tunnel's fault; a failed send, the peer's.
    pub fn feed(&mut self, dfd: BorrowedFd<'_>, mut input: &[u8]) -> Forwarded<Option<Blocked>> {
        while let Some(data) = self
            .chunks
            .next_data(&mut input)
            .map_err(ForwardError::from_chunk)?
        {
            self.moved += data.len() as u64;
            self.count.add(data.len());
            let sent = send_now(dfd, data).map_err(ForwardError::peer)?;
            if sent < data.len() {
                return Ok(Some(Blocked {
                    pending: data[sent..].to_vec(),
                    rest: input.to_vec(),
                }));
            }
        }
        Ok(None)
    }

    /// [`Self::feed`], waiting on `dst` whenever it is full, until `input` is all decoded.
    pub async fn feed_all(&mut self, dst: &TcpStream, input: &[u8]) -> Forwarded<()> {
        let mut blocked = self.feed(fd(dst), input)?;
        while let Some(b) = blocked {
            sockio::write_all(dst, &b.pending)
                .await
                .map_err(ForwardError::peer)?;
            blocked = self.feed(fd(dst), &b.rest)?;
        }
        Ok(())
    }
}

/// One read of the encoding direction, sent as a chunk.
struct Sent {
    /// Bytes read (0: EOF, sent as `END`).
    n: usize,
    /// The read filled the scratch buffer: a bulk transfer.
    full: bool,
    /// What the tunnel did not take yet.
    rest: Option<Vec<u8>>,
}

/// Peer → tunnel in chunks until the peer's EOF (`END`), or until a read fills the scratch
/// buffer, from where on the direction is `RAW` and spliced.
/// `quiet`: `src` has nothing to read now (the agent's just-connected local service, or a
/// visitor whose early bytes were already taken), so the first recv would only find `EAGAIN`:
/// wait on the ring first.
async fn encode(
    src: &TcpStream,
    dst: &TcpStream,
    pipes: &PipePool,
    quiet: bool,
    requests: Option<&mut Requests>,
    count: Count<'_, true>,
) -> Forwarded<(u64, Ended)> {
    let (peer, tunnel) = (ForwardError::peer, ForwardError::tunnel);
    if let Some(requests) = requests {
        // Boxed: inline, its state would grow every connection's task, rewriting or not.
        return Box::pin(encode_requests(src, dst, quiet, requests, count)).await;
    }
    let (sfd, dfd) = (fd(src), fd(dst));
    let mut total = 0u64;
    if quiet {
        src.readable(false).await.map_err(peer)?;
    }
    loop {
        let step = with_scratch(|buf| -> Forwarded<Option<Sent>> {
            let room = buf.len() - HEADER_LEN;
            let Some(n) = recv_now(sfd, &mut buf[HEADER_LEN..]).map_err(peer)? else {
                return Ok(None);
            };
            let frame_len = if n == 0 {
                buf[..HEADER_LEN].copy_from_slice(&chunk::header(chunk::END));
                HEADER_LEN
            } else {
                buf[..HEADER_LEN].copy_from_slice(&chunk::header(n as u32));
                HEADER_LEN + n
            };
            let sent = send_now(dfd, &buf[..frame_len]).map_err(tunnel)?;
            let rest = (sent < frame_len).then(|| buf[sent..frame_len].to_vec());
            Ok(Some(Sent {
                n,
                full: n == room,
                rest,
            }))
        })?;
        match step {
            None => src.readable(false).await.map_err(peer)?,
            Some(Sent { n, full, rest }) => {
                if let Some(rest) = rest {
                    sockio::write_all(dst, &rest).await.map_err(tunnel)?;
                }
                if n == 0 {
                    return Ok((total, Ended::Clean));
                }
                count.add(n);
                total += n as u64;
                if full {
                    // Bulk: the rest of this direction is raw, spliced.
                    let raw = chunk::header(chunk::RAW);
                    sockio::write_all(dst, &raw).await.map_err(tunnel)?;
                    total += pipe::splice_to_eof(src, dst, pipes, Side::Peer, count).await?;
                    crate::tls::ktls::close_notify_if_offloaded(dfd);
                    shutdown(dfd, Half::Write);
                    return Ok((total, Ended::Raw));
                }
                // A short read almost always drained the socket: wait on the ring rather than
                // spend a recv on EAGAIN (the ring's poll is level-triggered).
                src.readable(false).await.map_err(peer)?;
            }
        }
    }
}

/// [`encode`] for an HTTP visitor whose request heads are rewritten: copied all the way
/// (a body is followed byte by byte to find the next head, so it is never spliced).
async fn encode_requests(
    src: &TcpStream,
    dst: &TcpStream,
    quiet: bool,
    requests: &mut Requests,
    count: Count<'_, true>,
) -> Forwarded<(u64, Ended)> {
    let (peer, tunnel) = (ForwardError::peer, ForwardError::tunnel);
    let sfd = fd(src);
    let mut total = 0u64;
    if quiet {
        src.readable(false).await.map_err(peer)?;
    }
    loop {
        let step = with_scratch(|buf| -> io::Result<Option<(usize, bool, Vec<u8>)>> {
            let Some(n) = recv_now(sfd, buf)? else {
                return Ok(None);
            };
            let frames = match n {
                0 => chunk::header(chunk::END).to_vec(),
                n => rewrite::chunks(requests, &buf[..n])?,
            };
            Ok(Some((n, n == buf.len(), frames)))
        })
        .map_err(peer)?;
        match step {
            None => src.readable(false).await.map_err(peer)?,
            Some((n, full, frames)) => {
                if !frames.is_empty() {
                    sockio::write_all(dst, &frames).await.map_err(tunnel)?;
                }
                if n == 0 {
                    return Ok((total, Ended::Clean));
                }
                count.add(n);
                total += n as u64;
                if !full {
                    src.readable(false).await.map_err(peer)?;
                }
            }
        }
    }
}

/// Tunnel → peer: unwraps chunks until `END` (then FIN to the peer), or follows `RAW` by
/// splicing to the tunnel's EOF. `early` are tunnel bytes already read.
async fn decode(
    src: &TcpStream,
    dst: &TcpStream,
    pipes: &PipePool,
    early: &[u8],
    count: Count<'_, false>,
) -> Forwarded<(u64, Ended, Vec<u8>)> {
    let (peer, tunnel) = (ForwardError::peer, ForwardError::tunnel);
    let (sfd, dfd) = (fd(src), fd(dst));
    let mut st = Unchunk {
        count,
        ..Unchunk::default()
    };
    st.feed_all(dst, early).await?;
    // The tunnel's next bytes come after a round trip, and `early` (the visitor's first bytes,
    // sent with `Start`) was a read that drained the socket: the first recv would almost always
    // find nothing, so wait on the ring first (a poll on a ready socket completes at once).
    let mut wait_first = true;
    while !st.chunks.is_ended() && !st.chunks.is_raw() {
        if wait_first {
            src.readable(false).await.map_err(tunnel)?;
        }
        let step = with_scratch(|buf| -> Forwarded<Option<(bool, Option<Blocked>)>> {
            let Some(n) = recv_now(sfd, buf).map_err(tunnel)? else {
                return Ok(None);
            };
            if n == 0 {
                return Err(tunnel(cut_short()));
            }
            let short = n < buf.len();
            st.feed(dfd, &buf[..n]).map(|b| Some((short, b)))
        })?;
        match step {
            None => wait_first = true,
            Some((short, blocked)) => {
                // A short read almost always drained the socket (as in `encode`).
                wait_first = short;
                if let Some(b) = blocked {
                    sockio::write_all(dst, &b.pending).await.map_err(peer)?;
                    st.feed_all(dst, &b.rest).await?;
                }
            }
        }
    }
    if st.chunks.is_raw() {
        let n = pipe::splice_to_eof(src, dst, pipes, Side::Tunnel, count).await?;
        shutdown(dfd, Half::Write);
        return Ok((st.moved + n, Ended::Raw, Vec::new()));
    }
    shutdown(dfd, Half::Write);
    Ok((st.moved, Ended::Clean, st.chunks.take_leftover()))
}

/// The error of a data connection that ended before the visitor's `END`.
pub(super) fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "data connection closed in the middle of a visitor",
    )
}

/// Ends the peer's side of a failed forward: reset (see [`cut`]) when the tunnel failed, so
/// the truncation shows; shut down (a FIN) when the peer failed itself; only stop reading it
/// when the origin was unreachable, so the caller can still answer it (502).
pub(super) fn end_peer(peer: BorrowedFd<'_>, failed: Side) {
    match failed {
        Side::Tunnel => cut(peer),
        Side::Peer => shutdown(peer, Half::Both),
        Side::Origin => shutdown(peer, Half::Read),
    }
}

/// Runs a forwarder's two directions side by side. The first to fail calls `shut` (which
/// wakes the other) and its error is the one returned: what the other direction saw after
/// the shutdown is a consequence, not the cause.
/// The directions come pinned by the caller: moved in by value, each would take room twice in
/// this future (once as an argument, once in the join), and it lives as long as a visitor.
pub(super) async fn both<U, D>(
    up: Pin<&mut impl Future<Output = Forwarded<U>>>,
    down: Pin<&mut impl Future<Output = Forwarded<D>>>,
    shut: impl Fn(Side),
) -> Result<(U, D), ForwardError> {
    // Which direction failed first: up (true) or down (false).
    let first = std::cell::Cell::new(None::<bool>);
    let fail = |e: &ForwardError, is_up: bool| {
        if first.get().is_none() {
            first.set(Some(is_up));
            shut(e.side);
        }
    };
    let (up, down) = monoio::join!(
        async {
            let r = up.await;
            if let Err(e) = &r {
                fail(e, true);
            }
            r
        },
        async {
            let r = down.await;
            if let Err(e) = &r {
                fail(e, false);
            }
            r
        }
    );
    match (up, down) {
        (Ok(u), Ok(d)) => Ok((u, d)),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
        (Err(up), Err(down)) => Err(if first.get() == Some(true) { up } else { down }),
    }
}

/// Forwards `peer` ↔ plain `tunnel` in chunks until both directions end or either fails (then
/// both sockets are shut down, the peer's to be reset on close if the tunnel failed); the
/// error names the end that failed first. `early`: tunnel
/// bytes already read past `Start`; `peer_quiet`: the peer has nothing to read now (see
/// `encode`); `requests`: an HTTP visitor's reader, which rewrites every request head going up;
/// `tally`: where the visitor's bytes are counted as they move.
pub async fn forward(
    peer: &TcpStream,
    tunnel: &TcpStream,
    pipes: &PipePool,
    early: &[u8],
    peer_quiet: bool,
    requests: Option<&mut Requests>,
    tally: Tally<'_>,
) -> Forwarded<Outcome> {
    let shut = |failed: Side| {
        end_peer(fd(peer), failed);
        shutdown(fd(tunnel), Half::Both);
    };
    let up = pin!(encode(peer, tunnel, pipes, peer_quiet, requests, tally.up));
    let down = pin!(decode(tunnel, peer, pipes, early, tally.down));
    let ((up, up_end), (down, down_end, leftover)) = both(up, down, shut).await?;
    Ok(Outcome {
        up,
        down,
        reusable: up_end == Ended::Clean && down_end == Ended::Clean,
        leftover,
    })
}

#[cfg(test)]
mod tests {
    //! Both ends of a tunnel on one real ring: visitor ⇄ relay-side forward ⇄ tunnel ⇄
    //! agent-side forward ⇄ origin, with the visitor and origin played by plain threads.

    use std::io::{Read, Write};
    use std::net::Shutdown;

    use super::*;

    use crate::dataplane::uring::{on_ring, socket_pair as pair};

    /// Sends `up` from the visitor (then FIN) and `down` from the origin (after reading all
    /// of `up`, then FIN); returns both forwarders' outcomes and what each end received.
    fn run(up: Vec<u8>, down: Vec<u8>) -> (Outcome, Outcome, Vec<u8>, Vec<u8>) {
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let (mut visitor, v_side) = pair();
        let (mut origin, o_side) = pair();
        let want_up = up.len();
        let visitor_thread = std::thread::spawn(move || {
            visitor.write_all(&up).unwrap();
            visitor.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            visitor.read_to_end(&mut got).unwrap();
            got
        });
        let origin_thread = std::thread::spawn(move || {
            let mut got = vec![0u8; want_up];
            origin.read_exact(&mut got).unwrap();
            origin.write_all(&down).unwrap();
            origin.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            origin.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "only the visitor's bytes reach the origin");
            got
        });
        let (t_relay, t_agent) = pair();
        let (relay, agent) = rt.block_on(async move {
            let (v_side, o_side) = (on_ring(v_side), on_ring(o_side));
            let (t_relay, t_agent) = (on_ring(t_relay), on_ring(t_agent));
            let pipes = PipePool::default();
            let (r, a) = monoio::join!(
                forward(&v_side, &t_relay, &pipes, &[], false, None, Tally::none()),
                forward(&o_side, &t_agent, &pipes, &[], true, None, Tally::none())
            );
            (r.unwrap(), a.unwrap())
        });
        (
            relay,
            agent,
            visitor_thread.join().unwrap(),
            origin_thread.join().unwrap(),
        )
    }

    #[test]
    fn small_exchanges_stay_chunked_and_reusable() {
        if !crate::dataplane::probe::uring_for_tests() {
            return;
        }
        let (relay, agent, at_visitor, at_origin) = run(b"ping".to_vec(), b"pong".to_vec());
        assert_eq!(at_origin, b"ping");
        assert_eq!(at_visitor, b"pong");
        assert!(relay.reusable && agent.reusable, "{relay:?} {agent:?}");
        assert_eq!((relay.up, relay.down, agent.up, agent.down), (4, 4, 4, 4));
    }

    #[test]
    fn bulk_switches_to_raw_splice_and_ends_the_connection() {
        if !crate::dataplane::probe::uring_for_tests() {
            return;
        }
        // Far more than the scratch buffer each way: both directions go RAW.
        let up: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..3u32 << 20).map(|i| (i % 241) as u8).collect();
        let (relay, agent, at_visitor, at_origin) = run(up.clone(), down.clone());
        assert!(at_origin == up, "4 MiB up, intact and in order");
        assert!(at_visitor == down, "3 MiB down, intact and in order");
        assert!(
            !relay.reusable && !agent.reusable,
            "RAW ends the connection"
        );
        assert_eq!(relay.up, up.len() as u64);
        assert_eq!(agent.up, down.len() as u64);
    }

    #[test]
    fn a_lost_tunnel_is_the_tunnel_side_and_cuts_the_visitor() {
        if !crate::dataplane::probe::uring_for_tests() {
            return;
        }
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .build()
            .unwrap();
        let (_visitor, v_side) = pair();
        let (t_relay, mut t_agent) = pair();
        // Half a reply, then the agent's end vanishes without `END`.
        let mut half = Vec::new();
        chunk::push_chunks(&mut half, b"part of a reply");
        t_agent.write_all(&half).unwrap();
        drop(t_agent);
        let err = rt.block_on(async move {
            let (v_side, t_relay) = (on_ring(v_side), on_ring(t_relay));
            let pipes = PipePool::default();
            forward(&v_side, &t_relay, &pipes, &[], true, None, Tally::none())
                .await
                .unwrap_err()
        });
        assert_eq!(err.side, Side::Tunnel, "{err}");
        assert!(!err.retry, "bytes reached the visitor");
        assert!(err.to_string().contains("middle of a visitor"), "{err}");
    }
}
