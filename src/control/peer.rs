//! The receiving end of a fleet's visitor hand-over: another relay, which a visitor reached
//! but which has no session with the service's agent, hands the visitor to this relay, which
//! has one. The connection comes to the control port over TLS like an agent's; the sending
//! relay proves it knows the service's secret (a MAC over this relay's fresh nonce, the
//! service and the visitor's address), and the visitor is then served here as if it had
//! come to this relay's own port: the service's limits and address lists judge its real
//! address, its PROXY header names it, and it travels through the service's pools.

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use super::plane::{ControlPlane, HANDSHAKE_TIMEOUT, WRITE_TIMEOUT};
use crate::dataplane::pool::{Pool, Visitor};
use crate::net::cap::CapPlace;
use crate::protocol::auth::{new_nonce, verify_peer_mac};
use crate::protocol::{AgentMsg, ErrorCode, RelayMsg, PROTOCOL_VERSION};
use crate::transport::{Conn, Framed};

/// Largest `PeerVisit` frame: a name, an address and a MAC.
const PEER_VISIT_MAX: usize = 160;

/// Serves one relay-to-relay connection whose `PeerHello` was read.
pub async fn serve(
    plane: Arc<ControlPlane>,
    mut framed: Framed<Conn>,
    peer: SocketAddr,
    place: CapPlace,
) {
    let refuse = |code: ErrorCode, message: String| RelayMsg::Error { code, message };
    let nonce = new_nonce();
    let cfg = plane.cfg();
    let challenge = RelayMsg::Challenge {
        version: PROTOCOL_VERSION,
        nonce,
        data_tls: cfg.data_tls,
    };
    if framed.write_msg(&challenge, WRITE_TIMEOUT).await.is_err() {
        return;
    }
    let read = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        framed.read_msg_capped::<AgentMsg>(PEER_VISIT_MAX),
    );
    let (service, visitor, mac) = match read.await {
        Ok(Ok(AgentMsg::PeerVisit {
            service,
            visitor,
            mac,
        })) => (service, visitor, mac),
        Ok(Ok(other)) => {
            plane.metrics.bad_connections.inc();
            plane.failed(peer).await;
            let why = format!("{other:?} where a relay's visitor was expected");
            return plane.refusals.note(peer, "relay connection refused", &why);
        }
        Ok(Err(e)) => {
            plane.metrics.bad_connections.inc();
            plane.failed(peer).await;
            return plane
                .refusals
                .note(peer, "relay connection refused", &e.to_string());
        }
        Err(_) => {
            plane.metrics.bad_connections.inc();
            plane.failed(peer).await;
            let why = format!("no visitor within {HANDSHAKE_TIMEOUT:?}");
            return plane.refusals.note(peer, "relay connection refused", &why);
        }
    };
    let secret = cfg.secret_for(&service).map(|(s, _)| s.expose().to_vec());
    let proven = plane.fleet.is_some()
        && secret.is_some_and(|s| verify_peer_mac(&s, &nonce, &service, &visitor, &mac));
    if !proven {
        plane.metrics.auth_failures.inc();
        plane.failed(peer).await;
        plane.refusals.note(
            peer,
            "relay connection refused",
            &format!("a visitor of {service} handed over without its secret (or this relay is in no fleet)"),
        );
        let msg = refuse(ErrorCode::AuthFailed, "wrong secret".into());
        let _ = framed.write_msg(&msg, WRITE_TIMEOUT).await;
        return;
    }
    let Some(svc) = plane.registry.online_service(&service) else {
        let msg = refuse(
            ErrorCode::Internal,
            format!("no agent of service {service} is connected to this relay"),
        );
        let _ = framed.write_msg(&msg, WRITE_TIMEOUT).await;
        return;
    };
    let Ok(admission) = svc.gate.admit(visitor) else {
        let msg = refuse(
            ErrorCode::LimitReached,
            format!("service {service} refuses this visitor (its limits or address lists)"),
        );
        let _ = framed.write_msg(&msg, WRITE_TIMEOUT).await;
        return;
    };
    let (ours, theirs) = match crate::dataplane::sock::visitor_pair() {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(%peer, "handed-over visitor closed: socket pair: {e}");
            return;
        }
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
        let msg = refuse(ErrorCode::Internal, format!("service {service}: {e}"));
        let _ = framed.write_msg(&msg, WRITE_TIMEOUT).await;
        return;
    }
    if framed
        .write_msg(&RelayMsg::Start { visitor }, WRITE_TIMEOUT)
        .await
        .is_err()
    {
        return;
    }
    drop(place);
    tracing::debug!(%peer, service, %visitor, "visitor handed over by a relay of the fleet");
    let (mut conn, early) = framed.into_parts();
    let Ok(mut ours) = tokio::net::UnixStream::from_std(ours) else {
        return;
    };
    if !early.is_empty() {
        use tokio::io::AsyncWriteExt;
        if ours.write_all(&early).await.is_err() {
            return;
        }
    }
    // The data plane cannot watch a socket pair's progress; the relay-to-relay socket
    // carries exactly the visitor's bytes, so its idleness is the visitor's.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&conn.socket());
    // SAFETY: `fd` is the TCP socket of `conn`, which outlives the watcher (both live in
    // this function and the watcher is dropped first, with the select).
    let tcp = unsafe { BorrowedFd::borrow_raw(fd) };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut conn, &mut ours) => {}
        () = crate::dataplane::idle::tokio_idle(tcp, idle) => {
            plane.metrics.visitors_idle_closed.inc();
            svc.gate.stats().idle_closed.inc();
            tracing::info!(service = %svc.name, %visitor, "handed-over visitor closed: idle timeout");
        }
    }
}
