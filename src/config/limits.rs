//! Per-service admission limits (`[limits]` and `[service.limits]` in `relay.toml`).

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Per-service limits (`[limits]`, or `[service.limits]` for one service). `None`: not set
/// here (the relay's command line fills in [`Limits::public_defaults`]); `0`: no limit.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most visitors connected to the service at once; more are refused (HTTP: 503).
    pub max_visitors: Option<usize>,
    /// Most new connections per second from one visitor address (an IPv6 /64), as a token
    /// bucket: a burst of this many, then this many per second.
    pub conn_rate_per_ip: Option<u32>,
    /// Seconds without a byte either way after which a visitor connection is closed.
    pub idle_timeout_secs: Option<f64>,
    /// Most agent sessions at once authenticated with this service's secret (for the relay's
    /// default secret: the relay-wide value counts every agent using it).
    pub max_agents: Option<usize>,
    /// `udp` services: seconds without a datagram either way after which a visitor's flow
    /// ends (and its place and the agent's socket are freed).
    pub udp_flow_idle_secs: Option<f64>,
}

/// Default seconds a `udp` flow may sit silent: longer than the keep-alives of the usual
/// UDP protocols (WireGuard 25 s, QUIC 30 s, most games well under), as NAT gateways do.
pub const DEFAULT_UDP_FLOW_IDLE_SECS: f64 = 60.0;

/// Default most visitors at once per service: far above what one agent's link carries, low
/// enough that one service cannot take every descriptor of the relay.
pub const DEFAULT_MAX_VISITORS: usize = 10_000;

/// Default new connections per second per visitor address, per service: a browser opens
/// six per host; a busy NAT of users stays well under this.
pub const DEFAULT_CONN_RATE_PER_IP: u32 = 200;

/// Default seconds a visitor connection may sit silent both ways: an hour, so interactive
/// sessions (SSH, databases) left open survive a lunch break, and abandoned ones still go.
pub const DEFAULT_IDLE_TIMEOUT_SECS: f64 = 3600.0;

impl Limits {
    /// The limits a relay on a public address runs with unless its config says otherwise.
    pub fn public_defaults() -> Limits {
        Limits {
            max_visitors: Some(DEFAULT_MAX_VISITORS),
            conn_rate_per_ip: Some(DEFAULT_CONN_RATE_PER_IP),
            idle_timeout_secs: Some(DEFAULT_IDLE_TIMEOUT_SECS),
            max_agents: None,
            udp_flow_idle_secs: None,
        }
    }

    /// The visitor cap in force (`0` means none).
    pub fn visitor_cap(&self) -> Option<usize> {
        self.max_visitors.filter(|n| *n > 0)
    }

    /// The per-address connection rate in force (`0` means none).
    pub fn rate_cap(&self) -> Option<u32> {
        self.conn_rate_per_ip.filter(|n| *n > 0)
    }

    /// These limits with every unset field taken from `base`.
    pub fn over(&self, base: &Limits) -> Limits {
        Limits {
            max_visitors: self.max_visitors.or(base.max_visitors),
            conn_rate_per_ip: self.conn_rate_per_ip.or(base.conn_rate_per_ip),
            idle_timeout_secs: self.idle_timeout_secs.or(base.idle_timeout_secs),
            max_agents: self.max_agents.or(base.max_agents),
            udp_flow_idle_secs: self.udp_flow_idle_secs.or(base.udp_flow_idle_secs),
        }
    }

    /// The idle timeout as a duration (`0` means none).
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout_secs
            .filter(|t| *t > 0.0)
            .map(Duration::from_secs_f64)
    }

    /// How long a `udp` flow may sit silent.
    pub fn udp_flow_idle(&self) -> Duration {
        Duration::from_secs_f64(
            self.udp_flow_idle_secs
                .unwrap_or(DEFAULT_UDP_FLOW_IDLE_SECS),
        )
    }

    pub(super) fn validate(&self, whose: &str) -> Result<(), ConfigError> {
        if self.max_agents == Some(0) {
            return Err(ConfigError::Invalid(format!(
                "{whose}: max_agents must be at least 1"
            )));
        }
        if let Some(t) = self.idle_timeout_secs.filter(|t| *t != 0.0) {
            positive_secs(t, &format!("{whose}: idle_timeout_secs (0: none)"))?;
        }
        if let Some(t) = self.udp_flow_idle_secs {
            positive_secs(t, &format!("{whose}: udp_flow_idle_secs"))?;
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
