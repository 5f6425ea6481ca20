//! A worker's end of a tunnel data connection: a plain socket, spliced, or a TLS one, copied
//! through rustls. Relay and agent tasks use this one type whichever it is.

use std::io;

use monoio::net::TcpStream;

use super::chunked::{self, Outcome};
use super::splice::{self, PipePool};
use super::tls::{self, TlsStream};

/// A data connection owned by one worker.
pub enum Tunnel {
    /// Plain TCP: forwarded with splice.
    Plain(TcpStream),
    /// TLS in user space (no kTLS): forwarded by copying through rustls.
    Tls(Box<TlsStream>),
}

impl Tunnel {
    /// The underlying socket, for readiness waits.
    pub fn socket(&self) -> &TcpStream {
        match self {
            Tunnel::Plain(s) => s,
            Tunnel::Tls(t) => t.socket(),
        }
    }

    /// Sends all of `data` (encrypted on TLS), waiting on the ring when the socket is full.
    pub async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        match self {
            Tunnel::Plain(s) => splice::write_all(s, data).await,
            Tunnel::Tls(t) => t.write_all(data).await,
        }
    }

    /// Reads what is available: at least one byte, or 0 at the end of the stream.
    pub async fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Tunnel::Plain(s) => splice::read_some(s, buf).await,
            Tunnel::Tls(t) => t.read(buf).await,
        }
    }

    /// Forwards one visitor both ways between `peer` (visitor or local service) and the
    /// tunnel, in chunks, until both directions end or either fails. `early`: tunnel bytes
    /// already read past `Start`. The outcome says whether the tunnel can carry another.
    pub async fn forward(
        &self,
        peer: &TcpStream,
        pipes: &PipePool,
        early: &[u8],
    ) -> io::Result<Outcome> {
        match self {
            Tunnel::Plain(s) => chunked::forward(peer, s, pipes, early).await,
            Tunnel::Tls(t) => tls::forward(peer, t, early).await,
        }
    }
}
