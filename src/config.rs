//! Relay and agent configuration: the TOML file formats (unknown keys rejected), the merged
//! settings the rest of the crate runs on, and `validate()` for both.
//!
//! Command-line flags override the file; the file overrides built-in defaults.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::http::DEFAULT_MAX_HEAD;
use crate::protocol::msg::{
    ServiceKind, MAX_HOSTS_PER_SERVICE, MAX_HOST_LEN, MAX_NAME_LEN, MAX_SERVICES_PER_AGENT,
};
use crate::protocol::proxy::ProxyVersion;
use crate::protocol::MAX_FRAME_LEN;
use crate::tls::Fingerprint;

/// Default control port of the relay.
pub const DEFAULT_CONTROL_PORT: u16 = 7843;
/// Default number of idle data connections an agent keeps per service.
pub const DEFAULT_POOL: u8 = 4;
/// Largest pool an agent may ask for per service.
pub const MAX_POOL: u8 = 64;

/// A shared secret. `Debug` prints `***` and there is no `Display`, so it never lands in a
/// log by accident; [`Secret::expose`] is the one way to its bytes.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret string.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret's bytes, for HMAC keys only.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// A configuration that cannot work, with the reason in one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this format.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the bad key or value).
        message: String,
    },
    /// A setting is missing or out of range.
    #[error("{0}")]
    Invalid(String),
}

/// Inclusive range of public ports the relay may hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// Lowest allowed port.
    pub start: u16,
    /// Highest allowed port.
    pub end: u16,
}

impl PortRange {
    /// Whether `port` is inside the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
    /// Number of ports in the range.
    pub fn len(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }
    /// Never true: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            start: 20000,
            end: 29999,
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || format!("invalid port range {s:?}: expected START-END, e.g. 20000-29999");
        let (a, b) = s.split_once('-').ok_or_else(err)?;
        let start: u16 = a.trim().parse().map_err(|_| err())?;
        let end: u16 = b.trim().parse().map_err(|_| err())?;
        if start == 0 || start > end {
            return Err(err());
        }
        Ok(PortRange { start, end })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which data-plane implementation forwards visitor bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Pick the best backend this machine supports, and log why.
    #[default]
    Auto,
    /// Multi-threaded tokio with buffered copies: portable, the baseline.
    Tokio,
    /// Pinned io_uring workers that splice (needs io_uring, and plain or kTLS data connections).
    Uring,
}

/// On/off switch used by flags like `--data-tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Toggle {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl Toggle {
    /// `true` for [`Toggle::On`].
    pub fn enabled(self) -> bool {
        self == Toggle::On
    }
}

/// Heartbeat timing on control connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Send a heartbeat after this long without sending anything.
    pub interval: Duration,
    /// Drop the peer after this long without hearing anything.
    pub timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
        }
    }
}

impl Heartbeat {
    /// Timing from optional seconds (defaults where missing), checking interval < timeout.
    pub fn from_secs(interval: Option<u64>, timeout: Option<u64>) -> Result<Self, ConfigError> {
        let d = Heartbeat::default();
        let hb = Heartbeat {
            interval: interval.map(Duration::from_secs).unwrap_or(d.interval),
            timeout: timeout.map(Duration::from_secs).unwrap_or(d.timeout),
        };
        if hb.interval.is_zero() || hb.timeout <= hb.interval {
            return Err(ConfigError::Invalid(
                "heartbeat_timeout_secs must be greater than heartbeat_interval_secs (> 0)".into(),
            ));
        }
        Ok(hb)
    }
}

// ---------------------------------------------------------------- relay

/// `relay.toml`. Every key is optional; unknown keys are an error.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayFile {
    /// Control listen address.
    pub control: Option<SocketAddr>,
    /// Default secret for services without their own.
    pub secret: Option<Secret>,
    /// Address public service ports bind to.
    pub bind_addr: Option<std::net::IpAddr>,
    /// Public ports the relay may hand out.
    pub port_range: Option<PortRange>,
    /// TLS on data connections.
    pub data_tls: Option<Toggle>,
    /// Where the self-signed certificate is kept.
    pub state_dir: Option<PathBuf>,
    /// PEM certificate chain (CA-signed), with `key`.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// Data-plane backend.
    pub backend: Option<BackendKind>,
    /// Data-plane worker threads.
    pub workers: Option<usize>,
    /// Seconds between heartbeats.
    pub heartbeat_interval_secs: Option<u64>,
    /// Seconds of silence before an agent is dropped.
    pub heartbeat_timeout_secs: Option<u64>,
    /// Admin endpoint (`/health`, `/metrics`).
    pub admin: Option<SocketAddr>,
    /// Bearer token the admin endpoint requires.
    pub admin_token: Option<Secret>,
    /// Shared HTTP port for `http` services.
    pub http: Option<SocketAddr>,
    /// Shared TLS (SNI passthrough) port for `tls` services.
    pub tls: Option<SocketAddr>,
    /// Domain that bare `http`/`tls` host names are subdomains of.
    pub domain: Option<String>,
    /// Shared ports: largest request head read, in bytes (larger: 431).
    pub max_head_bytes: Option<usize>,
    /// Shared ports: seconds a visitor has to send its request head or ClientHello.
    pub head_timeout_secs: Option<f64>,
    /// Shared HTTP port: seconds a visitor waits for an offline agent before 502.
    pub agent_wait_secs: Option<f64>,
    /// Limits for every service (each `[[service]]` may override them).
    #[serde(default)]
    pub limits: Limits,
    /// Per-service secrets and limits.
    #[serde(default, rename = "service")]
    pub services: Vec<RelayServiceFile>,
}

/// A `[[service]]` table in `relay.toml`: a service name with its own secret and/or limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayServiceFile {
    /// Service name.
    pub name: String,
    /// The only secret that may register this name (`None`: the relay's secret).
    pub secret: Option<Secret>,
    /// Limits for this service, over the relay-wide `[limits]`.
    #[serde(default)]
    pub limits: Limits,
}

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

    fn validate(&self, whose: &str) -> Result<(), ConfigError> {
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

fn positive_secs(v: f64, what: &str) -> Result<Duration, ConfigError> {
    if v.is_finite() && v > 0.0 && v < 1e9 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(ConfigError::Invalid(format!(
            "{what} must be a positive number of seconds"
        )))
    }
}

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
fn claimable_host(name: &str) -> Option<String> {
    crate::protocol::http::normalize_host(name.as_bytes())
        .filter(|n| !n.starts_with('[') && n.len() == name.trim_end_matches('.').len())
}

/// Everything the relay runs on, after merging flags, file and defaults.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Control listen address (agents' control and data connections).
    pub control: SocketAddr,
    /// Default secret; `None` means only services with their own secret may register.
    pub secret: Option<Secret>,
    /// Per-service secrets, overriding `secret` for that name.
    pub service_secrets: Vec<RelayServiceFile>,
    /// Address public service ports bind to.
    pub bind_addr: std::net::IpAddr,
    /// Public ports the relay may hand out.
    pub port_range: PortRange,
    /// Whether data connections must be TLS.
    pub data_tls: bool,
    /// Where the self-signed certificate is kept.
    pub state_dir: PathBuf,
    /// CA-signed certificate and key files, instead of the self-signed one.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Data-plane backend.
    pub backend: BackendKind,
    /// Data-plane worker threads (`None`: one per core).
    pub workers: Option<usize>,
    /// Heartbeat timing.
    pub heartbeat: Heartbeat,
    /// Shared HTTP/TLS ports.
    pub front: FrontConfig,
    /// Relay-wide limits.
    pub limits: Limits,
    /// Admin endpoint address (`None`: off).
    pub admin: Option<SocketAddr>,
    /// Bearer token the admin endpoint requires (`None`: none).
    pub admin_token: Option<Secret>,
}

/// Which secret authenticated a service: the relay's default one, or a service's own.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SecretId {
    /// The relay-wide secret.
    Default,
    /// The secret of the named `[[service]]`.
    Service(String),
}

impl RelayConfig {
    /// The secret that authenticates service `name`, if any, and which one it is.
    pub fn secret_for(&self, name: &str) -> Option<(&Secret, SecretId)> {
        let own = self
            .service_secrets
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.secret.as_ref());
        match own {
            Some(s) => Some((s, SecretId::Service(name.to_string()))),
            None => self.secret.as_ref().map(|s| (s, SecretId::Default)),
        }
    }

    /// Limits for service `name`: its own `[service.limits]` over the relay-wide ones.
    pub fn limits_for(&self, name: &str) -> Limits {
        match self.service_secrets.iter().find(|s| s.name == name) {
            Some(s) => s.limits.over(&self.limits),
            None => self.limits.clone(),
        }
    }

    /// Most agents that may hold sessions with secret `id` at once.
    pub fn max_agents(&self, id: &SecretId) -> Option<usize> {
        match id {
            SecretId::Default => self.limits.max_agents,
            SecretId::Service(name) => self.limits_for(name).max_agents,
        }
    }

    /// Checks the settings make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.secret.is_none() && self.service_secrets.iter().all(|s| s.secret.is_none()) {
            return Err(ConfigError::Invalid(
                "no secret configured: pass --secret (or RINGTUNNEL_SECRET), or give services their own secret in the config file".into(),
            ));
        }
        if self.secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
            return Err(ConfigError::Invalid("the secret must not be empty".into()));
        }
        let mut seen = HashSet::new();
        for s in &self.service_secrets {
            validate_name(&s.name)?;
            if !seen.insert(&s.name) {
                return Err(ConfigError::Invalid(format!(
                    "service {:?} appears twice in the relay config",
                    s.name
                )));
            }
            if s.secret.as_ref().is_some_and(|x| x.expose().is_empty()) {
                return Err(ConfigError::Invalid(format!(
                    "service {:?} has an empty secret",
                    s.name
                )));
            }
            s.limits.validate(&format!("service {:?}", s.name))?;
        }
        self.limits.validate("[limits]")?;
        if self.workers == Some(0) {
            return Err(ConfigError::Invalid("--workers must be at least 1".into()));
        }
        if self
            .admin_token
            .as_ref()
            .is_some_and(|t| t.expose().is_empty())
        {
            return Err(ConfigError::Invalid(
                "the admin token must not be empty".into(),
            ));
        }
        if self
            .admin
            .is_some_and(|a| !a.ip().is_loopback() && self.admin_token.is_none())
        {
            return Err(ConfigError::Invalid(
                "the admin endpoint listens beyond loopback: set an admin token (--admin-token or RINGTUNNEL_ADMIN_TOKEN)".into(),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- agent

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
    /// Data-plane backend.
    pub backend: Option<BackendKind>,
    /// io_uring worker threads (default: one per core).
    pub workers: Option<usize>,
    /// Seconds between heartbeats.
    pub heartbeat_interval_secs: Option<u64>,
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
            ServiceKind::Tcp => {
                if !self.hosts.is_empty() || self.path.is_some() {
                    return bad("hosts and path are for http and tls services".into());
                }
            }
            ServiceKind::Http | ServiceKind::Tls => {
                if self.remote_port.is_some() {
                    return bad(format!(
                        "remote_port is for tcp services, not {}",
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
            if !p.starts_with('/')
                || p.len() > MAX_HOST_LEN
                || p.bytes()
                    .any(|b| !b.is_ascii_graphic() || b == b'?' || b == b'#')
            {
                return bad(format!(
                    "path prefix {p:?} must start with '/' and hold no spaces, '?' or '#'"
                ));
            }
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
        self.name.len() + 2 + strings + self.path.as_deref().map_or(0, str::len) + 2 + 40
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
    /// Services to publish.
    pub services: Vec<ServiceConfig>,
    /// Data-plane backend.
    pub backend: BackendKind,
    /// io_uring worker threads (`None`: one per core).
    pub workers: Option<usize>,
    /// Heartbeat timing.
    pub heartbeat: Heartbeat,
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
            if !names.insert(&s.name) {
                return Err(ConfigError::Invalid(format!(
                    "service name {:?} is used twice",
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

/// Service names are short and plain, so they are safe in logs, host names and URLs.
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "invalid service name {name:?}: use 1-{MAX_NAME_LEN} letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Splits `HOST:PORT` (or `[V6]:PORT`); the port is required.
pub fn split_host_port(s: &str) -> Result<(String, u16), String> {
    parse_host_port(s, None)
}

/// Splits `HOST[:PORT]`, using `default_port` when the port is missing.
pub fn parse_host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let bad = || format!("invalid address {s:?}: expected HOST:PORT");
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(bad()),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => (s, None), // bare IPv6 address
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        None => default_port.ok_or_else(bad)?,
    };
    Ok((host.to_string(), port))
}

/// Reads and parses a TOML config file.
pub fn load_file<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text).map_err(|message| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    })
}

/// Parses TOML text into a config file type; the error names the offending key.
pub fn parse_toml<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))
}

/// Default state directory: `$XDG_STATE_HOME/ringtunnel`, else `~/.local/state/ringtunnel`,
/// else `./ringtunnel-state`.
pub fn default_state_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("ringtunnel");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h).join(".local/state/ringtunnel");
    }
    PathBuf::from("ringtunnel-state")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            parse_host_port("a.example:1", None).unwrap(),
            ("a.example".into(), 1)
        );
        assert_eq!(
            parse_host_port("a.example", Some(7843)).unwrap(),
            ("a.example".into(), 7843)
        );
        assert_eq!(parse_host_port("[::1]:9", None).unwrap(), ("::1".into(), 9));
        assert_eq!(parse_host_port("::1", Some(5)).unwrap(), ("::1".into(), 5));
        assert!(parse_host_port("a.example", None).is_err());
        assert!(parse_host_port("a:0", None).is_err());
        assert!(parse_host_port(":80", None).is_err());
        assert!(parse_host_port("a:x", None).is_err());
    }

    #[test]
    fn port_range_parses_and_rejects() {
        assert_eq!(
            "10-20".parse::<PortRange>().unwrap(),
            PortRange { start: 10, end: 20 }
        );
        for bad in ["", "10", "20-10", "0-5", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_is_masked() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "***");
        let f: RelayFile = parse_toml("secret = \"hunter2\"").unwrap();
        assert!(!format!("{f:?}").contains("hunter2"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = parse_toml::<RelayFile>("contorl = \"0.0.0.0:1\"").unwrap_err();
        assert!(e.contains("contorl"), "{e}");
        let e =
            parse_toml::<AgentFile>("[[service]]\nname=\"a\"\nlocal=\"x:1\"\nport=3").unwrap_err();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("web-1.prod_x").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
