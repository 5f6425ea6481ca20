//! One published service on the relay: what it claims, who owns it, its admission gate and its
//! pools of data connections.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

use crate::config::SecretId;
use crate::dataplane::gate::Gate;
use crate::dataplane::{pool::Pool, ListenerGuard};
use crate::protocol::ServiceKind;

/// A published service as a relay hands it to the process taking over from it: enough to
/// publish it again, unowned, until its agent returns (its listeners travel beside it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceRecord {
    /// Name.
    pub name: String,
    /// `tcp`, `http` or `tls`.
    pub kind: ServiceKind,
    /// `tcp`: its public port.
    pub port: u16,
    /// `http`/`tls`: the full host names it claims.
    pub hosts: Vec<String>,
    /// `http`: the path prefix.
    pub path: String,
    /// How many listening sockets travel with it (`tcp`: one per worker of the old process).
    pub listeners: usize,
    /// Whether the operator was draining it (the drain carries over).
    #[serde(default)]
    pub draining: bool,
}

/// Identifies one authenticated control connection (the owner of services).
pub type SessionId = u64;

/// A published service on the relay.
pub struct Service {
    /// Unique name.
    pub name: String,
    /// How visitors reach it.
    pub kind: ServiceKind,
    /// `tcp`: its public port. `http`/`tls`: the shared port.
    pub port: u16,
    /// `http`/`tls`: the full host names it claims.
    pub hosts: Vec<String>,
    /// `http`: the path prefix it claims on those hosts.
    pub path: String,
    /// The secret that authenticated it: its host names belong to that secret.
    pub secret: SecretId,
    /// Admission: limits, PROXY header, forwarded headers.
    pub gate: Arc<Gate>,
    /// Ready data connections and waiting visitors, one pool per data-plane worker.
    pub pools: Vec<Arc<Pool>>,
    pub(super) state: Mutex<ServiceState>,
}

pub(super) struct ServiceState {
    /// The agent sessions serving it: one, or the members of its group; none while it
    /// lingers.
    pub(super) owners: Vec<SessionId>,
    /// The group its owners joined as (`--group`): another agent naming the same group
    /// joins them; any other takes the service over.
    pub(super) group: Option<String>,
    pub(super) listener: Option<ListenerGuard>,
    /// While unowned: when the service closes unless an agent claims it first.
    pub(super) linger_until: Option<Instant>,
}

impl Service {
    pub(super) fn state(&self) -> MutexGuard<'_, ServiceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `session` currently owns this service.
    pub fn is_owned_by(&self, session: SessionId) -> bool {
        self.state().owners.contains(&session)
    }

    /// Whether some agent session serves it now (it is not lingering).
    pub fn is_online(&self) -> bool {
        !self.state().owners.is_empty()
    }

    /// A `udp` service's hub (its public socket and flows), which takes its data
    /// connections as channels.
    pub fn udp_hub(&self) -> Option<Arc<crate::dataplane::udp::relay::Hub>> {
        match &self.state().listener {
            Some(ListenerGuard::Udp(hub)) => Some(hub.clone()),
            _ => None,
        }
    }

    pub(super) fn close(&self) {
        for p in &self.pools {
            p.close();
        }
        drop(self.state().listener.take());
    }

    pub(super) fn attach_pools(&self, session: SessionId, target: usize, wake: &Arc<Notify>) {
        // One count of the visitors the session carries across every worker's pool: a
        // group spreads visitors by what each agent carries in all.
        let carrying = self.pools[0].carrying(session).unwrap_or_default();
        for p in &self.pools {
            p.attach(session, target, wake.clone(), carrying.clone());
        }
    }

    pub(super) fn detach_pools(&self, session: SessionId) {
        for p in &self.pools {
            p.detach(session);
        }
    }

    /// Every agent leaves the pools: the service changes hands.
    pub(super) fn detach_all_pools(&self) {
        for p in &self.pools {
            p.detach_all();
        }
    }
}
