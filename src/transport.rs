//! Byte streams and framed message I/O shared by relay and agent.
//!
//! Control and data connections may be plain TCP or TLS; [`BoxStream`] erases the difference
//! so the rest of the code handles one type. [`Framed`] reads and writes protocol messages on
//! such a stream and hands back any bytes read past the last frame, because on a data
//! connection the visitor's bytes follow the `Start` frame in the same segment.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::protocol::msg::Message;
use crate::protocol::{ProtocolError, MAX_FRAME_LEN};

/// Anything that can carry a tunnel connection.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A plain or TLS connection, type-erased.
pub type BoxStream = Box<dyn Stream>;

/// A connection accepted on the relay's control port: plain TCP, which the io_uring data
/// plane can take over as a raw socket, or TLS, which stays in user space.
pub enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS terminated by rustls.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    /// The TCP socket under the connection (under TLS, when it is TLS).
    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Conn::Plain(s) => s.as_fd(),
            Conn::Tls(s) => s.get_ref().0.as_fd(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Conn::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// Failure reading or writing a framed message.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer sent bytes that are not a valid message.
    #[error("malformed frame: {0}")]
    Protocol(#[from] ProtocolError),
    /// A well-formed frame that is not allowed here.
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    /// The peer closed the connection (cleanly, between frames).
    #[error("connection closed by peer")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// A stream with a read buffer for decoding messages.
pub struct Framed<S> {
    io: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    /// Wraps a stream with an empty buffer.
    pub fn new(io: S) -> Self {
        Self {
            io,
            buf: Vec::with_capacity(1024),
        }
    }

    /// Wraps a stream whose first bytes were already read into `buf`.
    pub fn with_buffer(io: S, buf: Vec<u8>) -> Self {
        Self { io, buf }
    }

    /// A read that failed with `e`: an end of stream — a clean one, or a TLS peer that
    /// went away without `close_notify` (a process that exited; frames delimit themselves,
    /// so nothing is lost that a frame would not show) — is [`FrameIoError::Closed`]
    /// between frames and [`FrameIoError::Truncated`] inside one.
    fn ended(&self, e: io::Error) -> FrameIoError {
        match e.kind() {
            io::ErrorKind::UnexpectedEof if self.buf.is_empty() => FrameIoError::Closed,
            io::ErrorKind::UnexpectedEof => FrameIoError::Truncated,
            _ => FrameIoError::Io(e),
        }
    }

    /// Reads the next message. Cancel-safe: bytes read before a cancellation stay buffered
    /// for the next call. Never buffers more than one maximum-size frame plus one read.
    pub async fn read_msg<M: Message>(&mut self) -> Result<M, FrameIoError> {
        loop {
            if let Some((msg, used)) = M::decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(msg);
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096.min(MAX_FRAME_LEN));
            }
            let read = self.io.read_buf(&mut self.buf).await;
            if read.map_err(|e| self.ended(e))? == 0 {
                return Err(self.ended(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Reads the next message, refusing any frame that declares more than `max_len` bytes
    /// before its body is read: the first frames of an unauthenticated connection are tiny,
    /// and a peer must not make the relay buffer a maximum-size frame for free.
    pub async fn read_msg_capped<M: Message>(&mut self, max_len: usize) -> Result<M, FrameIoError> {
        loop {
            if let Some(header) = self.buf.get(..4) {
                let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
                if len > max_len {
                    return Err(ProtocolError::FrameTooLarge { len, max: max_len }.into());
                }
            }
            if let Some((msg, used)) = M::decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(msg);
            }
            // Never read past the frame, so a capped read buffers at most `max_len + 4` bytes.
            let want = match self.buf.len() {
                n if n < 4 => 4 - n,
                n => {
                    let h = &self.buf[..4];
                    4 + u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize - n
                }
            };
            let mut chunk = [0u8; 512];
            let want = want.min(chunk.len());
            let read = self.io.read(&mut chunk[..want]).await;
            let n = read.map_err(|e| self.ended(e))?;
            if n == 0 {
                return Err(self.ended(io::ErrorKind::UnexpectedEof.into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// [`Self::read_msg`] bounded by `limit`.
    pub async fn read_msg_within<M: Message>(
        &mut self,
        limit: Duration,
    ) -> Result<M, FrameIoError> {
        tokio::time::timeout(limit, self.read_msg())
            .await
            .map_err(|_| FrameIoError::Timeout(limit))?
    }

    /// Writes one message and flushes it, bounded by `limit` so a peer that stops reading
    /// cannot stall us forever.
    pub async fn write_msg<M: Message>(
        &mut self,
        msg: &M,
        limit: Duration,
    ) -> Result<(), FrameIoError> {
        let frame = msg.to_frame();
        let io = &mut self.io;
        let write = async move {
            io.write_all(&frame).await?;
            io.flush().await
        };
        tokio::time::timeout(limit, write)
            .await
            .map_err(|_| FrameIoError::Timeout(limit))??;
        Ok(())
    }

    /// The stream and the bytes read past the last decoded message.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.io, self.buf)
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::AgentMsg;

    /// A stream that yields `data`, then fails as rustls does when the TCP connection ends
    /// without `close_notify`.
    struct CutShort(std::io::Cursor<Vec<u8>>);

    impl AsyncRead for CutShort {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let before = buf.filled().len();
            let _ =
                std::io::Read::read(&mut self.0, buf.initialize_unfilled()).map(|n| buf.advance(n));
            if buf.filled().len() == before {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                );
                return Poll::Ready(Err(e));
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for CutShort {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_tls_peer_gone_without_close_notify_is_a_close_or_a_truncation() {
        let mut frame = Vec::new();
        AgentMsg::Heartbeat.encode(&mut frame);
        // Between frames: the peer closed.
        let mut f = Framed::new(CutShort(std::io::Cursor::new(frame.clone())));
        assert!(matches!(
            f.read_msg::<AgentMsg>().await,
            Ok(AgentMsg::Heartbeat)
        ));
        assert!(matches!(
            f.read_msg::<AgentMsg>().await,
            Err(FrameIoError::Closed)
        ));
        // Inside one: truncated, whichever read is used.
        let half = frame[..frame.len() - 1].to_vec();
        let mut f = Framed::new(CutShort(std::io::Cursor::new(half.clone())));
        assert!(matches!(
            f.read_msg::<AgentMsg>().await,
            Err(FrameIoError::Truncated)
        ));
        let mut f = Framed::new(CutShort(std::io::Cursor::new(half)));
        assert!(matches!(
            f.read_msg_capped::<AgentMsg>(64).await,
            Err(FrameIoError::Truncated)
        ));
    }
}
