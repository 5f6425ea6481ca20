//! Relay and agent configuration: the TOML file formats (unknown keys rejected), the merged
//! settings the rest of the crate runs on, and `validate()` for both.
//!
//! Command-line flags override the file; the file overrides built-in defaults.
//!
//! - [`relay`]: `relay.toml` and the relay's merged settings ([`RelayConfig`]).
//! - [`agent`]: `agent.toml`, one published service ([`ServiceConfig`]) and the agent's
//!   merged settings ([`AgentConfig`]).
//! - [`limits`]: per-service admission limits.
//! - [`access`]: who may visit a service (address lists, basic auth).
//! - [`hosts`]: the shared ports' settings and how claimed host names are qualified.
//! - this file: what both sides share — [`Secret`], [`ConfigError`], ports, backends,
//!   heartbeats, names, `HOST:PORT` parsing, loading a file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::msg::MAX_NAME_LEN;

pub mod access;
pub mod agent;
pub mod fleet;
pub mod hosts;
pub mod limits;
pub mod live;
pub mod relay;

pub use access::{AccessFile, BasicAuthFile};
pub use agent::{AgentConfig, AgentFile, ServiceConfig};
pub use fleet::FleetConfig;
pub use hosts::{BadCidr, Cidr, FrontConfig, HostError};
pub use limits::Limits;
pub use live::{plan_reload, LiveConfig, ReloadPlan};
pub use relay::{
    HttpsConfig, RelayConfig, RelayFile, RelayServiceFile, SecretId, DEFAULT_DRAIN_TIMEOUT,
};

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

    /// Why this secret is easy to guess, if it is: shorter than [`MIN_SECRET_LEN`] bytes, or
    /// a placeholder from an example.
    pub fn weakness(&self) -> Option<String> {
        let lower = self.0.to_ascii_lowercase();
        if PLACEHOLDER_SECRETS.contains(&lower.as_str()) {
            return Some(format!("{:?} is a placeholder from an example", self.0));
        }
        (self.0.len() < MIN_SECRET_LEN).then(|| {
            format!(
                "it is {} bytes; use at least {MIN_SECRET_LEN} random ones (e.g. `openssl rand -hex 32`)",
                self.0.len()
            )
        })
    }

    /// Reads a secret from `path`: its first line, without surrounding whitespace. Keeps the
    /// secret out of `ps` and shell history (`--secret-file`).
    pub fn from_file(path: &Path) -> Result<Secret, ConfigError> {
        let text = read_text(path)?;
        let line = text.lines().next().unwrap_or("").trim();
        if line.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "secret file {} is empty",
                path.display()
            )));
        }
        Ok(Secret(line.to_string()))
    }
}

/// Secrets shorter than this many bytes are reported as weak.
pub const MIN_SECRET_LEN: usize = 16;

/// Secrets from examples and habits, reported as weak whatever their length.
const PLACEHOLDER_SECRETS: &[&str] = &[
    "change-me",
    "changeme",
    "change_me",
    "secret",
    "password",
    "example",
    "test",
    "ringtunnel",
    "your-secret",
    "your-secret-here",
];

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
    #[error("reading {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (part of the message, so it is printed once).
        error: std::io::Error,
    },
    /// The config file is not valid TOML for this format.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message: its first line names the line and column, the next ones
        /// show the line with the bad key or value marked (kept as the parser wrote them).
        message: String,
    },
    /// A setting is missing or out of range.
    #[error("{0}")]
    Invalid(String),
    /// An address is not `HOST:PORT`.
    #[error(transparent)]
    Address(#[from] BadAddress),
    /// A host name cannot be claimed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A path prefix is not one.
    #[error(transparent)]
    Prefix(#[from] crate::protocol::http::BadPrefix),
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
    /// Pinned io_uring workers that splice plain data connections and seal TLS ones' records in place where the kernel has no kTLS (needs io_uring).
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
    /// 5 s and 15 s, measured with `scripts/loadtest/heartbeat` over an rtwire link with 50 ms
    /// each way: at 10 % loss no session dropped in 5 minutes (nor with 10/30 or 3/9); at
    /// 25 % loss one dropped (10/30: none). Halving the old 10/30 halves the time a cut control
    /// connection goes unnoticed, and a session that drops anyway costs a reconnect: streams
    /// in flight outlive their control connection.
    fn default() -> Self {
        Heartbeat {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
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
                "--heartbeat-timeout (heartbeat_timeout_secs) must be greater than --heartbeat (heartbeat_interval_secs), which must be > 0".into(),
            ));
        }
        Ok(hb)
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

/// An address that is not `HOST:PORT` (or `[V6]:PORT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address {0:?}: expected HOST:PORT")]
pub struct BadAddress(pub String);

/// Splits `HOST:PORT` (or `[V6]:PORT`); the port is required.
pub fn split_host_port(s: &str) -> Result<(String, u16), BadAddress> {
    parse_host_port(s, None)
}

/// Splits `HOST[:PORT]`, using `default_port` when the port is missing.
pub fn parse_host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16), BadAddress> {
    let bad = || BadAddress(s.to_string());
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

/// Reads a text file the settings name (config, secret), the error naming the file.
fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// Reads and parses a TOML config file.
pub fn load_file<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = read_text(path)?;
    parse_toml(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })
}

/// Parses TOML text into a config file type; the error names the offending key.
pub fn parse_toml<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, toml::de::Error> {
    toml::from_str(text)
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
pub(crate) mod tests {
    use super::*;

    /// Settings for a relay on loopback in unit tests: tokio backend, plain data
    /// connections, shared ports under `example.test`.
    pub(crate) fn relay_config() -> RelayConfig {
        RelayConfig {
            control: "127.0.0.1:0".parse().unwrap(),
            secret: Some(Secret::new("unit-test-secret-long-enough")),
            service_secrets: Vec::new(),
            bind_addr: "127.0.0.1".parse().unwrap(),
            port_range: PortRange::default(),
            data_tls: false,
            state_dir: std::env::temp_dir(),
            cert: None,
            backend: BackendKind::Tokio,
            workers: None,
            heartbeat: Heartbeat::default(),
            front: FrontConfig {
                domain: Some("example.test".into()),
                ..Default::default()
            },
            limits: Limits::default(),
            access: AccessFile::default(),
            admin: None,
            admin_token: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            log: None,
            access_log: false,
            https: None,
            fleet: None,
        }
    }

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
        let e = parse_toml::<RelayFile>("contorl = \"0.0.0.0:1\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("contorl"), "{e}");
        let e = parse_toml::<AgentFile>("[[service]]\nname=\"a\"\nlocal=\"x:1\"\nport=3")
            .unwrap_err()
            .to_string();
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
