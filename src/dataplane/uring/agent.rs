//! Agent-side worker task: one data connection — present the ticket, wait (pooled) for the
//! relay's `Start`, dial the local service, then forward both ways (splice on a plain or kTLS
//! data connection, seals records on a TLS one without kTLS).

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use monoio::net::TcpStream;

use rustls_pki_types::ServerName;

use super::load::{self, Copying};
use super::pipe::PipePool;
use super::sockio::{self, fd};
use super::tls::TlsStream;
use super::tunnel::{TlsState, Tunnel};
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
    // Dialing holds timers (cache-line aligned) and, with TLS, a handshaking rustls state:
    // boxed, so none of it pads the task that lives as long as the connection.
    let served = match Box::pin(open(tls, relay, ticket)).await {
        Ok((tunnel, conn)) => {
            visitors(tunnel, conn, None, &service, &local, &in_flight, &pipes).await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = served {
        tracing::debug!(service, "data connection ended: {e}");
    }
}

/// A TLS data connection on its way to another worker as its visitor starts (see
/// [`super::load`]): everything its task held.
pub struct Resume {
    socket: std::net::TcpStream,
    tls: TlsState,
    conn: AgentDataConn,
    visitor: SocketAddr,
    early: Vec<u8>,
    service: String,
    local: Arc<[SocketAddr]>,
    in_flight: InFlight,
}

/// Serves the visitor a data connection moved here with, then visitor after visitor as
/// [`serve_data`] does.
pub async fn resume(r: Box<Resume>, pipes: Rc<PipePool>) {
    // First: the worker that moved the connection counted the visitor here already.
    let copying = Copying::adopt();
    let Resume {
        socket,
        tls,
        conn,
        visitor,
        early,
        service,
        local,
        in_flight,
    } = *r;
    let served = async {
        let tunnel = Tunnel::tls(TcpStream::from_std(socket)?, tls);
        // Boxed: inline, it would take room in the task for as long as the connection lives.
        let first = Some((Box::new((visitor, early)), copying));
        visitors(tunnel, conn, first, &service, &local, &in_flight, &pipes).await
    };
    if let Err(e) = served.await {
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
        return Tunnel::after_handshake(stream);
    }
    // The relay sends nothing until `Start` (no session tickets), so rustls holds no record
    // the kernel would miss.
    let (socket, conn) = stream.into_parts();
    ktls::offload(fd(&socket), conn).map_err(io::Error::other)?;
    Ok(Tunnel::Ktls(socket))
}

/// Opens a data connection to the relay and presents `ticket` on it.
async fn open(
    tls: Option<AgentTls>,
    relay: RelayDial,
    ticket: Ticket,
) -> io::Result<(Tunnel, AgentDataConn)> {
    let tunnel = open_tunnel(tls, &relay).await?;
    let (conn, hello) = AgentDataConn::open(ticket);
    tunnel.write_all(&hello).await?;
    Ok((tunnel, conn))
}

/// A visitor whose `Start` came: its address and the bytes sent with it.
type Started = (SocketAddr, Vec<u8>);

/// Serves visitor after visitor on a data connection that has presented its ticket, for as
/// long as each ends cleanly both ways. `moved_in`: the visitor the connection was moved to
/// this worker with (its `Start` read already, its count taken over).
///
/// Not an `async fn`: one would keep its arguments twice in the task, once as passed and
/// once moved into its body (rustc#62958); an `async move` block holds them once.
#[allow(clippy::manual_async_fn)]
fn visitors<'a>(
    mut tunnel: Tunnel,
    mut conn: AgentDataConn,
    mut moved_in: Option<(Box<Started>, Copying)>,
    service: &'a str,
    local: &'a Arc<[SocketAddr]>,
    in_flight: &'a InFlight,
    pipes: &'a PipePool,
) -> impl std::future::Future<Output = io::Result<()>> + 'a {
    async move {
        // On the heap: held across the pooled wait, inline it would grow every idle task.
        let mut buf = vec![0u8; 512];
        loop {
            let (visitor, early, _copying) = match moved_in.take() {
                Some((started, copying)) => {
                    let (visitor, early) = *started;
                    (visitor, early, Some(copying))
                }
                None => {
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
                                refused(service, &message, routine);
                                return Ok(());
                            }
                            AgentEvent::Ended => return Ok(()), // relay dropped the pooled connection
                            AgentEvent::Invalid(why) => return Err(io::Error::other(why)),
                        }
                    };
                    let placed =
                        place(tunnel, conn, (visitor, early), (service, local, in_flight))?;
                    let Some((t, c, (visitor, early), copying)) = placed else {
                        return Ok(()); // moved to another worker with its visitor
                    };
                    (tunnel, conn) = (t, c);
                    (visitor, early, copying)
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
}

/// Logs the relay's refusal of a data connection (routine ones, such as a pool over its
/// target, only at debug).
fn refused(service: &str, message: &str, routine: bool) {
    match routine {
        true => tracing::debug!(service, "relay refused a data connection: {message}"),
        false => tracing::warn!(service, "relay refused a data connection: {message}"),
    }
}

/// Where a started visitor's data connection is served: here, counted if it is encrypted
/// here; or, encrypted here while another worker encrypts fewer, on that worker, moved
/// there with its visitor (see [`super::load`]). `None`: it moved.
#[allow(clippy::type_complexity)]
fn place(
    tunnel: Tunnel,
    conn: AgentDataConn,
    started: Started,
    here: (&str, &Arc<[SocketAddr]>, &InFlight),
) -> io::Result<Option<(Tunnel, AgentDataConn, Started, Option<Copying>)>> {
    let Some(target) = tunnel.copies().then(load::reserve_elsewhere).flatten() else {
        let copying = tunnel.copies().then(Copying::start);
        return Ok(Some((tunnel, conn, started, copying)));
    };
    match move_to(target, (tunnel, conn, started), here)? {
        None => {
            tracing::debug!(
                service = here.0,
                worker = target,
                "data connection moved to a less busy worker"
            );
            Ok(None)
        }
        Some((tunnel, conn, started)) => {
            load::unreserve(target);
            Ok(Some((tunnel, conn, started, Some(Copying::start()))))
        }
    }
}

/// Moves a TLS data connection whose visitor is about to start to worker `target`. `None`:
/// it went (this task is done with it); otherwise it comes back, to be served here.
#[allow(clippy::type_complexity)]
fn move_to(
    target: usize,
    (tunnel, conn, (visitor, early)): (Tunnel, AgentDataConn, Started),
    (service, local, in_flight): (&str, &Arc<[SocketAddr]>, &InFlight),
) -> io::Result<Option<(Tunnel, AgentDataConn, Started)>> {
    let (sock, tls) = match tunnel.into_tls() {
        Ok(parts) => parts,
        Err(tunnel) => return Ok(Some((tunnel, conn, (visitor, early)))),
    };
    // A duplicate for the other worker; this worker's own descriptor closes with `sock`. (Taking
    // the descriptor out of a monoio stream panics while any operation on the ring still
    // refers to it.)
    let Ok(dup) = rustix::io::dup(fd(&sock)) else {
        let tunnel = Tunnel::tls(sock, tls);
        return Ok(Some((tunnel, conn, (visitor, early))));
    };
    drop(sock);
    let socket = std::net::TcpStream::from(dup);
    let resume = Box::new(Resume {
        socket,
        tls,
        conn,
        visitor,
        early,
        service: service.to_string(),
        local: local.clone(),
        in_flight: in_flight.clone(),
    });
    match super::resume_on(target, resume) {
        Ok(()) => Ok(None),
        Err(r) => {
            let r = *r;
            let tunnel = Tunnel::tls(TcpStream::from_std(r.socket)?, r.tls);
            Ok(Some((tunnel, r.conn, (r.visitor, r.early))))
        }
    }
}

#[cfg(test)]
mod tests {
    /// One agent task per pooled or busy data connection: keep it small and not over-aligned
    /// (dial timers and TLS handshakes are boxed; inline they padded it to 2.9 KiB).
    #[test]
    fn connection_task_stays_small() {
        let local: std::sync::Arc<[std::net::SocketAddr]> = ["127.0.0.1:1".parse().unwrap()].into();
        let relay = super::RelayDial::Direct("127.0.0.1:1".parse().unwrap());
        let ticket = crate::protocol::auth::Ticket([0; 16]);
        let in_flight = crate::dataplane::InFlight::default();
        super::super::assert_task_small(|| {
            super::serve_data(
                None,
                relay.clone(),
                ticket,
                "x".into(),
                local.clone(),
                in_flight.clone(),
                std::rc::Rc::new(super::PipePool::default()),
            )
        });
    }
}
