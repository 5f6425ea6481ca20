//! Reloading the agent's settings while it runs (SIGHUP): read them again, and work out what
//! changes. Services, secrets, heartbeat and drain timeout change live; the relay address, its
//! trust (fingerprint, CA), the backend and the workers need a restart and keep their values.

use crate::config::live::{changed_fields, list_or_none};
use crate::config::{AgentConfig, ConfigError, ServiceConfig};

/// Reads the agent's settings again, as at start: the command line over its config file.
pub type AgentLoader = Box<dyn Fn() -> Result<AgentConfig, ConfigError> + Send + Sync>;

/// How a running agent is asked to reload: a counter of SIGHUPs, and how to read the
/// settings again.
pub struct Reload {
    /// Changes on every reload request.
    pub signal: tokio::sync::watch::Receiver<u32>,
    /// Reads the settings.
    pub load: AgentLoader,
}

impl Reload {
    /// Waits for the next reload request; `false` at once if none can come any more.
    pub async fn requested(reload: &mut Option<Reload>) -> bool {
        match reload {
            Some(r) => r.signal.changed().await.is_ok(),
            None => std::future::pending().await,
        }
    }

    /// Reads the settings again and plans the reload, or says why nothing changes (logged).
    pub fn plan(&self, current: &AgentConfig) -> Option<AgentReload> {
        let loaded = (self.load)().and_then(|new| {
            let p = plan(current, new);
            p.cfg.validate().map(|()| p)
        });
        match loaded {
            Ok(p) => {
                for name in &p.needs_restart {
                    tracing::warn!(
                        "{name} changed: needs a restart to take effect; the running value stays"
                    );
                }
                Some(p)
            }
            Err(e) => {
                tracing::error!("reload refused, nothing changed: {e}");
                None
            }
        }
    }
}

/// What a reload of the agent's settings will do.
#[derive(Debug)]
pub struct AgentReload {
    /// The old settings with every live setting taken from the new ones.
    pub cfg: AgentConfig,
    /// Services no longer in the settings: withdrawn from the relay at once.
    pub removed: Vec<String>,
    /// Services new in the settings.
    pub added: Vec<String>,
    /// Services whose settings changed (registered again).
    pub changed: Vec<String>,
    /// Whether any live setting changed: the agent then withdraws the removed services and
    /// registers the rest again in a new session (services, secrets, heartbeat, drain timeout).
    pub new_session: bool,
    /// Settings that changed but need a restart, by their name in `agent.toml`.
    pub needs_restart: Vec<&'static str>,
}

/// Compares the settings in force (`old`) with freshly loaded ones (`new`, validated).
pub fn plan(old: &AgentConfig, new: AgentConfig) -> AgentReload {
    fn find<'a>(list: &'a [ServiceConfig], name: &str) -> Option<&'a ServiceConfig> {
        list.iter().find(|s| s.name.eq_ignore_ascii_case(name))
    }
    let mut removed = Vec::new();
    let mut changed = Vec::new();
    for s in &old.services {
        match find(&new.services, &s.name) {
            None => removed.push(s.name.clone()),
            Some(n) if n != s => changed.push(s.name.clone()),
            Some(_) => {}
        }
    }
    let added: Vec<String> = new
        .services
        .iter()
        .filter(|s| find(&old.services, &s.name).is_none())
        .map(|s| s.name.clone())
        .collect();
    let needs_restart = changed_fields!(old, new,
        relay_host => "relay",
        relay_port => "relay",
        relay_fingerprint => "relay_fingerprint",
        ca => "ca",
        proxy => "proxy",
        backend => "backend",
        workers => "workers",
    );
    let new_session = !removed.is_empty()
        || !added.is_empty()
        || !changed.is_empty()
        || old.secret != new.secret
        || old.heartbeat != new.heartbeat
        || old.drain_timeout != new.drain_timeout;
    let cfg = AgentConfig {
        secret: new.secret,
        services: new.services,
        heartbeat: new.heartbeat,
        drain_timeout: new.drain_timeout,
        ..old.clone()
    };
    AgentReload {
        cfg,
        removed,
        added,
        changed,
        new_session,
        needs_restart,
    }
}

impl std::fmt::Display for AgentReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "added={} removed={} changed={} needs_restart={}",
            list_or_none(&self.added),
            list_or_none(&self.removed),
            list_or_none(&self.changed),
            list_or_none(&self.needs_restart)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendKind, Heartbeat, Secret};

    fn cfg(services: Vec<ServiceConfig>) -> AgentConfig {
        AgentConfig {
            relay_host: "relay.example".into(),
            relay_port: 7843,
            secret: Some(Secret::new("agent-secret-long-enough")),
            relay_fingerprint: None,
            ca: None,
            proxy: None,
            services,
            backend: BackendKind::Tokio,
            workers: None,
            heartbeat: Heartbeat::default(),
            drain_timeout: crate::config::DEFAULT_DRAIN_TIMEOUT,
        }
    }

    #[test]
    fn services_are_compared_by_name_and_settings() {
        let web = ServiceConfig::tcp("web", "127.0.0.1:80");
        let db = ServiceConfig::tcp("db", "127.0.0.1:5432");
        let api = ServiceConfig::tcp("api", "127.0.0.1:3000");
        let mut db2 = db.clone();
        db2.local = "127.0.0.1:5433".into();
        let old = cfg(vec![web.clone(), db, api]);
        let mut new = cfg(vec![
            web,
            db2,
            ServiceConfig::tcp("cache", "127.0.0.1:6379"),
        ]);
        new.workers = Some(3);
        let p = plan(&old, new);
        assert_eq!(
            (p.removed, p.added, p.changed),
            (vec!["api".into()], vec!["cache".into()], vec!["db".into()])
        );
        assert!(p.new_session);
        assert_eq!(p.needs_restart, ["workers"]);
        assert_eq!(p.cfg.workers, None, "kept until a restart");
    }

    #[test]
    fn the_same_settings_need_no_new_session() {
        let old = cfg(vec![ServiceConfig::tcp("web", "127.0.0.1:80")]);
        let p = plan(&old, old.clone());
        assert!(!p.new_session && p.needs_restart.is_empty());
        assert_eq!(
            p.to_string(),
            "added=none removed=none changed=none needs_restart=none"
        );
    }
}
