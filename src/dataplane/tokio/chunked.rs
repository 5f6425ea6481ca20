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

use crate::dataplane::rewrite;
use crate::protocol::chunk::{self, Unchunker, HEADER_LEN};
use crate::protocol::http::requests::Requests;

/// Bytes one read may move, in bytes. 64 KiB keeps syscalls per GiB low on bulk transfers;
/// it lives on the polling thread's stack, not per connection.
pub const COPY_BUF_LEN: usize = 64 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// From the first stream to the second.
    pub a_to_b: u64,
    /// From the second stream to the first.
    pub b_to_a: u64,
}

/// Writes `pending[*written..]` to `w`, adding each write to `counted`; once all of it is
/// written, frees it (an idle direction keeps no buffer).
fn poll_drain<W: AsyncWrite + ?Sized>(
    cx: &mut Context<'_>,
    mut w: Pin<&mut W>,
    pending: &mut Vec<u8>,
    written: &mut usize,
    counted: &mut u64,
) -> Poll<io::Result<()>> {
    while *written < pending.len() {
        let n = ready!(w.as_mut().poll_write(cx, &pending[*written..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *written += n;
        *counted += n as u64;
    }
    *pending = Vec::new();
    *written = 0;
    Poll::Ready(Ok(()))
}

/// How a forwarded visitor left the data connection.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Bytes moved each way (peer → tunnel, tunnel → peer).
    pub moved: Moved,
    /// Both directions ended with `END`: the tunnel may carry another visitor.
    pub reusable: bool,
    /// Bytes read from the tunnel after the `END` (the start of whatever follows).
    pub leftover: Vec<u8>,
}

/// Peer → tunnel: every read becomes one chunk; EOF becomes `END`.
#[derive(Default)]
struct Encode<'r> {
    pending: Vec<u8>,
    written: usize,
    ended: bool,
    done: bool,
    moved: u64,
    /// An HTTP visitor's request heads are rewritten on the way.
    requests: Option<&'r mut Requests>,
}

impl Encode<'_> {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            // Payload bytes were counted when read; the drain does not count them again.
            let (pending, written) = (&mut self.pending, &mut self.written);
            ready!(poll_drain(cx, w.as_mut(), pending, written, &mut 0))?;
            if self.ended {
                ready!(w.as_mut().poll_flush(cx))?;
                self.done = true;
                continue;
            }
            // Uninitialised on purpose, as in `forward`: zeroing it per poll costs more than
            // the copy. The header goes in front of the data, so one write sends both.
            let mut stack = [MaybeUninit::<u8>::uninit(); HEADER_LEN + COPY_BUF_LEN];
            let (head, body) = stack.split_at_mut(HEADER_LEN);
            let mut buf = ReadBuf::uninit(body);
            match r.as_mut().poll_read(cx, &mut buf) {
                Poll::Pending => {
                    ready!(w.as_mut().poll_flush(cx))?;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let n = buf.filled().len();
            if n == 0 {
                self.pending = chunk::header(chunk::END).to_vec();
                self.ended = true;
                continue;
            }
            if let Some(requests) = self.requests.as_deref_mut() {
                self.moved += n as u64;
                let frames = rewrite::chunks(requests, buf.filled())?;
                if !frames.is_empty() {
                    match w.as_mut().poll_write(cx, &frames) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
                        }
                        Poll::Ready(Ok(m)) => self.pending.extend_from_slice(&frames[m..]),
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => self.pending = frames,
                    }
                }
                continue;
            }
            for (slot, b) in head.iter_mut().zip(chunk::header(n as u32)) {
                slot.write(b);
            }
            // SAFETY: the header was just written and the read initialised `n` bytes after it.
            let frame =
                unsafe { std::slice::from_raw_parts(stack.as_ptr().cast::<u8>(), HEADER_LEN + n) };
            self.moved += n as u64;
            match w.as_mut().poll_write(cx, frame) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(m)) => self.pending.extend_from_slice(&frame[m..]),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => self.pending.extend_from_slice(frame),
            }
        }
    }
}

/// Tunnel → peer: chunks are unwrapped until `END` (or raw until EOF).
#[derive(Default)]
struct Decode {
    chunks: Unchunker,
    /// Visitor bytes the peer has not taken yet.
    pending: Vec<u8>,
    written: usize,
    /// Tunnel bytes read but not decoded yet (kept while `pending` drains).
    carry: Vec<u8>,
    /// Saw `END` (or EOF in raw mode): shut the peer's write side, then done.
    ended: bool,
    done: bool,
    moved: u64,
}

impl Decode {
    /// Decodes `input`; visitor bytes go to `w` or, once it is full, to `pending` (with the
    /// undecoded rest in `carry`).
    fn feed<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
        mut input: &[u8],
    ) -> io::Result<()> {
        while let Some(data) = self
            .chunks
            .next_data(&mut input)
            .map_err(io::Error::other)?
        {
            self.moved += data.len() as u64;
            match w.as_mut().poll_write(cx, data) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(m)) if m == data.len() => {}
                Poll::Ready(Ok(m)) => self.pending.extend_from_slice(&data[m..]),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => self.pending.extend_from_slice(data),
            }
            if !self.pending.is_empty() {
                // The peer is full: keep the undecoded rest for when it drains.
                self.carry.extend_from_slice(input);
                return Ok(());
            }
        }
        self.ended = self.chunks.is_ended();
        Ok(())
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            // Payload bytes were counted when read; the drain does not count them again.
            let (pending, written) = (&mut self.pending, &mut self.written);
            ready!(poll_drain(cx, w.as_mut(), pending, written, &mut 0))?;
            if !self.carry.is_empty() {
                let carry = std::mem::take(&mut self.carry);
                self.feed(cx, w.as_mut(), &carry)?;
                continue;
            }
            if self.ended {
                ready!(w.as_mut().poll_flush(cx))?;
                ready!(w.as_mut().poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); COPY_BUF_LEN];
            let mut buf = ReadBuf::uninit(&mut stack);
            match r.as_mut().poll_read(cx, &mut buf) {
                Poll::Pending => {
                    ready!(w.as_mut().poll_flush(cx))?;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            if buf.filled().is_empty() {
                if self.chunks.is_raw() {
                    self.ended = true;
                    continue;
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "data connection closed in the middle of a visitor",
                )));
            }
            self.feed(cx, w.as_mut(), buf.filled())?;
        }
    }
}

/// Sends `prefix` (raw bytes already framed by the caller, e.g. `Start` plus a chunk), then
/// forwards `peer` ↔ `tunnel` in chunks until both directions end or either fails. `early`
/// are tunnel bytes already read past the last control frame; they are decoded first.
/// `requests`: an HTTP visitor's reader, which rewrites every request head going up.
pub async fn forward<P, T>(
    peer: &mut P,
    tunnel: &mut T,
    prefix: &[u8],
    early: &[u8],
    requests: Option<&mut Requests>,
) -> io::Result<Outcome>
where
    P: AsyncRead + AsyncWrite + Unpin + ?Sized,
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if !prefix.is_empty() {
        tunnel.write_all(prefix).await?;
    }
    let mut up = Encode {
        requests,
        ..Encode::default()
    };
    let mut down = Decode {
        carry: early.to_vec(),
        ..Decode::default()
    };
    poll_fn(|cx| {
        let a = up.poll(cx, Pin::new(&mut *peer), Pin::new(&mut *tunnel))?;
        let b = down.poll(cx, Pin::new(&mut *tunnel), Pin::new(&mut *peer))?;
        if a.is_ready() && b.is_ready() {
            Poll::Ready(Ok::<(), io::Error>(()))
        } else {
            Poll::Pending
        }
    })
    .await?;
    Ok(Outcome {
        moved: Moved {
            a_to_b: up.moved,
            b_to_a: down.moved,
        },
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
            let relay = forward(&mut v_side, &mut t_relay, &pre, &[], None);
            let agent = forward(&mut o_side, &mut t_agent, &[], &[], None);
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
            assert_eq!((agent.moved.a_to_b, agent.moved.b_to_a), (3, 100_006));
        }
    }

    #[tokio::test]
    async fn a_bad_chunk_header_is_an_error() {
        let (mut t_relay, mut t_agent) = pair().await;
        let (_visitor, mut v_side) = pair().await;
        t_agent.write_all(&[0x7f, 0, 0, 0]).await.unwrap();
        let err = forward(&mut v_side, &mut t_relay, &[], &[], None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("invalid chunk header"), "{err}");
    }

    #[tokio::test]
    async fn slow_reader_gets_everything_in_order() {
        // visitor <-> relay forwarder <-> tunnel <-> agent forwarder <-> origin, the origin
        // reading only after the visitor has written far more than socket buffers hold, so
        // both forwarders' writers block and bytes wait in their heap buffers.
        let (mut t_relay, mut t_agent) = pair().await;
        let (mut visitor, mut v_side) = pair().await;
        let (mut o_side, mut origin) = pair().await;
        let relay =
            tokio::spawn(async move { forward(&mut v_side, &mut t_relay, &[], &[], None).await });
        let agent =
            tokio::spawn(async move { forward(&mut o_side, &mut t_agent, &[], &[], None).await });
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
        assert_eq!(relay.moved.a_to_b, 16 << 20);
        assert_eq!(agent.moved.b_to_a, 16 << 20);
        assert!(relay.reusable && agent.reusable);
    }
}
