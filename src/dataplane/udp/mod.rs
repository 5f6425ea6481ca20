//! `udp` services: a public UDP port on the relay, a flow per visitor address, and the
//! datagrams of every flow carried over a few data connections of the agent (*channels*,
//! framed by [`crate::protocol::datagram`]). Both backends run this on tokio: the rings
//! carry the TCP services.
//!
//! - [`flows`]: the relay's table of flows, with time as a parameter.
//! - [`relay`]: the relay's public socket, flows and channels of one service.
//! - [`agent`]: the agent's end of the channels: a socket per flow toward the local service.
//! - [`mmsg`]: datagrams in batches (`recvmmsg`, `sendmmsg`), the one unsafe edge here.

pub mod agent;
pub mod flows;
pub mod mmsg;
pub mod relay;

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Most datagrams queued per channel (each direction) before more are dropped.
pub const CHANNEL_QUEUE: usize = 4096;

/// Most bytes queued per channel (each direction) before more are dropped: a few
/// milliseconds at line rate, so a burst rides it out, and a stalled channel (or a flood of
/// 64 KiB datagrams) costs bounded memory.
pub const QUEUE_BYTES: usize = 2 << 20;

/// Bytes read from a channel at once.
pub const READ_BUF: usize = 256 * 1024;

/// Most bytes written to a channel in one batch.
const BATCH_MAX: usize = 256 * 1024;

/// Kernel buffer asked for on each UDP socket: room for a burst at line rate while the task
/// that reads it waits for a core (the default, ~200 KiB, drops datagrams under load).
const SOCKET_BUFFER: usize = 4 << 20;

/// The sending end of one channel's queue of items (each a header and a datagram), bounded
/// in items and in bytes: a push that does not fit is refused, and the caller drops the
/// datagram, as a congested link would.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<Vec<u8>>,
    bytes: Arc<AtomicUsize>,
}

/// The receiving end of a [`Queue`], for [`write_queue`].
pub struct Drain {
    rx: mpsc::Receiver<Vec<u8>>,
    bytes: Arc<AtomicUsize>,
}

/// An empty queue.
pub fn queue() -> (Queue, Drain) {
    let (tx, rx) = mpsc::channel(CHANNEL_QUEUE);
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        Queue {
            tx,
            bytes: bytes.clone(),
        },
        Drain { rx, bytes },
    )
}

impl Queue {
    /// Queues `item` if it fits; `false` if it was dropped.
    pub fn push(&self, item: Vec<u8>) -> bool {
        let n = item.len();
        if self.bytes.fetch_add(n, Ordering::Relaxed) + n > QUEUE_BYTES {
            self.bytes.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        if self.tx.try_send(item).is_err() {
            self.bytes.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Whether `other` feeds the same channel.
    pub fn same_channel(&self, other: &Queue) -> bool {
        self.tx.same_channel(&other.tx)
    }
}

/// Writes a channel's queued items until every sender is gone: whatever is queued when the
/// connection can take more goes in one write of up to [`BATCH_MAX`] bytes.
pub async fn write_queue(writer: &mut (impl AsyncWrite + Unpin), queue: Drain) -> io::Result<()> {
    let Drain { mut rx, bytes } = queue;
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        bytes.fetch_sub(batch.len(), Ordering::Relaxed);
        writer.write_all(&batch).await?;
        writer.flush().await?;
    }
    Ok(())
}

/// Errors a UDP socket reports for one datagram (an ICMP error from an earlier send, a full
/// buffer), after which it keeps working.
pub fn transient(e: &io::Error) -> bool {
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

/// Asks for [`SOCKET_BUFFER`] bytes of receive and send buffer: beyond the system's cap
/// where the process may (`SO_RCVBUFFORCE`, with `CAP_NET_ADMIN`), else up to the cap.
pub fn widen_buffers(fd: BorrowedFd<'_>) {
    use rustix::net::sockopt as o;
    if o::set_socket_recv_buffer_size_force(fd, SOCKET_BUFFER).is_err() {
        let _ = o::set_socket_recv_buffer_size(fd, SOCKET_BUFFER);
    }
    if o::set_socket_send_buffer_size_force(fd, SOCKET_BUFFER).is_err() {
        let _ = o::set_socket_send_buffer_size(fd, SOCKET_BUFFER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_queue_holds_a_bounded_number_of_bytes_and_frees_them_when_written() {
        let (q, drain) = queue();
        let big = vec![0u8; 64 * 1024];
        let fit = (0..100).take_while(|_| q.push(big.clone())).count();
        assert_eq!(fit, QUEUE_BYTES / big.len(), "bounded by bytes");
        assert!(q.push(Vec::new()), "an empty item still fits");
        let bytes = q.bytes.clone();
        drop(q);
        let mut out = Vec::new();
        write_queue(&mut out, drain).await.unwrap();
        assert_eq!(out.len(), fit * big.len(), "every queued byte written");
        assert_eq!(bytes.load(Ordering::Relaxed), 0, "and given back");
    }
}
