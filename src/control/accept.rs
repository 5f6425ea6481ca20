//! The relay's control port: every agent connection, control or data, arrives here. Each is
//! classified in its own task under a deadline (never in the accept loop): TLS or plain by
//! its first byte, then control or data by its first frame.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::plane::{ControlPlane, HANDSHAKE_TIMEOUT, WRITE_TIMEOUT};
use super::session;
use super::tickets::Redeemed;

use crate::dataplane::tokio::relay as tokio_backend;
use crate::dataplane::uring::tunnel::DataTls;
use crate::dataplane::{uring, DataPlane};
use crate::net::cap::{CapPlace, ConnCap};
use crate::net::throttle::THROTTLED_PER_ADDRESS;
use crate::net::AcceptErrors;
use crate::protocol::ServiceKind;
use crate::protocol::{
    answers_start, relay_serves, AgentMsg, ErrorCode, RelayMsg, PROTOCOL_VERSION,
};
use crate::tls::ktls;
use crate::transport::{Conn, FrameIoError, Framed};

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Most connections from one address (an IPv6 /64) that may be on the control port at once
/// without having authenticated (a control connection before its `Register` is verified, a
/// data connection before its ticket is redeemed). Sized for an agent filling its pools of
/// many services at once, which dials one data connection per ticket.
pub const MAX_UNAUTHENTICATED_PER_ADDRESS: usize = 256;

/// Most unauthenticated connections on the control port at once, from all addresses, at
/// most: each holds a descriptor, a task and a TLS state for up to [`HANDSHAKE_TIMEOUT`].
pub const MAX_UNAUTHENTICATED: usize = 2048;

/// The control port's cap on unauthenticated connections: [`MAX_UNAUTHENTICATED`], or an
/// eighth of the file-descriptor limit if that is lower (the rest is for visitors and
/// authenticated agents, so a flood here never starves them).
pub fn unauthenticated_cap() -> Arc<ConnCap> {
    let by_fds = usize::try_from(crate::net::fds::fd_limit() / 8).unwrap_or(usize::MAX);
    ConnCap::new(
        MAX_UNAUTHENTICATED.min(by_fds).max(1),
        MAX_UNAUTHENTICATED_PER_ADDRESS,
    )
}

/// The next connection on `listener`; never, once it is gone.
async fn accept(
    listener: &Option<TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// An agent's connection that arrived on the shared TLS port, with the ClientHello bytes
/// already read from it, for the control plane to finish the TLS handshake and serve.
pub struct AgentHandoff {
    /// The socket (blocking mode as the runtime left it; the control plane takes it over).
    pub stream: std::net::TcpStream,
    /// The agent's address.
    pub peer: SocketAddr,
    /// The bytes read so far: the whole ClientHello.
    pub hello: Vec<u8>,
}

/// Connections waiting for the control plane to take them from the shared TLS port; more
/// are closed (each is still unauthenticated).
pub const HANDOFF_QUEUE: usize = 256;

/// The first frame of any connection (`ControlHello` or `DataHello`) is a few bytes; a frame
/// declaring more is refused before its body is read.
const FIRST_FRAME_MAX: usize = 64;

/// How an agent's connection reached the relay.
enum Arrival {
    /// On the control port: nothing read yet.
    ControlPort(TcpStream),
    /// On the shared TLS port (its ALPN said agent): the ClientHello already read.
    SharedTls(TcpStream, Vec<u8>),
}

/// Accepts agent connections forever: on the control port, and those the shared TLS port
/// hands over (`handoffs`). Each connection's task (handshake, session, parked data
/// connection) belongs to this loop: when the loop is dropped, they end with it.
pub async fn accept_loop(
    plane: Arc<ControlPlane>,
    listener: TcpListener,
    mut handoffs: mpsc::Receiver<AgentHandoff>,
) {
    let mut conns = JoinSet::new();
    let unauthenticated = unauthenticated_cap();
    let mut errors = AcceptErrors::new("agent connection");
    let mut drain = plane.drain_signal();
    // `None` once draining: the port is closed, the connections it gave keep their tasks.
    let mut listener = Some(listener);
    loop {
        tokio::select! {
            _ = drain.changed(), if listener.is_some() => listener = None,
            got = accept(&listener) => match got {
                Ok((tcp, peer)) => {
                    let Some(tcp) = errors.admit(tcp, Instant::now()) else {
                        continue;
                    };
                    let allowance = match plane.throttle.is_throttled(peer.ip(), Instant::now()) {
                        true => THROTTLED_PER_ADDRESS,
                        false => MAX_UNAUTHENTICATED_PER_ADDRESS,
                    };
                    match unauthenticated.enter_within(peer.ip(), allowance) {
                        Ok(place) => {
                            conns.spawn(handle(plane.clone(), Arrival::ControlPort(tcp), peer, place));
                        }
                        Err(full) => {
                            // Dropping the socket closes it at once: no task, no TLS state.
                            plane.metrics.unauthenticated_shed.inc();
                            plane.refusals.note(peer, "connection closed at accept", &full.to_string());
                        }
                    }
                }
                Err(e) => errors.back_off(&e).await,
            },
            Some(h) = handoffs.recv() => {
                // Draining: no new agents (dropping the socket closes it).
                if listener.is_none() {
                    continue;
                }
                let peer = h.peer;
                let tcp = match h.stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(h.stream)) {
                    Ok(t) => t,
                    Err(_) => continue,
                };
                let allowance = match plane.throttle.is_throttled(peer.ip(), Instant::now()) {
                    true => THROTTLED_PER_ADDRESS,
                    false => MAX_UNAUTHENTICATED_PER_ADDRESS,
                };
                match unauthenticated.enter_within(peer.ip(), allowance) {
                    Ok(place) => {
                        conns.spawn(handle(plane.clone(), Arrival::SharedTls(tcp, h.hello), peer, place));
                    }
                    Err(full) => {
                        plane.metrics.unauthenticated_shed.inc();
                        plane.refusals.note(peer, "connection closed at accept", &full.to_string());
                    }
                }
            }
            Some(_) = conns.join_next() => {}
        }
    }
}

enum Opened {
    /// A control connection (its protocol version; whether it came by the shared TLS port).
    Control(Framed<Conn>, u16, bool),
    /// Another relay of the fleet handing over a visitor.
    Peer(Framed<Conn>),
    Data(Framed<Conn>, u16, crate::protocol::auth::Ticket, bool),
}

async fn open(plane: &ControlPlane, arrival: Arrival) -> Result<Opened, FrameIoError> {
    let shared = matches!(arrival, Arrival::SharedTls(..));
    let (stream, tls) = match arrival {
        Arrival::ControlPort(tcp) => {
            let mut first = [0u8; 1];
            if tcp.peek(&mut first).await? == 0 {
                return Err(FrameIoError::Closed);
            }
            if first[0] == TLS_HANDSHAKE {
                (Conn::Tls(Box::new(plane.acceptor.accept(tcp).await?)), true)
            } else {
                (Conn::Plain(tcp), false)
            }
        }
        Arrival::SharedTls(tcp, hello) => (
            Conn::Tls(Box::new(resume_tls(plane, tcp, &hello).await?)),
            true,
        ),
    };
    let mut framed = Framed::new(stream);
    match framed.read_msg_capped::<AgentMsg>(FIRST_FRAME_MAX).await? {
        AgentMsg::ControlHello { version } if tls => Ok(Opened::Control(framed, version, shared)),
        AgentMsg::PeerHello { .. } if tls && !shared => Ok(Opened::Peer(framed)),
        AgentMsg::DataHello { version, ticket } => Ok(Opened::Data(framed, version, ticket, tls)),
        AgentMsg::ControlHello { .. } => Err(FrameIoError::Unexpected(
            "control connection without TLS".into(),
        )),
        other => Err(FrameIoError::Unexpected(format!(
            "{other:?} as the first frame"
        ))),
    }
}

/// The server side of a TLS handshake whose ClientHello (`hello`, whole) was already read
/// from `tcp` by the shared TLS port.
async fn resume_tls(
    plane: &ControlPlane,
    tcp: TcpStream,
    hello: &[u8],
) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = hello;
    while !rest.is_empty() {
        acceptor.read_tls(&mut rest)?;
    }
    let accepted = match acceptor.accept() {
        Ok(Some(a)) => a,
        Ok(None) => return Err(std::io::Error::other("incomplete ClientHello")),
        Err((e, _alert)) => return Err(std::io::Error::other(e)),
    };
    tokio_rustls::StartHandshake::from_parts(accepted, tcp)
        .into_stream(plane.acceptor.config().clone())
        .await
}

async fn handle(plane: Arc<ControlPlane>, arrival: Arrival, peer: SocketAddr, place: CapPlace) {
    let opened = match tokio::time::timeout(HANDSHAKE_TIMEOUT, open(&plane, arrival)).await {
        Ok(Ok(o)) => o,
        Ok(Err(FrameIoError::Closed)) => return, // port probe, health check
        Ok(Err(e)) => {
            plane.metrics.bad_connections.inc();
            plane.failed(peer).await;
            plane
                .refusals
                .note(peer, "connection refused", &e.to_string());
            return;
        }
        Err(_) => {
            plane.metrics.bad_connections.inc();
            plane.failed(peer).await;
            let why = format!("no valid hello within {HANDSHAKE_TIMEOUT:?}");
            plane.refusals.note(peer, "connection refused", &why);
            return;
        }
    };
    match opened {
        Opened::Control(framed, version, shared) => {
            match session::run(plane.clone(), framed, peer, version, shared, place).await {
                Ok(()) => {}
                Err(e @ session::SessionEnd::AuthFailed(_)) => {
                    plane.refusals.note(peer, "agent rejected", &e.to_string())
                }
                Err(e) => tracing::info!(%peer, "agent session ended: {e}"),
            }
        }
        Opened::Data(framed, version, ticket, tls) => {
            data_connection(plane, framed, peer, version, ticket, tls, place).await
        }
        Opened::Peer(framed) => super::peer::serve(plane, framed, peer, place).await,
    }
}

async fn reject(
    plane: &ControlPlane,
    framed: Framed<Conn>,
    peer: SocketAddr,
    code: ErrorCode,
    message: &str,
) {
    plane.failed(peer).await;
    plane
        .refusals
        .note(peer, "data connection refused", message);
    refuse(plane, framed, code, message).await
}

/// Refuses a data connection without a warning: used when the refusal is an expected race,
/// not a fault (a connection the agent dialled before its own session ended).
async fn refuse(plane: &ControlPlane, mut framed: Framed<Conn>, code: ErrorCode, message: &str) {
    plane.metrics.data_rejected.inc();
    let msg = RelayMsg::Error {
        code,
        message: message.to_string(),
    };
    let _ = framed.write_msg(&msg, WRITE_TIMEOUT).await;
}

/// Drops a data connection whose agent sent bytes after `DataHello`, before any visitor.
fn refuse_early_bytes(plane: &ControlPlane, peer: SocketAddr) {
    plane.metrics.data_rejected.inc();
    let m = "bytes sent before a visitor arrived";
    plane.refusals.note(peer, "data connection refused", m);
}

/// Whether rustls holds plaintext the agent sent after its `DataHello`: the kernel would
/// never see it, so such a connection (a misbehaving agent's) is refused, not offloaded.
fn unread_plaintext(conn: &mut rustls::ServerConnection) -> bool {
    conn.process_new_packets()
        .map_or(true, |state| state.plaintext_bytes_to_read() > 0)
}

async fn data_connection(
    plane: Arc<ControlPlane>,
    framed: Framed<Conn>,
    peer: SocketAddr,
    version: u16,
    ticket: crate::protocol::auth::Ticket,
    tls: bool,
    place: CapPlace,
) {
    if !relay_serves(version) {
        let m = format!("relay speaks protocol {PROTOCOL_VERSION}, agent sent {version}");
        return reject(&plane, framed, peer, ErrorCode::UnsupportedVersion, &m).await;
    }
    let answers = answers_start(version);
    // The transport is checked before the ticket is touched: a plain connection to a relay
    // that requires TLS must not spend a ticket it cannot use.
    if plane.cfg().data_tls && !tls {
        let m = "this relay requires TLS on data connections";
        return reject(&plane, framed, peer, ErrorCode::BadRequest, m).await;
    }
    let redeemed = plane.tickets().redeem(Instant::now(), &ticket);
    let settled = match redeemed {
        Redeemed::Valid(grant) => grant.settle().map(|generation| (grant, generation)),
        Redeemed::Retired => None,
        Redeemed::Expired(grant) => {
            let _ = grant.settle();
            return reject(&plane, framed, peer, ErrorCode::BadTicket, "expired ticket").await;
        }
        // Just after a takeover (an upgrade), agents still dial with the old process's
        // tickets, which reach this one through the shared port: an expected race, not a
        // guess, so refused quietly and not counted against the address.
        Redeemed::Unknown if plane.predecessor_tickets_possible(Instant::now()) => {
            let m = "ticket of the relay process this one took over from";
            tracing::debug!(%peer, "data connection refused: {m}");
            return refuse(&plane, framed, ErrorCode::BadTicket, m).await;
        }
        Redeemed::Unknown => {
            let m = "unknown or already used ticket";
            return reject(&plane, framed, peer, ErrorCode::BadTicket, m).await;
        }
    };
    let (service, worker, generation) = match settled {
        Some((grant, generation)) => (grant.service, grant.worker, generation),
        None => {
            // An agent that ends its session cannot recall the data connections it is dialling
            // at that moment; they arrive after the end and are refused quietly.
            let m = "ticket belongs to an agent session that has ended";
            tracing::debug!(%peer, "data connection refused: {m}");
            return refuse(&plane, framed, ErrorCode::BadTicket, m).await;
        }
    };
    drop(place); // authenticated by its ticket
    let (tunnel, leftover) = framed.into_parts();
    // It may idle in a pool for hours: let the kernel notice a cut link (see `keep_alive`).
    let _ = crate::dataplane::sock::keep_alive(tunnel.socket());
    if !leftover.is_empty() {
        return refuse_early_bytes(&plane, peer);
    }
    plane.metrics.data_accepted.inc();
    let pool = service.pools[worker].clone();
    if service.kind == ServiceKind::Udp {
        // Taken as a channel for the service's flows, on tokio whatever the backend.
        if let Some(hub) = service.udp_hub() {
            hub.attach(tunnel, &pool, generation);
        }
        return;
    }
    match &plane.dataplane {
        DataPlane::Tokio => {
            let metrics = &plane.metrics;
            let name = &service.name;
            tokio_backend::park_and_forward(tunnel, name, &pool, generation, answers, metrics).await
        }
        DataPlane::Uring(workers) => {
            // A plain socket is spliced by the worker. A TLS one has its keys handed to the
            // kernel where it has kTLS, and is spliced too; elsewhere it moves there with its
            // rustls state (handshake done), whose keys the worker takes over to seal records.
            let (tcp, tls) = match tunnel {
                Conn::Plain(s) => (s, DataTls::Plain),
                Conn::Tls(s) => {
                    let (tcp, mut conn) = s.into_inner();
                    if !ktls::available() {
                        (tcp, DataTls::User(Box::new(conn)))
                    } else if unread_plaintext(&mut conn) {
                        return refuse_early_bytes(&plane, peer);
                    } else if let Err(e) = ktls::offload(tcp.as_fd(), conn) {
                        tracing::warn!(%peer, "data connection dropped: {e}");
                        return;
                    } else {
                        (tcp, DataTls::Kernel)
                    }
                }
            };
            let Ok(stream) = tcp.into_std() else {
                return;
            };
            let cmd = uring::Command::RelayData {
                stream,
                tls,
                metrics: plane.metrics.clone(),
                service: service.name.clone(),
                pool,
                generation,
                answers,
            };
            if let Err(e) = workers.send(worker, cmd) {
                tracing::warn!(%peer, "data connection dropped: {e}");
            }
        }
    }
}
