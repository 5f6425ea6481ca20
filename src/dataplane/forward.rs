//! Bidirectional forwarding for the tokio backend, with half-close propagated: each
//! direction shuts down its writer when its reader reaches EOF, so a half-closed peer still
//! receives the whole answer.
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
pub(super) fn poll_drain<W: AsyncWrite + ?Sized>(
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

/// One direction's state.
#[derive(Default)]
struct Direction {
    /// Bytes read but not yet written; empty (and unallocated) most of the time.
    pending: Vec<u8>,
    written: usize,
    eof: bool,
    done: bool,
    moved: u64,
}

impl Direction {
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
            if self.written < self.pending.len() {
                let (pending, written) = (&mut self.pending, &mut self.written);
                ready!(poll_drain(
                    cx,
                    w.as_mut(),
                    pending,
                    written,
                    &mut self.moved
                ))?;
                continue;
            }
            if self.eof {
                ready!(w.as_mut().poll_flush(cx))?;
                ready!(w.as_mut().poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            // Uninitialised on purpose: zeroing 64 KiB on every poll cost 14 % of the relay's
            // CPU under small-request load (perf, wrk keep-alive). A plain TCP read writes
            // into it without initialising; TLS streams initialise only what they need.
            let mut stack = [MaybeUninit::<u8>::uninit(); COPY_BUF_LEN];
            let mut buf = ReadBuf::uninit(&mut stack);
            match r.as_mut().poll_read(cx, &mut buf) {
                Poll::Pending => {
                    // Nothing to read: flush whatever the writer buffers (TLS records).
                    ready!(w.as_mut().poll_flush(cx))?;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let data = buf.filled();
            if data.is_empty() {
                self.eof = true;
                continue;
            }
            match w.as_mut().poll_write(cx, data) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.moved += n as u64;
                    if n < data.len() {
                        self.pending.extend_from_slice(&data[n..]);
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => self.pending.extend_from_slice(data),
            }
        }
    }
}

/// Writes `prefix` to `b`, then copies both ways until both directions reach EOF or either
/// side fails. On failure both streams are dropped by the caller, closing them.
pub async fn forward<A, B>(a: &mut A, b: &mut B, prefix: &[u8]) -> io::Result<Moved>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if !prefix.is_empty() {
        b.write_all(prefix).await?;
    }
    let mut ab = Direction::default();
    let mut ba = Direction::default();
    poll_fn(|cx| {
        let a_to_b = ab.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let b_to_a = ba.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        if a_to_b.is_ready() && b_to_a.is_ready() {
            Poll::Ready(Ok::<(), io::Error>(()))
        } else {
            Poll::Pending
        }
    })
    .await?;
    Ok(Moved {
        a_to_b: ab.moved + prefix.len() as u64,
        b_to_a: ba.moved,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected loopback socket pair.
    pub(in crate::dataplane) async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn half_close_and_prefix_pass_through() {
        // client <-> (a | forward | b) <-> server
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let fwd = tokio::spawn(async move { forward(&mut a, &mut b, b"pre:").await });
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"pre:ping");
        server.write_all(b"pong after half-close").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"pong after half-close");
        let moved = fwd.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Moved {
                a_to_b: 8,
                b_to_a: 21
            }
        );
    }

    #[tokio::test]
    async fn slow_reader_gets_everything_in_order() {
        // The server reads only after the client has written far more than socket buffers
        // hold, so the forwarder's writer blocks and bytes wait in its heap buffer.
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let fwd = tokio::spawn(async move { forward(&mut a, &mut b, &[]).await });
        let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&data).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        tokio::task::yield_now().await;
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == expected, "16 MiB arrive intact and in order");
        drop(server);
        drop(writer.await.unwrap());
        fwd.await.unwrap().unwrap();
    }
}
