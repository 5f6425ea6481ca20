//! Agent-side worker task: one data connection — present the ticket, wait (pooled) for the
//! relay's `Start`, dial the local service, then forward both ways (splice on a plain or kTLS
//! data connection, copies through rustls on a TLS one).

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use monoio::net::TcpStream;

use rustls_pki_types::ServerName;

use super::pipe::PipePool;
use super::sockio::{self, fd};
use super::tls::TlsStream;
use super::tunnel::Tunnel;
use crate::dataplane::sock::{self, set_nonblocking};
use crate::dataplane::tally::Tally;
use crate::dataplane::wait::{proxy_answer, ReadSome};
use crate::dataplane::InFlight;
use crate::net::CONNECT_TIMEOUT;
use crate::protocol::auth::Ticket;
use crate::protocol::lifecycle::{AgentDataConn, AgentEvent};
use crate::tls::ktls;

/// How a worker speaks TLS to the relay on data connections.
#[derive(Clone)]
pub struct AgentTls {
    /// The agent's client configuration (it pins or verifies the relay's certificate).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the relay's certificate is checked against.
    pub server_name: ServerName<'static>,
}

/// How a worker reaches the relay's control port: straight to its address, or through an HTTP
/// proxy (`CONNECT`). Addresses arrive resolved: name lookups block, and must not stall a worker.
#[derive(Debug, Clone)]
pub enum RelayDial {
    /// The relay's address.
    Direct(SocketAddr),
    /// The proxy's address, and the `CONNECT` request that opens a tunnel to the relay.
    Proxied {
        /// The proxy.
        proxy: SocketAddr,
        /// What is sent to it first.
        request: Arc<[u8]>,
    },
}

/// A worker's socket, read on the ring (for the proxy's answer).
struct Dialing<'a>(&'a TcpStream);

impl ReadSome for Dialing<'_> {
    async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sockio::read_some(self.0, buf).await
    }
}

impl RelayDial {
    /// A connection to the relay's control port (through the proxy's tunnel, if any).
    async fn open(&self) -> io::Result<TcpStream> {
        match self {
            RelayDial::Direct(addr) => connect(*addr).await,
            RelayDial::Proxied { proxy, request } => {
                let socket = connect(*proxy).await?;
                let exchange = async {
                    sockio::write_all(&socket, request).await?;
                    proxy_answer(&mut Dialing(&socket)).await
                };
                monoio::time::timeout(CONNECT_TIMEOUT, exchange)
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "the proxy did not answer CONNECT")
                    })??;
                Ok(socket)
            }
        }
    }
}

/// Runs one data connection: redeems `ticket`, then serves visitor after visitor (each on a
/// fresh connection to the local service) for as long as the connection stays reusable.
pub async fn serve_data(
    tls: Option<AgentTls>,
    relay: RelayDial,
    ticket: Ticket,
    service: String,
    local: Arc<[SocketAddr]>,
    in_flight: InFlight,
    pipes: Rc<PipePool>,
) {
    if let Err(e) = run(tls, relay, ticket, &service, &local, &in_flight, &pipes).await {
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
async fn open_tunnel(tls: Option<AgentTls>, relay: &RelayDial) -> io::Result<Tunnel> {
    let socket = relay.open().await?;
    // It may idle in the relay's pool for hours: let the kernel notice a cut link.
    let _ = crate::dataplane::sock::keep_alive(fd(&socket));
    let Some(tls) = tls else {
        return Ok(Tunnel::Plain(socket));
    };
    let conn =
        rustls::ClientConnection::new(tls.config, tls.server_name).map_err(io::Error::other)?;
    let stream = TlsStream::new(socket, conn);
    monoio::time::timeout(CONNECT_TIMEOUT, stream.handshake())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    if !ktls::available() {
        return Ok(Tunnel::Tls(Box::new(stream)));
    }
    // The relay sends nothing until `Start` (no session tickets), so rustls holds no record
    // the kernel would miss.
    let (socket, conn) = stream.into_parts();
    ktls::offload(fd(&socket), conn).map_err(io::Error::other)?;
    Ok(Tunnel::Ktls(socket))
}

async fn run(
    tls: Option<AgentTls>,
    relay: RelayDial,
    ticket: Ticket,
    service: &str,
    local: &[SocketAddr],
    in_flight: &InFlight,
    pipes: &PipePool,
) -> io::Result<()> {
    // Dialing holds timers (cache-line aligned) and, with TLS, a handshaking rustls state:
    // boxed, so none of it pads the task that lives as long as the connection.
    let tunnel = Box::pin(open_tunnel(tls, &relay)).await?;
    let (mut conn, hello) = AgentDataConn::open(ticket);
    tunnel.write_all(&hello).await?;

    // On the heap: held across the pooled wait, inline it would grow every idle task.
    let mut buf = vec![0u8; 512];
    // One visitor after another, for as long as each ends cleanly both ways.
    loop {
        // Pooled: wait, unbounded, for Start (or the relay closing us).
        let mut event = conn.pending();
        let (visitor, early) = loop {
            match event {
                AgentEvent::NeedMore => {
                    let n = tunnel.read_some_later(&mut buf).await?;
                    event = conn.on_pooled_input(&buf[..n]);
                }
                AgentEvent::Start { visitor, early } => break (visitor, early),
                AgentEvent::Refused { message, routine } => {
                    match routine {
                        true => {
                            tracing::debug!(service, "relay refused a data connection: {message}")
                        }
                        false => {
                            tracing::warn!(service, "relay refused a data connection: {message}")
                        }
                    }
                    return Ok(());
                }
                AgentEvent::Ended => return Ok(()), // relay dropped the pooled connection
                AgentEvent::Invalid(why) => return Err(io::Error::other(why)),
            }
        };
        // At once, before dialing: the relay hands the visitor on if this stays silent.
        tunnel.write_all(&conn.started()).await?;
        let _visiting = in_flight.enter();
        let origin = match Box::pin(connect_any(local)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(service, %visitor, "cannot reach local service {local:?}: {e}");
                // Tell the relay, so the visitor hears why (a 502 for HTTP), then close.
                let unreachable = conn.on_dial_failed();
                let told = tunnel.write_all(&unreachable);
                // Boxed: a timer inline would over-align every connection's task.
                let _ = Box::pin(monoio::time::timeout(CONNECT_TIMEOUT, told)).await;
                return Ok(());
            }
        };
        // Until its stream ends whole: an agent that dies meanwhile resets the local service.
        sock::arm_reset(fd(&origin));
        let outcome = match tunnel
            .forward(&origin, pipes, &early, true, None, Tally::none())
            .await
        {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(service, %visitor, "visitor ended: {e}");
                return Ok(());
            }
        };
        // Forwarding ran origin → tunnel as "up" from the agent's side; the visitor's view is
        // the reverse.
        let reusable = outcome.reusable && tunnel.keys_fresh();
        let (up, down) = (outcome.down, outcome.up);
        tracing::debug!(service, %visitor, up, down, reusable, "visitor done");
        sock::disarm_reset(fd(&origin));
        drop(origin);
        let Some(ready) = conn.on_visitor_done(reusable, outcome.leftover) else {
            return Ok(());
        };
        // Done with the local connection, cleanly: the relay may send the next visitor here.
        tunnel.write_all(&ready).await?;
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
        let relay = super::RelayDial::Direct("127.0.0.1:1".parse().unwrap());
        let ticket = crate::protocol::auth::Ticket([0; 16]);
        let in_flight = crate::dataplane::InFlight::default();
        super::super::assert_task_small(|| {
            super::run(None, relay.clone(), ticket, "x", &local, &in_flight, &pipes)
        });
    }
}
