//! The tokio backend's forwarding over a reusable data connection: the visitor's (or local
//! service's) bytes go down the tunnel as chunks ([`crate::protocol::chunk`]), each direction
//! ends with an `END` chunk instead of a FIN, and when both did the connection can carry the
//! next visitor. A peer that switched a direction to raw (the uring backend splicing a bulk
//! transfer) is followed: the rest of that direction is copied as it comes, and the connection
//! ends with this visitor.
//!
//! Memory follows traffic, not connections: a direction reads into a buffer on the stack of
//! the poll that found data and writes it straight on; only bytes the writer could not take
//! yet move to the heap, and that buffer is freed once drained. An idle forwarded pair owns no
//! buffer at all (tokio's `copy_bidirectional` keeps two for the pair's whole life).

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::dataplane::forwarded::{ForwardError, Forwarded, Outcome, Side};
use crate::dataplane::gate::Admission;
use crate::dataplane::rewrite;
use crate::dataplane::tally::Tally;
use crate::protocol::chunk::{self, Unchunker, HEADER_LEN};
use crate::protocol::http::requests::Requests;

/// Bytes one read may move, in bytes. 64 KiB keeps syscalls per GiB low on bulk transfers;
/// it lives on the polling thread's stack, not per connection.
pub const COPY_BUF_LEN: usize = 64 * 1024;

/// Which way a [`HalfDuplex`] moves bytes, and so what it does to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Peer → tunnel: every read becomes one chunk; EOF becomes `END`.
    Up,
    /// Tunnel → peer: chunks are unwrapped until `END` (or raw until EOF), then the peer's
    /// write side is shut.
    Down,
}

impl Direction {
    /// The end this direction reads from (it writes to the other).
    fn reads(self) -> Side {
        match self {
            Direction::Up => Side::Peer,
            Direction::Down => Side::Tunnel,
        }
    }
}

/// One direction of a forwarded visitor: reads its source, frames (up) or unframes (down),
/// writes its destination. Bytes the destination cannot take yet wait in `pending`, the only
/// heap buffer, freed once drained.
struct HalfDuplex<'r> {
    direction: Direction,
    /// Bytes for the destination not written yet.
    pending: Vec<u8>,
    written: usize,
    /// Down: the chunk decoder.
    chunks: Unchunker,
    /// Down: tunnel bytes read but not decoded yet (kept while `pending` drains).
    carry: Vec<u8>,
    /// Up: an HTTP visitor's request heads are rewritten on the way.
    requests: Option<&'r mut Requests>,
    /// The source ended: flush (and, down, shut the peer's write side), then done.
    ended: bool,
    done: bool,
    /// Payload bytes moved (counted when read, so a drain does not count them again).
    moved: u64,
    /// The visitor's admission, which counts them as well (on the relay).
    count: Option<&'r Admission>,
}

impl<'r> HalfDuplex<'r> {
    fn new(direction: Direction) -> Self {
        Self {
            direction,
            pending: Vec::new(),
            written: 0,
            chunks: Unchunker::default(),
            carry: Vec::new(),
            requests: None,
            ended: false,
            done: false,
            moved: 0,
            count: None,
        }
    }

    /// `n` more bytes moved this way: counted into the visitor's admission, if any.
    fn counted(&self, n: usize) {
        if let Some(a) = self.count {
            a.count_bytes(matches!(self.direction, Direction::Up), n as u64);
        }
    }

    fn read_err(&self, e: io::Error) -> ForwardError {
        ForwardError::new(self.direction.reads(), e)
    }

    fn write_err(&self, e: io::Error) -> ForwardError {
        ForwardError::new(self.direction.reads().other(), e)
    }

    /// Writes `bytes` to `w` now as far as it takes them; the rest waits in `pending`.
    fn write_or_keep<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        w: Pin<&mut W>,
        bytes: &[u8],
    ) -> Forwarded<()> {
        match w.poll_write(cx, bytes) {
            Poll::Ready(Ok(0)) => Err(self.write_err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(m)) => {
                self.pending.extend_from_slice(&bytes[m..]);
                Ok(())
            }
            Poll::Ready(Err(e)) => Err(self.write_err(e)),
            Poll::Pending => {
                self.pending.extend_from_slice(bytes);
                Ok(())
            }
        }
    }

    /// Writes `pending[written..]` to `w`; once all of it is written, frees it.
    fn poll_drain<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
    ) -> Poll<Forwarded<()>> {
        while self.written < self.pending.len() {
            let n = match ready!(w.as_mut().poll_write(cx, &self.pending[self.written..])) {
                Ok(0) => return Poll::Ready(Err(self.write_err(io::ErrorKind::WriteZero.into()))),
                Ok(n) => n,
                Err(e) => return Poll::Ready(Err(self.write_err(e))),
            };
            self.written += n;
        }
        self.pending = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Down: decodes `input`; visitor bytes go to `w` or, once it is full, to `pending` (with
    /// the undecoded rest in `carry`).
    fn feed<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
        mut input: &[u8],
    ) -> Forwarded<()> {
        loop {
            let data = match self.chunks.next_data(&mut input) {
                Ok(Some(data)) => data,
                Ok(None) => break,
                Err(e) => return Err(ForwardError::from_chunk(e)),
            };
            self.moved += data.len() as u64;
            self.counted(data.len());
            self.write_or_keep(cx, w.as_mut(), data)?;
            if !self.pending.is_empty() {
                // The peer is full: keep the undecoded rest for when it drains.
                self.carry.extend_from_slice(input);
                return Ok(());
            }
        }
        self.ended = self.chunks.is_ended();
        Ok(())
    }

    /// Up: sends the `n` bytes read into `stack[HEADER_LEN..]` as a chunk (the header goes in
    /// front, so one write sends both), or as rewritten request frames.
    fn encode<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        w: Pin<&mut W>,
        stack: &mut [MaybeUninit<u8>],
        n: usize,
    ) -> Forwarded<()> {
        self.moved += n as u64;
        self.counted(n);
        // SAFETY: the read initialised `n` bytes after the header slot.
        let read =
            unsafe { std::slice::from_raw_parts(stack.as_ptr().add(HEADER_LEN).cast::<u8>(), n) };
        if let Some(requests) = self.requests.as_deref_mut() {
            let frames = rewrite::chunks(requests, read).map_err(ForwardError::peer)?;
            if frames.is_empty() {
                return Ok(());
            }
            return self.write_or_keep(cx, w, &frames);
        }
        for (slot, b) in stack.iter_mut().zip(chunk::header(n as u32)) {
            slot.write(b);
        }
        // SAFETY: the header was just written and the read initialised `n` bytes after it.
        let frame =
            unsafe { std::slice::from_raw_parts(stack.as_ptr().cast::<u8>(), HEADER_LEN + n) };
        self.write_or_keep(cx, w, frame)
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<Forwarded<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_drain(cx, w.as_mut()))?;
            if !self.carry.is_empty() {
                let carry = std::mem::take(&mut self.carry);
                self.feed(cx, w.as_mut(), &carry)?;
                continue;
            }
            if self.ended {
                ready!(w.as_mut().poll_flush(cx)).map_err(|e| self.write_err(e))?;
                if self.direction == Direction::Down {
                    ready!(w.as_mut().poll_shutdown(cx)).map_err(|e| self.write_err(e))?;
                }
                self.done = true;
                continue;
            }
            // Uninitialised on purpose: zeroing it per poll costs more than the copy. Up
            // leaves room for a chunk header in front of the data.
            let mut stack = [MaybeUninit::<u8>::uninit(); HEADER_LEN + COPY_BUF_LEN];
            let mut buf = ReadBuf::uninit(&mut stack[HEADER_LEN..]);
            match r.as_mut().poll_read(cx, &mut buf) {
                Poll::Pending => {
                    ready!(w.as_mut().poll_flush(cx)).map_err(|e| self.write_err(e))?;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.read_err(e))),
                Poll::Ready(Ok(())) => {}
            }
            let n = buf.filled().len();
            match (self.direction, n) {
                (Direction::Up, 0) => {
                    self.pending = chunk::header(chunk::END).to_vec();
                    self.ended = true;
                }
                (Direction::Up, n) => self.encode(cx, w.as_mut(), &mut stack, n)?,
                (Direction::Down, 0) if self.chunks.is_raw() => self.ended = true,
                (Direction::Down, 0) => {
                    return Poll::Ready(Err(ForwardError::tunnel(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "data connection closed in the middle of a visitor",
                    ))))
                }
                (Direction::Down, _) => {
                    // SAFETY: the read initialised `n` bytes after the header slot.
                    let read = unsafe {
                        std::slice::from_raw_parts(stack.as_ptr().add(HEADER_LEN).cast::<u8>(), n)
                    };
                    self.feed(cx, w.as_mut(), read)?;
                }
            }
        }
    }
}

/// Sends `prefix` (raw bytes already framed by the caller, e.g. `Start` plus a chunk), then
/// forwards `peer` ↔ `tunnel` in chunks until both directions end or either fails; the error
/// names the end that failed first. `early` are tunnel bytes already read past the last
/// control frame; they are decoded first. `requests`: an HTTP visitor's reader, which
/// rewrites every request head going up; `tally`: where the visitor's bytes are counted as
/// they move.
pub async fn forward<P, T>(
    peer: &mut P,
    tunnel: &mut T,
    prefix: &[u8],
    early: &[u8],
    requests: Option<&mut Requests>,
    tally: Tally<'_>,
) -> Forwarded<Outcome>
where
    P: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if !prefix.is_empty() {
        tunnel
            .write_all(prefix)
            .await
            .map_err(|e| ForwardError::tunnel(e).with_progress(0, 0))?;
    }
    let mut up = HalfDuplex::new(Direction::Up);
    up.requests = requests;
    up.count = tally.admission();
    let mut down = HalfDuplex::new(Direction::Down);
    down.carry = early.to_vec();
    down.count = tally.admission();
    poll_fn(|cx| {
        let a = up.poll(cx, Pin::new(&mut *peer), Pin::new(&mut *tunnel));
        let b = down.poll(cx, Pin::new(&mut *tunnel), Pin::new(&mut *peer));
        match (a, b) {
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await
    .map_err(|e| e.with_progress(up.moved, down.moved))?;
    Ok(Outcome {
        up: up.moved,
        down: down.moved,
        reusable: !down.chunks.is_raw(),
        leftover: down.chunks.take_leftover(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected loopback socket pair.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn two_visitors_share_one_tunnel() {
        // Two forwarders back to back over one tunnel, as relay and agent are.
        let (mut t_relay, mut t_agent) = pair().await;
        for round in 0..2u8 {
            let (mut visitor, mut v_side) = pair().await;
            let (mut o_side, mut origin) = pair().await;
            let mut pre = Vec::new();
            chunk::push_chunks(&mut pre, b"hello ");
            let relay = forward(&mut v_side, &mut t_relay, &pre, &[], None, Tally::none());
            let agent = forward(&mut o_side, &mut t_agent, &[], &[], None, Tally::none());
            let client = async {
                visitor.write_all(&[b'a' + round; 100_000]).await.unwrap();
                visitor.shutdown().await.unwrap();
                let mut got = Vec::new();
                origin.read_to_end(&mut got).await.unwrap();
                assert_eq!(&got[..6], b"hello ");
                assert_eq!(got.len(), 100_006);
                origin.write_all(b"bye").await.unwrap();
                origin.shutdown().await.unwrap();
                let mut reply = Vec::new();
                visitor.read_to_end(&mut reply).await.unwrap();
                assert_eq!(reply, b"bye");
            };
            let (relay, agent, ()) = tokio::join!(relay, agent, client);
            let (relay, agent) = (relay.unwrap(), agent.unwrap());
            assert!(relay.reusable && agent.reusable, "round {round}");
            assert!(relay.leftover.is_empty() && agent.leftover.is_empty());
            assert_eq!((agent.up, agent.down), (3, 100_006));
        }
    }

    #[tokio::test]
    async fn a_bad_chunk_header_is_an_error() {
        let (mut t_relay, mut t_agent) = pair().await;
        let (_visitor, mut v_side) = pair().await;
        t_agent.write_all(&[0x7f, 0, 0, 0]).await.unwrap();
        let err = forward(&mut v_side, &mut t_relay, &[], &[], None, Tally::none())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("invalid chunk header"), "{err}");
        assert_eq!(
            err.side,
            Side::Tunnel,
            "a broken frame is the tunnel's fault"
        );
    }

    #[tokio::test]
    async fn a_lost_tunnel_and_a_lost_peer_are_told_apart() {
        // The agent's end of the tunnel vanishes after part of a reply: the tunnel failed,
        // and since bytes moved the visitor cannot be retried elsewhere.
        let (mut t_relay, mut t_agent) = pair().await;
        let (_visitor, mut v_side) = pair().await;
        let mut half = Vec::new();
        chunk::push_chunks(&mut half, b"part of a reply");
        t_agent.write_all(&half).await.unwrap();
        drop(t_agent);
        let err = forward(&mut v_side, &mut t_relay, &[], &[], None, Tally::none())
            .await
            .unwrap_err();
        assert_eq!(err.side, Side::Tunnel, "{err}");
        assert!(err.tunnel_lost() && !err.retry, "{err:?}");

        // Before anything moved, a lost tunnel leaves the visitor free to go elsewhere.
        let (mut t_relay, t_agent) = pair().await;
        let (_visitor, mut v_side) = pair().await;
        drop(t_agent);
        let err = forward(&mut v_side, &mut t_relay, &[], &[], None, Tally::none())
            .await
            .unwrap_err();
        assert!(err.tunnel_lost() && err.retry, "{err:?}");

        // The visitor resets its connection: the peer failed, the tunnel did not.
        let (mut t_relay, _t_agent) = pair().await;
        let (visitor, mut v_side) = pair().await;
        crate::dataplane::sock::reset_on_close(std::os::fd::AsFd::as_fd(&visitor));
        drop(visitor);
        let err = forward(&mut v_side, &mut t_relay, &[], &[], None, Tally::none())
            .await
            .unwrap_err();
        assert_eq!(err.side, Side::Peer, "{err}");
        assert!(!err.retry);
    }

    #[tokio::test]
    async fn slow_reader_gets_everything_in_order() {
        // visitor <-> relay forwarder <-> tunnel <-> agent forwarder <-> origin, the origin
        // reading only after the visitor has written far more than socket buffers hold, so
        // both forwarders' writers block and bytes wait in their heap buffers.
        let (mut t_relay, mut t_agent) = pair().await;
        let (mut visitor, mut v_side) = pair().await;
        let (mut o_side, mut origin) = pair().await;
        let relay = tokio::spawn(async move {
            forward(&mut v_side, &mut t_relay, &[], &[], None, Tally::none()).await
        });
        let agent = tokio::spawn(async move {
            forward(&mut o_side, &mut t_agent, &[], &[], None, Tally::none()).await
        });
        let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            visitor.write_all(&data).await.unwrap();
            visitor.shutdown().await.unwrap();
            visitor
        });
        tokio::task::yield_now().await;
        let mut got = Vec::new();
        origin.read_to_end(&mut got).await.unwrap();
        assert!(got == expected, "16 MiB arrive intact and in order");
        origin.shutdown().await.unwrap();
        drop(writer.await.unwrap());
        let (relay, agent) = (relay.await.unwrap().unwrap(), agent.await.unwrap().unwrap());
        assert_eq!(relay.up, 16 << 20);
        assert_eq!(agent.down, 16 << 20);
        assert!(relay.reusable && agent.reusable);
    }
}
