//! How a relay joins a fleet of relays sharing one namespace in etcd (`--registry`).

use std::path::PathBuf;
use std::time::Duration;

use super::{validate_name, ConfigError, Secret};

/// Default time a claim outlives the last relay that renews it, and a relay's own presence
/// outlives the relay.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Default key prefix: several fleets may share one etcd cluster under different prefixes.
pub const DEFAULT_PREFIX: &str = "/ringtunnel/";

/// How a relay joins a fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// `etcd://HOST:PORT[,HOST:PORT...]` (plain HTTP) or `etcds://...` (TLS).
    pub registry: String,
    /// This relay's name in the fleet (unique).
    pub relay_id: String,
    /// Where agents and other relays reach this relay's control port.
    pub advertise: String,
    /// Key prefix in etcd.
    pub prefix: String,
    /// Lease time of claims and of this relay's presence.
    pub ttl: Duration,
    /// How the relay proves itself to etcd and trusts it.
    pub access: RegistryAccess,
}

/// TLS and authentication toward etcd (`etcds://`, `--registry-ca`, ...). All empty: plain
/// HTTP, no user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryAccess {
    /// Extra CA certificates (PEM) etcd's certificate is checked against, beside the public
    /// roots (`etcds://` only).
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM chain) for an etcd that asks for one (`--client-cert-auth`).
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// etcd user (its authentication enabled), with `password`.
    pub user: Option<String>,
    /// The user's password (sent only over TLS).
    pub password: Option<Secret>,
}

impl FleetConfig {
    /// Checks what can be checked without etcd.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |why: &str| Err(ConfigError::Invalid(why.to_string()));
        let tls = match self.registry.split_once("://") {
            Some(("etcd", rest)) if !rest.is_empty() => false,
            Some(("etcds", rest)) if !rest.is_empty() => true,
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "registry {:?}: expected etcd://HOST:PORT[,HOST:PORT...] (or etcds:// for TLS)",
                    self.registry
                )))
            }
        };
        let a = &self.access;
        if !tls && (a.ca.is_some() || a.cert.is_some() || a.key.is_some()) {
            return bad("--registry-ca, --registry-cert and --registry-key are for an etcds:// registry (TLS)");
        }
        if a.cert.is_some() != a.key.is_some() {
            return bad("--registry-cert and --registry-key go together");
        }
        if a.user.is_some() != a.password.is_some() {
            return bad("--registry-user needs a password (RINGTUNNEL_REGISTRY_PASSWORD or --registry-password-file), and a password needs a user");
        }
        if a.user.is_some() && !tls {
            return bad("an etcd password is sent only over TLS: use an etcds:// registry");
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
