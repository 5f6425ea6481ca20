//! Waits shared by the tokio and uring paths, written once for any runtime: the caller
//! brings the runtime's own read and timer.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::pin;
use std::task::Poll;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::protocol::chunk;
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
