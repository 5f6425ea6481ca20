//! The relay's settings while it runs: read by whoever needs them at the moment they need
//! them, replaced whole by a reload. [`plan_reload`] decides what a reload may change: what
//! the running relay can apply (secrets, reservations, limits, access rules, heartbeat, drain timeout), and
//! what needs a restart (addresses, ports, backend, workers, TLS), which keeps its old value.

use std::sync::{Arc, RwLock};

use super::RelayConfig;

/// The names of the fields that differ between `old` and `new`, in the order given (each
/// name once): what a reload reports as changed.
macro_rules! changed_fields {
    ($old:expr, $new:expr, $($field:ident => $name:literal),* $(,)?) => {{
        let mut names: Vec<&'static str> = Vec::new();
        $(
            if $old.$field != $new.$field && !names.contains(&$name) {
                names.push($name);
            }
        )*
        names
    }};
}
pub(crate) use changed_fields;

/// `items` joined by commas, or `none`: how reload log lines list what changed.
pub fn list_or_none<S: AsRef<str>>(items: &[S]) -> String {
    match items {
        [] => "none".to_string(),
        _ => items
            .iter()
            .map(AsRef::as_ref)
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// The settings in force. Cheap to read: a clone of an `Arc` under a read lock.
#[derive(Debug)]
pub struct LiveConfig(RwLock<Arc<RelayConfig>>);

impl LiveConfig {
    /// Settings starting as `cfg`.
    pub fn new(cfg: RelayConfig) -> Arc<Self> {
        Arc::new(Self(RwLock::new(Arc::new(cfg))))
    }

    /// The settings in force now. Hold the result for one decision, not across awaits that
    /// should see a reload.
    pub fn get(&self) -> Arc<RelayConfig> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the settings (a reload, after [`plan_reload`]).
    pub fn set(&self, cfg: RelayConfig) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(cfg);
    }
}

/// What a reload will do: the settings to put in force, which live settings changed, and
/// which changed settings need a restart (and were left as they were).
#[derive(Debug)]
pub struct ReloadPlan {
    /// The old settings with every live setting taken from the new file.
    pub cfg: RelayConfig,
    /// Live settings that changed, by their name in `relay.toml`.
    pub changed: Vec<&'static str>,
    /// Settings that changed but need a restart, by their name in `relay.toml`.
    pub needs_restart: Vec<&'static str>,
}

/// Compares the settings in force (`old`) with freshly loaded ones (`new`, already
/// validated) and keeps from `new` only what a running relay can apply.
pub fn plan_reload(old: &RelayConfig, new: RelayConfig) -> ReloadPlan {
    let mut cfg = old.clone();
    let mut changed = Vec::new();
    macro_rules! live {
        ($($field:ident => $name:literal),* $(,)?) => {$(
            if old.$field != new.$field {
                cfg.$field = new.$field.clone();
                changed.push($name);
            }
        )*};
    }
    live!(
        secret => "secret",
        service_secrets => "service",
        limits => "limits",
        access => "access",
        heartbeat => "heartbeat",
        drain_timeout => "drain_timeout_secs",
        log => "log",
        access_log => "access_log",
    );
    let needs_restart = changed_fields!(old, new,
        control => "control",
        bind_addr => "bind_addr",
        port_range => "port_range",
        data_tls => "data_tls",
        state_dir => "state_dir",
        cert => "cert",
        backend => "backend",
        workers => "workers",
        front => "http/tls/domain/shared port settings",
        https => "https/acme settings",
        admin => "admin",
        admin_token => "admin_token",
    );
    ReloadPlan {
        cfg,
        changed,
        needs_restart,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Limits, Secret};

    fn cfg() -> RelayConfig {
        crate::config::tests::relay_config()
    }

    #[test]
    fn live_settings_change_and_the_rest_waits_for_a_restart() {
        let old = cfg();
        let mut new = old.clone();
        new.limits = Limits {
            max_visitors: Some(3),
            ..old.limits.clone()
        };
        new.secret = Some(Secret::new("a-new-secret-of-some-length"));
        new.control = "127.0.0.1:9".parse().unwrap();
        new.workers = Some(7);
        let plan = plan_reload(&old, new);
        assert_eq!(plan.changed, ["secret", "limits"]);
        assert_eq!(plan.needs_restart, ["control", "workers"]);
        assert_eq!(plan.cfg.limits.max_visitors, Some(3));
        assert_eq!(plan.cfg.control, old.control, "kept until a restart");
        assert_eq!(plan.cfg.workers, old.workers);
    }

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let plan = plan_reload(&cfg(), cfg());
        assert!(plan.changed.is_empty() && plan.needs_restart.is_empty());
    }

    #[test]
    fn the_live_handle_hands_out_the_latest() {
        let live = LiveConfig::new(cfg());
        let before = live.get();
        let mut next = cfg();
        next.limits.max_visitors = Some(1);
        live.set(next);
        assert_eq!(live.get().limits.max_visitors, Some(1));
        assert_ne!(
            before.limits.max_visitors,
            Some(1),
            "a held copy does not move"
        );
    }
}
