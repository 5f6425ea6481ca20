//! A worker's end of a tunnel data connection: a plain socket, spliced; a TLS one whose keys
//! the kernel holds (kTLS), spliced the same way; a TLS one whose records the worker seals in
//! place with the keys rustls handed over; or, where rustls cannot hand them over (TLS 1.2), a
//! TLS one copied through rustls. Relay and agent tasks use this one type whichever it is.

use std::io;

use monoio::net::TcpStream;

use super::chunked;
use super::pipe::PipePool;
use super::sealed::{self, Sealed, SealedStream};
use super::sockio;
use super::tls::{self, TlsStream};
use crate::dataplane::forwarded::{Forwarded, Outcome};
use crate::dataplane::tally::Tally;
use crate::protocol::http::requests::Requests;
use crate::tls::{ktls, records};

/// How a data connection reaching a relay worker is encrypted.
pub enum DataTls {
    /// Not at all.
    Plain,
    /// By the kernel: its keys were handed over after the handshake (`tls::ktls::offload`).
    Kernel,
    /// By rustls, whose state (handshake done) comes along.
    User(Box<rustls::ServerConnection>),
}

/// A data connection owned by one worker.
pub enum Tunnel {
    /// Plain TCP: forwarded with splice.
    Plain(TcpStream),
    /// TLS offloaded to the kernel (`tls::ktls`): forwarded with splice like plain TCP.
    Ktls(TcpStream),
    /// TLS in user space (no kTLS), records sealed and opened in place.
    Sealed(Box<SealedStream>),
    /// TLS in user space that rustls could not hand over (TLS 1.2): copied through rustls.
    Tls(Box<TlsStream>),
}

/// A user-space TLS data connection's state without its socket, to move it to another worker.
pub enum TlsState {
    /// Records sealed in place.
    Sealed(Sealed),
    /// rustls.
    Rustls(rustls::Connection),
}

impl Tunnel {
    /// The underlying socket, for readiness waits.
    pub fn socket(&self) -> &TcpStream {
        match self {
            Tunnel::Plain(s) | Tunnel::Ktls(s) => s,
            Tunnel::Sealed(t) => t.socket(),
            Tunnel::Tls(t) => t.socket(),
        }
    }

    /// Sends all of `data` (encrypted on TLS), waiting on the ring when the socket is full.
    pub async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        match self {
            Tunnel::Plain(s) | Tunnel::Ktls(s) => sockio::write_all(s, data).await,
            Tunnel::Sealed(t) => t.write_all(data).await,
            Tunnel::Tls(t) => t.write_all(data).await,
        }
    }

    /// Reads what is available: at least one byte, or 0 at the end of the stream.
    pub async fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Tunnel::Plain(s) | Tunnel::Ktls(s) => sockio::read_some(s, buf).await,
            Tunnel::Sealed(t) => t.read(buf).await,
            Tunnel::Tls(t) => t.read(buf).await,
        }
    }

    /// Forwards one visitor both ways between `peer` (visitor or local service) and the
    /// tunnel, in chunks, until both directions end or either fails. `early`: tunnel bytes
    /// already read past `Start`; `peer_quiet`: the peer has nothing to read now (just
    /// connected, or its early bytes already sent with `Start`), so wait on the ring first;
    /// `requests`: an HTTP visitor's reader, which rewrites every request head going up;
    /// `tally`: where the visitor's bytes are counted as they move. The outcome says whether
    /// the tunnel can carry another.
    pub async fn forward(
        &self,
        peer: &TcpStream,
        pipes: &PipePool,
        early: &[u8],
        peer_quiet: bool,
        requests: Option<&mut Requests>,
        tally: Tally<'_>,
    ) -> Forwarded<Outcome> {
        match self {
            Tunnel::Plain(s) | Tunnel::Ktls(s) => {
                chunked::forward(peer, s, pipes, early, peer_quiet, requests, tally).await
            }
            Tunnel::Sealed(t) => sealed::forward(peer, t, early, peer_quiet, requests, tally).await,
            Tunnel::Tls(t) => tls::forward(peer, t, early, peer_quiet, requests, tally).await,
        }
    }

    /// A TLS connection whose handshake `stream` finished, as a worker carries it in user
    /// space: its records sealed in place where rustls hands its keys over (TLS 1.3 with one
    /// of its three suites, nothing left to send), else through rustls. Plaintext rustls had
    /// received comes along. Fails only when rustls finds a record it holds bad.
    pub fn after_handshake(stream: TlsStream) -> io::Result<Tunnel> {
        let (sock, mut conn) = stream.into_parts();
        conn.process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        if !records::can_take_over(&conn) {
            return Ok(Tunnel::tls(sock, TlsState::Rustls(conn)));
        }
        let mut plain = Vec::new();
        loop {
            let mut part = [0u8; 4096];
            match io::Read::read(&mut conn.reader(), &mut part) {
                Ok(0) => break,
                Ok(n) => plain.extend_from_slice(&part[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let records = records::take_over(conn).map_err(io::Error::other)?;
        Ok(Tunnel::tls(
            sock,
            TlsState::Sealed(Sealed::new(records, plain)),
        ))
    }

    /// A user-space TLS connection on this worker: `sock` with its state (a connection moved
    /// here from another worker).
    pub fn tls(sock: TcpStream, state: TlsState) -> Tunnel {
        match state {
            TlsState::Sealed(st) => Tunnel::Sealed(Box::new(SealedStream::new(sock, st))),
            TlsState::Rustls(conn) => Tunnel::Tls(Box::new(TlsStream::new(sock, conn))),
        }
    }

    /// A user-space TLS connection taken apart, to move to another worker; any other is
    /// given back.
    pub fn into_tls(self) -> Result<(TcpStream, TlsState), Tunnel> {
        match self {
            Tunnel::Sealed(t) => {
                let (sock, st) = t.into_parts();
                Ok((sock, TlsState::Sealed(st)))
            }
            Tunnel::Tls(t) => {
                let (sock, conn) = t.into_parts();
                Ok((sock, TlsState::Rustls(conn)))
            }
            other => Err(other),
        }
    }

    /// Whether this worker encrypts and decrypts the connection's bytes itself (TLS without
    /// kTLS), rather than the kernel splicing them.
    pub fn copies(&self) -> bool {
        matches!(self, Tunnel::Sealed(_) | Tunnel::Tls(_))
    }

    /// Whether the connection may carry another visitor as far as its keys go: a kTLS one is
    /// retired once it has carried [`ktls::RECORD_BUDGET`] records either way under its keys
    /// (the kernel cannot rekey), and so is a sealed one (neither can it); rustls rekeys on its own. Asked once
    /// a visitor is done (a check inside [`Self::forward`] would grow every connection's task).
    pub fn keys_fresh(&self) -> bool {
        match self {
            Tunnel::Ktls(s) => {
                ktls::records_used(sockio::fd(s)).is_ok_and(|n| n < ktls::RECORD_BUDGET)
            }
            Tunnel::Sealed(t) => t.records_used() < ktls::RECORD_BUDGET,
            _ => true,
        }
    }

    /// [`Self::read_some`] when the peer is expected to send only later (the next `Start`,
    /// the agent's `READY`): a plain tunnel waits on the ring before its first `recv` instead
    /// of spending one on `EAGAIN`. A TLS tunnel reads as usual (rustls may hold the bytes).
    pub async fn read_some_later(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Tunnel::Plain(s) | Tunnel::Ktls(s) = self {
            s.readable(false).await?;
        }
        self.read_some(buf).await
    }
}
