//! Per-service admission limits (`[limits]` and `[service.limits]` in `relay.toml`).

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Per-service limits (`[limits]`, or `[service.limits]` for one service). `None`: no limit.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most visitors connected to the service at once; more are refused (HTTP: 503).
    pub max_visitors: Option<usize>,
    /// Most new connections per second from one visitor IP address.
    pub conn_rate_per_ip: Option<u32>,
    /// Seconds without a byte either way after which a visitor connection is closed.
    pub idle_timeout_secs: Option<f64>,
    /// Most agent sessions at once authenticated with this service's secret (for the relay's
    /// default secret: the relay-wide value counts every agent using it).
    pub max_agents: Option<usize>,
}

impl Limits {
    /// These limits with every unset field taken from `base`.
    pub fn over(&self, base: &Limits) -> Limits {
        Limits {
            max_visitors: self.max_visitors.or(base.max_visitors),
            conn_rate_per_ip: self.conn_rate_per_ip.or(base.conn_rate_per_ip),
            idle_timeout_secs: self.idle_timeout_secs.or(base.idle_timeout_secs),
            max_agents: self.max_agents.or(base.max_agents),
        }
    }

    /// The idle timeout as a duration.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout_secs.map(Duration::from_secs_f64)
    }

    pub(super) fn validate(&self, whose: &str) -> Result<(), ConfigError> {
        let bad = |what: &str| ConfigError::Invalid(format!("{whose}: {what} must be at least 1"));
        if self.max_visitors == Some(0) {
            return Err(bad("max_visitors"));
        }
        if self.conn_rate_per_ip == Some(0) {
            return Err(bad("conn_rate_per_ip"));
        }
        if self.max_agents == Some(0) {
            return Err(bad("max_agents"));
        }
        if let Some(t) = self.idle_timeout_secs {
            positive_secs(t, &format!("{whose}: idle_timeout_secs"))?;
        }
        Ok(())
    }
}

pub(super) fn positive_secs(v: f64, what: &str) -> Result<Duration, ConfigError> {
    if v.is_finite() && v > 0.0 && v < 1e9 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(ConfigError::Invalid(format!(
            "{what} must be a positive number of seconds"
        )))
    }
}
