//! The relay: binds its ports, wires the control plane, the data plane, the shared ports and
//! the admin endpoint together, and owns every task it starts.
//!
//! The parts never import this module: each is handed what it reads
//! ([`ControlPlane`], [`Router`], [`AdminView`]).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

pub mod reload;
pub mod upgrade;

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
pub use upgrade::{Inherited, UpgradeError};

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
    /// HTTPS termination could not be set up (the certificate store, TLS settings).
    #[error("--https: {0}")]
    Https(String),
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
    /// Duplicates of the control, admin and shared ports' listeners, for a handover.
    own_ports: upgrade::Outgoing,
    /// The admin endpoint's task, ended on its own when handing over.
    admin_task: Option<tokio::task::AbortHandle>,
    /// Whether the doors are closed (or handed over) already.
    doors_closed: bool,
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
        if self.doors_closed {
            return;
        }
        self.doors_closed = true;
        // The duplicates kept for a handover would keep the ports listening (and
        // connections queueing on them) after their accept loops end.
        self.own_ports = upgrade::Outgoing::default();
        self.shared_stops.clear();
        self.shared_accepts.abort_all();
        self.worker_ports.clear();
        self.plane.registry.stop_listening();
        self.plane.start_drain();
    }

    /// Starts `exe` with `args` as this relay's successor and hands it every listening socket
    /// and a record of every published service (see [`upgrade`]); returns its process id
    /// once it is ready. Then call [`Self::let_go`] and [`Self::drain`]. On failure nothing
    /// has changed here.
    pub async fn upgrade(&self, exe: PathBuf, args: Vec<OsString>) -> Result<u32, UpgradeError> {
        let dup = |fds: &[OwnedFd]| -> std::io::Result<Vec<OwnedFd>> {
            fds.iter().map(|f| f.try_clone()).collect()
        };
        let outgoing = upgrade::Outgoing {
            control: dup(&self.own_ports.control)?,
            admin: dup(&self.own_ports.admin)?,
            http: dup(&self.own_ports.http)?,
            tls: dup(&self.own_ports.tls)?,
            services: self.plane.registry.records()?,
        };
        tokio::task::spawn_blocking(move || upgrade::hand_over(&exe, &args, outgoing))
            .await
            .map_err(|e| UpgradeError::Io(std::io::Error::other(e)))?
    }

    /// Stops accepting anything, like [`Self::close_doors`], but without ending the
    /// listening: the sockets were handed to a successor, which accepts on them now.
    pub fn let_go(&mut self) {
        self.doors_closed = true;
        for stop in &mut self.shared_stops {
            stop.release();
        }
        self.shared_stops.clear();
        self.shared_accepts.abort_all();
        for stop in &mut self.worker_ports {
            stop.release();
        }
        self.worker_ports.clear();
        if let Some(admin) = self.admin_task.take() {
            admin.abort();
        }
        self.plane.registry.release_listeners();
        self.plane.start_drain();
        self.own_ports = upgrade::Outgoing::default();
    }

    /// [`Self::close_doors`], then waits up to `timeout` for the visitors in flight (and those already
    /// waiting for a data connection) to finish. Every agent session is told the relay is
    /// going away ([`crate::protocol::RelayMsg::GoingAway`]) and closed, so agents reconnect
    /// to a successor at once; data connections carrying visitors stay up. Call
    /// [`Self::stop`] after it to end the rest.
    pub async fn drain(&mut self, timeout: Duration) -> Drained {
        self.close_doors(); // nothing if already closed or handed over
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

/// A tokio listener for `flag`: the one handed over, or [`bind`] a new one.
fn bind_or_adopt(
    flag: &'static str,
    addr: SocketAddr,
    handed: Option<std::net::TcpListener>,
) -> Result<(tokio::net::TcpListener, SocketAddr), RelayError> {
    let Some(l) = handed else {
        return bind(flag, addr);
    };
    let adopted = |error| RelayError::Bind { flag, addr, error };
    l.set_nonblocking(true).map_err(adopted)?;
    let l = tokio::net::TcpListener::from_std(l).map_err(adopted)?;
    let local = l.local_addr().map_err(adopted)?;
    Ok((l, local))
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
    start_with(cfg, None, Inherited::default()).await
}

/// [`start`], with a way to read the settings again for a reload ([`RelayHandle::reload`],
/// SIGHUP, `POST /api/reload` on the admin endpoint), and the listening sockets (and
/// services) of the process this one takes over from, if any ([`RelayHandle::upgrade`]).
pub async fn start_reloadable(
    cfg: RelayConfig,
    load: Loader,
    inherited: Inherited,
) -> Result<RelayHandle, RelayError> {
    start_with(cfg, Some(load), inherited).await
}

async fn start_with(
    cfg: RelayConfig,
    load: Option<Loader>,
    mut inherited: Inherited,
) -> Result<RelayHandle, RelayError> {
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
    let took_over = inherited.control.is_some();
    let (listener, control_addr) =
        bind_or_adopt("--control", cfg.control, inherited.control.take())?;
    let dataplane = DataPlane::start(backend, cfg.workers)
        .map_err(|e| RelayError::Backend(format!("starting the {backend} data plane: {e}")))?;
    // The shared ports are the data plane's: on uring every worker accepts on its own.
    let bind_shared = |flag: &'static str,
                       addr: Option<SocketAddr>,
                       handed: Vec<std::net::TcpListener>|
     -> Result<_, RelayError> {
        let Some(addr) = addr else {
            return Ok((None, None));
        };
        let shared = match handed.is_empty() {
            true => dataplane.bind_shared(addr),
            false => dataplane.adopt_shared(handed),
        };
        let (l, bound) = shared.map_err(|error| RelayError::Bind { flag, addr, error })?;
        Ok((Some(l), Some(bound)))
    };
    let (http_listener, http_addr) = bind_shared(
        "--http",
        cfg.front.http,
        std::mem::take(&mut inherited.http),
    )?;
    let (tls_listener, tls_addr) =
        bind_shared("--tls", cfg.front.tls, std::mem::take(&mut inherited.tls))?;
    let (admin_listener, admin_addr) = match cfg.admin {
        None => (None, None),
        Some(addr) => {
            let (l, bound) = bind_or_adopt("--admin", addr, inherited.admin.take())?;
            (Some(l), Some(bound))
        }
    };
    let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned();
    let shared_dups = |l: &Option<SharedListener>| -> std::io::Result<Vec<OwnedFd>> {
        match l {
            None => Ok(Vec::new()),
            Some(SharedListener::Tokio(l)) => Ok(vec![dup(l.as_fd())?]),
            Some(SharedListener::Uring(_, group)) => group.iter().map(|l| dup(l.as_fd())).collect(),
        }
    };
    let dups_failed =
        |e: std::io::Error| RelayError::Backend(format!("duplicating listeners: {e}"));
    let own_ports = upgrade::Outgoing {
        control: vec![dup(listener.as_fd()).map_err(dups_failed)?],
        admin: admin_listener
            .iter()
            .map(|l| dup(l.as_fd()))
            .collect::<Result<_, _>>()
            .map_err(dups_failed)?,
        http: shared_dups(&http_listener).map_err(dups_failed)?,
        tls: shared_dups(&tls_listener).map_err(dups_failed)?,
        services: Vec::new(),
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
            https: cfg.https.is_some(),
        },
        metrics.clone(),
        dataplane.clone(),
    ));
    // Before any port accepts: a visitor of a carried-over service must find it.
    let now = Instant::now();
    for (record, listeners) in inherited.services {
        let name = record.name.clone();
        match registry.restore(record, listeners, now) {
            Ok(()) => {
                tracing::debug!(service = %name, "service carried over, waiting for its agent")
            }
            Err(e) => tracing::warn!(service = %name, "service not carried over: {e}"),
        }
    }
    let (agents_tx, agents_rx) = tokio::sync::mpsc::channel(crate::control::accept::HANDOFF_QUEUE);
    let https = match &cfg.https {
        None => None,
        Some(h) => Some(start_https(h, &cfg.state_dir, &registry, &metrics)?),
    };
    let admin_token = cfg.admin_token.clone();
    let reloader = Arc::new(Reloader::new(load, live.clone(), registry.clone()));
    let fleet = match &cfg.fleet {
        None => None,
        Some(f) => {
            let mut f = f.clone();
            // The default is the control address as configured: with its port resolved, and
            // a warning when other relays could not dial it.
            if f.advertise == cfg.control.to_string() {
                f.advertise = control_addr.to_string();
                if control_addr.ip().is_unspecified() {
                    tracing::warn!(
                        "fleet: other relays hand visitors to this one at {}, which they cannot reach: pass --advertise HOST:PORT",
                        f.advertise
                    );
                }
            }
            let fleet = crate::fleet::Fleet::new(f.clone())
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            // Relays of a fleet present one certificate: another relay is trusted by it.
            let peers = tls::client_config(&tls::RelayTrust::Pinned(identity.fingerprint))?;
            let secrets_from = live.clone();
            let secrets: crate::fleet::handoff::Secrets = Arc::new(move |name: &str| {
                let cfg = secrets_from.get();
                cfg.secret_for(name).map(|(s, _)| s.expose().to_vec())
            });
            let handoff = crate::fleet::handoff::Handoff::new(
                cfg.bind_addr,
                tokio_rustls::TlsConnector::from(peers),
                secrets,
            );
            let _ = fleet.handoff.set(Arc::new(handoff));
            tracing::info!(
                relay_id = %f.relay_id,
                registry = %fleet.etcd.endpoints(),
                prefix = %f.prefix,
                "in a fleet: services are claimed in etcd before they are published"
            );
            Some(Arc::new(fleet))
        }
    };
    let router = Arc::new(Router {
        // The bound ports (a port 0 resolved), for redirects to the TLS port.
        cfg: crate::config::FrontConfig {
            http: http_addr,
            tls: tls_addr,
            ..cfg.front.clone()
        },
        registry: registry.clone(),
        metrics: metrics.clone(),
        agents: agents_tx,
        https: https
            .as_ref()
            .map(|(t, _)| t.clone() as Arc<dyn crate::shared_ports::route::Terminate>),
        fleet: fleet.as_ref().and_then(|f| f.handoff.get().cloned()),
        only: None,
    });
    let plane = Arc::new(
        ControlPlane::new(
            live.clone(),
            registry.clone(),
            metrics.clone(),
            acceptor,
            dataplane,
        )
        .in_fleet(fleet.clone())
        .serving_hosts(Arc::new(crate::shared_ports::tokio::Handed(router.clone()))),
    );
    if took_over {
        plane.took_over(Instant::now());
    }
    let mut tasks = JoinSet::new();
    if let Some((_, issuer)) = https {
        tasks.spawn(issuer);
    }
    if let Some(fleet) = fleet {
        let members = Arc::new(RegistryMembers(registry.clone(), live));
        tasks.spawn(crate::fleet::keeper::run(fleet, members));
    }
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
    let mut admin_task = None;
    if let Some(l) = admin_listener {
        let (services, agents, drain) = (registry.clone(), registry.clone(), registry.clone());
        let view = Arc::new(AdminView {
            metrics: metrics.clone(),
            services: Box::new(move || services.snapshot()),
            agents: Box::new(move || agents.agents()),
            drain: Box::new(move |name, on| drain.set_draining(name, on)),
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
        admin_task = Some(tasks.spawn(crate::admin::http::serve(view, l)));
    }
    let sweeper = plane.clone();
    tasks.spawn(async move {
        loop {
            tokio::time::sleep(SWEEP).await;
            let now = Instant::now();
            sweeper.sweep_tickets(now);
            sweeper.registry.expire_lingering(now);
            sweeper.registry.trim_idle(now);
            sweeper.refusals.flush(now);
        }
    });
    tasks.spawn(accept::accept_loop(plane.clone(), listener, agents_rx));
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
        own_ports,
        admin_task,
        doors_closed: false,
    })
}

/// The HTTPS terminator of the shared TLS port and its certificate issuer (to spawn), over
/// the certificates already kept in the state directory.
fn start_https(
    cfg: &crate::config::HttpsConfig,
    state_dir: &std::path::Path,
    registry: &Arc<Registry>,
    metrics: &Arc<Metrics>,
) -> Result<
    (
        Arc<crate::shared_ports::https::Terminator>,
        impl std::future::Future<Output = ()>,
    ),
    RelayError,
> {
    use crate::acme::{issuer, Acme, AcmeSettings, Certs, Challenges};
    let settings = AcmeSettings {
        challenge: cfg.challenge,
        ..AcmeSettings::new(
            cfg.directory.clone(),
            cfg.email.clone(),
            cfg.ca_file.clone(),
            state_dir,
        )
    };
    // Checked now, so a bad file is a startup error and not a failed issuance later.
    crate::acme::fetch::Fetcher::new(settings.ca_file.as_deref())
        .map_err(|e| RelayError::Https(e.to_string()))?;
    if let Some(parent) = settings.dir.parent() {
        crate::tls::state::ensure_dir(parent)?;
    }
    let certs = Arc::new(Certs::open(&settings.dir).map_err(|e| RelayError::Https(e.to_string()))?);
    let challenges = Arc::new(Challenges::default());
    let acme = Acme {
        certs: certs.clone(),
        challenges: challenges.clone(),
    };
    let terminator =
        crate::shared_ports::https::Terminator::new(acme, tokio::runtime::Handle::current())
            .map_err(|e| RelayError::Https(e.to_string()))?;
    tracing::info!(directory = %settings.directory, challenge = %settings.challenge.name(), store = %settings.dir.display(), "HTTPS for http services: certificates from the ACME CA");
    let hosts: Arc<dyn issuer::Hosts> = Arc::new(RegistryHosts(registry.clone(), metrics.clone()));
    let issuer = issuer::run(settings, certs, challenges, hosts);
    Ok((Arc::new(terminator), issuer))
}

/// The hosts the issuer may get certificates for: those the registry routes to `http`
/// services exactly, or reserves; its outcomes go to the counters.
struct RegistryHosts(Arc<Registry>, Arc<Metrics>);

impl crate::acme::issuer::Hosts for RegistryHosts {
    fn eligible(&self, host: &str) -> bool {
        self.0.terminates_https(host)
    }

    fn claimed(&self) -> Vec<String> {
        self.0.http_hosts()
    }

    fn outcome(&self, issued: bool) {
        match issued {
            true => self.1.acme_issued.inc(),
            false => self.1.acme_failed.inc(),
        }
    }
}

/// What the fleet keeper asks of this relay: its services, and giving one up.
struct RegistryMembers(Arc<Registry>, Arc<LiveConfig>);

impl crate::fleet::keeper::Members for RegistryMembers {
    fn present(&self) -> Vec<String> {
        self.0.service_names()
    }

    fn lost(&self, name: &str, why: &str) {
        self.0.evict(name, why);
    }

    fn port_range(&self) -> crate::config::PortRange {
        self.1.get().port_range
    }

    fn online(&self) -> Vec<String> {
        self.0.online_names()
    }

    fn drop_lingering(&self, name: &str) -> bool {
        self.0.drop_lingering(name)
    }
}
