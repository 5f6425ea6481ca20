//! One agent's control session on the relay: challenge, authenticate, register, then issue
//! tickets on demand and exchange heartbeats until the agent leaves or goes silent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, Notify};

use super::plane::{ControlPlane, Grant, HANDSHAKE_TIMEOUT, WRITE_TIMEOUT};
use super::refusal::Refusal;
use super::registry::{Kick, LINGER};
use super::service::{Service, SessionId};
use super::tickets::Owner;
use crate::net::cap::CapPlace;
use crate::protocol::auth::{new_nonce, verify_register_mac};
use crate::protocol::liveness::{Action, Liveness};
use crate::protocol::msg::MAX_TICKETS_PER_FRAME;
use crate::protocol::{
    relay_serves, AgentMsg, ErrorCode, RelayMsg, ServiceOutcome, PROTOCOL_VERSION,
};
use crate::transport::{Conn, FrameIoError, Framed};

/// How long a session whose tickets were withheld (a quota was out) waits before asking
/// the store again.
pub const TICKET_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a draining relay keeps a session for visitors already waiting for one of its
/// data connections, before telling the agent to go.
const HANDOFF_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a draining relay keeps a session at least (see [`HANDOFF_WAIT`]).
const HANDOFF_MIN: std::time::Duration = std::time::Duration::from_millis(100);
/// How often a leaving session looks whether those visitors are served.
const HANDOFF_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Why a control session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    /// The agent's connection failed or it sent something invalid.
    #[error("agent connection: {0}")]
    Agent(#[from] FrameIoError),
    /// The agent broke the protocol.
    #[error("agent protocol violation: {0}")]
    Violation(String),
    /// The agent did not authenticate.
    #[error("authentication failed for service {0}: wrong secret")]
    AuthFailed(String),
    /// The agent went silent past the heartbeat timeout.
    #[error("agent silent for {0:?}, dropped")]
    Silent(std::time::Duration),
    /// Another session took over a service.
    #[error("replaced: {0}")]
    Replaced(String),
    /// A reload changed a secret or reservation the session relies on.
    #[error("ended by a reload: {0}")]
    SettingsChanged(String),
    /// No requested service could be published.
    #[error("no service could be published")]
    NothingPublished,
    /// The agent is stopping on purpose ([`AgentMsg::Goodbye`]).
    #[error("agent stopping: it said goodbye; its visitors in flight finish")]
    Goodbye,
    /// The relay is draining: it told the agent ([`RelayMsg::GoingAway`]) and closed the
    /// session; the agent's visitors in flight finish over their data connections.
    #[error("relay draining: the agent was told to reconnect to a successor")]
    Draining,
    /// The registry refused the agent (agents per secret).
    #[error("{0}")]
    Refused(#[from] Refusal),
}

/// Runs a control session whose `ControlHello` (with `version`) was already read;
/// `via_tls_port`: it came by the shared TLS port, so its data connections must be TLS. `place`
/// is the connection's place among unauthenticated ones; it is given up once the agent has
/// proved its secrets.
pub async fn run(
    plane: Arc<ControlPlane>,
    mut framed: Framed<Conn>,
    peer: SocketAddr,
    version: u16,
    via_tls_port: bool,
    place: CapPlace,
) -> Result<(), SessionEnd> {
    if !relay_serves(version) {
        let message = format!("relay speaks protocol {PROTOCOL_VERSION}, agent sent {version}");
        let _ = framed
            .write_msg(
                &RelayMsg::Error {
                    code: ErrorCode::UnsupportedVersion,
                    message: message.clone(),
                },
                WRITE_TIMEOUT,
            )
            .await;
        return Err(SessionEnd::Violation(message));
    }
    let nonce = new_nonce();
    // The agent's own version: an older agent checks that the relay speaks its version, and
    // the relay serves it as such.
    let challenge = RelayMsg::Challenge {
        version,
        nonce,
        // An agent on the shared TLS port can reach only TLS there: its data connections
        // must be TLS too, whatever the relay requires of others.
        data_tls: plane.cfg().data_tls || via_tls_port,
    };
    framed.write_msg(&challenge, WRITE_TIMEOUT).await?;
    let services = match framed
        .read_msg_within::<AgentMsg>(HANDSHAKE_TIMEOUT)
        .await?
    {
        AgentMsg::Register { services } if !services.is_empty() => services,
        AgentMsg::Register { .. } => return Err(SessionEnd::Violation("no services".into())),
        other => {
            return Err(SessionEnd::Violation(format!(
                "expected Register, got {other:?}"
            )))
        }
    };
    for s in &services {
        let ok = plane.cfg().secret_for(&s.name).is_some_and(|(secret, _)| {
            verify_register_mac(secret.expose(), &nonce, &s.name, &s.mac)
        });
        if !ok {
            plane.metrics.auth_failures.inc();
            plane.failed(peer).await;
            let end = SessionEnd::AuthFailed(s.name.clone());
            let _ = framed
                .write_msg(
                    &RelayMsg::Error {
                        code: ErrorCode::AuthFailed,
                        message: end.to_string(),
                    },
                    WRITE_TIMEOUT,
                )
                .await;
            return Err(end);
        }
    }

    drop(place); // authenticated
    let (kick_tx, kick_rx) = mpsc::channel(1);
    let wake = Arc::new(Notify::new());
    let secrets = services
        .iter()
        .filter_map(|s| plane.cfg().secret_for(&s.name).map(|(_, id)| id))
        .collect();
    let session = match plane.registry.new_session(kick_tx, secrets, peer) {
        Ok(id) => id,
        Err(refusal) => {
            tracing::warn!(%peer, "agent refused: {refusal}");
            let _ = framed
                .write_msg(
                    &RelayMsg::Error {
                        code: refusal.code(),
                        message: refusal.to_string(),
                    },
                    WRITE_TIMEOUT,
                )
                .await;
            return Err(SessionEnd::Refused(refusal));
        }
    };
    let result = serve(
        &plane,
        &mut framed,
        peer,
        session,
        &services,
        &wake,
        kick_rx,
    )
    .await;
    plane.registry.end_session(session, LINGER, Instant::now());
    plane.tickets().drop_session(session);
    let told = match &result {
        Err(SessionEnd::Replaced(why)) => Some((ErrorCode::Replaced, why)),
        Err(SessionEnd::SettingsChanged(why)) => Some((ErrorCode::SettingsChanged, why)),
        _ => None,
    };
    if let Some((code, why)) = told {
        let message = why.clone();
        let _ = framed
            .write_msg(&RelayMsg::Error { code, message }, WRITE_TIMEOUT)
            .await;
    }
    result
}

async fn serve(
    plane: &Arc<ControlPlane>,
    framed: &mut Framed<Conn>,
    peer: SocketAddr,
    session: SessionId,
    services: &[crate::protocol::ServiceRequest],
    wake: &Arc<Notify>,
    mut kick: mpsc::Receiver<Kick>,
) -> Result<(), SessionEnd> {
    let (results, owned) = match &plane.fleet {
        None => plane.registry.register(session, services, wake),
        Some(fleet) => {
            let cfg = plane.cfg();
            let claimed =
                super::fleet_claims::claim_all(fleet, &plane.registry, &cfg, services).await;
            let (mut results, owned) = plane.registry.register(session, &claimed.requests, wake);
            for r in &results {
                let refused = matches!(r.outcome, ServiceOutcome::Rejected { .. });
                if refused && claimed.created.iter().any(|n| n == &r.name) {
                    fleet.release_created(&r.name).await;
                }
            }
            results.extend(claimed.refused);
            (results, owned)
        }
    };
    for r in &results {
        match &r.outcome {
            ServiceOutcome::Online { port, hosts } => {
                tracing::info!(%peer, session, service = %r.name, port, hosts = %hosts.join(","), "service online")
            }
            ServiceOutcome::Rejected { message, .. } => {
                tracing::warn!(%peer, session, service = %r.name, "service refused: {message}")
            }
        }
    }
    framed
        .write_msg(&RelayMsg::Registered { results }, WRITE_TIMEOUT)
        .await?;
    if owned.is_empty() {
        return Err(SessionEnd::NothingPublished);
    }
    plane.metrics.sessions_accepted.inc();

    let hb = plane.cfg().heartbeat;
    let mut live = Liveness::new(Instant::now(), hb.interval, hb.timeout);
    let mut drain = plane.drain_signal();
    // When the relay started draining, if it has: the session is told to go away once no
    // visitor of its services waits for a data connection, and within HANDOFF_WAIT.
    let mut draining_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if draining_since.is_none() && *drain.borrow_and_update() {
            draining_since = Some(now);
        }
        // Not at once even with no one waiting: a visitor accepted just before the doors
        // closed may not have reached its pool yet.
        let leave = draining_since
            .map(|t| now.saturating_duration_since(t))
            .is_some_and(|d| {
                d >= HANDOFF_WAIT || (d >= HANDOFF_MIN && !visitors_waiting(session, &owned))
            });
        if leave {
            framed
                .write_msg(&RelayMsg::GoingAway, WRITE_TIMEOUT)
                .await?;
            return Err(SessionEnd::Draining);
        }
        let (frames, withheld) = issue_tickets(plane, session, &owned);
        for msg in frames {
            framed.write_msg(&msg, WRITE_TIMEOUT).await?;
            live.sent(Instant::now());
        }
        let retry = withheld.then(|| Instant::now() + TICKET_RETRY);
        let wait_until = match live.poll(Instant::now()) {
            Action::PeerDead => return Err(SessionEnd::Silent(hb.timeout)),
            Action::SendHeartbeat => {
                framed
                    .write_msg(&RelayMsg::Heartbeat, WRITE_TIMEOUT)
                    .await?;
                live.sent(Instant::now());
                continue;
            }
            Action::WaitUntil(t) => retry.map_or(t, |r| r.min(t)),
        };
        // While leaving, look again soon: the waiting visitors are being served.
        let wait_until = match draining_since {
            Some(_) => wait_until.min(Instant::now() + HANDOFF_POLL),
            None => wait_until,
        };
        tokio::select! {
            msg = framed.read_msg::<AgentMsg>() => {
                live.heard(Instant::now());
                match msg? {
                    AgentMsg::Heartbeat => {}
                    AgentMsg::Goodbye => return Err(SessionEnd::Goodbye),
                    AgentMsg::Withdraw { names } => {
                        for name in plane.registry.withdraw(session, &names) {
                            tracing::info!(%peer, session, service = %name, "service closed: withdrawn by its agent");
                        }
                    }
                    other => return Err(SessionEnd::Violation(format!("unexpected {other:?}"))),
                }
            }
            _ = wake.notified() => {}
            _ = drain.changed() => {}
            kicked = kick.recv() => {
                return Err(match kicked {
                    Some(Kick::SettingsChanged(why)) => SessionEnd::SettingsChanged(why),
                    Some(Kick::Replaced(why)) => SessionEnd::Replaced(why),
                    None => SessionEnd::Replaced(String::new()),
                });
            }
            _ = tokio::time::sleep_until(wait_until.into()) => {}
        }
    }
}

/// Whether a visitor of one of the services `session` still owns waits for a data connection.
fn visitors_waiting(session: SessionId, owned: &[Arc<Service>]) -> bool {
    owned
        .iter()
        .filter(|s| s.is_owned_by(session))
        .any(|s| s.pools.iter().any(|p| p.waiting_count() > 0))
}

/// Tickets every owned service's pool asks for, as frames ready to send, and whether some
/// were withheld (a quota was out: try again after [`TICKET_RETRY`], not at once, or a
/// session whose pools keep asking would spin).
fn issue_tickets(
    plane: &ControlPlane,
    session: SessionId,
    owned: &[Arc<Service>],
) -> (Vec<RelayMsg>, bool) {
    let mut frames = Vec::new();
    let mut withheld = false;
    for svc in owned {
        if !svc.is_owned_by(session) {
            continue;
        }
        let mut tickets = Vec::new();
        for (worker, pool) in svc.pools.iter().enumerate() {
            let n = pool.claim_tickets(session);
            if n == 0 {
                continue;
            }
            let now = Instant::now();
            let mut store = plane.tickets();
            let owner = Owner {
                session,
                secret: svc.secret.clone(),
            };
            for i in 0..n {
                let grant = Grant {
                    session,
                    service: svc.clone(),
                    worker,
                };
                match store.issue(now, owner.clone(), grant) {
                    Ok(t) => tickets.push(t),
                    Err(_) => {
                        pool.tickets_withheld(session, n - i);
                        plane.metrics.tickets_withheld.inc();
                        withheld = true;
                        break;
                    }
                }
            }
        }
        for chunk in tickets.chunks(MAX_TICKETS_PER_FRAME) {
            frames.push(RelayMsg::Tickets {
                service: svc.name.clone(),
                tickets: chunk.to_vec(),
            });
        }
    }
    (frames, withheld)
}
