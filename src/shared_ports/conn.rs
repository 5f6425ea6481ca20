//! A visitor's socket on whichever runtime accepted it, and reading its first bytes (the
//! request head or ClientHello) under a deadline.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::dataplane::gate::local_addr_of;
use crate::dataplane::sock::{shutdown, Half};
use crate::dataplane::wait::{race, ReadSome};

/// A visitor's socket on whichever runtime accepted it (tokio's, or a worker's).
pub(crate) trait VisitorConn: ReadSome {
    /// Writes all of `buf`.
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Sends FIN (errors ignored: the visitor may be gone).
    fn shutdown_write(&mut self);
    /// The local address the visitor connected to (a `getsockname`: ask only when needed).
    fn local_addr(&self) -> SocketAddr;
}

impl VisitorConn for TcpStream {
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        AsyncWriteExt::write_all(self, buf).await
    }

    fn shutdown_write(&mut self) {
        shutdown(self.as_fd(), Half::Write);
    }

    fn local_addr(&self) -> SocketAddr {
        local_addr_of(self.as_fd())
    }
}

/// What reading a visitor's first bytes ended with.
pub enum Head<T> {
    /// The parser is satisfied: its answer, and every byte read so far.
    Done(T, Vec<u8>),
    /// The visitor closed before saying enough.
    Closed,
    /// The deadline passed first.
    TimedOut,
}

/// Reads from `conn` until `parse` gives an answer (`Ok(Some)`) or an error, the visitor
/// closes, or `deadline` fires. `parse` sees all bytes read so far and owns the size limit.
pub(crate) async fn read_head<T, E>(
    conn: &mut impl VisitorConn,
    deadline: impl Future<Output = ()>,
    mut parse: impl FnMut(&[u8]) -> Result<Option<T>, E>,
) -> Result<Head<T>, E> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = match conn.read_some(&mut chunk).await {
                Ok(0) | Err(_) => return Ok(Head::Closed),
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            if let Some(t) = parse(&buf)? {
                return Ok(Head::Done(t, std::mem::take(&mut buf)));
            }
        }
    };
    race(read, deadline).await.unwrap_or(Ok(Head::TimedOut))
}
