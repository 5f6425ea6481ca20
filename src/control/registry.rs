//! Which services exist, which agent session owns each, and which public port each holds.
//!
//! A service outlives the session that registered it by a short linger, so an agent that
//! reconnects (restart, network blip) gets the same port back and visitors arriving in the
//! gap wait instead of being refused. A new session that proves the service's secret takes a
//! service over; the previous owner is told and disconnected.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, Notify};

use super::refusal::Refusal;
use super::routes::Routes;
pub use super::service::SessionId;
use super::service::{Service, ServiceRecord, ServiceState};
use crate::access::Access;
use crate::admin::{AgentSnapshot, Metrics, ServiceSnapshot};
use crate::config::{validate_name, LiveConfig, RelayConfig, SecretId, MAX_POOL};
use crate::dataplane::gate::Gate;
use crate::dataplane::pool::{Pool, MAX_MEMBERS, TRIM_AFTER};
use crate::dataplane::{DataPlane, ListenerGuard};
use crate::protocol::auth::random_bytes;
use crate::protocol::http::normalize_prefix;
use crate::protocol::{ServiceKind, ServiceOutcome, ServiceRequest, ServiceResult};

/// How long a service keeps its port after its agent disconnects.
pub const LINGER: Duration = Duration::from_secs(30);

/// Random ports tried before giving up on finding a free one in the range.
const PORT_ATTEMPTS: usize = 64;

/// Remembered name → port assignments (so a returning service gets its old port).
const MAX_REMEMBERED_PORTS: usize = 4096;

/// The key a service name is kept under: names compare without regard to case, so
/// `Billing` can never sit beside (or squat the port of) `billing`.
/// Channels (data connections kept for good) a `udp` service holds per pool at most.
pub const UDP_CHANNELS_PER_POOL: usize = 2;

fn key(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// Why the registry ends a session from outside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kick {
    /// Another session took one of its services over (the agent should not come back).
    Replaced(String),
    /// A reload changed a secret or a reservation it relies on (the agent should
    /// authenticate again).
    SettingsChanged(String),
}

/// One authenticated agent session.
struct SessionEntry {
    /// Receives a reason if another session takes one of its services.
    kick: mpsc::Sender<Kick>,
    /// The secrets it authenticated with (each counts one agent).
    secrets: Vec<SecretId>,
    /// The agent's address as the relay saw it.
    peer: SocketAddr,
    /// When it authenticated.
    since: SystemTime,
}

#[derive(Default)]
struct Inner {
    /// By [`key`] of the name.
    services: HashMap<String, Arc<Service>>,
    sessions: HashMap<SessionId, SessionEntry>,
    agents_per_secret: HashMap<SecretId, usize>,
    /// By [`key`] of the name.
    last_port: HashMap<String, u16>,
    next_session: SessionId,
}

/// Seconds since the Unix epoch (0 for a clock set before it).
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Why `svc`'s owner may not keep it under the `new` settings (reserved hosts `reserved`),
/// if it may not: its secret changed or went, or a host it claims is reserved for another
/// service.
fn unwelcome(
    svc: &Service,
    old: &RelayConfig,
    new: &RelayConfig,
    reserved: &[(String, String)],
) -> Option<String> {
    let value = |cfg: &RelayConfig| cfg.secret_for(&svc.name).map(|(s, id)| (s.clone(), id));
    match (value(old), value(new)) {
        (_, None) => return Some(format!("service {} has no secret any more", svc.name)),
        (_, Some((_, id))) if id != svc.secret => {
            return Some(format!("service {} has a secret of its own now", svc.name))
        }
        (Some((was, _)), Some((now, _))) if was != now => {
            return Some(format!("the secret of service {} changed", svc.name))
        }
        _ => {}
    }
    reserved
        .iter()
        .find(|(host, owner)| svc.hosts.contains(host) && !owner.eq_ignore_ascii_case(&svc.name))
        .map(|(host, owner)| format!("host {host} is reserved for service {owner} now"))
}

/// The actual ports of the relay's shared listeners (after binding, so port 0 is resolved).
#[derive(Debug, Clone, Copy, Default)]
pub struct SharedPorts {
    /// The shared HTTP port, if the relay has one.
    pub http: Option<u16>,
    /// The shared TLS port, if the relay has one.
    pub tls: Option<u16>,
    /// Whether the TLS port terminates HTTPS for `http` services (`--https`): they may
    /// register on a relay without an HTTP port.
    pub https: bool,
}

/// The relay's table of services and sessions.
pub struct Registry {
    inner: Mutex<Inner>,
    routes: RwLock<Routes>,
    live: Arc<LiveConfig>,
    shared_ports: SharedPorts,
    metrics: Arc<Metrics>,
    dataplane: DataPlane,
}

impl Registry {
    /// An empty registry for a relay configured by `live`, served by `dataplane`.
    pub fn new(
        live: Arc<LiveConfig>,
        shared_ports: SharedPorts,
        metrics: Arc<Metrics>,
        dataplane: DataPlane,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            // Validated with the config: a bad reservation never gets this far.
            routes: RwLock::new(Routes::new(live.get().reservations().unwrap_or_default())),
            live,
            shared_ports,
            metrics,
            dataplane,
        }
    }

    /// Empty pools for a new service: one per data-plane worker.
    fn new_pools(&self) -> Vec<Arc<Pool>> {
        (0..self.dataplane.pools_per_service())
            .map(|_| Arc::new(Pool::new()))
            .collect()
    }

    /// The settings in force now.
    fn cfg(&self) -> Arc<RelayConfig> {
        self.live.get()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn routes(&self) -> std::sync::RwLockReadGuard<'_, Routes> {
        self.routes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn routes_mut(&self) -> std::sync::RwLockWriteGuard<'_, Routes> {
        self.routes.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The `http` service for a request to `host` (normalized) with `path`: the longest
    /// claimed prefix of the path wins.
    pub fn route_http(&self, host: &str, path: &str) -> Option<Arc<Service>> {
        self.routes().http(host, path)
    }

    /// Every service, for the admin endpoint.
    pub fn snapshot(&self) -> Vec<ServiceSnapshot> {
        let g = self.lock();
        let mut out: Vec<ServiceSnapshot> =
            g.services.values().map(|s| Self::report(&g, s)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Starts (`on`) or ends the operator's drain of service `name` (see
    /// [`Gate::set_draining`]); the service as it is then, or `None` if there is no such
    /// service.
    pub fn set_draining(&self, name: &str, on: bool) -> Option<ServiceSnapshot> {
        let g = self.lock();
        let svc = g.services.get(&key(name))?;
        if svc.gate.is_draining() != on {
            svc.gate.set_draining(on);
            let visitors = svc.gate.active();
            match on {
                true => {
                    tracing::info!(service = %svc.name, visitors, "service draining: new visitors are refused, those in flight carry on")
                }
                false => {
                    tracing::info!(service = %svc.name, "service resumed: taking new visitors again")
                }
            }
        }
        Some(Self::report(&g, svc))
    }

    /// One service as the admin endpoint reports it.
    fn report(g: &Inner, s: &Service) -> ServiceSnapshot {
        let (owners, group) = {
            let st = s.state();
            (st.owners.clone(), st.group.clone())
        };
        let session = owners.first().and_then(|id| g.sessions.get(id));
        ServiceSnapshot {
            name: s.name.clone(),
            kind: s.kind.to_string(),
            port: s.port,
            hosts: s.hosts.clone(),
            path: s.path.clone(),
            online: !owners.is_empty(),
            group,
            agents: owners.len(),
            draining: s.gate.is_draining(),
            agent: session.map(|e| e.peer.to_string()),
            connected_since: session.map(|e| unix_secs(e.since)),
            visitors_now: s.gate.active(),
            idle_connections: s.pools.iter().map(|p| p.idle_count()).sum(),
            counts: s
                .gate
                .stats()
                .snapshot()
                .into_iter()
                .map(|(name, _, v)| (name.to_string(), v))
                .collect(),
        }
    }

    /// Every agent session, oldest first, with the services it owns.
    pub fn agents(&self) -> Vec<AgentSnapshot> {
        let g = self.lock();
        let mut out: Vec<AgentSnapshot> = g
            .sessions
            .iter()
            .map(|(&id, e)| {
                let mut services: Vec<String> = g
                    .services
                    .values()
                    .filter(|s| s.is_owned_by(id))
                    .map(|s| s.name.clone())
                    .collect();
                services.sort();
                AgentSnapshot {
                    session: id,
                    address: e.peer.to_string(),
                    connected_since: unix_secs(e.since),
                    services,
                }
            })
            .collect();
        out.sort_by_key(|a| a.session);
        out
    }

    /// Whether the relay may terminate HTTPS for `host` (see [`Routes::terminates`]).
    pub fn terminates_https(&self, host: &str) -> bool {
        self.routes().terminates(host)
    }

    /// The exact host names `http` services claim now: those the relay gets certificates
    /// for ahead of their first visitor.
    pub fn http_hosts(&self) -> Vec<String> {
        self.routes().http_hosts()
    }

    /// The `tls` service claiming SNI name `host` (normalized).
    pub fn route_tls(&self, host: &str) -> Option<Arc<Service>> {
        self.routes().tls(host)
    }

    /// Starts a session for an agent at `peer` that authenticated with `secrets`; `kick`
    /// receives a reason if another session takes one of its services. Fails if a secret
    /// already has its maximum of agents connected.
    pub fn new_session(
        &self,
        kick: mpsc::Sender<Kick>,
        mut secrets: Vec<SecretId>,
        peer: SocketAddr,
    ) -> Result<SessionId, Refusal> {
        secrets.sort();
        secrets.dedup();
        let mut g = self.lock();
        for id in &secrets {
            let have = g.agents_per_secret.get(id).copied().unwrap_or(0);
            if let Some(max) = self.cfg().max_agents(id) {
                if have >= max {
                    self.metrics.agents_over_limit.inc();
                    let whose = match id {
                        SecretId::Default => "the relay's secret".to_string(),
                        SecretId::Service(n) => format!("service {n}'s secret"),
                    };
                    return Err(Refusal::AgentsPerSecret { whose, max });
                }
            }
        }
        for id in &secrets {
            *g.agents_per_secret.entry(id.clone()).or_insert(0) += 1;
        }
        g.next_session += 1;
        let id = g.next_session;
        let entry = SessionEntry {
            kick,
            secrets,
            peer,
            since: SystemTime::now(),
        };
        g.sessions.insert(id, entry);
        Ok(id)
    }

    /// Publishes the (already authenticated) requests for `session`. Returns one result per
    /// request, and the services now owned. `wake` is notified when a pool wants tickets.
    pub fn register(
        self: &Arc<Self>,
        session: SessionId,
        requests: &[ServiceRequest],
        wake: &Arc<Notify>,
    ) -> (Vec<ServiceResult>, Vec<Arc<Service>>) {
        let mut g = self.lock();
        let mut results = Vec::with_capacity(requests.len());
        let mut owned = Vec::new();
        for (i, req) in requests.iter().enumerate() {
            let outcome = if requests[..i]
                .iter()
                .any(|r| r.name.eq_ignore_ascii_case(&req.name))
            {
                Err(Refusal::ListedTwice(req.name.clone()))
            } else if let Err(e) = validate_name(&req.name) {
                Err(Refusal::BadRequest(e.to_string()))
            } else if !req.group.is_empty() && validate_name(&req.group).is_err() {
                Err(Refusal::BadRequest(format!(
                    "invalid group name {:?} for service {}",
                    req.group, req.name
                )))
            } else {
                self.register_one(&mut g, session, req, wake)
            };
            let outcome = match outcome {
                Ok(svc) => {
                    let (port, hosts) = (svc.port, svc.hosts.clone());
                    owned.push(svc);
                    ServiceOutcome::Online { port, hosts }
                }
                Err(refusal) => ServiceOutcome::Rejected {
                    code: refusal.code(),
                    message: refusal.to_string(),
                },
            };
            results.push(ServiceResult {
                name: req.name.clone(),
                outcome,
            });
        }
        (results, owned)
    }

    fn register_one(
        self: &Arc<Self>,
        g: &mut Inner,
        session: SessionId,
        req: &ServiceRequest,
        wake: &Arc<Notify>,
    ) -> Result<Arc<Service>, Refusal> {
        let mut target = usize::from(req.pool.clamp(1, MAX_POOL));
        if req.kind == ServiceKind::Udp {
            // Channels carry every flow and live as long as the agent: a few per worker
            // spread the load without holding many connections.
            target = target.min(UDP_CHANNELS_PER_POOL);
        }
        let (hosts, path) = self.claims(req)?;
        let secret = self
            .cfg()
            .secret_for(&req.name)
            .map(|(_, id)| id)
            .ok_or_else(|| Refusal::BadRequest(format!("no secret for service {}", req.name)))?;
        let access = self.cfg().access_for(&req.name);
        if access.basic_auth.is_some() && req.kind != ServiceKind::Http {
            return Err(Refusal::BadRequest(format!(
                "service {} has basic auth in the relay's config, which only http services can ask for",
                req.name
            )));
        }
        if let Some(existing) = g.services.get(&key(&req.name)).cloned() {
            let same = existing.kind == req.kind
                && match req.kind {
                    ServiceKind::Tcp | ServiceKind::Udp => {
                        req.remote_port == 0 || req.remote_port == existing.port
                    }
                    _ => existing.hosts == hosts && existing.path == path,
                };
            if same {
                self.take_over(g, &existing, session, &req.group)?;
                existing.gate.configure(req.proxy, req.forwarded_headers);
                existing.gate.set_access(Access::for_service(
                    &req.name,
                    req.kind == ServiceKind::Http,
                    &access,
                ));
                existing.attach_pools(session, target, wake);
                return Ok(existing);
            }
            self.check_claims(req, &secret, &hosts, &path)?;
            // The agent now wants a different port or other host names: retire the old
            // entry first.
            let group_online = existing.state().group.as_deref() == Some(req.group.as_str());
            if group_online && existing.is_online() {
                return Err(Refusal::BadRequest(format!(
                    "service {} is served by group {} with other settings (port, hosts or path): an agent of a group must ask for what the others do",
                    req.name, req.group
                )));
            }
            self.take_over(g, &existing, session, "")?;
            self.retire(g, &existing);
        } else {
            self.check_claims(req, &secret, &hosts, &path)?;
        }
        let pools = self.new_pools();
        let gate = Gate::new(
            &req.name,
            &self.cfg().limits_for(&req.name),
            self.metrics.clone(),
        );
        gate.configure(req.proxy, req.forwarded_headers);
        gate.set_access(Access::for_service(
            &req.name,
            req.kind == ServiceKind::Http,
            &access,
        ));
        let (port, guard) = match req.kind {
            ServiceKind::Tcp => {
                let wait = self.cfg().front.agent_wait;
                let bind = |addr| self.dataplane.listen(addr, &gate, &pools, wait);
                let (port, guard) = self.bind_port(g, req, bind)?;
                (port, Some(guard))
            }
            ServiceKind::Udp => {
                let idle = self.cfg().limits_for(&req.name).udp_flow_idle();
                let (name, metrics) = (&req.name, &self.metrics);
                let bind = |addr| {
                    crate::dataplane::udp::relay::Hub::bind(
                        addr,
                        name,
                        gate.clone(),
                        metrics.clone(),
                        idle,
                    )
                    .map(ListenerGuard::Udp)
                };
                let (port, guard) = self.bind_port(g, req, bind)?;
                (port, Some(guard))
            }
            // An HTTPS-only relay's http services are reached on its TLS port.
            ServiceKind::Http => (
                self.shared_ports
                    .http
                    .or(self.shared_ports.tls)
                    .unwrap_or(0),
                None,
            ),
            ServiceKind::Tls => (self.shared_ports.tls.unwrap_or(0), None),
        };
        let svc = Arc::new(Service {
            name: req.name.clone(),
            kind: req.kind,
            port,
            hosts,
            path,
            secret,
            gate,
            pools,
            state: Mutex::new(ServiceState {
                owners: vec![session],
                group: (!req.group.is_empty()).then(|| req.group.clone()),
                listener: guard,
                linger_until: None,
            }),
        });
        svc.attach_pools(session, target, wake);
        if req.kind.own_port() {
            if g.last_port.len() >= MAX_REMEMBERED_PORTS
                && !g.last_port.contains_key(&key(&req.name))
            {
                if let Some(k) = g.last_port.keys().next().cloned() {
                    g.last_port.remove(&k);
                }
            }
            g.last_port.insert(key(&req.name), port);
        } else {
            self.routes_mut().insert(&svc);
        }
        g.services.insert(key(&req.name), svc.clone());
        Ok(svc)
    }

    /// The full host names and path prefix `req` claims, or why it cannot.
    pub fn claims(&self, req: &ServiceRequest) -> Result<(Vec<String>, String), Refusal> {
        let reject = Refusal::BadRequest;
        let bad = |m: String| Err(Refusal::BadRequest(m));
        match req.kind {
            ServiceKind::Tcp | ServiceKind::Udp => {
                if !req.hosts.is_empty() || !req.path.is_empty() {
                    return bad("host names and paths are for http and tls services".into());
                }
                return Ok((Vec::new(), String::new()));
            }
            ServiceKind::Http if self.shared_ports.http.is_none() && !self.shared_ports.https => {
                return bad(
                    "this relay has no shared HTTP port (start it with --http or --https)".into(),
                )
            }
            ServiceKind::Tls if self.shared_ports.tls.is_none() => {
                return bad("this relay has no shared TLS port (start it with --tls)".into())
            }
            _ => {}
        }
        if req.hosts.is_empty() {
            return bad(format!("a {} service needs a host name", req.kind));
        }
        if req.remote_port != 0 {
            return bad(format!("a {} service has no port of its own", req.kind));
        }
        let mut hosts = Vec::with_capacity(req.hosts.len());
        for h in &req.hosts {
            let q = self
                .cfg()
                .front
                .qualify(h)
                .map_err(|e| reject(e.to_string()))?;
            if !hosts.contains(&q) {
                hosts.push(q);
            }
        }
        let path = match req.kind {
            ServiceKind::Http => normalize_prefix(&req.path).map_err(|e| reject(e.to_string()))?,
            _ if req.path.is_empty() => String::new(),
            _ => return bad("path prefixes are for http services".into()),
        };
        Ok((hosts, path))
    }

    /// Fails if one of the host names is reserved for another service, serves (at any path)
    /// a service authenticated by another secret, or is held with the same path prefix by
    /// another service. A host, with every path under it, belongs to the secret that holds it.
    fn check_claims(
        &self,
        req: &ServiceRequest,
        secret: &SecretId,
        hosts: &[String],
        path: &str,
    ) -> Result<(), Refusal> {
        let routes = self.routes();
        let other = |name: &str| !name.eq_ignore_ascii_case(&req.name);
        for h in hosts {
            if let Some(owner) = routes.reserved_for(h).filter(|n| other(n)) {
                return Err(Refusal::HostReserved {
                    host: h.clone(),
                    service: owner.to_string(),
                });
            }
            if let Some(s) = routes
                .serving(req.kind, h)
                .into_iter()
                .find(|s| other(&s.name) && s.secret != *secret)
            {
                return Err(Refusal::HostOwned {
                    host: h.clone(),
                    holder: s.name.clone(),
                });
            }
            let holder = match req.kind {
                ServiceKind::Tcp | ServiceKind::Udp => None,
                ServiceKind::Http => routes.http_holder(h, path),
                ServiceKind::Tls => routes.tls_holder(h),
            };
            if let Some(holder) = holder.filter(|n| other(n)) {
                let what = match req.kind {
                    ServiceKind::Http if path != "/" => format!("{h}{path}"),
                    _ => h.clone(),
                };
                return Err(Refusal::HostTaken {
                    what,
                    holder: holder.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Closes `svc` for good: listener, pools and routes; forgets it.
    fn retire(&self, g: &mut Inner, svc: &Arc<Service>) {
        svc.close();
        if !svc.kind.own_port() {
            self.routes_mut().remove(svc);
        }
        g.services.remove(&key(&svc.name));
    }

    /// Every published service as a record for a process taking over from this one, with
    /// duplicates of its listening sockets (in the record's order).
    pub fn records(&self) -> io::Result<Vec<(ServiceRecord, Vec<OwnedFd>)>> {
        let g = self.lock();
        let mut out = Vec::with_capacity(g.services.len());
        // A `udp` service's socket is not handed over: its flows live in this process. It
        // closes here (see `release_listeners`), and its agent publishes it again, on the
        // same port, with the process taking over.
        for svc in g.services.values().filter(|s| s.kind != ServiceKind::Udp) {
            let st = svc.state();
            let fds = match &st.listener {
                Some(guard) => guard
                    .fds()
                    .into_iter()
                    .map(|fd| fd.try_clone_to_owned())
                    .collect::<io::Result<Vec<_>>>()?,
                None => Vec::new(),
            };
            let record = ServiceRecord {
                name: svc.name.clone(),
                kind: svc.kind,
                port: svc.port,
                hosts: svc.hosts.clone(),
                path: svc.path.clone(),
                listeners: fds.len(),
                draining: svc.gate.is_draining(),
            };
            out.push((record, fds));
        }
        Ok(out)
    }

    /// Publishes a service the process this one took over from had, on its handed-over
    /// `listeners`: unowned, lingering as after its agent's session ended, so its visitors
    /// (accepted at once) wait for the agent, which reconnects and takes it back.
    pub fn restore(
        &self,
        record: ServiceRecord,
        listeners: Vec<std::net::TcpListener>,
        now: Instant,
    ) -> Result<(), Refusal> {
        let cfg = self.cfg();
        let secret = cfg
            .secret_for(&record.name)
            .map(|(_, id)| id)
            .ok_or_else(|| Refusal::BadRequest(format!("no secret for service {}", record.name)))?;
        if record.kind == ServiceKind::Udp {
            return Err(Refusal::BadRequest(format!(
                "udp service {} is not handed over",
                record.name
            )));
        }
        let mut g = self.lock();
        if g.services.contains_key(&key(&record.name)) {
            return Err(Refusal::BadRequest(format!(
                "service {} twice",
                record.name
            )));
        }
        let pools = self.new_pools();
        let gate = Gate::new(
            &record.name,
            &cfg.limits_for(&record.name),
            self.metrics.clone(),
        );
        gate.set_draining(record.draining);
        gate.set_access(Access::for_service(
            &record.name,
            record.kind == ServiceKind::Http,
            &cfg.access_for(&record.name),
        ));
        let guard = match record.kind {
            ServiceKind::Tcp => Some(
                self.dataplane
                    .adopt(listeners, &gate, &pools, cfg.front.agent_wait)
                    .map_err(|e| Refusal::PortUnbindable {
                        port: record.port,
                        reason: e.to_string(),
                    })?,
            ),
            _ => None,
        };
        let svc = Arc::new(Service {
            name: record.name.clone(),
            kind: record.kind,
            port: record.port,
            hosts: record.hosts,
            path: record.path,
            secret,
            gate,
            pools,
            state: Mutex::new(ServiceState {
                owners: Vec::new(),
                group: None,
                listener: guard,
                linger_until: Some(now + LINGER),
            }),
        });
        match svc.kind.own_port() {
            true => {
                g.last_port.insert(key(&svc.name), svc.port);
            }
            false => self.routes_mut().insert(&svc),
        }
        g.services.insert(key(&svc.name), svc);
        Ok(())
    }

    /// Stops accepting on every service's own port without ending the listening: the
    /// sockets live on in the process they were handed to.
    pub fn release_listeners(&self) {
        for svc in self.lock().services.values() {
            if let Some(mut guard) = svc.state().listener.take() {
                guard.release();
            }
        }
    }

    /// Closes the services among `names` that `session` owns, for good (their agent no longer
    /// publishes them): visitors waiting for them are told at once. Returns the names closed.
    pub fn withdraw(&self, session: SessionId, names: &[String]) -> Vec<String> {
        let mut g = self.lock();
        let mut closed = Vec::new();
        for name in names {
            let Some(svc) = g.services.get(&key(name)).cloned() else {
                continue;
            };
            let mut st = svc.state();
            if !st.owners.contains(&session) {
                continue;
            }
            st.owners.retain(|o| *o != session);
            let others = !st.owners.is_empty();
            drop(st);
            if others {
                // The rest of its group still serve it.
                svc.detach_pools(session);
            } else {
                self.retire(&mut g, &svc);
            }
            closed.push(svc.name.clone());
        }
        closed
    }

    /// Makes `session` an owner of `svc`: beside its owners if they are a group and `group`
    /// names theirs (a group holds [`MAX_MEMBERS`] at most), else instead of them (they are
    /// kicked and their connections dropped).
    fn take_over(
        &self,
        g: &Inner,
        svc: &Service,
        session: SessionId,
        group: &str,
    ) -> Result<(), Refusal> {
        let mut st = svc.state();
        let joins = !group.is_empty() && st.group.as_deref() == Some(group);
        if joins && !st.owners.is_empty() {
            if !st.owners.contains(&session) {
                if st.owners.len() >= MAX_MEMBERS {
                    return Err(Refusal::GroupFull {
                        service: svc.name.clone(),
                        group: group.to_string(),
                        max: MAX_MEMBERS,
                    });
                }
                st.owners.push(session);
                tracing::info!(service = %svc.name, group, agents = st.owners.len(), "agent joined the service's group");
            }
            st.linger_until = None;
            return Ok(());
        }
        for prev in st.owners.iter().filter(|p| **p != session) {
            if let Some(SessionEntry { kick, .. }) = g.sessions.get(prev) {
                tracing::warn!(service = %svc.name, "service taken over by a newer agent session");
                let _ = kick.try_send(Kick::Replaced(format!(
                    "service {} was taken over by another agent with the same secret",
                    svc.name
                )));
            }
        }
        let had_others = st.owners.iter().any(|p| *p != session);
        st.owners = vec![session];
        st.group = (!group.is_empty()).then(|| group.to_string());
        st.linger_until = None;
        drop(st);
        if had_others {
            svc.detach_all_pools();
        }
        Ok(())
    }

    /// The names of every service here, online or lingering.
    pub fn service_names(&self) -> Vec<String> {
        self.lock()
            .services
            .values()
            .map(|s| s.name.clone())
            .collect()
    }

    /// Service `name` if an agent session owns it here now (not lingering).
    pub fn online_service(&self, name: &str) -> Option<Arc<Service>> {
        let g = self.lock();
        g.services
            .get(&key(name))
            .filter(|s| s.is_online())
            .cloned()
    }

    /// The names of the services an agent session owns here now (not lingering).
    pub fn online_names(&self) -> Vec<String> {
        let g = self.lock();
        g.services
            .values()
            .filter(|s| s.is_online())
            .map(|s| s.name.clone())
            .collect()
    }

    /// Closes service `name` if it is lingering (no agent session owns it): another relay of
    /// the fleet serves it, so its visitors are better handed there than kept waiting here.
    pub fn drop_lingering(&self, name: &str) -> bool {
        let mut g = self.lock();
        let Some(svc) = g.services.get(&key(name)).cloned() else {
            return false;
        };
        if svc.is_online() {
            return false;
        }
        self.retire(&mut g, &svc);
        true
    }

    /// The port of service `name` if it is here (online or lingering) with `kind`.
    pub fn held_port(&self, name: &str, kind: ServiceKind) -> Option<u16> {
        let g = self.lock();
        g.services
            .get(&key(name))
            .filter(|s| s.kind == kind)
            .map(|s| s.port)
    }

    /// Closes service `name` for good, telling its agent `why` (its place went to another
    /// secret in the fleet): the agent is not asked to come back.
    pub fn evict(&self, name: &str, why: &str) {
        let mut g = self.lock();
        let Some(svc) = g.services.get(&key(name)).cloned() else {
            return;
        };
        tracing::error!(service = %svc.name, "service closed: {why}");
        for owner in &svc.state().owners {
            if let Some(SessionEntry { kick, .. }) = g.sessions.get(owner) {
                let _ = kick.try_send(Kick::Replaced(format!("service {name}: {why}")));
            }
        }
        self.retire(&mut g, &svc);
    }

    /// The service holding public port `port` for `kind` (`tcp` and `udp` ports are apart,
    /// as the kernel's are: `iperf3 -u` and DNS want both on one number).
    fn port_holder<'a>(&self, g: &'a Inner, port: u16, kind: ServiceKind) -> Option<&'a str> {
        g.services
            .values()
            .find(|s| s.port == port && s.kind == kind)
            .map(|s| s.name.as_str())
    }

    /// Binds `req`'s public port with `bind`: the one it asks for, the one its name had
    /// before, or a free one from the range.
    fn bind_port(
        &self,
        g: &Inner,
        req: &ServiceRequest,
        bind: impl Fn(SocketAddr) -> io::Result<ListenerGuard>,
    ) -> Result<(u16, ListenerGuard), Refusal> {
        let range = self.cfg().port_range;
        let try_bind = |port: u16| bind(SocketAddr::new(self.cfg().bind_addr, port));
        if req.remote_port != 0 {
            let port = req.remote_port;
            if !range.contains(port) {
                return Err(Refusal::PortForbidden { port, range });
            }
            if let Some(holder) = self.port_holder(g, port, req.kind) {
                return Err(Refusal::PortTaken {
                    port,
                    holder: holder.to_string(),
                });
            }
            return try_bind(port)
                .map(|l| (port, l))
                .map_err(|e| Refusal::PortUnbindable {
                    port,
                    reason: e.to_string(),
                });
        }
        // No port asked for: the one this name had before, else a random free one. Ports
        // remembered for other names are avoided while there is a choice.
        if let Some(&port) = g.last_port.get(&key(&req.name)) {
            if self.port_holder(g, port, req.kind).is_none() {
                if let Ok(l) = try_bind(port) {
                    return Ok((port, l));
                }
            }
        }
        for attempt in 0..PORT_ATTEMPTS.min(range.len() * 2) {
            let mut r = [0u8; 4];
            random_bytes(&mut r);
            let port = range.start + (u32::from_le_bytes(r) % range.len() as u32) as u16;
            let reserved = g
                .last_port
                .iter()
                .any(|(n, p)| *p == port && *n != key(&req.name));
            if self.port_holder(g, port, req.kind).is_some()
                || (reserved && attempt < PORT_ATTEMPTS / 2)
            {
                continue;
            }
            if let Ok(l) = try_bind(port) {
                return Ok((port, l));
            }
        }
        Err(Refusal::NoFreePort(range))
    }

    /// Ends `session` at `now`: services it still owns stop taking tickets and linger until
    /// `now + linger`; [`Self::expire_lingering`] closes their ports after that, unless an
    /// agent claims them first.
    pub fn end_session(&self, session: SessionId, linger: Duration, now: Instant) {
        let mut g = self.lock();
        if let Some(entry) = g.sessions.remove(&session) {
            for id in entry.secrets {
                if let Some(n) = g.agents_per_secret.get_mut(&id) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        for svc in g.services.values() {
            let mut st = svc.state();
            if !st.owners.contains(&session) {
                continue;
            }
            st.owners.retain(|o| *o != session);
            if st.owners.is_empty() {
                st.linger_until = Some(now + linger);
            }
            drop(st);
            svc.detach_pools(session);
        }
    }

    /// Puts reloaded settings in force for what is already published: `old` were the
    /// settings before, `new` (already in force for new sessions) after. Reserved hosts and
    /// every service's limits are replaced; a session whose secret changed or went, or whose
    /// service claims a host now reserved for another service, is ended (its agent
    /// reconnects and authenticates again, or is refused). Returns how many sessions ended.
    pub fn apply_settings(&self, old: &RelayConfig, new: &RelayConfig) -> usize {
        let reserved = new.reservations().unwrap_or_default();
        self.routes_mut().set_reserved(reserved.clone());
        let g = self.lock();
        let mut ended = std::collections::HashSet::new();
        for svc in g.services.values() {
            svc.gate.set_limits(&new.limits_for(&svc.name));
            if let Some(hub) = svc.udp_hub() {
                hub.set_idle(new.limits_for(&svc.name).udp_flow_idle());
            }
            let access = new.access_for(&svc.name);
            // Unchanged rules keep what they remember (passwords that passed).
            if access != old.access_for(&svc.name) {
                let http = svc.kind == ServiceKind::Http;
                svc.gate
                    .set_access(Access::for_service(&svc.name, http, &access));
            }
            let owners = svc.state().owners.clone();
            if owners.is_empty() {
                continue;
            }
            let Some(why) = unwelcome(svc, old, new, &reserved) else {
                continue;
            };
            for owner in owners {
                if let Some(entry) = g.sessions.get(&owner) {
                    tracing::warn!(service = %svc.name, session = owner, "agent session ended by the reload: {why}");
                    let _ = entry.kick.try_send(Kick::SettingsChanged(why.clone()));
                    ended.insert(owner);
                }
            }
        }
        ended.len()
    }

    /// Closes every service whose linger ended by `now` (its agent did not return). Driven by
    /// the relay's sweeper; time is a parameter so tests can move it.
    pub fn expire_lingering(&self, now: Instant) {
        let mut g = self.lock();
        let due: Vec<Arc<Service>> = g
            .services
            .values()
            .filter(|s| {
                let st = s.state();
                st.owners.is_empty() && st.linger_until.is_some_and(|t| t <= now)
            })
            .cloned()
            .collect();
        for svc in due {
            tracing::info!(
                service = %svc.name,
                port = svc.port,
                "service closed: its agent did not return"
            );
            self.retire(&mut g, &svc);
        }
    }

    /// Closes the idle data connections beyond each pool's target that have stayed beyond it
    /// for [`TRIM_AFTER`] (see [`Pool::trim`]); counted. Driven by the relay's sweeper.
    pub fn trim_idle(&self, now: Instant) {
        let pools: Vec<Arc<Pool>> = self
            .lock()
            .services
            .values()
            .flat_map(|s| s.pools.iter().cloned())
            .collect();
        let closed: usize = pools.iter().map(|p| p.trim(now, TRIM_AFTER)).sum();
        if closed > 0 {
            self.metrics.data_trimmed.add(closed as u64);
            tracing::debug!(
                closed,
                "idle data connections beyond the pools' targets closed"
            );
        }
    }

    /// Closes every service's public port (the relay is draining): no new visitors, while
    /// the ones in flight and those already waiting for a data connection are served.
    pub fn stop_listening(&self) {
        for svc in self.lock().services.values() {
            drop(svc.state().listener.take());
        }
    }

    /// Visitors admitted and not finished yet, across every service.
    pub fn visitors_active(&self) -> usize {
        self.lock().services.values().map(|s| s.gate.active()).sum()
    }

    /// Closes every service (listeners, pools, routes) and forgets it: the relay is stopping.
    pub fn close_all(&self) {
        let mut g = self.lock();
        for svc in g.services.values() {
            svc.close();
        }
        g.services.clear();
        *self.routes_mut() = Routes::default();
    }
}

#[cfg(test)]
mod tests {
    //! The registry under simulated time: sessions, claims, takeover, linger and port reuse,
    //! with `now` passed in and the tokio data plane's real listeners on loopback.

    use super::*;
    use crate::config::{Limits, Secret};
    use crate::protocol::ErrorCode;

    const SECRET: &str = "registry-test-secret";
    const PEER: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

    fn registry(limits: Limits) -> Arc<Registry> {
        let cfg = RelayConfig {
            secret: Some(Secret::new(SECRET)),
            limits,
            ..crate::config::tests::relay_config()
        };
        let ports = SharedPorts {
            http: Some(8080),
            tls: Some(8443),
            https: false,
        };
        Arc::new(Registry::new(
            LiveConfig::new(cfg),
            ports,
            Arc::new(Metrics::default()),
            DataPlane::Tokio,
        ))
    }

    fn http(name: &str, host: &str, path: &str) -> ServiceRequest {
        ServiceRequest {
            name: name.into(),
            kind: ServiceKind::Http,
            hosts: vec![host.into()],
            path: path.into(),
            pool: 2,
            ..Default::default()
        }
    }

    fn tcp(name: &str) -> ServiceRequest {
        ServiceRequest {
            name: name.into(),
            kind: ServiceKind::Tcp,
            pool: 2,
            ..Default::default()
        }
    }

    /// A session with the relay's secret; its kick receiver says whether it was replaced.
    fn session(reg: &Registry) -> (SessionId, mpsc::Receiver<Kick>) {
        let (tx, rx) = mpsc::channel(1);
        (
            reg.new_session(tx, vec![SecretId::Default], PEER).unwrap(),
            rx,
        )
    }

    fn publish(reg: &Arc<Registry>, s: SessionId, req: ServiceRequest) -> ServiceOutcome {
        let wake = Arc::new(Notify::new());
        let (mut results, _) = reg.register(s, &[req], &wake);
        results.remove(0).outcome
    }

    fn online(reg: &Registry, name: &str) -> Option<bool> {
        reg.snapshot()
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| s.online)
    }

    #[tokio::test]
    async fn a_service_lingers_then_expires_and_frees_its_host() {
        let reg = registry(Limits::default());
        let t0 = Instant::now();
        let (a, _kick) = session(&reg);
        assert!(matches!(
            publish(&reg, a, http("blog", "blog", "/")),
            ServiceOutcome::Online { .. }
        ));
        assert!(reg.route_http("blog.example.test", "/x").is_some());

        reg.end_session(a, LINGER, t0);
        assert_eq!(online(&reg, "blog"), Some(false), "lingering, not gone");
        reg.expire_lingering(t0 + LINGER - Duration::from_secs(1));
        assert!(
            reg.route_http("blog.example.test", "/x").is_some(),
            "visitors still wait for the agent during the linger"
        );
        reg.expire_lingering(t0 + LINGER);
        assert_eq!(online(&reg, "blog"), None, "closed after the linger");
        assert!(reg.route_http("blog.example.test", "/x").is_none());

        // The host is free for another name now.
        let (b, _kick) = session(&reg);
        assert!(matches!(
            publish(&reg, b, http("other", "blog", "/")),
            ServiceOutcome::Online { .. }
        ));
    }

    fn grouped(name: &str, group: &str) -> ServiceRequest {
        ServiceRequest {
            group: group.into(),
            ..tcp(name)
        }
    }

    #[tokio::test]
    async fn a_group_lingers_only_when_its_last_agent_leaves() {
        let reg = registry(Limits::default());
        let t0 = Instant::now();
        let (a, mut kick_a) = session(&reg);
        let (b, mut kick_b) = session(&reg);
        let (c, _kick_c) = session(&reg);
        for s in [a, b, c] {
            let got = publish(&reg, s, grouped("api", "blue"));
            assert!(matches!(got, ServiceOutcome::Online { .. }), "{got:?}");
        }
        assert!(kick_a.try_recv().is_err() && kick_b.try_recv().is_err());
        let snap = reg.snapshot().remove(0);
        assert_eq!((snap.agents, snap.group.as_deref()), (3, Some("blue")));

        // One withdraws, one ends: the third still serves it, nothing lingers.
        assert_eq!(reg.withdraw(a, &["api".into()]), vec!["api".to_string()]);
        reg.end_session(b, LINGER, t0);
        reg.expire_lingering(t0 + LINGER * 2);
        assert_eq!(online(&reg, "api"), Some(true));
        assert!(reg.online_service("api").is_some_and(|s| s.is_owned_by(c)));
        assert!(!reg.online_service("api").unwrap().is_owned_by(a));

        // The last one ends: now it lingers, and a member of the group coming back rejoins.
        reg.end_session(c, LINGER, t0);
        assert_eq!(online(&reg, "api"), Some(false));
        let (d, _kick_d) = session(&reg);
        let back = publish(&reg, d, grouped("api", "blue"));
        assert!(matches!(back, ServiceOutcome::Online { .. }), "{back:?}");
        // An agent outside the group takes it over and its members are told.
        let (e, _kick_e) = session(&reg);
        assert!(matches!(
            publish(&reg, e, tcp("api")),
            ServiceOutcome::Online { .. }
        ));
        assert!(!reg.online_service("api").unwrap().is_owned_by(d));
        assert_eq!(reg.snapshot().remove(0).group, None);
    }

    #[tokio::test]
    async fn a_group_is_bounded() {
        let reg = registry(Limits::default());
        let mut kicks = Vec::new();
        for _ in 0..MAX_MEMBERS {
            let (s, k) = session(&reg);
            kicks.push(k);
            let got = publish(&reg, s, grouped("wide", "g"));
            assert!(matches!(got, ServiceOutcome::Online { .. }), "{got:?}");
        }
        let (one_more, _k) = session(&reg);
        let ServiceOutcome::Rejected { code, message } =
            publish(&reg, one_more, grouped("wide", "g"))
        else {
            panic!("a group past its bound was joined");
        };
        assert_eq!(code, ErrorCode::LimitReached);
        assert!(message.contains("maximum of 64 agents"), "{message}");
        assert_eq!(reg.snapshot().remove(0).agents, MAX_MEMBERS);
        let ServiceOutcome::Rejected { message, .. } =
            publish(&reg, one_more, grouped("bad", "no spaces"))
        else {
            panic!("a bad group name was taken");
        };
        assert!(message.contains("invalid group name"), "{message}");
    }

    #[tokio::test]
    async fn an_agent_back_within_the_linger_keeps_its_service() {
        let reg = registry(Limits::default());
        let t0 = Instant::now();
        let (a, _kick) = session(&reg);
        let ServiceOutcome::Online { port, .. } = publish(&reg, a, tcp("db")) else {
            panic!("tcp service refused")
        };
        reg.end_session(a, LINGER, t0);
        let (b, _kick) = session(&reg);
        let back = publish(&reg, b, tcp("db"));
        assert!(
            matches!(back, ServiceOutcome::Online { port: p, .. } if p == port),
            "{back:?}"
        );
        reg.expire_lingering(t0 + LINGER * 2);
        assert_eq!(
            online(&reg, "db"),
            Some(true),
            "the new owner cleared the linger"
        );
    }

    #[tokio::test]
    async fn a_returning_tcp_service_gets_its_old_port_after_expiry() {
        let reg = registry(Limits::default());
        let t0 = Instant::now();
        let (a, _kick) = session(&reg);
        let ServiceOutcome::Online { port, .. } = publish(&reg, a, tcp("cache")) else {
            panic!("tcp service refused")
        };
        reg.end_session(a, LINGER, t0);
        reg.expire_lingering(t0 + LINGER);
        assert_eq!(online(&reg, "cache"), None);
        // The tokio listener closes when its aborted accept task is dropped, on the runtime's
        // next turn.
        let mut turns = 0;
        while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            turns += 1;
            assert!(turns < 1000, "port {port} never released");
            tokio::task::yield_now().await;
        }
        let (b, _kick) = session(&reg);
        let again = publish(&reg, b, tcp("cache"));
        assert!(
            matches!(again, ServiceOutcome::Online { port: p, .. } if p == port),
            "{again:?}"
        );
    }

    #[tokio::test]
    async fn a_reload_ends_the_sessions_it_no_longer_allows_and_only_those() {
        let reg = registry(Limits::default());
        let old = reg.cfg();
        let (a, mut kick_a) = session(&reg);
        let (b, mut kick_b) = session(&reg);
        publish(&reg, a, http("shop", "shop", "/"));
        publish(&reg, b, http("blog", "blog", "/"));
        // The blog's host is now reserved for another service; the shop is untouched.
        let mut new = (*old).clone();
        new.service_secrets.push(crate::config::RelayServiceFile {
            name: "journal".into(),
            secret: None,
            hosts: vec!["blog".into()],
            limits: Limits::default(),
            access: Default::default(),
        });
        reg.live.set(new.clone());
        assert_eq!(reg.apply_settings(&old, &new), 1);
        let told = kick_b.try_recv().expect("the blog's session is told");
        assert!(
            matches!(&told, Kick::SettingsChanged(why) if why.contains("reserved for service journal")),
            "{told:?}"
        );
        assert!(kick_a.try_recv().is_err(), "the shop's session carries on");
        // The relay's secret changes: every session on it ends.
        let mut rotated = new.clone();
        rotated.secret = Some(Secret::new("another-secret-entirely-xyz"));
        assert_eq!(reg.apply_settings(&new, &rotated), 2);
        assert!(matches!(kick_a.try_recv(), Ok(Kick::SettingsChanged(_))));
    }

    #[tokio::test]
    async fn the_same_name_takes_over_and_the_old_session_is_told() {
        let reg = registry(Limits::default());
        let (a, mut kick_a) = session(&reg);
        publish(&reg, a, http("shop", "shop", "/"));
        let (b, _kick_b) = session(&reg);
        assert!(matches!(
            publish(&reg, b, http("shop", "shop", "/")),
            ServiceOutcome::Online { .. }
        ));
        let told = kick_a.try_recv().expect("the old session is told");
        assert!(
            matches!(&told, Kick::Replaced(why) if why.contains("taken over")),
            "{told:?}"
        );
        // The old session ending now must not unpublish the new owner's service.
        reg.end_session(a, LINGER, Instant::now());
        assert_eq!(online(&reg, "shop"), Some(true));
    }

    #[tokio::test]
    async fn a_claimed_host_and_prefix_is_refused_to_another_name() {
        let reg = registry(Limits::default());
        let (a, _ka) = session(&reg);
        publish(&reg, a, http("blog", "blog", "/"));
        let (b, _kb) = session(&reg);
        match publish(&reg, b, http("thief", "blog", "/")) {
            ServiceOutcome::Rejected { code, message } => {
                assert_eq!(code, ErrorCode::HostTaken);
                assert!(message.contains("claimed by service blog"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // The same name listed twice in one Register is refused too.
        let wake = Arc::new(Notify::new());
        let (results, owned) = reg.register(b, &[http("x", "x", "/"), http("x", "y", "/")], &wake);
        assert_eq!(owned.len(), 1);
        assert!(matches!(
            results[1].outcome,
            ServiceOutcome::Rejected {
                code: ErrorCode::BadRequest,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn agents_per_secret_are_bounded_and_released() {
        let reg = registry(Limits {
            max_agents: Some(2),
            ..Default::default()
        });
        let (a, _ka) = session(&reg);
        let (_b, _kb) = session(&reg);
        let (tx, _rx) = mpsc::channel(1);
        let refused = reg
            .new_session(tx, vec![SecretId::Default], PEER)
            .unwrap_err();
        assert!(
            refused.to_string().contains("maximum of 2 agents"),
            "{refused}"
        );
        reg.end_session(a, LINGER, Instant::now());
        let (tx, _rx) = mpsc::channel(1);
        assert!(reg.new_session(tx, vec![SecretId::Default], PEER).is_ok());
    }
}
