//! The shared HTTP and TLS ports' settings, and how a claimed host name becomes a full one.

use std::net::SocketAddr;
use std::time::Duration;

use super::limits::positive_secs;
use super::ConfigError;
use crate::protocol::http::DEFAULT_MAX_HEAD;

/// How the relay reads visitors on its shared HTTP and TLS ports.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontConfig {
    /// Shared HTTP port (`None`: no `http` services).
    pub http: Option<SocketAddr>,
    /// Shared TLS port (`None`: no `tls` services).
    pub tls: Option<SocketAddr>,
    /// Domain bare host names are subdomains of.
    pub domain: Option<String>,
    /// Largest request head or ClientHello read, in bytes.
    pub max_head: usize,
    /// Time a visitor has to send its head or ClientHello.
    pub head_timeout: Duration,
    /// Time a visitor waits for an offline agent to come back.
    pub agent_wait: Duration,
}

impl Default for FrontConfig {
    fn default() -> Self {
        FrontConfig {
            http: None,
            tls: None,
            domain: None,
            max_head: DEFAULT_MAX_HEAD,
            head_timeout: Duration::from_secs(10),
            agent_wait: Duration::from_secs(10),
        }
    }
}

impl FrontConfig {
    /// Merges file values over defaults, checking each.
    pub fn from_parts(
        http: Option<SocketAddr>,
        tls: Option<SocketAddr>,
        domain: Option<String>,
        max_head: Option<usize>,
        head_timeout_secs: Option<f64>,
        agent_wait_secs: Option<f64>,
    ) -> Result<Self, ConfigError> {
        let d = FrontConfig::default();
        let domain = match domain {
            Some(dm) => {
                let norm = crate::protocol::http::normalize_host(dm.as_bytes())
                    .filter(|n| !n.starts_with('['))
                    .ok_or_else(|| ConfigError::Invalid(format!("invalid --domain {dm:?}")))?;
                Some(norm)
            }
            None => None,
        };
        let max_head = max_head.unwrap_or(d.max_head);
        if !(256..=1 << 20).contains(&max_head) {
            return Err(ConfigError::Invalid(
                "max_head_bytes must be between 256 and 1048576".into(),
            ));
        }
        Ok(FrontConfig {
            http,
            tls,
            domain,
            max_head,
            head_timeout: match head_timeout_secs {
                Some(t) => positive_secs(t, "head_timeout_secs")?,
                None => d.head_timeout,
            },
            agent_wait: match agent_wait_secs {
                Some(t) => positive_secs(t, "agent_wait_secs")?,
                None => d.agent_wait,
            },
        })
    }

    /// The full host name for a claimed `host`: names without a dot are subdomains of
    /// `--domain`. Errors if the name is invalid, or bare with no domain configured.
    /// A claim may also be a wildcard, `*.NAME`: it covers every host one label below `NAME`
    /// (`*.apps` → `*.apps.DOMAIN`, matching `x.apps.DOMAIN` but not `apps.DOMAIN` or
    /// `a.b.apps.DOMAIN`), like a wildcard certificate.
    pub fn qualify(&self, host: &str) -> Result<String, String> {
        let (wild, name) = match host.strip_prefix("*.") {
            Some(rest) => ("*.", rest),
            None => ("", host),
        };
        let norm = claimable_host(name).ok_or_else(|| format!("invalid host name {host:?}"))?;
        if norm.contains('.') {
            return Ok(format!("{wild}{norm}"));
        }
        match &self.domain {
            Some(d) => Ok(format!("{wild}{norm}.{d}")),
            None => Err(format!(
                "host {host:?} has no dot and the relay has no --domain to put it under"
            )),
        }
    }
}

/// `name` as a claimable host name (lower case, no trailing dot), or `None` if it is not a
/// plain DNS name: no port, no address literal, no wildcard.
pub(super) fn claimable_host(name: &str) -> Option<String> {
    crate::protocol::http::normalize_host(name.as_bytes())
        .filter(|n| !n.starts_with('[') && n.len() == name.trim_end_matches('.').len())
}
