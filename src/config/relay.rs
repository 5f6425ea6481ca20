//! `relay.toml` and the relay's settings after merging flags, file and defaults.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::validate_name;
use super::{
    AccessFile, BackendKind, ConfigError, FrontConfig, Heartbeat, Limits, PortRange, Secret, Toggle,
};

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
    /// Seconds a stopping relay waits for visitors in flight.
    pub drain_timeout_secs: Option<u64>,
    /// Log filter (`--log` and `RINGTUNNEL_LOG` win over it); a reload changes it.
    pub log: Option<String>,
    /// One log line per visitor (target `access`); a reload changes it.
    pub access_log: Option<bool>,
    /// Shared HTTP port for `http` services.
    pub http: Option<SocketAddr>,
    /// Shared TLS (SNI passthrough) port for `tls` services.
    pub tls: Option<SocketAddr>,
    /// The shared TLS port, also terminating HTTPS for `http` services with certificates
    /// from an ACME CA (instead of `tls`, or the same address).
    pub https: Option<SocketAddr>,
    /// ACME directory URL (default: Let's Encrypt).
    pub acme_directory: Option<String>,
    /// Contact address for the ACME account.
    pub acme_email: Option<String>,
    /// Extra root (PEM) for the ACME directory's own certificate (a private or test CA).
    pub acme_ca_file: Option<PathBuf>,
    /// `http-01` (default with `http`) or `tls-alpn-01` (default without).
    pub acme_challenge: Option<String>,
    /// Domain that bare `http`/`tls` host names are subdomains of.
    pub domain: Option<String>,
    /// Fleet registry: `etcd://HOST:PORT[,HOST:PORT...]` (none: this relay alone).
    pub registry: Option<String>,
    /// This relay's name in the fleet (default: the host name).
    pub relay_id: Option<String>,
    /// Where agents reach this relay's control port, as the fleet records it.
    pub advertise: Option<String>,
    /// Key prefix in etcd (default `/ringtunnel/`).
    pub registry_prefix: Option<String>,
    /// Lease time of fleet claims, in seconds (default 10).
    pub registry_ttl_secs: Option<u64>,
    /// Extra CA (PEM) for an `etcds://` registry's certificate.
    pub registry_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an etcd that asks for one.
    pub registry_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub registry_key: Option<PathBuf>,
    /// etcd user, when etcd's authentication is on.
    pub registry_user: Option<String>,
    /// That user's password.
    pub registry_password: Option<Secret>,
    /// Shared ports: largest request head read, in bytes (larger: 431).
    pub max_head_bytes: Option<usize>,
    /// Shared ports: seconds a visitor has to send its request head or ClientHello.
    pub head_timeout_secs: Option<f64>,
    /// Shared HTTP port: seconds a visitor waits for an offline agent before 502.
    pub agent_wait_secs: Option<f64>,
    /// Shared HTTP port: address blocks (a load balancer in front) whose `X-Forwarded-For`
    /// and `Forwarded` chains are kept; everyone else's are replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<super::Cidr>,
    /// Limits for every service (each `[[service]]` may override them).
    #[serde(default)]
    pub limits: Limits,
    /// Address allow and deny lists for every service (`[access]`; each `[[service]]` may
    /// add its own in `[service.access]`, with basic auth for `http` services).
    #[serde(default)]
    pub access: AccessFile,
    /// Per-service secrets and limits.
    #[serde(default, rename = "service")]
    pub services: Vec<RelayServiceFile>,
}

/// A `[[service]]` table in `relay.toml`: a service name with its own secret and/or limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayServiceFile {
    /// Service name.
    pub name: String,
    /// The only secret that may register this name (`None`: the relay's secret).
    pub secret: Option<Secret>,
    /// Host names reserved for this service (`http`/`tls`), whether it is online or not: no
    /// other service may claim them, nor any path under them, and no wildcard serves them.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Limits for this service, over the relay-wide `[limits]`.
    #[serde(default)]
    pub limits: Limits,
    /// Who may visit this service, over the relay-wide `[access]`.
    #[serde(default)]
    pub access: AccessFile,
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
    /// Relay-wide address lists (`[access]`; no basic auth at this level).
    pub access: AccessFile,
    /// Admin endpoint address (`None`: off).
    pub admin: Option<SocketAddr>,
    /// Bearer token the admin endpoint requires (`None`: none).
    pub admin_token: Option<Secret>,
    /// How long a stopping relay (SIGTERM, SIGINT) waits for visitors in flight before it
    /// cuts them.
    pub drain_timeout: std::time::Duration,
    /// Log filter from the config file (the command line's wins over it).
    pub log: Option<String>,
    /// Whether one access line per visitor is logged (target `access`).
    pub access_log: bool,
    /// HTTPS termination on the shared TLS port (`--https`), `None`: passthrough only.
    pub https: Option<HttpsConfig>,
    /// Membership of a fleet of relays (`--registry`), `None`: this relay alone.
    pub fleet: Option<super::FleetConfig>,
}

/// HTTPS at the relay: where certificates come from. The port is `front.tls`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpsConfig {
    /// ACME directory URL.
    pub directory: String,
    /// Contact address for the ACME account.
    pub email: Option<String>,
    /// Extra root (PEM) for the directory's own certificate.
    pub ca_file: Option<PathBuf>,
    /// The challenge answered.
    pub challenge: crate::acme::ChallengeKind,
}

impl HttpsConfig {
    /// Merges `--https` and the `acme_*` settings with the shared ports: returns the TLS
    /// port's address and the termination settings. `--https` is the TLS port (an equal
    /// `--tls` is allowed); HTTP-01 (the default with `--http`) needs `--http`, TLS-ALPN-01
    /// (the default without) is answered on the TLS port itself.
    pub fn from_parts(
        https: Option<SocketAddr>,
        tls: Option<SocketAddr>,
        http: Option<SocketAddr>,
        directory: Option<String>,
        email: Option<String>,
        ca_file: Option<PathBuf>,
        challenge: Option<String>,
    ) -> Result<(Option<SocketAddr>, Option<HttpsConfig>), ConfigError> {
        use crate::acme::ChallengeKind;
        let Some(addr) = https else {
            if directory.is_some() || email.is_some() || ca_file.is_some() || challenge.is_some() {
                return Err(ConfigError::Invalid(
                    "acme_directory, acme_email, acme_ca_file and acme_challenge need --https"
                        .into(),
                ));
            }
            return Ok((tls, None));
        };
        let challenge = match challenge.as_deref() {
            None if http.is_some() => ChallengeKind::Http01,
            None => ChallengeKind::TlsAlpn01,
            Some("http-01") => ChallengeKind::Http01,
            Some("tls-alpn-01") => ChallengeKind::TlsAlpn01,
            Some(other) => {
                return Err(ConfigError::Invalid(format!(
                    "acme_challenge {other:?}: http-01 or tls-alpn-01"
                )))
            }
        };
        if tls.is_some_and(|t| t != addr) {
            return Err(ConfigError::Invalid(format!(
                "--https {addr} is the shared TLS port, with HTTPS termination: drop --tls {}, or give both the same address",
                tls.map(|t| t.to_string()).unwrap_or_default()
            )));
        }
        if http.is_none() && challenge == ChallengeKind::Http01 {
            return Err(ConfigError::Invalid(
                "--acme-challenge http-01 needs --http: the ACME CA checks each host over plain HTTP on the shared HTTP port, which must be port 80 as the CA sees it (or use tls-alpn-01, answered on the --https port)".into(),
            ));
        }
        let directory = directory.unwrap_or_else(|| crate::acme::LETS_ENCRYPT.to_string());
        if !directory.starts_with("https://") {
            return Err(ConfigError::Invalid(format!(
                "acme_directory {directory:?} must be an https:// URL"
            )));
        }
        if let Some(e) = &email {
            if !e.contains('@') || e.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ConfigError::Invalid(format!(
                    "acme_email {e:?} is not an address"
                )));
            }
        }
        Ok((
            Some(addr),
            Some(HttpsConfig {
                directory,
                email,
                ca_file,
                challenge,
            }),
        ))
    }
}

/// Default for [`RelayConfig::drain_timeout`].
pub const DEFAULT_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Which secret authenticated a service: the relay's default one, or a service's own.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SecretId {
    /// The relay-wide secret.
    Default,
    /// The secret of the named `[[service]]`.
    Service(String),
}

impl RelayConfig {
    /// The `[[service]]` table for `name`. Service names compare without regard to case
    /// everywhere: `Billing` is `billing`, with its secret, limits and reservations.
    pub fn service_file(&self, name: &str) -> Option<&RelayServiceFile> {
        self.service_secrets
            .iter()
            .find(|s| s.name.eq_ignore_ascii_case(name))
    }

    /// The secret that authenticates service `name`, if any, and which one it is.
    pub fn secret_for(&self, name: &str) -> Option<(&Secret, SecretId)> {
        match self
            .service_file(name)
            .and_then(|s| Some((s, s.secret.as_ref()?)))
        {
            Some((file, own)) => Some((own, SecretId::Service(file.name.to_ascii_lowercase()))),
            None => self.secret.as_ref().map(|s| (s, SecretId::Default)),
        }
    }

    /// Every reserved host name (qualified with the relay's domain) and the service it is
    /// reserved for. Fails on a host that is not a plain name or is reserved twice.
    pub fn reservations(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let mut out: Vec<(String, String)> = Vec::new();
        for s in &self.service_secrets {
            for h in &s.hosts {
                if h.starts_with("*.") {
                    return Err(ConfigError::Invalid(format!(
                        "service {:?}: reserved host {h:?}: reservations are exact names, not wildcards",
                        s.name
                    )));
                }
                let q = self.front.qualify(h).map_err(|e| {
                    ConfigError::Invalid(format!("service {:?}: reserved host: {e}", s.name))
                })?;
                if let Some((_, other)) = out.iter().find(|(o, _)| *o == q) {
                    return Err(ConfigError::Invalid(format!(
                        "host {q} is reserved for both service {other:?} and service {:?}",
                        s.name
                    )));
                }
                out.push((q, s.name.clone()));
            }
        }
        Ok(out)
    }

    /// Limits for service `name`: its own `[service.limits]` over the relay-wide ones.
    pub fn limits_for(&self, name: &str) -> Limits {
        match self.service_file(name) {
            Some(s) => s.limits.over(&self.limits),
            None => self.limits.clone(),
        }
    }

    /// Who may visit service `name`: its own `[service.access]` over the relay-wide one.
    pub fn access_for(&self, name: &str) -> AccessFile {
        match self.service_file(name) {
            Some(s) => s.access.over(&self.access),
            None => self.access.clone(),
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
        if let Some(fleet) = &self.fleet {
            fleet.validate()?;
        }
        if let Some(filter) = &self.log {
            crate::logging::filter_for(filter, false)
                .map_err(|e| ConfigError::Invalid(format!("log: {e}")))?;
        }
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
            if !seen.insert(s.name.to_ascii_lowercase()) {
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
            s.access
                .validate(&format!("service {:?}: access", s.name))?;
        }
        self.limits.validate("[limits]")?;
        if self.access.basic_auth.is_some() {
            return Err(ConfigError::Invalid(
                "[access] takes address lists only: put basic_auth under the service it protects ([service.access.basic_auth])".into(),
            ));
        }
        self.reservations()?;
        // A service handed one of the relay's own ports would fail to bind, and the refusal
        // would name the wrong culprit.
        let own = [
            ("--control", Some(self.control)),
            ("--http", self.front.http),
            ("--tls", self.front.tls),
            ("--admin", self.admin),
        ];
        for (flag, addr) in own {
            if let Some(a) = addr.filter(|a| a.port() != 0 && self.port_range.contains(a.port())) {
                return Err(ConfigError::Invalid(format!(
                    "port_range {} contains the {flag} port {}: move one of them",
                    self.port_range,
                    a.port()
                )));
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    type Parts = (Option<SocketAddr>, Option<HttpsConfig>);

    /// `from_parts` with `--https`, `--tls`, `--http` and one ACME setting at a time.
    fn parts(
        https: &str,
        tls: &str,
        http: &str,
        set: Option<(&str, &str)>,
    ) -> Result<Parts, ConfigError> {
        let a = |s: &str| (!s.is_empty()).then(|| s.parse().unwrap());
        let pick = |key: &str| set.filter(|(k, _)| *k == key).map(|(_, v)| v.to_string());
        HttpsConfig::from_parts(
            a(https),
            a(tls),
            a(http),
            pick("directory"),
            pick("email"),
            None,
            pick("challenge"),
        )
    }

    #[test]
    fn https_is_the_tls_port_with_termination_and_picks_its_challenge() {
        use crate::acme::ChallengeKind;
        let (tls, https) = parts(
            "0.0.0.0:443",
            "",
            "0.0.0.0:80",
            Some(("email", "ops@example.com")),
        )
        .unwrap();
        assert_eq!(tls, addr("0.0.0.0:443"));
        let https = https.unwrap();
        assert_eq!(https.directory, crate::acme::LETS_ENCRYPT);
        assert_eq!(https.challenge, ChallengeKind::Http01);
        // Without --http: TLS-ALPN-01 on the TLS port.
        let (_, https) = parts("0.0.0.0:443", "", "", None).unwrap();
        assert_eq!(https.unwrap().challenge, ChallengeKind::TlsAlpn01);
        let (_, https) = parts(
            "0.0.0.0:443",
            "",
            "0.0.0.0:80",
            Some(("challenge", "tls-alpn-01")),
        )
        .unwrap();
        assert_eq!(https.unwrap().challenge, ChallengeKind::TlsAlpn01);
        // The same address given to both is fine; two different ones are not.
        assert!(parts("0.0.0.0:443", "0.0.0.0:443", "0.0.0.0:80", None).is_ok());
        let cases = [
            (
                "0.0.0.0:443",
                "0.0.0.0:8443",
                "0.0.0.0:80",
                None,
                "drop --tls",
            ),
            (
                "0.0.0.0:443",
                "",
                "",
                Some(("challenge", "http-01")),
                "http-01 needs --http",
            ),
            (
                "0.0.0.0:443",
                "",
                "",
                Some(("challenge", "dns-01")),
                "http-01 or tls-alpn-01",
            ),
            (
                "0.0.0.0:443",
                "",
                "0.0.0.0:80",
                Some(("directory", "http://ca/dir")),
                "https:// URL",
            ),
            (
                "0.0.0.0:443",
                "",
                "0.0.0.0:80",
                Some(("email", "not an address")),
                "not an address",
            ),
            (
                "",
                "0.0.0.0:443",
                "0.0.0.0:80",
                Some(("directory", "https://ca/dir")),
                "need --https",
            ),
        ];
        for (https, tls, http, set, want) in cases {
            let e = parts(https, tls, http, set).unwrap_err();
            assert!(e.to_string().contains(want), "{e} lacks {want:?}");
        }
        // Without --https: passthrough only, the TLS port as given.
        let (tls, https) = parts("", "0.0.0.0:443", "", None).unwrap();
        assert_eq!((tls, https), (addr("0.0.0.0:443"), None));
    }
}
