//! The relay: binds its ports, wires the control plane, the data plane, the shared ports and
//! the admin endpoint together, and owns every task it starts.
//!
//! The parts never import this module: each is handed what it reads
//! ([`ControlPlane`], [`Router`], [`AdminView`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

pub mod reload;

use crate::admin::http::AdminView;
use crate::admin::Metrics;
use crate::config::{ConfigError, LiveConfig, RelayConfig, Secret};
use crate::control::accept;
use crate::control::plane::ControlPlane;
use crate::control::registry::{Registry, SharedPorts};
use crate::dataplane::{choose_backend, Backend, DataPlane, SharedListener};
use crate::shared_ports::{Port, Router};
use crate::tls::{self, Fingerprint, RelayIdentity, TlsError};
pub use reload::{Loader, Reloaded, Reloader};

/// How often expired tickets and services whose linger ended are swept: a lingering service
/// closes at most this long after its linger.
const SWEEP: Duration = Duration::from_secs(1);

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Bad settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Certificate trouble.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The requested data-plane backend cannot run here.
    #[error("{0}")]
    Backend(String),
    /// A listener could not be bound.
    #[error("cannot listen on {flag} {addr}: {error}{}", bind_hint(*addr, error))]
    Bind {
        /// The flag (or relay.toml key) that asked for it: `--control`, `--http`, `--tls`,
        /// `--admin`.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why (part of the message, so it is printed once).
        error: std::io::Error,
    },
}

/// A running relay. Dropping it (or [`RelayHandle::stop`]) ends every task the relay started:
/// the control port, agent sessions, the ticket sweeper, the admin endpoint and the shared
/// ports, on tokio and on the workers.
pub struct RelayHandle {
    /// The bound control address (resolves port 0).
    pub control_addr: SocketAddr,
    /// SHA-256 fingerprint of the relay certificate, for agents to pin.
    pub fingerprint: Fingerprint,
    /// Whether this start generated the self-signed certificate.
    pub generated_cert: bool,
    /// The data-plane backend in use.
    pub backend: Backend,
    /// The bound shared HTTP port, if any.
    pub http_addr: Option<SocketAddr>,
    /// The bound shared TLS port, if any.
    pub tls_addr: Option<SocketAddr>,
    /// The bound admin endpoint, if any.
    pub admin_addr: Option<SocketAddr>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Every tokio task of the relay; dropping the set aborts them.
    tasks: JoinSet<()>,
    /// The tokio accept loops of the shared ports (the visitors they routed run on their
    /// own), and stops that close their ports at once: ended first when draining.
    shared_accepts: JoinSet<()>,
    shared_stops: Vec<crate::net::StopListening>,
    /// Stop handles of the shared ports' accept loops on the uring workers; dropping them
    /// stops those loops and closes the ports.
    worker_ports: Vec<crate::dataplane::uring::ListenerStop>,
    /// The control plane, whose registry holds the services' public listeners: closed on stop
    /// even while a session task still unwinds.
    plane: Arc<ControlPlane>,
    reloader: Arc<Reloader>,
}

/// What a drain achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Visitors in flight when the drain began that finished on their own.
    pub finished: usize,
    /// Visitors still in flight when it ended (cut by the stop that follows).
    pub cut: usize,
}

impl RelayHandle {
    /// Reads the settings again and puts in force what can change live (see [`Reloader`]).
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        self.reloader.reload()
    }

    /// The settings in force now.
    pub fn settings(&self) -> Arc<RelayConfig> {
        self.plane.cfg()
    }

    /// Runs until the relay's tasks end (they do not, short of a panic).
    pub async fn wait(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    /// Visitors admitted and not finished yet.
    pub fn visitors_active(&self) -> usize {
        self.plane.registry.visitors_active()
    }

    /// Stops taking anything new, at once: visitors on every public port are refused, and
    /// agent connections on the control port (as soon as its loop sees the signal). Visitors
    /// in flight carry on; agent sessions are told to go away once no visitor of theirs waits
    /// for a data connection. [`Self::drain`] starts with it.
    pub fn close_doors(&mut self) {
        self.shared_stops.clear();
        self.shared_accepts.abort_all();
        self.worker_ports.clear();
        self.plane.registry.stop_listening();
        self.plane.start_drain();
    }

    /// [`Self::close_doors`], then waits up to `timeout` for the visitors in flight (and those already
    /// waiting for a data connection) to finish. Every agent session is told the relay is
    /// going away ([`crate::protocol::RelayMsg::GoingAway`]) and closed, so agents reconnect
    /// to a successor at once; data connections carrying visitors stay up. Call
    /// [`Self::stop`] after it to end the rest.
    pub async fn drain(&mut self, timeout: Duration) -> Drained {
        self.close_doors();
        let at_start = self.visitors_active();
        let deadline = Instant::now() + timeout;
        // Polled: a visitor's end is not an event anything here can wait on, and a tenth of
        // a second is nothing next to a drain.
        while self.visitors_active() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let cut = self.visitors_active();
        Drained {
            finished: at_start.saturating_sub(cut),
            cut,
        }
    }

    /// Stops the relay: every task it started ends, its ports close, and its services'
    /// listeners with them. Visitors in flight are cut.
    pub fn stop(mut self) {
        self.shared_stops.clear();
        self.shared_accepts.abort_all();
        self.tasks.abort_all();
        self.worker_ports.clear();
        self.plane.registry.close_all();
    }
}

/// What to do about a bind that failed: ports below 1024 need a privilege.
fn bind_hint(addr: SocketAddr, error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE, e.g. AmbientCapabilities=CAP_NET_BIND_SERVICE in a systemd unit)"
        }
        std::io::ErrorKind::AddrInUse => " (another process holds it: `ss -ltnp` shows which)",
        _ => "",
    }
}

/// Binds one tokio listener (control port, admin endpoint) asked for by `flag`; returns it
/// with the address it got (port 0 resolved).
fn bind(
    flag: &'static str,
    addr: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), RelayError> {
    let bound = |error| RelayError::Bind { flag, addr, error };
    let l = crate::net::bind(addr, false).map_err(bound)?;
    let local = l.local_addr().map_err(bound)?;
    Ok((l, local))
}

/// Validates `cfg`, loads or creates the certificate, binds the control port and starts
/// serving. Must be called inside a tokio runtime.
pub async fn start(cfg: RelayConfig) -> Result<RelayHandle, RelayError> {
    start_with(cfg, None).await
}

/// [`start`], with a way to read the settings again for a reload ([`RelayHandle::reload`],
/// SIGHUP, `POST /api/reload` on the admin endpoint).
pub async fn start_reloadable(cfg: RelayConfig, load: Loader) -> Result<RelayHandle, RelayError> {
    start_with(cfg, Some(load)).await
}

async fn start_with(cfg: RelayConfig, load: Option<Loader>) -> Result<RelayHandle, RelayError> {
    cfg.validate()?;
    if let Some(why) = cfg.secret.as_ref().and_then(Secret::weakness) {
        tracing::warn!("the relay's secret is weak: {why}");
    }
    for s in &cfg.service_secrets {
        if let Some(why) = s.secret.as_ref().and_then(Secret::weakness) {
            tracing::warn!(service = %s.name, "the service's secret is weak: {why}");
        }
    }
    let fds = crate::net::fds::raise_fd_limit();
    tracing::debug!(fds, "file descriptor limit");
    let identity = match &cfg.cert {
        Some((cert, key)) => RelayIdentity::from_files(cert, key)?,
        None => RelayIdentity::load_or_create(&cfg.state_dir)?,
    };
    let acceptor = TlsAcceptor::from(tls::server_config(&identity)?);
    let (backend, why) = choose_backend(cfg.backend, cfg.data_tls)
        .map_err(|e| RelayError::Backend(e.to_string()))?;
    let (listener, control_addr) = bind("--control", cfg.control)?;
    let dataplane = DataPlane::start(backend, cfg.workers)
        .map_err(|e| RelayError::Backend(format!("starting the {backend} data plane: {e}")))?;
    // The shared ports are the data plane's: on uring every worker accepts on its own.
    let bind_shared = |flag: &'static str, addr: Option<SocketAddr>| -> Result<_, RelayError> {
        let Some(addr) = addr else {
            return Ok((None, None));
        };
        let (l, bound) = dataplane
            .bind_shared(addr)
            .map_err(|error| RelayError::Bind { flag, addr, error })?;
        Ok((Some(l), Some(bound)))
    };
    let (http_listener, http_addr) = bind_shared("--http", cfg.front.http)?;
    let (tls_listener, tls_addr) = bind_shared("--tls", cfg.front.tls)?;
    let (admin_listener, admin_addr) = match cfg.admin {
        None => (None, None),
        Some(addr) => {
            let (l, bound) = bind("--admin", addr)?;
            (Some(l), Some(bound))
        }
    };
    tracing::info!(%backend, "data plane backend: {why}");
    if !cfg.data_tls {
        tracing::warn!("data connections are plain TCP (--data-tls off): visitor bytes cross the network unencrypted between relay and agent");
    }
    let metrics = Arc::new(Metrics::default());
    let live = LiveConfig::new(cfg.clone());
    let registry = Arc::new(Registry::new(
        live.clone(),
        SharedPorts {
            http: http_addr.map(|a| a.port()),
            tls: tls_addr.map(|a| a.port()),
        },
        metrics.clone(),
        dataplane.clone(),
    ));
    let router = Arc::new(Router {
        cfg: cfg.front.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
    });
    let admin_token = cfg.admin_token.clone();
    let reloader = Arc::new(Reloader::new(load, live.clone(), registry.clone()));
    let plane = Arc::new(ControlPlane::new(
        live,
        registry.clone(),
        metrics.clone(),
        acceptor,
        dataplane,
    ));
    let mut tasks = JoinSet::new();
    let mut shared_accepts = JoinSet::new();
    let mut shared_stops = Vec::new();
    let mut worker_ports = Vec::new();
    for (l, port) in [(http_listener, Port::Http), (tls_listener, Port::Tls)] {
        match l {
            None => {}
            Some(SharedListener::Tokio(l)) => {
                let stop = crate::net::StopListening::new(std::os::fd::AsFd::as_fd(&l))
                    .map_err(|e| RelayError::Backend(format!("the {} port: {e}", port.name())))?;
                shared_stops.push(stop);
                shared_accepts.spawn(crate::shared_ports::tokio::accept_loop(
                    router.clone(),
                    l,
                    port,
                ));
            }
            Some(SharedListener::Uring(workers, group)) => worker_ports.extend(
                crate::shared_ports::uring::start(&workers, &router, port, group).map_err(|e| {
                    RelayError::Backend(format!(
                        "serving the {} port on the workers: {e}",
                        port.name()
                    ))
                })?,
            ),
        }
    }
    if let Some(l) = admin_listener {
        let agents = registry.clone();
        let view = Arc::new(AdminView {
            metrics: metrics.clone(),
            services: Box::new(move || registry.snapshot()),
            agents: Box::new(move || agents.agents()),
            reload: {
                let reloader = reloader.clone();
                Box::new(move || {
                    reloader
                        .reload()
                        .map(|done| serde_json::to_string_pretty(&done).unwrap_or_default())
                        .map_err(|e| e.to_string())
                })
            },
            token: admin_token,
        });
        tasks.spawn(crate::admin::http::serve(view, l));
    }
    let sweeper = plane.clone();
    tasks.spawn(async move {
        loop {
            tokio::time::sleep(SWEEP).await;
            let now = Instant::now();
            sweeper.sweep_tickets(now);
            sweeper.registry.expire_lingering(now);
            sweeper.refusals.flush(now);
        }
    });
    tasks.spawn(accept::accept_loop(plane.clone(), listener));
    Ok(RelayHandle {
        control_addr,
        fingerprint: identity.fingerprint,
        generated_cert: identity.generated,
        backend,
        http_addr,
        tls_addr,
        admin_addr,
        metrics,
        tasks,
        shared_accepts,
        shared_stops,
        worker_ports,
        plane,
        reloader,
    })
}
