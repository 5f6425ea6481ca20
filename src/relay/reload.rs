//! Reloading the relay's settings while it runs (SIGHUP, `POST /api/reload`): read them
//! again, put in force what can change live, report what needs a restart, and end the
//! sessions the new settings no longer allow. A file that does not load changes nothing.

use std::sync::{Arc, Mutex};

use crate::config::live::list_or_none;
use crate::config::{plan_reload, ConfigError, LiveConfig, RelayConfig};
use crate::control::registry::Registry;

/// Reads the relay's settings again, as at start: the command line over its config file.
pub type Loader = Box<dyn Fn() -> Result<RelayConfig, ConfigError> + Send + Sync>;

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reloaded {
    /// Settings that changed and are in force now, by their name in `relay.toml`.
    pub changed: Vec<&'static str>,
    /// Settings that changed but need a restart; their old values stay in force.
    pub needs_restart: Vec<&'static str>,
    /// Agent sessions ended because a secret or reservation they relied on changed.
    pub sessions_ended: usize,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "changed={} needs_restart={} sessions_ended={}",
            list_or_none(&self.changed),
            list_or_none(&self.needs_restart),
            self.sessions_ended
        )
    }
}

/// Reloads one relay's settings; one reload at a time.
pub struct Reloader {
    load: Option<Loader>,
    live: Arc<LiveConfig>,
    registry: Arc<Registry>,
    one_at_a_time: Mutex<()>,
}

impl Reloader {
    /// A reloader that reads settings with `load` (`None`: the relay was started from
    /// settings alone, and a reload says so) into `live`, applied to `registry`.
    pub fn new(load: Option<Loader>, live: Arc<LiveConfig>, registry: Arc<Registry>) -> Self {
        Self {
            load,
            live,
            registry,
            one_at_a_time: Mutex::new(()),
        }
    }

    /// Reads the settings again and puts in force what can change live. Logs what it did
    /// (or why it changed nothing) in one line.
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        let result = self.try_reload();
        match &result {
            Ok(done) => tracing::info!("settings reloaded: {done}"),
            Err(e) => tracing::error!("reload refused, nothing changed: {e}"),
        }
        result
    }

    fn try_reload(&self) -> Result<Reloaded, ConfigError> {
        let _one = self.one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
        let load = self.load.as_ref().ok_or_else(|| {
            ConfigError::Invalid("this relay was not started from a command line".into())
        })?;
        let old = self.live.get();
        let plan = plan_reload(&old, load()?);
        plan.cfg.validate()?;
        crate::logging::configure(plan.cfg.log.as_deref(), plan.cfg.access_log)
            .map_err(|e| ConfigError::Invalid(format!("log: {e}")))?;
        for name in &plan.needs_restart {
            tracing::warn!(
                "{name} changed: needs a restart to take effect; the running value stays"
            );
        }
        // In force first, so an agent that reconnects after its session ends below
        // authenticates against the new settings.
        self.live.set(plan.cfg.clone());
        let sessions_ended = self.registry.apply_settings(&old, &plan.cfg);
        Ok(Reloaded {
            changed: plan.changed,
            needs_restart: plan.needs_restart,
            sessions_ended,
        })
    }
}
