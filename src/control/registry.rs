//! Which services exist, which agent session owns each, and which public port each holds.
//!
//! A service outlives the session that registered it by a short linger, so an agent that
//! reconnects (restart, network blip) gets the same port back and visitors arriving in the
//! gap wait instead of being refused. A new session that proves the service's secret takes a
//! service over; the previous owner is told and disconnected.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::admin::Metrics;
use crate::config::{validate_name, PortRange, MAX_POOL};
use crate::dataplane::{pool::Pool, DataPlane, ListenerGuard};
use crate::protocol::auth::random_bytes;
use crate::protocol::{ErrorCode, ServiceOutcome, ServiceRequest, ServiceResult};

/// Identifies one authenticated control connection.
pub type SessionId = u64;

/// How long a service keeps its port after its agent disconnects.
pub const LINGER: Duration = Duration::from_secs(30);

/// Random ports tried before giving up on finding a free one in the range.
const PORT_ATTEMPTS: usize = 64;

/// Remembered name → port assignments (so a returning service gets its old port).
const MAX_REMEMBERED_PORTS: usize = 4096;

/// A published service on the relay.
pub struct Service {
    /// Unique name.
    pub name: String,
    /// Public port.
    pub port: u16,
    /// Ready data connections and waiting visitors, one pool per data-plane worker.
    pub pools: Vec<Arc<Pool>>,
    state: Mutex<ServiceState>,
}

struct ServiceState {
    owner: Option<SessionId>,
    listener: Option<ListenerGuard>,
    /// Bumped whenever the owner changes, so a stale linger timer does nothing.
    generation: u64,
}

impl Service {
    fn state(&self) -> MutexGuard<'_, ServiceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `session` currently owns this service.
    pub fn is_owned_by(&self, session: SessionId) -> bool {
        self.state().owner == Some(session)
    }

    fn close(&self) {
        self.detach_pools();
        drop(self.state().listener.take());
    }

    fn attach_pools(&self, target: usize, wake: &Arc<Notify>) {
        for p in &self.pools {
            p.attach(target, wake.clone());
        }
    }

    fn detach_pools(&self) {
        for p in &self.pools {
            p.detach();
        }
    }
}

#[derive(Default)]
struct Inner {
    services: HashMap<String, Arc<Service>>,
    sessions: HashMap<SessionId, mpsc::Sender<String>>,
    last_port: HashMap<String, u16>,
    next_session: SessionId,
}

/// The relay's table of services and sessions.
pub struct Registry {
    inner: Mutex<Inner>,
    bind_addr: IpAddr,
    range: PortRange,
    metrics: Arc<Metrics>,
    dataplane: DataPlane,
}

impl Registry {
    /// An empty registry publishing ports on `bind_addr` within `range`, served by `dataplane`.
    pub fn new(
        bind_addr: IpAddr,
        range: PortRange,
        metrics: Arc<Metrics>,
        dataplane: DataPlane,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            bind_addr,
            range,
            metrics,
            dataplane,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a session; `kick` receives a reason if another session takes one of its services.
    pub fn new_session(&self, kick: mpsc::Sender<String>) -> SessionId {
        let mut g = self.lock();
        g.next_session += 1;
        let id = g.next_session;
        g.sessions.insert(id, kick);
        id
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
            let outcome = if requests[..i].iter().any(|r| r.name == req.name) {
                Err((
                    ErrorCode::BadRequest,
                    format!("service {} is listed twice", req.name),
                ))
            } else if let Err(e) = validate_name(&req.name) {
                Err((ErrorCode::BadRequest, e.to_string()))
            } else {
                self.register_one(&mut g, session, req, wake)
            };
            let outcome = match outcome {
                Ok(svc) => {
                    let port = svc.port;
                    owned.push(svc);
                    ServiceOutcome::Online { port }
                }
                Err((code, message)) => ServiceOutcome::Rejected { code, message },
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
    ) -> Result<Arc<Service>, (ErrorCode, String)> {
        let target = usize::from(req.pool.clamp(1, MAX_POOL));
        if let Some(existing) = g.services.get(&req.name).cloned() {
            if req.remote_port == 0 || req.remote_port == existing.port {
                self.take_over(g, &existing, session);
                existing.attach_pools(target, wake);
                return Ok(existing);
            }
            // The agent now wants a different port: retire the old entry first.
            self.take_over(g, &existing, session);
            existing.close();
            g.services.remove(&req.name);
        }
        let pools: Vec<Arc<Pool>> = (0..self.dataplane.pools_per_service())
            .map(|_| Arc::new(Pool::new()))
            .collect();
        let (port, guard) = self.bind_port(g, req, &pools)?;
        let svc = Arc::new(Service {
            name: req.name.clone(),
            port,
            pools,
            state: Mutex::new(ServiceState {
                owner: Some(session),
                listener: Some(guard),
                generation: 0,
            }),
        });
        svc.attach_pools(target, wake);
        if g.last_port.len() >= MAX_REMEMBERED_PORTS && !g.last_port.contains_key(&req.name) {
            if let Some(k) = g.last_port.keys().next().cloned() {
                g.last_port.remove(&k);
            }
        }
        g.last_port.insert(req.name.clone(), port);
        g.services.insert(req.name.clone(), svc.clone());
        Ok(svc)
    }

    /// Makes `session` the owner of `svc`, kicking a different live owner.
    fn take_over(&self, g: &Inner, svc: &Service, session: SessionId) {
        let mut st = svc.state();
        if let Some(prev) = st.owner.filter(|p| *p != session) {
            if let Some(kick) = g.sessions.get(&prev) {
                tracing::warn!(service = %svc.name, "service taken over by a newer agent session");
                let _ = kick.try_send(format!(
                    "service {} was taken over by another agent with the same secret",
                    svc.name
                ));
            }
        }
        st.owner = Some(session);
        st.generation += 1;
    }

    fn port_holder<'a>(&self, g: &'a Inner, port: u16) -> Option<&'a str> {
        g.services
            .values()
            .find(|s| s.port == port)
            .map(|s| s.name.as_str())
    }

    fn bind_port(
        &self,
        g: &Inner,
        req: &ServiceRequest,
        pools: &[Arc<Pool>],
    ) -> Result<(u16, ListenerGuard), (ErrorCode, String)> {
        let try_bind = |port: u16| {
            let addr = SocketAddr::new(self.bind_addr, port);
            self.dataplane.listen(addr, &req.name, pools, &self.metrics)
        };
        if req.remote_port != 0 {
            let port = req.remote_port;
            if !self.range.contains(port) {
                return Err((
                    ErrorCode::PortForbidden,
                    format!(
                        "port {port} is outside the relay's allowed range {}",
                        self.range
                    ),
                ));
            }
            if let Some(holder) = self.port_holder(g, port) {
                return Err((
                    ErrorCode::PortTaken,
                    format!("port {port} is already used by service {holder}"),
                ));
            }
            return try_bind(port).map(|l| (port, l)).map_err(|e| {
                (
                    ErrorCode::PortTaken,
                    format!("port {port} cannot be bound on the relay: {e}"),
                )
            });
        }
        // No port asked for: the one this name had before, else a random free one. Ports
        // remembered for other names are avoided while there is a choice.
        if let Some(&port) = g.last_port.get(&req.name) {
            if self.port_holder(g, port).is_none() {
                if let Ok(l) = try_bind(port) {
                    return Ok((port, l));
                }
            }
        }
        for attempt in 0..PORT_ATTEMPTS.min(self.range.len() * 2) {
            let mut r = [0u8; 4];
            random_bytes(&mut r);
            let port = self.range.start + (u32::from_le_bytes(r) % self.range.len() as u32) as u16;
            let reserved = g
                .last_port
                .iter()
                .any(|(n, p)| *p == port && *n != req.name);
            if self.port_holder(g, port).is_some() || (reserved && attempt < PORT_ATTEMPTS / 2) {
                continue;
            }
            if let Ok(l) = try_bind(port) {
                return Ok((port, l));
            }
        }
        Err((
            ErrorCode::LimitReached,
            format!("no free port found in the relay's range {}", self.range),
        ))
    }

    /// Ends `session`: services it still owns stop taking tickets and linger for `linger`
    /// before their ports are closed, unless an agent claims them first.
    pub fn end_session(self: &Arc<Self>, session: SessionId, linger: Duration) {
        let mut g = self.lock();
        g.sessions.remove(&session);
        for svc in g.services.values() {
            let mut st = svc.state();
            if st.owner != Some(session) {
                continue;
            }
            st.owner = None;
            st.generation += 1;
            let generation = st.generation;
            drop(st);
            svc.detach_pools();
            let me = self.clone();
            let name = svc.name.clone();
            tokio::spawn(async move {
                tokio::time::sleep(linger).await;
                me.expire(&name, generation);
            });
        }
    }

    fn expire(&self, name: &str, generation: u64) {
        let mut g = self.lock();
        let Some(svc) = g.services.get(name) else {
            return;
        };
        {
            let st = svc.state();
            if st.owner.is_some() || st.generation != generation {
                return;
            }
        }
        tracing::info!(
            service = name,
            port = svc.port,
            "service closed: its agent did not return"
        );
        svc.close();
        g.services.remove(name);
    }
}
