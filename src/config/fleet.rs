//! How a relay joins a fleet of relays sharing one namespace in etcd (`--registry`).

use std::time::Duration;

use super::{validate_name, ConfigError};

/// Default time a claim outlives the last relay that renews it, and a relay's own presence
/// outlives the relay.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Default key prefix: several fleets may share one etcd cluster under different prefixes.
pub const DEFAULT_PREFIX: &str = "/ringtunnel/";

/// How a relay joins a fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// `etcd://HOST:PORT[,HOST:PORT...]`.
    pub registry: String,
    /// This relay's name in the fleet (unique).
    pub relay_id: String,
    /// Where agents and other relays reach this relay's control port.
    pub advertise: String,
    /// Key prefix in etcd.
    pub prefix: String,
    /// Lease time of claims and of this relay's presence.
    pub ttl: Duration,
}

impl FleetConfig {
    /// Checks what can be checked without etcd.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.registry.starts_with("etcd://") || self.registry.len() <= "etcd://".len() {
            return Err(ConfigError::Invalid(format!(
                "registry {:?}: expected etcd://HOST:PORT[,HOST:PORT...]",
                self.registry
            )));
        }
        validate_name(&self.relay_id)
            .map_err(|e| ConfigError::Invalid(format!("relay id: {e}")))?;
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return Err(ConfigError::Invalid(format!(
                "registry prefix {:?} must start and end with /",
                self.prefix
            )));
        }
        if self.ttl < Duration::from_secs(2) || self.ttl > Duration::from_secs(300) {
            return Err(ConfigError::Invalid(
                "registry TTL must be 2 to 300 seconds".into(),
            ));
        }
        Ok(())
    }
}

/// This machine's host name, the default relay id.
pub fn host_name() -> Result<String, ConfigError> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if rc == 0 && !name.is_empty() => Ok(name.to_string()),
        _ => Err(ConfigError::Invalid(
            "no host name to name this relay by: pass --relay-id".into(),
        )),
    }
}
