//! The relay: its control plane and the glue that starts it.
//!
//! - [`accept`]: the control port; classifies each agent connection (control or data).
//! - [`session`]: one authenticated agent control session.
//! - [`registry`]: services, their owners and their public ports.
//! - [`routes`]: host names (and path prefixes) of the shared ports → services.
//! - [`tickets`]: single-use data-connection tickets.
//!
//! Everything runs on one tokio runtime for now; the control plane is small and the
//! data-plane work (listeners, forwarding) lives in [`crate::dataplane`].

pub mod accept;
pub mod registry;
pub mod routes;
pub mod session;
pub mod tickets;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::admin::Metrics;
use crate::config::{ConfigError, RelayConfig};
use crate::dataplane::{choose_backend, Backend, DataPlane, SharedListener};
use crate::front::Port;
use crate::tls::{self, Fingerprint, RelayIdentity, TlsError};
use registry::{Registry, Service, SessionId, SharedPorts};
use tickets::TicketStore;

/// Deadline for an agent connection's TLS handshake and first frames.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for writing one control frame to an agent.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often expired tickets are swept.
const TICKET_SWEEP: Duration = Duration::from_secs(5);

/// What a ticket was issued for.
pub struct Grant {
    /// The session it was issued to; only valid while that session owns the service.
    pub session: SessionId,
    /// The service whose pool the connection joins.
    pub service: Arc<Service>,
    /// Which of the service's pools (data-plane worker) the connection joins.
    pub worker: usize,
}

/// State shared by every task of one relay.
pub struct Shared {
    /// Settings.
    pub cfg: RelayConfig,
    /// Services and sessions.
    pub registry: Arc<Registry>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// TLS for control and data connections.
    pub acceptor: TlsAcceptor,
    /// Where visitor bytes are forwarded.
    pub dataplane: DataPlane,
    tickets: Mutex<TicketStore<Grant>>,
}

impl Shared {
    fn tickets(&self) -> MutexGuard<'_, TicketStore<Grant>> {
        self.tickets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

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
    /// The control port could not be bound.
    #[error("cannot listen on control address {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running relay.
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
    task: JoinHandle<()>,
}

impl RelayHandle {
    /// Runs until the relay's accept loop ends (it does not, short of a panic).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// Stops accepting agents. Existing sessions end when their tasks next fail.
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// Validates `cfg`, loads or creates the certificate, binds the control port and starts
/// serving. Must be called inside a tokio runtime.
pub async fn start(cfg: RelayConfig) -> Result<RelayHandle, RelayError> {
    cfg.validate()?;
    let identity = match &cfg.cert {
        Some((cert, key)) => RelayIdentity::from_files(cert, key)?,
        None => RelayIdentity::load_or_create(&cfg.state_dir)?,
    };
    let acceptor = TlsAcceptor::from(tls::server_config(&identity)?);
    let (backend, why) = choose_backend(cfg.backend, cfg.data_tls).map_err(RelayError::Backend)?;
    let listener = crate::dataplane::listener::bind(cfg.control, false).map_err(|source| {
        RelayError::Bind {
            addr: cfg.control,
            source,
        }
    })?;
    let control_addr = listener.local_addr().map_err(|source| RelayError::Bind {
        addr: cfg.control,
        source,
    })?;
    let dataplane = DataPlane::start(backend, cfg.workers)
        .map_err(|e| RelayError::Backend(format!("starting the {backend} data plane: {e}")))?;
    // The shared ports are the data plane's: on uring every worker accepts on its own.
    let bind_shared = |addr: Option<SocketAddr>| -> Result<_, RelayError> {
        let Some(addr) = addr else {
            return Ok((None, None));
        };
        let (l, bound) = dataplane
            .bind_shared(addr)
            .map_err(|source| RelayError::Bind { addr, source })?;
        Ok((Some(l), Some(bound)))
    };
    let (http_listener, http_addr) = bind_shared(cfg.front.http)?;
    let (tls_listener, tls_addr) = bind_shared(cfg.front.tls)?;
    let (admin_listener, admin_addr) = match cfg.admin {
        None => (None, None),
        Some(addr) => {
            let l = crate::dataplane::listener::bind(addr, false)
                .map_err(|source| RelayError::Bind { addr, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| RelayError::Bind { addr, source })?;
            (Some(l), Some(bound))
        }
    };
    tracing::info!(%backend, "data plane backend: {why}");
    if !cfg.data_tls {
        tracing::warn!("data connections are plain TCP (--data-tls off): visitor bytes cross the network unencrypted between relay and agent");
    }
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(Registry::new(
        cfg.clone(),
        SharedPorts {
            http: http_addr.map(|a| a.port()),
            tls: tls_addr.map(|a| a.port()),
        },
        metrics.clone(),
        dataplane.clone(),
    ));
    let shared = Arc::new(Shared {
        cfg,
        registry,
        metrics: metrics.clone(),
        acceptor,
        dataplane,
        tickets: Mutex::new(TicketStore::default()),
    });
    // Shared ports: tokio's accept loops start with the relay's task below; the workers' start
    // now and stop when `worker_fronts` (held by that task) is dropped.
    let mut tokio_fronts = Vec::new();
    let mut worker_fronts = Vec::new();
    for (l, port) in [(http_listener, Port::Http), (tls_listener, Port::Tls)] {
        match l {
            None => {}
            Some(SharedListener::Tokio(l)) => tokio_fronts.push((l, port)),
            Some(SharedListener::Uring(workers, group)) => worker_fronts.push(
                crate::front::worker::start(&workers, &shared, port, group).map_err(|e| {
                    RelayError::Backend(format!(
                        "serving the {} port on the workers: {e}",
                        port.name()
                    ))
                })?,
            ),
        }
    }
    let sweeper = shared.clone();
    let task = tokio::spawn(async move {
        let sweep = tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICKET_SWEEP).await;
                let expired = sweeper.tickets().purge(Instant::now());
                for g in expired {
                    if g.service.is_owned_by(g.session) {
                        g.service.pools[g.worker].ticket_done();
                    }
                }
            }
        });
        let mut fronts = Vec::new();
        if let Some(l) = admin_listener {
            fronts.push(tokio::spawn(crate::admin::http::serve(shared.clone(), l)));
        }
        for (l, port) in tokio_fronts {
            fronts.push(tokio::spawn(crate::front::accept_loop(
                shared.clone(),
                l,
                port,
            )));
        }
        accept::accept_loop(shared, listener).await;
        sweep.abort();
        for f in fronts {
            f.abort();
        }
        drop(worker_fronts);
    });
    Ok(RelayHandle {
        control_addr,
        fingerprint: identity.fingerprint,
        generated_cert: identity.generated,
        backend,
        http_addr,
        tls_addr,
        admin_addr,
        metrics,
        task,
    })
}
