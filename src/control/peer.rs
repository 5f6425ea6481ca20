//! The receiving end of a fleet's visitor hand-over: another relay, which a visitor reached
//! but which has no session with the service's agent, hands the visitor to this relay, which
//! has one. The connection comes to the control port over TLS like an agent's; the sending
//! relay proves it knows the service's secret (a MAC over this relay's fresh nonce, the
//! service and the visitor's address), and the visitor is then served here as if it had
//! come to this relay's own port: the service's limits and address lists judge its real
//! address, its PROXY header names it, and it travels through the service's pools. A visitor
//! of an `http` or `tls` service goes through this relay's shared-port routing instead (its
//! request head or ClientHello comes first), limited to services of the secret it proved.
//!
//! The visitor's bytes cross in chunks with an end marker each way, as on an agent's data
//! connection, so a connection whose visitor ended cleanly carries the next one: a fresh
//! challenge follows each visitor, and each visitor is proven with its own MAC.

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use super::plane::{ControlPlane, HANDSHAKE_TIMEOUT, WRITE_TIMEOUT};
use crate::dataplane::pool::{Pool, Visitor};
use crate::dataplane::tally::Tally;
use crate::net::cap::CapPlace;
use crate::protocol::auth::{new_nonce, verify_peer_mac};
use crate::protocol::{AgentMsg, ErrorCode, RelayMsg, ServiceKind, PROTOCOL_VERSION};
use crate::transport::{Conn, Framed};

/// Largest `PeerVisit` frame: a name, an address and a MAC.
const PEER_VISIT_MAX: usize = 160;
/// How long a relay-to-relay connection that carried a visitor may wait for the next one
/// (the sending relay keeps it shorter than this).
pub const PEER_IDLE: Duration = Duration::from_secs(60);

/// Why a hand-over was refused: the code and message for the sending relay (none when the
/// message is empty), and whether the sender proved nothing (counted as a failed attempt).
struct Refused(ErrorCode, String, bool);

impl Refused {
    /// The connection is over with nothing to say (closed, broken, idle too long).
    fn silent() -> Refused {
        Refused(ErrorCode::Internal, String::new(), false)
    }
}

/// Serves one relay-to-relay connection whose `PeerHello` was read: one visitor after
/// another, until one ends uncleanly, a hand-over is refused, or none comes in time.
pub async fn serve(
    plane: Arc<ControlPlane>,
    framed: Framed<Conn>,
    peer: SocketAddr,
    place: CapPlace,
) {
    plane.metrics.peer_connections.inc();
    // Held for its count: until its first visitor is proven, the connection's place among
    // the unauthenticated ones; from then on, among the relay-to-relay connections.
    let mut _place = place;
    let mut proven = false;
    let mut framed = framed;
    loop {
        // The first visitor comes within the handshake deadline, as an agent's registration;
        // after one proven visitor the connection is a fleet member's and may idle longer.
        let wait = match proven {
            false => HANDSHAKE_TIMEOUT,
            true => PEER_IDLE,
        };
        let visit = match receive(&plane, &mut framed, wait).await {
            Ok(v) => v,
            Err(Refused(code, message, unproven)) => {
                if unproven {
                    plane.metrics.bad_connections.inc();
                    plane.failed(peer).await;
                    plane
                        .refusals
                        .note(peer, "relay hand-over refused", &message);
                }
                if !message.is_empty() {
                    let msg = RelayMsg::Error { code, message };
                    let _ = framed.write_msg(&msg, WRITE_TIMEOUT).await;
                }
                return;
            }
        };
        let (conn, early) = framed.into_parts();
        if !proven {
            match plane.peers.enter(peer.ip()) {
                Ok(p) => (_place, proven) = (p, true),
                Err(full) => {
                    tracing::warn!(%peer, "relay-to-relay connection closed after its visitor: {full}");
                    forward(&plane, conn, early, visit).await;
                    return;
                }
            }
        }
        match forward(&plane, conn, early, visit).await {
            Some(next) => framed = next,
            None => return,
        }
    }
}

/// A visitor proven and handed to its service's pools, not yet forwarded.
struct Visit {
    svc: Arc<super::service::Service>,
    visitor: SocketAddr,
    ours: std::os::unix::net::UnixStream,
    idle: Option<Duration>,
}

/// Challenges, reads and checks one `PeerVisit` (waiting `wait` for it), and hands its
/// visitor to the service; then says `Start`.
async fn receive(
    plane: &ControlPlane,
    framed: &mut Framed<Conn>,
    wait: Duration,
) -> Result<Visit, Refused> {
    let nonce = new_nonce();
    let cfg = plane.cfg();
    let challenge = RelayMsg::Challenge {
        version: PROTOCOL_VERSION,
        nonce,
        data_tls: cfg.data_tls,
    };
    framed
        .write_msg(&challenge, WRITE_TIMEOUT)
        .await
        .map_err(|_| Refused::silent())?;
    let read = tokio::time::timeout(wait, framed.read_msg_capped::<AgentMsg>(PEER_VISIT_MAX));
    let (service, visitor, mac) = match read.await {
        Ok(Ok(AgentMsg::PeerVisit {
            service,
            visitor,
            mac,
        })) => (service, visitor, mac),
        Ok(Ok(other)) => {
            let why = format!("{other:?} where a relay's visitor was expected");
            return Err(Refused(ErrorCode::BadRequest, why, true));
        }
        // A pooled connection the sending relay let go: nothing to refuse.
        Ok(Err(crate::transport::FrameIoError::Closed)) => return Err(Refused::silent()),
        Ok(Err(e)) => return Err(Refused(ErrorCode::BadRequest, e.to_string(), true)),
        Err(_) => return Err(Refused::silent()),
    };
    let secret = cfg.secret_for(&service);
    let proven = plane.fleet.is_some()
        && secret
            .as_ref()
            .is_some_and(|(s, _)| verify_peer_mac(s.expose(), &nonce, &service, &visitor, &mac));
    let secret_id = match secret {
        Some((_, id)) if proven => id,
        _ => {
            plane.metrics.auth_failures.inc();
            return Err(Refused(ErrorCode::AuthFailed, "wrong secret".into(), true));
        }
    };
    let refuse = |code, message| Err(Refused(code, message, false));
    let Some(svc) = plane.registry.online_service(&service) else {
        return refuse(
            ErrorCode::Internal,
            format!("no agent of service {service} is connected to this relay"),
        );
    };
    if matches!(svc.kind, ServiceKind::Http | ServiceKind::Tls) {
        // Routed and admitted by the shared ports, as on this relay's own.
        let Some(hosts) = &plane.hosts else {
            return refuse(ErrorCode::Internal, "this relay has no shared ports".into());
        };
        let (ours, theirs) = match crate::dataplane::sock::visitor_pair() {
            Ok(pair) => pair,
            Err(e) => return refuse(ErrorCode::Internal, format!("socket pair: {e}")),
        };
        started(plane, framed, &service, visitor).await?;
        hosts.serve(theirs, visitor, secret_id);
        let idle = svc.gate.idle_timeout();
        return Ok(Visit {
            svc,
            visitor,
            ours,
            idle,
        });
    }
    let Ok(admission) = svc.gate.admit(visitor) else {
        return refuse(
            ErrorCode::LimitReached,
            format!("service {service} refuses this visitor (its limits or address lists)"),
        );
    };
    let (ours, theirs) = match crate::dataplane::sock::visitor_pair() {
        Ok(pair) => pair,
        Err(e) => return refuse(ErrorCode::Internal, format!("socket pair: {e}")),
    };
    let prefix = if svc.gate.wants_proxy_header() {
        let local = crate::dataplane::gate::local_addr_of(framed.get_mut().socket());
        svc.gate.proxy_header(visitor, local)
    } else {
        Vec::new()
    };
    let v = Visitor {
        stream: theirs,
        addr: visitor,
        prefix,
        admission: Some(admission),
        requests: None,
        http: false,
        early: Vec::new(),
        unanswered: 0,
        ask_first: false,
    };
    let idle = v.idle_timeout();
    if let Err((e, _)) = Pool::hand(&svc.pools, v, cfg.front.agent_wait).await {
        svc.gate.count_unserved();
        return refuse(ErrorCode::Internal, format!("service {service}: {e}"));
    }
    started(plane, framed, &service, visitor).await?;
    Ok(Visit {
        svc,
        visitor,
        ours,
        idle,
    })
}

/// Tells the sending relay the visitor is taken (`Start`); counted.
async fn started(
    plane: &ControlPlane,
    framed: &mut Framed<Conn>,
    service: &str,
    visitor: SocketAddr,
) -> Result<(), Refused> {
    framed
        .write_msg(&RelayMsg::Start { visitor }, WRITE_TIMEOUT)
        .await
        .map_err(|_| Refused::silent())?;
    plane.metrics.handovers_received.inc();
    tracing::debug!(service, %visitor, "visitor handed over by a relay of the fleet");
    Ok(())
}

/// Forwards one handed-over visitor in chunks; the connection back if it may carry another.
async fn forward(
    plane: &ControlPlane,
    mut conn: Conn,
    early: Vec<u8>,
    visit: Visit,
) -> Option<Framed<Conn>> {
    let Visit {
        svc,
        visitor,
        ours,
        idle,
    } = visit;
    let mut ours = tokio::net::UnixStream::from_std(ours).ok()?;
    // The data plane cannot watch a socket pair's progress; the relay-to-relay socket
    // carries this visitor's bytes now, so its idleness is the visitor's.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&conn.socket());
    // SAFETY: `fd` is the TCP socket of `conn`, which outlives the watcher (both live in
    // this function and the watcher is dropped first, with the select).
    let tcp = unsafe { BorrowedFd::borrow_raw(fd) };
    let moved = tokio::select! {
        moved = crate::dataplane::tokio::chunked::forward(&mut ours, &mut conn, &[], &early, None, Tally::none()) => moved,
        () = crate::dataplane::idle::tokio_idle(tcp, idle) => {
            plane.metrics.visitors_idle_closed.inc();
            svc.gate.stats().idle_closed.inc();
            tracing::info!(service = %svc.name, %visitor, "handed-over visitor closed: idle timeout");
            return None;
        }
    };
    match moved {
        Ok(o) if o.reusable => Some(Framed::with_buffer(conn, o.leftover)),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(service = %svc.name, %visitor, "handed-over visitor ended: {e}");
            None
        }
    }
}
