//! Waits shared by the tokio and uring paths, written once for any runtime: the caller
//! brings the runtime's own read and timer.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::pin;
use std::task::Poll;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::protocol::chunk::{self, StartAnswer};
use crate::protocol::http_proxy;
use crate::protocol::lifecycle::{RelayDataConn, RelayNext};

/// A socket (or stream over one) read on whichever runtime owns it.
#[allow(async_fn_in_trait)] // implemented and awaited only inside this crate, on concrete types
pub trait ReadSome {
    /// Reads what is available: at least one byte, or 0 at EOF.
    async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Every tokio stream.
impl<T: AsyncRead + Unpin> ReadSome for T {
    async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf).await
    }
}

/// Reads an HTTP proxy's answer to the agent's `CONNECT` (already sent) from `proxy`, up to
/// the end of its head: `Ok` once the tunnel to the relay is open. A refusal, garbage, or
/// bytes after the answer (nothing should come before the agent speaks) are errors.
pub async fn proxy_answer(proxy: &mut impl ReadSome) -> io::Result<()> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        let n = proxy.read_some(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the proxy closed the connection before answering CONNECT",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        match http_proxy::connect_answer(&buf) {
            Ok(None) => continue,
            Ok(Some(head)) if head == buf.len() => return Ok(()),
            Ok(Some(_)) => {
                return Err(io::Error::other(
                    "the proxy sent bytes after its answer to CONNECT",
                ))
            }
            Err(e) => return Err(io::Error::other(e)),
        }
    }
}

/// Runs `work` until it finishes (`Some`) or `deadline` fires first (`None`).
pub async fn race<T>(
    work: impl Future<Output = T>,
    deadline: impl Future<Output = ()>,
) -> Option<T> {
    let (mut work, mut deadline) = (pin!(work), pin!(deadline));
    poll_fn(|cx| {
        if let Poll::Ready(r) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        deadline.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// The relay's wait for the agent's `READY` after a visitor's two `END`s: feeds what the
/// agent sends to `conn` until it says park or close, or `deadline` (which should fire after
/// [`chunk::READY_WAIT`]) comes first. `next` is what [`RelayDataConn::on_visitor_done`]
/// answered. `true`: park the connection again.
pub async fn agent_ready(
    conn: &mut RelayDataConn,
    mut next: RelayNext,
    tunnel: &mut impl ReadSome,
    deadline: impl Future<Output = ()>,
) -> bool {
    let wait = async {
        loop {
            match next {
                RelayNext::Park => return true,
                RelayNext::Close => return false,
                RelayNext::WaitReady(_) => {}
            }
            let mut buf = [0u8; chunk::HEADER_LEN];
            // An error reads as EOF: either way the connection is not reused.
            let n = tunnel.read_some(&mut buf).await.unwrap_or(0);
            next = conn.on_ready_input(&buf[..n], Instant::now());
        }
    };
    match race(wait, deadline).await {
        Some(park) => park,
        // The driver's timer fired: the machine decides (past its deadline, it closes).
        None => conn.on_timeout(Instant::now()) == RelayNext::Park,
    }
}

/// Why a data connection gave no answer to `Start`: the visitor, of whom nothing was
/// answered, may move to another connection.
#[derive(Debug, thiserror::Error)]
pub enum NoAnswer {
    /// Nothing within [`chunk::START_WAIT`]: a link cut without a reset looks like this.
    #[error("no answer to Start within {:?}", chunk::START_WAIT)]
    Silent,
    /// The connection ended or failed first.
    #[error("the data connection ended before answering Start: {0}")]
    Lost(io::Error),
}

/// The relay's wait, after sending `Start`, for the agent's [`chunk::STARTED`], or for
/// `deadline` (which should fire after [`chunk::START_WAIT`]). Reads only the four bytes of
/// the answer. `Ok`: the header the chunk decoder must see first (`None` after `STARTED`;
/// the header itself when it was something else, such as `UNREACHABLE`).
pub async fn agent_started(
    tunnel: &mut impl ReadSome,
    deadline: impl Future<Output = ()>,
) -> Result<Option<[u8; chunk::HEADER_LEN]>, NoAnswer> {
    let wait = async {
        let mut buf = [0u8; chunk::HEADER_LEN];
        let mut have = 0;
        loop {
            match chunk::start_answer(&buf[..have]) {
                StartAnswer::NeedMore => {}
                StartAnswer::Started => return Ok(None),
                StartAnswer::Other => return Ok(Some(buf)),
            }
            match tunnel.read_some(&mut buf[have..]).await {
                Ok(0) => return Err(NoAnswer::Lost(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => have += n,
                Err(e) => return Err(NoAnswer::Lost(e)),
            }
        }
    };
    race(wait, deadline).await.unwrap_or(Err(NoAnswer::Silent))
}
