//! The agent: runs next to the service, dials out to the relay, and forwards visitors.
//!
//! - [`session`]: one control connection — authenticate, register, receive tickets.
//! - [`data`]: one data connection — redeem a ticket, wait for a visitor, dial the local
//!   service, forward.
//! - [`backoff`]: reconnect delays.

pub mod backoff;
pub mod data;
pub mod reload;
pub mod session;

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::CertificateError;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use crate::config::{AgentConfig, BackendKind};
use crate::dataplane::probe;
use crate::dataplane::uring::Workers;
use crate::net::CONNECT_TIMEOUT;
use crate::protocol::{ErrorCode, ServiceKind};
use crate::tls::fingerprint::FingerprintMismatch;
use crate::tls::{self, RelayTrust};
use crate::transport::BoxStream;
use backoff::Backoff;

/// First reconnect delay.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// How long a stopping agent lets its session say goodbye to the relay.
const GOODBYE_WAIT: Duration = Duration::from_secs(2);

/// After the relay said it is going away: how long the agent keeps retrying often, for a
/// successor (an upgraded process takes over at once; a restart takes the old process's
/// drain plus its start), and how often.
const SUCCESSOR_WAIT: Duration = Duration::from_secs(120);
const SUCCESSOR_RETRY: Duration = Duration::from_secs(1);

/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Whose side an agent failure is on: what the person reading the error should look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This agent's settings or machine (config, flags, io_uring, the local service).
    Agent,
    /// The relay: what it answered, its certificate, its protocol.
    Relay,
    /// The way between: the relay unreachable, the connection lost, the relay silent.
    Network,
}

/// How an agent run ends or a session fails. [`AgentError::retryable`] says whether the
/// agent reconnects (with backoff) or exits; [`AgentError::side`] says whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent's settings or machine cannot work (bad config, io_uring asked for but
    /// missing): exit.
    #[error("{0}")]
    Settings(String),
    /// The relay's certificate is not the one the agent trusts: exit.
    #[error("{0}")]
    Certificate(String),
    /// The relay is unreachable, the connection broke or went silent: retry.
    #[error("{0}")]
    Network(String),
    /// The relay refused, with `code`; `retry` says whether waiting can help (a port still
    /// held by a lingering session) or not (wrong secret, replaced, wrong version).
    #[error("{message}")]
    Refused {
        /// The relay's reason.
        code: ErrorCode,
        /// What the relay said, with context.
        message: String,
        /// Whether reconnecting can succeed.
        retry: bool,
    },
    /// The relay sent something out of order: retry (a relay mid-upgrade, say).
    #[error("{0}")]
    Protocol(String),
    /// The relay said it is going away (draining before a stop, a restart or an upgrade):
    /// reconnect at once and often, to whatever takes its control port next.
    #[error("the relay is going away (stopping, restarting or upgrading)")]
    RelayLeaving,
    /// The settings were reloaded (SIGHUP) and the services changed: the session withdrew
    /// the removed ones and said goodbye; the next one registers with these settings.
    #[error("settings reloaded")]
    Reload(Box<AgentConfig>),
    /// The agent was told to stop (a signal): it said goodbye and drains.
    #[error("stopping")]
    Stopping,
}

impl AgentError {
    /// Whether reconnecting after a delay can help.
    pub fn retryable(&self) -> bool {
        match self {
            AgentError::Settings(_) | AgentError::Certificate(_) | AgentError::Stopping => false,
            AgentError::Network(_)
            | AgentError::Protocol(_)
            | AgentError::RelayLeaving
            | AgentError::Reload(_) => true,
            AgentError::Refused { retry, .. } => *retry,
        }
    }

    /// Whose side the failure is on.
    pub fn side(&self) -> Side {
        match self {
            AgentError::Settings(_) | AgentError::Stopping | AgentError::Reload(_) => Side::Agent,
            AgentError::Certificate(_)
            | AgentError::Refused { .. }
            | AgentError::Protocol(_)
            | AgentError::RelayLeaving => Side::Relay,
            AgentError::Network(_) => Side::Network,
        }
    }
}

/// State shared by the agent's sessions and data connections.
pub struct Ctx {
    /// Settings.
    pub cfg: AgentConfig,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    /// Ports the relay assigned, requested again after a reconnect.
    assigned: Mutex<HashMap<String, u16>>,
    events: Option<mpsc::UnboundedSender<Online>>,
    /// io_uring workers, when the backend allows them; they carry every data connection.
    workers: Option<Arc<Workers>>,
    /// Visitors being served now, on either backend.
    pub in_flight: crate::dataplane::InFlight,
    /// The flows of each `udp` service, shared by its channels (made on first use).
    udp: Mutex<HashMap<String, Arc<crate::dataplane::udp::agent::Service>>>,
    /// How many stop signals arrived: the first says goodbye and drains, the second ends it.
    stop: tokio::sync::watch::Receiver<u32>,
}

/// A service became reachable (sent on every (re)registration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Online {
    /// Service name.
    pub name: String,
    /// Public port on the relay.
    pub port: u16,
}

impl Ctx {
    /// Opens a data connection to the relay's control port, with TLS when `tls` is set, and
    /// with TCP liveness ([`crate::dataplane::sock::keep_alive`]): it may idle in the
    /// relay's pool for hours.
    pub async fn connect_data(&self, tls: bool) -> Result<BoxStream, AgentError> {
        Ok(self.connect_with_peer(tls, true).await?.0)
    }

    /// Connects to the relay's control port, with TLS when `tls` is set; `data`: a data
    /// connection (see [`Self::connect_data`]). Also returns the address the relay answered on.
    pub async fn connect_with_peer(
        &self,
        tls: bool,
        data: bool,
    ) -> Result<(BoxStream, std::net::SocketAddr), AgentError> {
        let addr = self.cfg.relay_addr();
        let connect = async {
            let tcp = self.dial_relay(&addr).await?;
            let _ = tcp.set_nodelay(true);
            if data {
                let _ = crate::dataplane::sock::keep_alive(std::os::fd::AsFd::as_fd(&tcp));
            }
            let peer = tcp
                .peer_addr()
                .map_err(|e| AgentError::Network(format!("relay {addr}: {e}")))?;
            if !tls {
                return Ok((Box::new(tcp) as BoxStream, peer));
            }
            let s = self
                .connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(classify_tls_error)?;
            tracing::debug!(handshake = ?s.get_ref().1.handshake_kind(), "TLS to relay");
            Ok((Box::new(s) as BoxStream, peer))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| AgentError::Network(format!("relay {addr}: connect timed out")))?
    }

    /// A TCP connection to the relay's control port: direct, or a tunnel through the proxy.
    async fn dial_relay(&self, addr: &str) -> Result<TcpStream, AgentError> {
        let cfg = &self.cfg;
        let Some(proxy) = &cfg.proxy else {
            return TcpStream::connect((cfg.relay_host.as_str(), cfg.relay_port))
                .await
                .map_err(|e| AgentError::Network(format!("relay {addr} unreachable: {e}")));
        };
        let fail = |e: std::io::Error| {
            AgentError::Network(format!("relay {addr} through proxy {proxy}: {e}"))
        };
        let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
            .await
            .map_err(|e| AgentError::Network(format!("proxy {proxy} unreachable: {e}")))?;
        let request = proxy.connect_request(&cfg.relay_host, cfg.relay_port);
        tokio::io::AsyncWriteExt::write_all(&mut tcp, &request)
            .await
            .map_err(fail)?;
        crate::dataplane::wait::proxy_answer(&mut tcp)
            .await
            .map_err(fail)?;
        Ok(tcp)
    }

    /// The same agent with reloaded settings `cfg`: the same connections to the relay's
    /// trust, workers, visitor count, stop signal and remembered ports (of the services it
    /// still has).
    fn reconfigured(&self, cfg: AgentConfig) -> Ctx {
        let mut assigned = self
            .assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        assigned.retain(|name, _| cfg.services.iter().any(|s| s.name == *name));
        Ctx {
            cfg,
            connector: self.connector.clone(),
            server_name: self.server_name.clone(),
            assigned: Mutex::new(assigned),
            events: self.events.clone(),
            workers: self.workers.clone(),
            in_flight: self.in_flight.clone(),
            udp: Mutex::new(HashMap::new()),
            stop: self.stop.clone(),
        }
    }

    /// The flows of `udp` service `name`, whose local service is at `local`.
    pub fn udp_service(
        &self,
        name: &str,
        local: &str,
    ) -> Arc<crate::dataplane::udp::agent::Service> {
        let mut g = self.udp.lock().unwrap_or_else(|e| e.into_inner());
        g.entry(name.to_string())
            .or_insert_with(|| crate::dataplane::udp::agent::Service::new(name, local))
            .clone()
    }

    fn assigned_port(&self, name: &str) -> Option<u16> {
        self.assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }

    fn announce(&self, name: &str, port: u16) {
        if let Some(tx) = &self.events {
            let _ = tx.send(Online {
                name: name.to_string(),
                port,
            });
        }
    }

    fn remember_port(&self, name: &str, port: Option<u16>) {
        let mut g = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
        match port {
            Some(p) => g.insert(name.to_string(), p),
            None => g.remove(name),
        };
    }
}

/// Starts io_uring workers unless the backend is tokio or io_uring is unavailable (which is
/// fatal only when uring was asked for explicitly).
fn start_workers(
    backend: BackendKind,
    workers: Option<usize>,
) -> Result<Option<Arc<Workers>>, AgentError> {
    if backend == BackendKind::Tokio {
        tracing::info!("data plane backend: tokio (requested with --backend tokio)");
        return Ok(None);
    }
    match probe::io_uring() {
        Ok(()) => Workers::start(workers)
            .map(Some)
            .map_err(|e| AgentError::Settings(format!("starting io_uring workers: {e}"))),
        Err(why) if backend == BackendKind::Uring => Err(AgentError::Settings(format!(
            "--backend uring: io_uring is unavailable: {why}"
        ))),
        Err(why) => {
            tracing::info!("data plane backend: tokio (auto: io_uring is unavailable ({why}))");
            Ok(None)
        }
    }
}

/// Certificate problems are fatal (retrying will not change the certificate); anything else
/// in the handshake is treated as a network problem.
fn classify_tls_error(e: io::Error) -> AgentError {
    let rustls_err = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match rustls_err {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) => {
            match other.0.downcast_ref::<FingerprintMismatch>() {
                Some(m) => AgentError::Certificate(m.to_string()),
                None => AgentError::Certificate(format!("relay certificate rejected: {other}")),
            }
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            AgentError::Certificate(
                "relay certificate is not trusted (self-signed?): pass --relay-fingerprint with the fingerprint the relay printed at start".into(),
            )
        }
        Some(rustls::Error::InvalidCertificate(c)) => {
            AgentError::Certificate(format!("relay certificate rejected: {c:?}"))
        }
        _ => AgentError::Network(format!("TLS handshake with relay failed: {e}")),
    }
}

/// Runs the agent until a fatal error: connects, publishes, and reconnects with backoff
/// whenever the relay connection is lost.
pub async fn run(cfg: AgentConfig) -> Result<Drained, AgentError> {
    // No stop signal: the sender goes at once, which turns the stop branches off.
    run_with_events(cfg, None, tokio::sync::watch::channel(0).1).await
}

/// What a stopping agent's drain achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Visitors being served when the agent said goodbye that finished on their own.
    pub finished: usize,
    /// Visitors still being served when it ended (cut as the agent exits).
    pub cut: usize,
}

/// Tries the local service once at start and warns if it does not answer: the agent still
/// starts (the service may come up after it), but a typo in `--local` shows at once instead
/// of as visitors that are cut off.
async fn check_local(service: String, local: String) {
    let dial = tokio::time::timeout(LOCAL_CHECK, tokio::net::TcpStream::connect(&local));
    let why = match dial.await {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {LOCAL_CHECK:?}"),
    };
    tracing::warn!(
        service,
        "local service {local} is not reachable now ({why}); its visitors are cut off until it is"
    );
}

/// How long the start-up check of a local service waits for it.
const LOCAL_CHECK: Duration = Duration::from_secs(2);

/// [`run`], also reporting each service that comes online on `events`.
/// `stop` counts stop signals (a dropped sender means none will come): at the first the agent says goodbye to the relay (which
/// routes it no new visitors) and waits up to `cfg.drain_timeout` for the visitors it is
/// serving; at the second it ends at once. Returns how the drain went.
pub async fn run_with_events(
    cfg: AgentConfig,
    events: Option<mpsc::UnboundedSender<Online>>,
    stop: tokio::sync::watch::Receiver<u32>,
) -> Result<Drained, AgentError> {
    run_inner(cfg, events, stop, None, None).await
}

/// [`run_with_events`] without events, and reloading its settings whenever `reload`
/// signals: services added register, removed ones are withdrawn from the relay at once,
/// changed ones register again; visitors in flight are untouched.
pub async fn run_reloadable(
    cfg: AgentConfig,
    stop: tokio::sync::watch::Receiver<u32>,
    reload: reload::Reload,
) -> Result<Drained, AgentError> {
    run_inner(cfg, None, stop, Some(reload), None).await
}

/// [`run_reloadable`] for each of several relays of a fleet at once: one session (and pool
/// of data connections) per relay, each retried on its own. A fatal error on one relay (its
/// certificate not trusted, a port it cannot bind) is logged and the others carry on; the
/// run ends when every relay's has, with the last error if any ended with one.
pub async fn run_relays(
    runs: Vec<(AgentConfig, reload::Reload)>,
    stop: tokio::sync::watch::Receiver<u32>,
) -> Result<Drained, AgentError> {
    use tracing::Instrument;
    let mut set = tokio::task::JoinSet::new();
    let several = runs.len() > 1;
    // One set of workers carries the data connections to every relay.
    let workers = match runs.first() {
        Some((cfg, _)) => start_workers(cfg.backend, cfg.workers)?,
        None => None,
    };
    for (cfg, reload) in runs {
        // With several relays, each line says which one it is about.
        let span = match several {
            true => tracing::info_span!("relay", addr = %cfg.relay_addr()),
            false => tracing::Span::none(),
        };
        let shared = Some(workers.clone());
        set.spawn(run_inner(cfg, None, stop.clone(), Some(reload), shared).instrument(span));
    }
    let mut total = Drained {
        finished: 0,
        cut: 0,
    };
    let mut failed = None;
    while let Some(joined) = set.join_next().await {
        let err = match joined {
            Ok(Ok(d)) => {
                total.finished += d.finished;
                total.cut += d.cut;
                continue;
            }
            Ok(Err(e)) => e,
            Err(e) => AgentError::Settings(format!("a relay's session task failed: {e}")),
        };
        if !set.is_empty() {
            tracing::error!("{err}; staying with the other relays");
        }
        failed = Some(err);
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// `workers`: the io_uring workers to use, already started (several relays share one set);
/// `None` starts them here.
async fn run_inner(
    cfg: AgentConfig,
    events: Option<mpsc::UnboundedSender<Online>>,
    stop: tokio::sync::watch::Receiver<u32>,
    mut reload: Option<reload::Reload>,
    workers: Option<Option<Arc<Workers>>>,
) -> Result<Drained, AgentError> {
    cfg.validate()
        .map_err(|e| AgentError::Settings(e.to_string()))?;
    for svc in &cfg.services {
        if let Some(why) = cfg
            .secret_for(svc)
            .and_then(crate::config::Secret::weakness)
        {
            tracing::warn!(service = %svc.name, "the secret is weak: {why}");
        }
        // In the background: a local service that drops packets would otherwise hold up
        // the start by the check's timeout, once per service. UDP has no connection to try.
        if svc.kind != ServiceKind::Udp {
            tokio::spawn(check_local(svc.name.clone(), svc.local.clone()));
        }
    }
    let trust = match (&cfg.relay_fingerprint, &cfg.ca) {
        (Some(fp), _) => RelayTrust::Pinned(*fp),
        (None, Some(ca)) => RelayTrust::CaFile(ca.clone()),
        (None, None) => RelayTrust::PublicRoots,
    };
    let client = tls::client_config(&trust).map_err(|e| AgentError::Settings(e.to_string()))?;
    let server_name = ServerName::try_from(cfg.relay_host.clone())
        .map_err(|_| AgentError::Settings(format!("invalid relay host {:?}", cfg.relay_host)))?;
    let workers = match workers {
        Some(w) => w,
        None => start_workers(cfg.backend, cfg.workers)?,
    };
    let mut ctx = Arc::new(Ctx {
        cfg,
        connector: TlsConnector::from(client),
        server_name,
        assigned: Mutex::new(HashMap::new()),
        events,
        workers,
        in_flight: crate::dataplane::InFlight::default(),
        udp: Mutex::new(HashMap::new()),
        stop: stop.clone(),
    });
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    let mut progress = session::Progress::default();
    let mut stop = stop;
    // Until when a successor relay is expected (the last one said it is going away).
    let mut successor_until: Option<Instant> = None;
    loop {
        let err = {
            let session = session::run(&ctx, &mut progress, &mut reload);
            tokio::pin!(session);
            tokio::select! {
                err = &mut session => err,
                true = stopped(&mut stop, 1) => {
                    // An online session says goodbye itself and ends; one still connecting
                    // is given up after a moment.
                    tokio::time::timeout(GOODBYE_WAIT, &mut session)
                        .await
                        .unwrap_or(AgentError::Stopping)
                }
            }
        };
        if matches!(err, AgentError::Stopping) {
            return Ok(drain(&ctx, stop).await);
        }
        if let AgentError::Reload(cfg) = err {
            ctx = Arc::new(ctx.reconfigured(*cfg));
            continue;
        }
        if !err.retryable() {
            return Err(err);
        }
        let now = Instant::now();
        if progress.online_at.is_some() {
            successor_until = None;
        }
        if was_stable(progress.online_at, now) {
            backoff.reset();
        }
        let mut delay = backoff.next_delay();
        if matches!(err, AgentError::RelayLeaving) {
            backoff.reset();
            successor_until = Some(now + SUCCESSOR_WAIT);
            delay = Duration::ZERO;
            tracing::info!("{err}: reconnecting to its successor");
        } else if successor_until.is_some_and(|t| now < t) {
            // Expected while the old relay drains: one line a second would drown the log.
            delay = delay.min(SUCCESSOR_RETRY);
            tracing::debug!("{err}; waiting for the relay's successor");
        } else {
            successor_until = None;
            tracing::warn!("{err}; reconnecting in {:.1}s", delay.as_secs_f64());
        }
        let stopped = tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            true = stopped(&mut stop, 1) => true,
        };
        if stopped {
            return Ok(drain(&ctx, stop).await);
        }
    }
}

/// Whether `n` stop signals have come, once they have; `false` at once if none ever will
/// (the sender is gone), which a `true = ...` select branch reads as "never".
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<u32>, n: u32) -> bool {
    stop.wait_for(|v| *v >= n).await.is_ok()
}

/// Waits for the visitors being served to finish: until none is left, `drain_timeout`
/// passes, or a second stop signal comes.
async fn drain(ctx: &Ctx, mut stop: tokio::sync::watch::Receiver<u32>) -> Drained {
    let at_start = ctx.in_flight.count();
    let deadline = Instant::now() + ctx.cfg.drain_timeout;
    tracing::info!(
        visitors = at_start,
        timeout_secs = ctx.cfg.drain_timeout.as_secs(),
        "stopping: the relay routes no new visitors here, those being served may finish (a second signal stops at once)"
    );
    while ctx.in_flight.count() > 0 && Instant::now() < deadline {
        // Polled: a visitor's end is not an event to wait on here.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            true = stopped(&mut stop, 2) => break,
        }
    }
    let cut = ctx.in_flight.count();
    Drained {
        finished: at_start.saturating_sub(cut),
        cut,
    }
}

/// Whether a session that came online at `online_at` (if it did) lasted long enough, by
/// `now`, to start the backoff over.
fn was_stable(online_at: Option<Instant>, now: Instant) -> bool {
    online_at.is_some_and(|t| now.saturating_duration_since(t) >= STABLE_SESSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_session_that_was_online_for_a_while_resets_the_backoff() {
        let t0 = Instant::now();
        let later = t0 + STABLE_SESSION;
        // A relay that swallows the dial until its timeout never brought the agent online.
        assert!(!was_stable(None, later));
        assert!(!was_stable(Some(t0), t0 + Duration::from_secs(1)));
        assert!(was_stable(Some(t0), later));
    }

    #[test]
    fn errors_say_whose_fault_and_whether_to_retry() {
        let wrong_secret = session::relay_error(ErrorCode::AuthFailed, "wrong secret".into());
        assert!(!wrong_secret.retryable());
        assert_eq!(wrong_secret.side(), Side::Relay);
        assert_eq!(
            wrong_secret.to_string(),
            "relay rejected the agent: wrong secret"
        );
        let busy = session::relay_error(ErrorCode::LimitReached, "too many agents".into());
        assert!(busy.retryable(), "a limit may free up");
        let gone = AgentError::Network("relay 127.0.0.1:1 unreachable".into());
        assert!(gone.retryable());
        assert_eq!(gone.side(), Side::Network);
        let pinned = classify_tls_error(io::Error::other(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        )));
        assert!(!pinned.retryable());
        assert!(
            pinned.to_string().contains("--relay-fingerprint"),
            "{pinned}"
        );
        let settings = AgentError::Settings("--backend uring: io_uring is unavailable".into());
        assert_eq!(
            (settings.retryable(), settings.side()),
            (false, Side::Agent)
        );
    }
}
