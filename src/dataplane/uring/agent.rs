//! Agent-side worker task: one data connection — present the ticket, wait (pooled) for the
//! relay's `Start`, dial the local service, then forward both ways (splice on a plain data
//! connection, copies through rustls on a TLS one).

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use monoio::net::TcpStream;

use rustls_pki_types::ServerName;

use super::pipe::PipePool;
use super::sockio::fd;
use super::tls::TlsStream;
use super::tunnel::Tunnel;
use crate::dataplane::sock::set_nonblocking;
use crate::net::CONNECT_TIMEOUT;
use crate::protocol::auth::Ticket;
use crate::protocol::chunk;
use crate::protocol::msg::Message;
use crate::protocol::{AgentMsg, RelayMsg, MAX_FRAME_LEN, PROTOCOL_VERSION};

/// How a worker speaks TLS to the relay on data connections.
#[derive(Clone)]
pub struct AgentTls {
    /// The agent's client configuration (it pins or verifies the relay's certificate).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the relay's certificate is checked against.
    pub server_name: ServerName<'static>,
}

/// Runs one data connection: redeems `ticket`, then serves visitor after visitor (each on a
/// fresh connection to the local service) for as long as the connection stays reusable.
pub async fn serve_data(
    tls: Option<AgentTls>,
    relay: SocketAddr,
    ticket: Ticket,
    service: String,
    local: Arc<[SocketAddr]>,
    pipes: Rc<PipePool>,
) {
    if let Err(e) = run(tls, relay, ticket, &service, &local, &pipes).await {
        tracing::debug!(service, "data connection ended: {e}");
    }
}

/// Addresses arrive resolved: name lookups are blocking and must not stall a worker.
async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = monoio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect_addr(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out"),
            )
        })??;
    set_nonblocking(fd(&s))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// The first of `addrs` that accepts a connection.
async fn connect_any(addrs: &[SocketAddr]) -> io::Result<TcpStream> {
    let mut last = io::Error::other("no address");
    for addr in addrs {
        match connect(*addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Dials the relay and, when asked, completes the TLS handshake, within [`CONNECT_TIMEOUT`].
async fn open_tunnel(tls: Option<AgentTls>, relay: SocketAddr) -> io::Result<Tunnel> {
    let socket = connect(relay).await?;
    let Some(tls) = tls else {
        return Ok(Tunnel::Plain(socket));
    };
    let conn =
        rustls::ClientConnection::new(tls.config, tls.server_name).map_err(io::Error::other)?;
    let stream = TlsStream::new(socket, conn);
    monoio::time::timeout(CONNECT_TIMEOUT, stream.handshake())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    Ok(Tunnel::Tls(Box::new(stream)))
}

async fn run(
    tls: Option<AgentTls>,
    relay: SocketAddr,
    ticket: Ticket,
    service: &str,
    local: &[SocketAddr],
    pipes: &PipePool,
) -> io::Result<()> {
    // Dialing holds timers (cache-line aligned) and, with TLS, a handshaking rustls state:
    // boxed, so none of it pads the task that lives as long as the connection.
    let tunnel = Box::pin(open_tunnel(tls, relay)).await?;
    let hello = AgentMsg::DataHello {
        version: PROTOCOL_VERSION,
        ticket,
    };
    tunnel.write_all(&hello.to_frame()).await?;

    // One visitor after another, for as long as each ends cleanly both ways.
    let mut buf = vec![0u8; 512];
    let mut have = 0;
    loop {
        // Pooled: wait, unbounded, for Start (or the relay closing us).
        let (visitor, used) = loop {
            match RelayMsg::decode(&buf[..have]) {
                Ok(None) => {}
                Ok(Some((RelayMsg::Start { visitor }, used))) => break (visitor, used),
                Ok(Some((RelayMsg::Error { message, .. }, _))) => {
                    tracing::warn!(service, "relay refused a data connection: {message}");
                    return Ok(());
                }
                Ok(Some((other, _))) => {
                    return Err(io::Error::other(format!(
                        "unexpected {other:?} on data connection"
                    )))
                }
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
            if have == buf.len() {
                if buf.len() > MAX_FRAME_LEN + 4 {
                    return Err(io::Error::other("oversized frame from relay"));
                }
                buf.resize(buf.len() * 2, 0);
            }
            let n = tunnel.read_some_later(&mut buf[have..]).await?;
            if n == 0 {
                return Ok(()); // relay dropped the pooled connection
            }
            have += n;
        };
        let origin = match Box::pin(connect_any(local)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(service, %visitor, "cannot reach local service {local:?}: {e}");
                return Ok(());
            }
        };
        let outcome = tunnel
            .forward(&origin, pipes, &buf[used..have], true)
            .await?;
        // Forwarding ran origin → tunnel as "up" from the agent's side; the visitor's view is
        // the reverse.
        let (up, down, reusable) = (outcome.down, outcome.up, outcome.reusable);
        tracing::debug!(service, %visitor, up, down, reusable, "visitor done");
        if !reusable {
            return Ok(());
        }
        drop(origin);
        // Done with the local connection, cleanly: the relay may send the next visitor here.
        tunnel.write_all(&chunk::header(chunk::READY)).await?;
        have = outcome.leftover.len();
        if buf.len() < have {
            buf.resize(have, 0);
        }
        buf[..have].copy_from_slice(&outcome.leftover);
    }
}

#[cfg(test)]
mod tests {
    /// One agent task per pooled or busy data connection: keep it small and not over-aligned
    /// (dial timers and TLS handshakes are boxed; inline they padded it to 2.9 KiB).
    #[test]
    fn connection_task_stays_small() {
        let pipes = super::PipePool::default();
        let local: Vec<std::net::SocketAddr> = vec!["127.0.0.1:1".parse().unwrap()];
        let relay = "127.0.0.1:1".parse().unwrap();
        let ticket = crate::protocol::auth::Ticket([0; 16]);
        super::super::assert_task_small(|| super::run(None, relay, ticket, "x", &local, &pipes));
    }
}
