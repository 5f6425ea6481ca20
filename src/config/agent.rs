//! `agent.toml`, one published service, and the agent's settings after merging flags, file
//! and defaults.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;

use super::hosts::claimable_host;
use super::{
    split_host_port, validate_name, BackendKind, ConfigError, Heartbeat, Secret, DEFAULT_POOL,
    MAX_POOL,
};
use crate::protocol::http::normalize_prefix;
use crate::protocol::http_proxy::ProxyUrl;
use crate::protocol::msg::{
    ServiceKind, MAX_HOSTS_PER_SERVICE, MAX_HOST_LEN, MAX_SERVICES_PER_AGENT,
};
use crate::protocol::proxy::ProxyVersion;
use crate::protocol::MAX_FRAME_LEN;
use crate::tls::Fingerprint;

/// `agent.toml`. Every key is optional; unknown keys are an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// Relay address, `HOST[:PORT]`.
    pub relay: Option<String>,
    /// Default secret for services without their own.
    pub secret: Option<Secret>,
    /// Pinned SHA-256 fingerprint of the relay certificate.
    pub relay_fingerprint: Option<String>,
    /// Extra CA certificates (PEM) to trust for the relay.
    pub ca: Option<PathBuf>,
    /// HTTP proxy to reach the relay through (`http://[USER:PASSWORD@]HOST[:PORT]`).
    pub proxy: Option<String>,
    /// Data-plane backend.
    pub backend: Option<BackendKind>,
    /// io_uring worker threads (default: one per core).
    pub workers: Option<usize>,
    /// Seconds between heartbeats.
    pub heartbeat_interval_secs: Option<u64>,
    /// Seconds a stopping agent lets the visitors it serves finish.
    pub drain_timeout_secs: Option<u64>,
    /// Seconds of silence before the relay is considered gone.
    pub heartbeat_timeout_secs: Option<u64>,
    /// Services to publish.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// One service the agent publishes (`[[service]]` in `agent.toml`, or the `--local` flags).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name on the relay.
    pub name: String,
    /// Local address of the service, `HOST:PORT`.
    pub local: String,
    /// How visitors reach it: `tcp` (its own port), `http` (shared port, by host name) or
    /// `tls` (shared port, by SNI).
    #[serde(default)]
    pub kind: ServiceKind,
    /// `tcp`: public port wanted (`None`: the relay picks one from its range).
    pub remote_port: Option<u16>,
    /// `http`/`tls`: host names to claim; a name without a dot is a subdomain of the relay's
    /// domain.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// `http`: path prefix to claim on those hosts (default `/`).
    pub path: Option<String>,
    /// `tcp`/`tls`: PROXY protocol header in front of each visitor (`off`, `v1`, `v2`).
    #[serde(default)]
    pub proxy_protocol: ProxyVersion,
    /// `http`: add `X-Forwarded-For`, `X-Forwarded-Proto` and `Forwarded` (default true).
    #[serde(default = "default_true")]
    pub forwarded_headers: bool,
    /// Secret for this service (`None`: the agent's secret).
    pub secret: Option<Secret>,
    /// Idle data connections kept open for this service.
    #[serde(default = "default_pool")]
    pub pool: u8,
    /// Serve the service together with the other agents naming this group (each relay
    /// spreads its visitors over them, fewest visitors first) instead of taking it over
    /// from them. `None`: the last agent to register takes the service over.
    #[serde(default)]
    pub group: Option<String>,
}

fn default_true() -> bool {
    true
}

impl ServiceConfig {
    /// A `tcp` service with defaults: what `--local` alone publishes.
    pub fn tcp(name: impl Into<String>, local: impl Into<String>) -> Self {
        ServiceConfig {
            name: name.into(),
            local: local.into(),
            kind: ServiceKind::Tcp,
            remote_port: None,
            hosts: Vec::new(),
            path: None,
            proxy_protocol: ProxyVersion::Off,
            forwarded_headers: true,
            secret: None,
            pool: DEFAULT_POOL,
            group: None,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| {
            Err(ConfigError::Invalid(format!(
                "service {:?}: {m}",
                self.name
            )))
        };
        match self.kind {
            ServiceKind::Tcp | ServiceKind::Udp => {
                if !self.hosts.is_empty() || self.path.is_some() {
                    return bad("hosts and path are for http and tls services".into());
                }
            }
            ServiceKind::Http | ServiceKind::Tls => {
                if self.remote_port.is_some() {
                    return bad(format!(
                        "remote_port is for tcp and udp services, not {}",
                        self.kind
                    ));
                }
                if self.hosts.is_empty() {
                    return bad(format!(
                        "a {} service needs at least one host name",
                        self.kind
                    ));
                }
                if self.hosts.len() > MAX_HOSTS_PER_SERVICE {
                    return bad(format!("at most {MAX_HOSTS_PER_SERVICE} host names"));
                }
                for h in &self.hosts {
                    let name = h.strip_prefix("*.").unwrap_or(h);
                    let ok = h.len() <= MAX_HOST_LEN && claimable_host(name).is_some();
                    if !ok {
                        return bad(format!("invalid host name {h:?}"));
                    }
                }
            }
        }
        if let Some(p) = &self.path {
            if self.kind != ServiceKind::Http {
                return bad("path is for http services".into());
            }
            if p.len() > MAX_HOST_LEN {
                return bad(format!(
                    "path prefix {p:?} is longer than {MAX_HOST_LEN} bytes"
                ));
            }
            // The relay applies the same rule to what it receives.
            normalize_prefix(p)?;
        }
        if let Some(g) = &self.group {
            if super::validate_name(g).is_err() {
                return bad(format!(
                    "invalid group name {g:?} (letters, digits, '-', '_' and '.', at most {} bytes)",
                    crate::protocol::msg::MAX_NAME_LEN
                ));
            }
        }
        if self.proxy_protocol != ProxyVersion::Off && self.kind == ServiceKind::Udp {
            return bad("proxy_protocol is for tcp and tls services".into());
        }
        if self.proxy_protocol != ProxyVersion::Off && self.kind == ServiceKind::Http {
            return bad(
                "proxy_protocol is for tcp and tls services; http services get X-Forwarded-For"
                    .into(),
            );
        }
        Ok(())
    }

    /// Bytes this service takes in the Register frame (an upper bound).
    fn wire_len(&self) -> usize {
        let strings: usize = self.hosts.iter().map(|h| h.len() + 2).sum();
        let group = self.group.as_deref().map_or(0, str::len) + 2;
        self.name.len() + 2 + strings + self.path.as_deref().map_or(0, str::len) + 2 + 40 + group
    }
}

fn default_pool() -> u8 {
    DEFAULT_POOL
}

/// Everything the agent runs on, after merging flags, file and defaults.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Relay host name or address.
    pub relay_host: String,
    /// Relay control port.
    pub relay_port: u16,
    /// Default secret.
    pub secret: Option<Secret>,
    /// Pinned relay certificate.
    pub relay_fingerprint: Option<Fingerprint>,
    /// Extra CA file.
    pub ca: Option<PathBuf>,
    /// HTTP proxy the relay is reached through (`None`: direct).
    pub proxy: Option<ProxyUrl>,
    /// Services to publish.
    pub services: Vec<ServiceConfig>,
    /// Data-plane backend.
    pub backend: BackendKind,
    /// io_uring worker threads (`None`: one per core).
    pub workers: Option<usize>,
    /// Heartbeat timing.
    pub heartbeat: Heartbeat,
    /// How long a stopping agent (SIGTERM, SIGINT) lets the visitors it serves finish.
    pub drain_timeout: std::time::Duration,
}

impl AgentConfig {
    /// The secret service `svc` authenticates with.
    pub fn secret_for<'a>(&'a self, svc: &'a ServiceConfig) -> Option<&'a Secret> {
        svc.secret.as_ref().or(self.secret.as_ref())
    }

    /// `HOST:PORT` of the relay control port, for dialing and display.
    pub fn relay_addr(&self) -> String {
        if self.relay_host.contains(':') {
            format!("[{}]:{}", self.relay_host, self.relay_port)
        } else {
            format!("{}:{}", self.relay_host, self.relay_port)
        }
    }

    /// The proxy to reach a relay at `relay_host` through: `--proxy` or the file's `proxy`,
    /// else `HTTPS_PROXY` (or `https_proxy`) from `env`, unless `NO_PROXY` (or `no_proxy`)
    /// exempts the relay's host. `env` looks up an environment variable.
    pub fn pick_proxy(
        given: Option<String>,
        relay_host: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<ProxyUrl>, ConfigError> {
        let nonempty = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let Some(url) = given
            .or_else(|| nonempty("HTTPS_PROXY"))
            .or_else(|| nonempty("https_proxy"))
        else {
            return Ok(None);
        };
        let no_proxy = nonempty("NO_PROXY").or_else(|| nonempty("no_proxy"));
        if no_proxy.is_some_and(|n| crate::protocol::http_proxy::bypassed(&n, relay_host)) {
            return Ok(None);
        }
        url.trim()
            .parse()
            .map(Some)
            .map_err(|e: crate::protocol::http_proxy::ProxyError| {
                ConfigError::Invalid(e.to_string())
            })
    }

    /// Checks the settings make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.services.is_empty() {
            return Err(ConfigError::Invalid(
                "no service to publish: pass --local HOST:PORT or add [[service]] tables to the config file".into(),
            ));
        }
        if self.workers == Some(0) {
            return Err(ConfigError::Invalid("--workers must be at least 1".into()));
        }
        if self.services.len() > MAX_SERVICES_PER_AGENT {
            return Err(ConfigError::Invalid(format!(
                "at most {MAX_SERVICES_PER_AGENT} services per agent"
            )));
        }
        let mut names = HashSet::new();
        for s in &self.services {
            validate_name(&s.name)?;
            if !names.insert(s.name.to_ascii_lowercase()) {
                return Err(ConfigError::Invalid(format!(
                    "service name {:?} is used twice (names ignore case)",
                    s.name
                )));
            }
            if self.secret_for(s).is_none_or(|x| x.expose().is_empty()) {
                return Err(ConfigError::Invalid(format!(
                    "service {:?} has no secret: pass --secret (or RINGTUNNEL_SECRET)",
                    s.name
                )));
            }
            if s.remote_port == Some(0) {
                return Err(ConfigError::Invalid(format!(
                    "service {:?}: remote_port 0 is not a port; leave it out to let the relay pick",
                    s.name
                )));
            }
            if s.pool == 0 || s.pool > MAX_POOL {
                return Err(ConfigError::Invalid(format!(
                    "service {:?}: pool must be between 1 and {MAX_POOL}",
                    s.name
                )));
            }
            split_host_port(&s.local).map_err(|e| {
                ConfigError::Invalid(format!("service {:?}: local address: {e}", s.name))
            })?;
            s.validate()?;
        }
        let total: usize = self.services.iter().map(ServiceConfig::wire_len).sum();
        if total + 16 > MAX_FRAME_LEN {
            return Err(ConfigError::Invalid(
                "too many services and host names for one registration; split them over two agents"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod proxy_tests {
    use super::*;

    fn pick(given: Option<&str>, env: &[(&str, &str)]) -> Result<Option<String>, ConfigError> {
        let lookup = |k: &str| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        AgentConfig::pick_proxy(given.map(str::to_string), "relay.example.com", lookup)
            .map(|p| p.map(|p| p.to_string()))
    }

    #[test]
    fn the_flag_then_https_proxy_unless_no_proxy_names_the_relay() {
        assert_eq!(pick(None, &[]).unwrap(), None);
        assert_eq!(
            pick(None, &[("https_proxy", "http://p:3128")])
                .unwrap()
                .as_deref(),
            Some("http://p:3128")
        );
        let env = [
            ("HTTPS_PROXY", "http://env:1"),
            ("https_proxy", "http://lower:1"),
        ];
        assert_eq!(pick(None, &env).unwrap().as_deref(), Some("http://env:1"));
        assert_eq!(
            pick(Some("http://flag:2"), &env).unwrap().as_deref(),
            Some("http://flag:2")
        );
        let exempt = [
            ("HTTPS_PROXY", "http://env:1"),
            ("NO_PROXY", ".example.com"),
        ];
        assert_eq!(pick(None, &exempt).unwrap(), None);
        assert_eq!(
            pick(None, &[("HTTPS_PROXY", "  ")]).unwrap(),
            None,
            "empty is unset"
        );
        let e = pick(Some("socks5://p:1"), &[]).unwrap_err().to_string();
        assert!(e.contains("only http://"), "{e}");
    }
}
