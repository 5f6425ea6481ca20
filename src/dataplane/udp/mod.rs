//! `udp` services: a public UDP port on the relay, a flow per visitor address, and the
//! datagrams of every flow carried over a few data connections of the agent (*channels*,
//! framed by [`crate::protocol::datagram`]). Both backends run this on tokio: the rings
//! carry the TCP services.
//!
//! - [`flows`]: the relay's table of flows, with time as a parameter.
//! - [`relay`]: the relay's public socket, flows and channels of one service.
//! - [`agent`]: the agent's end of the channels: a socket per flow toward the local service.

pub mod agent;
pub mod flows;
pub mod relay;

use std::io;
use std::os::fd::BorrowedFd;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Datagrams queued per channel (each direction) before more are dropped: about 1.5 MB of
/// 1 500-byte datagrams, a few milliseconds at line rate, so a burst rides it out and a
/// stalled channel costs bounded memory.
pub const CHANNEL_QUEUE: usize = 1024;

/// Bytes read from a channel at once.
pub const READ_BUF: usize = 256 * 1024;

/// Most bytes written to a channel in one batch.
const BATCH_MAX: usize = 256 * 1024;

/// Kernel buffer asked for on each UDP socket: room for a burst at line rate while the task
/// that reads it waits for a core (the default, ~200 KiB, drops datagrams under load).
const SOCKET_BUFFER: usize = 4 << 20;

/// Writes a channel's queued items until every sender is gone: whatever is queued when the
/// connection can take more goes in one write of up to [`BATCH_MAX`] bytes.
pub async fn write_queue(
    writer: &mut (impl AsyncWrite + Unpin),
    mut rx: mpsc::Receiver<Vec<u8>>,
) -> io::Result<()> {
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
        writer.write_all(&batch).await?;
        writer.flush().await?;
    }
    Ok(())
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
