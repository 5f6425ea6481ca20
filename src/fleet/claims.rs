//! The fleet's namespace in etcd, and claiming a place in it.
//!
//! Keys, under the prefix (`/ringtunnel/` by default):
//!
//! | key | value (JSON) | held by |
//! |---|---|---|
//! | `relays/ID` | where the relay is reached | the relay's own lease |
//! | `services/NAME` | owner secret, kind, port, hosts, path, lease | the service's lease |
//! | `hosts/HOST/NAME` | owner secret, kind, path | the service's lease |
//! | `ports/KIND/PORT` | the service, its owner | the service's lease |
//! | `holders/NAME/ID` | (empty) | the relay's own lease: relay ID has an agent session of NAME |
//!
//! A service's keys share one lease, renewed by every relay that holds the service (its
//! agent connected, or lingering after a disconnect): the claim lives as long as any relay
//! has the service and ends one TTL after the last one lets it go. A claim is read, decided,
//! then written in one transaction conditional on nothing read having changed since; two
//! relays claiming the same port or host at once cannot both succeed.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::etcd::{Cmp, Etcd, Kv, Op};
use super::{FleetError, FleetSettings};
use crate::config::PortRange;
use crate::protocol::ServiceKind;

/// Transactions tried before a claim gives up on a namespace that keeps changing under it.
const ATTEMPTS: usize = 8;

/// What a service asks of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Its name (compared without regard to case).
    pub name: String,
    /// How visitors reach it.
    pub kind: ServiceKind,
    /// `tcp`/`udp`: the port asked for, 0 for any.
    pub port: u16,
    /// `http`/`tls`: its full host names.
    pub hosts: Vec<String>,
    /// `http`: its path prefix.
    pub path: String,
    /// The secret it authenticates with, as a label (`default`, `service:NAME`).
    pub owner: String,
}

/// A claim made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    /// `tcp`/`udp`: its public port on every relay (0 otherwise).
    pub port: u16,
    /// Whether this call created it (nobody in the fleet held it before).
    pub created: bool,
}

/// Why a claim failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// Another secret holds the service name.
    #[error("service {0} is held in the fleet by another secret")]
    NameHeld(String),
    /// A host belongs to another secret.
    #[error("{host} belongs to service {holder} in the fleet, which another secret holds")]
    HostOwned {
        /// The host.
        host: String,
        /// The service holding it.
        holder: String,
    },
    /// A host (with this path) is another service's.
    #[error("{what} is already claimed by service {holder} in the fleet")]
    HostTaken {
        /// The host, with the path when not `/`.
        what: String,
        /// The service holding it.
        holder: String,
    },
    /// The port asked for is another service's.
    #[error("port {port} is held by service {holder} in the fleet")]
    PortTaken {
        /// The port.
        port: u16,
        /// The service holding it.
        holder: String,
    },
    /// No free port found in the range.
    #[error("no port of the range is free in the fleet")]
    NoFreePort,
    /// The registry could not be asked, or kept changing.
    #[error("the fleet registry is unavailable ({0}); try again")]
    Registry(FleetError),
}

impl From<FleetError> for ClaimError {
    fn from(e: FleetError) -> Self {
        ClaimError::Registry(e)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ServiceValue {
    owner: String,
    kind: String,
    port: u16,
    hosts: Vec<String>,
    path: String,
    lease: i64,
    relay: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HostValue {
    owner: String,
    kind: String,
    path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PortValue {
    service: String,
    owner: String,
}

fn decode<T: for<'a> Deserialize<'a>>(kv: &Kv) -> Result<T, FleetError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| FleetError::Etcd(format!("{} holds an unreadable value: {e}", kv.key)))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain structs serialize")
}

/// A service this relay holds, and the lease it renews for it.
#[derive(Debug, Clone)]
pub struct Hold {
    /// What it claimed.
    pub claim: Claim,
    /// The lease its keys are held by.
    pub lease: i64,
    /// Its port.
    pub port: u16,
}

/// This relay's view of the fleet's namespace.
#[derive(Debug)]
pub struct Fleet {
    /// The cluster.
    pub etcd: Etcd,
    /// How this relay joined.
    pub settings: FleetSettings,
    holds: Mutex<HashMap<String, Hold>>,
    /// Why the registry did not answer last time, while it does not.
    failing: Mutex<Option<String>>,
    /// Visitors of services other relays serve, handed to them (set once at start).
    pub handoff: std::sync::OnceLock<std::sync::Arc<super::handoff::Handoff>>,
}

impl Fleet {
    /// A fleet member with nothing claimed yet (nothing is asked of etcd here).
    pub fn new(settings: FleetSettings) -> Result<Fleet, FleetError> {
        settings
            .validate()
            .map_err(|e| FleetError::Config(e.to_string()))?;
        Ok(Fleet {
            etcd: Etcd::from_settings(&settings)?,
            settings,
            holds: Mutex::new(HashMap::new()),
            failing: Mutex::new(None),
            handoff: std::sync::OnceLock::new(),
        })
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.settings.prefix)
    }

    fn service_key(&self, name: &str) -> String {
        self.key(&format!("services/{}", name.to_ascii_lowercase()))
    }

    fn host_prefix(&self, host: &str) -> String {
        self.key(&format!("hosts/{}/", host.to_ascii_lowercase()))
    }

    fn host_key(&self, host: &str, name: &str) -> String {
        format!("{}{}", self.host_prefix(host), name.to_ascii_lowercase())
    }

    fn port_key(&self, kind: ServiceKind, port: u16) -> String {
        self.key(&format!("ports/{kind}/{port}"))
    }

    /// The key of this relay's presence.
    pub fn relay_key(&self) -> String {
        self.key(&format!("relays/{}", self.settings.relay_id))
    }

    /// Notes how the last call to etcd went; logs when that changes.
    pub fn note(&self, outcome: &Result<(), FleetError>) {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!("fleet registry reachable again");
                }
            }
            Err(FleetError::Unreachable(why)) => {
                if failing.is_none() {
                    tracing::error!(
                        "fleet registry unreachable ({why}): existing services keep serving; new claims are refused until it is back"
                    );
                }
                *failing = Some(why.clone());
            }
            Err(FleetError::Denied(why)) => {
                if failing.is_none() {
                    tracing::error!(
                        "fleet registry refuses this relay ({why}): existing services keep serving; new claims are refused until --registry-user, its password or its etcd role is fixed"
                    );
                }
                *failing = Some(why.clone());
            }
            // etcd answered: it is reachable, whatever it said.
            Err(_) => {}
        }
    }

    /// The services this relay holds.
    pub fn holds(&self) -> Vec<Hold> {
        let g = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        g.values().cloned().collect()
    }

    /// Stops renewing the services `keep` does not name (no longer on this relay).
    pub fn keep_only(&self, keep: &[String]) {
        let mut g = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|name, _| keep.iter().any(|k| k.eq_ignore_ascii_case(name)));
    }

    /// Claims `c`'s name, port (picked from `range` if `c.port` is 0 and the service has
    /// none yet) and hosts for its owner, fleet-wide; on success this relay renews the
    /// claim until [`Self::keep_only`] drops it.
    pub async fn claim(&self, c: &Claim, range: PortRange) -> Result<Claimed, ClaimError> {
        let r = self.try_claim(c, range).await;
        match &r {
            Err(ClaimError::Registry(e @ (FleetError::Unreachable(_) | FleetError::Denied(_)))) => {
                self.note(&Err(e.clone()))
            }
            _ => self.note(&Ok(())),
        }
        r
    }

    async fn try_claim(&self, c: &Claim, range: PortRange) -> Result<Claimed, ClaimError> {
        let skey = self.service_key(&c.name);
        let mut tried_ports: Vec<u16> = Vec::new();
        let mut granted: Option<i64> = None;
        for _ in 0..ATTEMPTS {
            // What the service and its hosts look like now, at one revision.
            let mut reads = vec![Op::get(skey.clone())];
            reads.extend(c.hosts.iter().map(|h| Op::prefix(self.host_prefix(h))));
            let snap = self.etcd.txn(&[], &reads, &[]).await?;
            let rev = snap.revision;
            let existing: Option<ServiceValue> = match snap.ranges[0].first() {
                Some(kv) => Some(decode(kv)?),
                None => None,
            };
            if let Some(v) = &existing {
                if v.owner != c.owner {
                    return Err(ClaimError::NameHeld(c.name.clone()));
                }
            }
            for (h, entries) in c.hosts.iter().zip(&snap.ranges[1..]) {
                for kv in entries {
                    let holder = kv.key.rsplit('/').next().unwrap_or("").to_string();
                    if holder.eq_ignore_ascii_case(&c.name) {
                        continue;
                    }
                    let v: HostValue = decode(kv)?;
                    if v.owner != c.owner {
                        return Err(ClaimError::HostOwned {
                            host: h.clone(),
                            holder,
                        });
                    }
                    let clash = v.kind == c.kind.to_string()
                        && (c.kind == ServiceKind::Tls || v.path == c.path);
                    if clash {
                        let what = match c.kind {
                            ServiceKind::Http if c.path != "/" => format!("{h}{}", c.path),
                            _ => h.clone(),
                        };
                        return Err(ClaimError::HostTaken { what, holder });
                    }
                }
            }
            // The lease: the service's own while it lives (even when this claim granted one
            // in an earlier attempt, which another relay's claim beat: every relay of the
            // service must renew the one its keys are held by), else a new one.
            let live = match &existing {
                Some(v) if v.lease != 0 => self.etcd.keep_alive(v.lease).await?.map(|_| v.lease),
                _ => None,
            };
            let lease = match (live, granted) {
                (Some(l), _) => l,
                (None, Some(l)) => l,
                (None, None) => *granted.insert(self.etcd.grant(self.ttl_secs()).await?),
            };
            let mut when = vec![Cmp::key_unchanged(skey.clone(), rev)];
            when.extend(
                c.hosts
                    .iter()
                    .map(|h| Cmp::prefix_unchanged(self.host_prefix(h), rev)),
            );
            let mut then = Vec::new();
            let mut port = 0;
            if c.kind.own_port() {
                let same_kind = existing
                    .as_ref()
                    .filter(|v| v.kind == c.kind.to_string() && v.port != 0)
                    .map(|v| v.port);
                port = match (c.port, same_kind) {
                    (0, Some(p)) => p,
                    (0, None) => match pick_port(range, &tried_ports) {
                        Some(p) => p,
                        None => return Err(ClaimError::NoFreePort),
                    },
                    (p, _) => p,
                };
                let pkey = self.port_key(c.kind, port);
                let held = self.etcd.txn(&[], &[Op::get(pkey.clone())], &[]).await?;
                if let Some(kv) = held.ranges[0].first() {
                    let v: PortValue = decode(kv)?;
                    if !v.service.eq_ignore_ascii_case(&c.name) {
                        if c.port != 0 {
                            return Err(ClaimError::PortTaken {
                                port,
                                holder: v.service,
                            });
                        }
                        tried_ports.push(port);
                        continue;
                    }
                }
                when.push(Cmp::key_unchanged(pkey.clone(), held.revision));
                then.push(Op::Put {
                    key: pkey,
                    value: encode(&PortValue {
                        service: c.name.to_ascii_lowercase(),
                        owner: c.owner.clone(),
                    }),
                    lease,
                });
            }
            // What the service held before and holds no longer.
            if let Some(old) = &existing {
                if old.port != 0 && (old.port != port || old.kind != c.kind.to_string()) {
                    if let Some(kind) = kind_named(&old.kind).filter(|k| k.own_port()) {
                        then.push(Op::Delete {
                            key: self.port_key(kind, old.port),
                        });
                    }
                }
                for h in old.hosts.iter().filter(|h| !c.hosts.contains(h)) {
                    then.push(Op::Delete {
                        key: self.host_key(h, &c.name),
                    });
                }
            }
            for h in &c.hosts {
                then.push(Op::Put {
                    key: self.host_key(h, &c.name),
                    value: encode(&HostValue {
                        owner: c.owner.clone(),
                        kind: c.kind.to_string(),
                        path: c.path.clone(),
                    }),
                    lease,
                });
            }
            then.push(Op::Put {
                key: skey.clone(),
                value: encode(&ServiceValue {
                    owner: c.owner.clone(),
                    kind: c.kind.to_string(),
                    port,
                    hosts: c.hosts.clone(),
                    path: c.path.clone(),
                    lease,
                    relay: self.settings.relay_id.clone(),
                }),
                lease,
            });
            if self.etcd.txn(&when, &then, &[]).await?.succeeded {
                if let Some(unused) = granted.filter(|g| *g != lease) {
                    let _ = self.etcd.revoke(unused).await;
                }
                let mut g = self.holds.lock().unwrap_or_else(|p| p.into_inner());
                g.insert(
                    c.name.to_ascii_lowercase(),
                    Hold {
                        claim: c.clone(),
                        lease,
                        port,
                    },
                );
                return Ok(Claimed {
                    port,
                    created: existing.is_none(),
                });
            }
        }
        if let Some(l) = granted {
            let _ = self.etcd.revoke(l).await;
        }
        Err(ClaimError::Registry(FleetError::Etcd(format!(
            "the claim of service {} kept conflicting with other changes",
            c.name
        ))))
    }

    /// Undoes a claim this relay just created (its agent could not be served here after
    /// all): ends its lease, which removes its keys. Claims others hold are left alone.
    pub async fn release_created(&self, name: &str) {
        let hold = {
            let mut g = self.holds.lock().unwrap_or_else(|p| p.into_inner());
            g.remove(&name.to_ascii_lowercase())
        };
        if let Some(h) = hold {
            if let Err(e) = self.etcd.revoke(h.lease).await {
                tracing::warn!(service = name, "releasing its fleet claim: {e}");
            }
        }
    }

    /// Records, under this relay's `presence` lease, which services it has an agent session
    /// of: `online` now, `marked` as recorded before (updated).
    pub async fn mark_holders(
        &self,
        presence: i64,
        online: &[String],
        marked: &mut Vec<String>,
    ) -> Result<(), FleetError> {
        let online: Vec<String> = online.iter().map(|n| n.to_ascii_lowercase()).collect();
        let key = |n: &str| self.key(&format!("holders/{n}/{}", self.settings.relay_id));
        let mut ops = Vec::new();
        for n in online.iter().filter(|n| !marked.contains(n)) {
            ops.push(Op::Put {
                key: key(n),
                value: Vec::new(),
                lease: presence,
            });
        }
        for n in marked.iter().filter(|n| !online.contains(n)) {
            ops.push(Op::Delete { key: key(n) });
        }
        // etcd caps the operations of one transaction (128 by default).
        for chunk in ops.chunks(100) {
            self.etcd.txn(&[], chunk, &[]).await?;
        }
        *marked = online;
        Ok(())
    }

    /// The `tcp` services of the fleet that other relays have an agent session of, with where
    /// those relays are reached.
    pub async fn elsewhere(
        &self,
    ) -> Result<HashMap<String, super::elsewhere::Elsewhere>, FleetError> {
        let range = |rest: &str| Op::prefix(self.key(rest));
        let read = self
            .etcd
            .txn(
                &[],
                &[range("services/"), range("holders/"), range("relays/")],
                &[],
            )
            .await?;
        let tail = |kv: &Kv, rest: &str| -> String {
            kv.key
                .strip_prefix(&self.key(rest))
                .unwrap_or("")
                .to_string()
        };
        let mut advertise: HashMap<String, String> = HashMap::new();
        for kv in &read.ranges[2] {
            let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap_or_default();
            if let Some(a) = v["advertise"].as_str() {
                advertise.insert(tail(kv, "relays/"), a.to_string());
            }
        }
        let mut holders: HashMap<String, Vec<String>> = HashMap::new();
        for kv in &read.ranges[1] {
            let rest = tail(kv, "holders/");
            if let Some((name, id)) = rest.rsplit_once('/') {
                if id == self.settings.relay_id {
                    continue;
                }
                if let Some(a) = advertise.get(id) {
                    holders.entry(name.to_string()).or_default().push(a.clone());
                }
            }
        }
        let mut out = HashMap::new();
        for kv in &read.ranges[0] {
            let Ok(v) = decode::<ServiceValue>(kv) else {
                continue;
            };
            let name = tail(kv, "services/");
            let Some(kind) = kind_named(&v.kind) else {
                continue;
            };
            let handed = match kind {
                ServiceKind::Tcp => v.port != 0,
                ServiceKind::Http | ServiceKind::Tls => !v.hosts.is_empty(),
                ServiceKind::Udp => false,
            };
            if !handed {
                continue;
            }
            if let Some(relays) = holders.remove(&name) {
                out.insert(
                    name,
                    super::elsewhere::Elsewhere {
                        kind,
                        port: v.port,
                        hosts: v.hosts,
                        path: v.path,
                        relays,
                    },
                );
            }
        }
        Ok(out)
    }

    /// The TTL in whole seconds.
    pub fn ttl_secs(&self) -> u64 {
        self.settings.ttl.as_secs().max(1)
    }
}

fn kind_named(s: &str) -> Option<ServiceKind> {
    [
        ServiceKind::Tcp,
        ServiceKind::Udp,
        ServiceKind::Http,
        ServiceKind::Tls,
    ]
    .into_iter()
    .find(|k| k.to_string() == s)
}

/// A random port of `range` not in `tried`.
fn pick_port(range: PortRange, tried: &[u16]) -> Option<u16> {
    let span = u32::from(range.end.saturating_sub(range.start)) + 1;
    if tried.len() as u32 >= span {
        return None;
    }
    for _ in 0..64 {
        let mut b = [0u8; 4];
        crate::protocol::auth::random_bytes(&mut b);
        let p = range.start + (u32::from_le_bytes(b) % span) as u16;
        if !tried.contains(&p) {
            return Some(p);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picked_ports_stay_in_range_and_skip_tried_ones() {
        let range = PortRange {
            start: 20000,
            end: 20003,
        };
        for _ in 0..100 {
            let p = pick_port(range, &[20000, 20001]).unwrap();
            assert!(p == 20002 || p == 20003, "{p}");
        }
        assert_eq!(pick_port(range, &[20000, 20001, 20002, 20003]), None);
    }

    #[test]
    fn kinds_round_trip_by_name() {
        for k in [
            ServiceKind::Tcp,
            ServiceKind::Udp,
            ServiceKind::Http,
            ServiceKind::Tls,
        ] {
            assert_eq!(kind_named(&k.to_string()), Some(k));
        }
        assert_eq!(kind_named("ftp"), None);
    }
}
