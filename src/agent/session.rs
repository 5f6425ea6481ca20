//! One control connection from the agent: hello, challenge, register, then tickets and
//! heartbeats until the connection is lost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::reload::Reload;
use super::{data, AgentError, Ctx};
use crate::dataplane::uring::agent::{AgentTls, RelayDial};
use crate::dataplane::uring::Command;
use crate::net::CONNECT_TIMEOUT;
use crate::protocol::auth::register_mac;
use crate::protocol::liveness::{Action, Liveness};
use crate::protocol::{
    AgentMsg, ErrorCode, RelayMsg, ServiceKind, ServiceOutcome, ServiceRequest, PROTOCOL_VERSION,
};
use crate::transport::{FrameIoError, Framed};

fn lost(e: FrameIoError) -> AgentError {
    AgentError::Network(format!("relay connection lost: {e}"))
}

pub(super) fn relay_error(code: ErrorCode, message: String) -> AgentError {
    let (message, retry) = match code {
        ErrorCode::AuthFailed => (format!("relay rejected the agent: {message}"), false),
        ErrorCode::UnsupportedVersion | ErrorCode::Replaced => (message, false),
        _ => (format!("relay closed the session: {message}"), true),
    };
    AgentError::Refused {
        code,
        message,
        retry,
    }
}

/// Where uring workers dial, resolved once per session on the tokio side: name lookups
/// block, and a worker must never wait on one. The relay is the address the control
/// connection reached; each local service keeps every address its name resolves to.
struct UringRoutes {
    relay: RelayDial,
    locals: HashMap<String, Arc<[SocketAddr]>>,
}

/// A local service address that did not resolve.
#[derive(Debug, thiserror::Error)]
#[error("resolving {local}: {why}")]
struct Unresolved {
    local: String,
    why: String,
}

impl UringRoutes {
    /// `relay`: the address the control connection reached (the proxy's, with a proxy).
    async fn resolve(ctx: &Ctx, relay: SocketAddr) -> Result<UringRoutes, Unresolved> {
        let relay = match &ctx.cfg.proxy {
            None => RelayDial::Direct(relay),
            Some(proxy) => RelayDial::Proxied {
                proxy: relay,
                request: proxy
                    .connect_request(&ctx.cfg.relay_host, ctx.cfg.relay_port)
                    .into(),
            },
        };
        let mut locals = HashMap::new();
        for s in &ctx.cfg.services {
            let unresolved = |why: String| Unresolved {
                local: s.local.clone(),
                why,
            };
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&s.local)
                .await
                .map_err(|e| unresolved(e.to_string()))?
                .collect();
            if addrs.is_empty() {
                return Err(unresolved("no address".into()));
            }
            locals.insert(s.name.clone(), addrs.into());
        }
        Ok(UringRoutes { relay, locals })
    }
}

/// What the agent's sessions achieved, for the reconnect loop.
#[derive(Debug, Default)]
pub struct Progress {
    /// A session has published something: from then on a registration refusal (an old port
    /// briefly still held) is retried; before, the settings are wrong and it is fatal.
    pub published: bool,
    /// When the latest session came online, if it did. Only a session that was online for a
    /// while resets the backoff: a dial that hangs until its timeout is no session at all.
    pub online_at: Option<Instant>,
}

/// Runs one session; returns why it ended (it never ends without an error), noting in
/// `progress` whether and when it came online.
pub async fn run(
    ctx: &Arc<Ctx>,
    progress: &mut Progress,
    reload: &mut Option<Reload>,
) -> AgentError {
    progress.online_at = None;
    match session(ctx, progress, reload).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session(
    ctx: &Arc<Ctx>,
    progress: &mut Progress,
    reload: &mut Option<Reload>,
) -> Result<std::convert::Infallible, AgentError> {
    let cfg = &ctx.cfg;
    let (stream, relay_peer) = ctx.connect_with_peer(true, false).await?;
    let mut framed = Framed::new(stream);
    framed
        .write_msg(
            &AgentMsg::ControlHello {
                version: PROTOCOL_VERSION,
            },
            CONNECT_TIMEOUT,
        )
        .await
        .map_err(lost)?;
    let (nonce, data_tls) = match framed
        .read_msg_within::<RelayMsg>(CONNECT_TIMEOUT)
        .await
        .map_err(lost)?
    {
        RelayMsg::Challenge {
            version,
            nonce,
            data_tls,
        } if version == PROTOCOL_VERSION => (nonce, data_tls),
        RelayMsg::Challenge { version, .. } => {
            return Err(AgentError::Refused {
                code: ErrorCode::UnsupportedVersion,
                message: format!(
                    "relay speaks protocol {version}, this agent speaks {PROTOCOL_VERSION}"
                ),
                retry: false,
            })
        }
        RelayMsg::Error { code, message } => return Err(relay_error(code, message)),
        other => {
            return Err(AgentError::Protocol(format!(
                "unexpected {other:?} from relay"
            )))
        }
    };

    let services: Vec<ServiceRequest> = cfg
        .services
        .iter()
        .map(|s| {
            let secret = cfg.secret_for(s).map(|x| x.expose()).unwrap_or_default();
            let remote_port = match s.kind.own_port() {
                true => s
                    .remote_port
                    .or_else(|| ctx.assigned_port(&s.name))
                    .unwrap_or(0),
                false => 0,
            };
            ServiceRequest {
                name: s.name.clone(),
                kind: s.kind,
                remote_port,
                hosts: s.hosts.clone(),
                path: s.path.clone().unwrap_or_default(),
                proxy: s.proxy_protocol,
                forwarded_headers: s.forwarded_headers,
                pool: s.pool,
                mac: register_mac(secret, &nonce, &s.name),
                group: s.group.clone().unwrap_or_default(),
            }
        })
        .collect();
    framed
        .write_msg(&AgentMsg::Register { services }, CONNECT_TIMEOUT)
        .await
        .map_err(lost)?;
    let results = match framed
        .read_msg_within::<RelayMsg>(CONNECT_TIMEOUT)
        .await
        .map_err(lost)?
    {
        RelayMsg::Registered { results } => results,
        RelayMsg::Error { code, message } => return Err(relay_error(code, message)),
        other => {
            return Err(AgentError::Protocol(format!(
                "unexpected {other:?} from relay"
            )))
        }
    };

    let mut online = 0;
    let mut refusals = Vec::new();
    let mut first_code = None;
    for r in &results {
        match &r.outcome {
            ServiceOutcome::Online { port, hosts } => {
                online += 1;
                let svc = cfg
                    .services
                    .iter()
                    .find(|s| s.name.eq_ignore_ascii_case(&r.name));
                let kind = svc.map_or(ServiceKind::Tcp, |s| s.kind);
                if kind.own_port() {
                    ctx.remember_port(&r.name, Some(*port));
                }
                // The prefix as the relay claims it (the root shows as nothing).
                let path = svc
                    .and_then(|s| s.path.as_deref())
                    .and_then(|p| crate::protocol::http::normalize_prefix(p).ok())
                    .filter(|p| p != "/")
                    .unwrap_or_default();
                let public = public_address(kind, &cfg.relay_host, *port, hosts, &path);
                crate::say(&format!("online service={} public={public}", r.name));
                ctx.announce(&r.name, *port);
            }
            ServiceOutcome::Rejected { code, message } => {
                tracing::error!(service = %r.name, "relay refused service: {message}");
                // A port we only remembered may have been taken meanwhile: ask afresh next time.
                let configured = cfg
                    .services
                    .iter()
                    .any(|s| s.name.eq_ignore_ascii_case(&r.name) && s.remote_port.is_some());
                if *code == ErrorCode::PortTaken && !configured {
                    ctx.remember_port(&r.name, None);
                }
                refusals.push(format!("service {}: {message}", r.name));
                first_code.get_or_insert(*code);
            }
        }
    }
    if online == 0 {
        let msg = format!("relay published no service: {}", refusals.join("; "));
        // Refused on the first connection: the settings are wrong, so exit. After the
        // agent has been online, a refusal (its old port briefly still held) is retried, and
        // so is a relay-side failure (a fleet relay that cannot reach its registry).
        let code = first_code.unwrap_or(ErrorCode::BadRequest);
        return Err(AgentError::Refused {
            code,
            message: msg,
            retry: progress.published || code == ErrorCode::Internal,
        });
    }
    progress.published = true;
    progress.online_at = Some(Instant::now());
    let uring = match &ctx.workers {
        Some(w) => match UringRoutes::resolve(ctx, relay_peer).await {
            Ok(routes) => {
                let tls = data_tls.then(|| AgentTls {
                    config: ctx.connector.config().clone(),
                    server_name: ctx.server_name.clone(),
                });
                if tls.is_some() {
                    match crate::tls::ktls::probe() {
                        Ok(()) => tracing::info!(
                            workers = w.len(),
                            "data plane backend: uring (TLS data connections, spliced, encrypted by the kernel (kTLS))"
                        ),
                        Err(why) => tracing::info!(
                            workers = w.len(),
                            "data plane backend: uring (TLS data connections, sealed in place on the workers: kTLS is unavailable: {why})"
                        ),
                    }
                } else {
                    tracing::info!(
                        workers = w.len(),
                        "data plane backend: uring (plain data connections, spliced)"
                    );
                }
                Some((w.clone(), routes, tls))
            }
            Err(e) => {
                tracing::warn!("{e}; data connections use tokio this session");
                None
            }
        },
        None => None,
    };

    let hb = cfg.heartbeat;
    let mut live = Liveness::new(Instant::now(), hb.interval, hb.timeout);
    let mut stop = ctx.stop.clone();
    loop {
        let wait_until = match live.poll(Instant::now()) {
            Action::PeerDead => {
                return Err(AgentError::Network(format!(
                    "relay silent for {:?}",
                    hb.timeout
                )))
            }
            Action::SendHeartbeat => {
                framed
                    .write_msg(&AgentMsg::Heartbeat, CONNECT_TIMEOUT)
                    .await
                    .map_err(lost)?;
                live.sent(Instant::now());
                continue;
            }
            Action::WaitUntil(t) => t,
        };
        tokio::select! {
            true = Reload::requested(reload) => {
                let Some(plan) = reload.as_ref().and_then(|r| r.plan(cfg)) else {
                    continue;
                };
                if !plan.new_session {
                    tracing::info!("settings reloaded: {plan}");
                    continue;
                }
                if !plan.removed.is_empty() {
                    let withdraw = AgentMsg::Withdraw { names: plan.removed.clone() };
                    framed.write_msg(&withdraw, CONNECT_TIMEOUT).await.map_err(lost)?;
                }
                // The relay keeps the other services for the next session, which follows at
                // once; visitors in flight carry on over their data connections.
                framed.write_msg(&AgentMsg::Goodbye, CONNECT_TIMEOUT).await.map_err(lost)?;
                tracing::info!("settings reloaded: {plan}; registering again");
                return Err(AgentError::Reload(Box::new(plan.cfg)));
            }
            true = super::stopped(&mut stop, 1) => {
                // Said once, bounded: the relay then routes this agent no new visitors.
                let _ = framed.write_msg(&AgentMsg::Goodbye, CONNECT_TIMEOUT).await;
                return Err(AgentError::Stopping);
            }
            msg = framed.read_msg::<RelayMsg>() => {
                live.heard(Instant::now());
                match msg.map_err(lost)? {
                    RelayMsg::Heartbeat => {}
                    RelayMsg::Tickets { service, tickets } => {
                        let Some(svc) = cfg.services.iter().find(|s| s.name.eq_ignore_ascii_case(&service)) else {
                            tracing::warn!(service, "tickets for a service this agent does not have");
                            continue;
                        };
                        for ticket in tickets {
                            if svc.kind == ServiceKind::Udp {
                                // Channels run on tokio whatever the backend.
                                tokio::spawn(data::serve_udp(ctx.clone(), data_tls, svc.name.clone(), svc.local.clone(), ticket));
                                continue;
                            }
                            match &uring {
                                Some((w, routes, tls)) => {
                                    let cmd = Command::AgentData {
                                        tls: tls.clone(),
                                        relay: routes.relay.clone(),
                                        ticket,
                                        service: svc.name.clone(),
                                        local: routes.locals[&svc.name].clone(),
                                        in_flight: ctx.in_flight.clone(),
                                    };
                                    if let Err(e) = w.send(w.next_worker(), cmd) {
                                        tracing::warn!(service, "data connection not opened: {e}");
                                    }
                                }
                                None => {
                                    tokio::spawn(data::serve(ctx.clone(), data_tls, svc.name.clone(), svc.local.clone(), ticket));
                                }
                            }
                        }
                    }
                    RelayMsg::GoingAway => return Err(AgentError::RelayLeaving),
                    RelayMsg::Error { code, message } => return Err(relay_error(code, message)),
                    other => return Err(AgentError::Protocol(format!("unexpected {other:?} from relay"))),
                }
            }
            _ = tokio::time::sleep_until(wait_until.into()) => {}
        }
    }
}

/// Where visitors reach a service, for the `online` line: `HOST:PORT` for `tcp`,
/// `udp://HOST:PORT` for `udp`,
/// `http://NAME[:PORT]/PATH` for `http`, `NAME:PORT` for `tls` (several joined by commas).
fn public_address(
    kind: ServiceKind,
    relay_host: &str,
    port: u16,
    hosts: &[String],
    path: &str,
) -> String {
    match kind {
        ServiceKind::Tcp if relay_host.contains(':') => format!("[{relay_host}]:{port}"),
        ServiceKind::Tcp => format!("{relay_host}:{port}"),
        ServiceKind::Udp if relay_host.contains(':') => format!("udp://[{relay_host}]:{port}"),
        ServiceKind::Udp => format!("udp://{relay_host}:{port}"),
        ServiceKind::Http => hosts
            .iter()
            .map(|h| match port {
                80 => format!("http://{h}{path}"),
                // An HTTPS-only relay (`--https` without `--http`) gives its TLS port.
                443 => format!("https://{h}{path}"),
                _ => format!("http://{h}:{port}{path}"),
            })
            .collect::<Vec<_>>()
            .join(","),
        ServiceKind::Tls => hosts
            .iter()
            .map(|h| format!("{h}:{port}"))
            .collect::<Vec<_>>()
            .join(","),
    }
}
