//! Waits shared by the tokio and uring paths, written once for any runtime: the caller
//! brings the runtime's own read and timer.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::pin;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::protocol::chunk;

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

/// The relay's wait for the agent's `READY` after a visitor's two `END`s, until `deadline`
/// (which should fire after [`chunk::READY_WAIT`]). `got` are bytes already read after the
/// agent's `END`; the rest is read from `tunnel`. Anything but `READY`, EOF or silence means
/// the connection is not reused.
pub async fn agent_ready(
    tunnel: &mut impl ReadSome,
    mut got: Vec<u8>,
    deadline: impl Future<Output = ()>,
) -> bool {
    let wait = async {
        loop {
            match chunk::check_ready(&got) {
                Ok(true) => return true,
                Ok(false) => {}
                Err(_) => return false,
            }
            let mut buf = [0u8; chunk::HEADER_LEN];
            match tunnel.read_some(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    race(wait, deadline).await.unwrap_or(false)
}
