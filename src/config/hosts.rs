//! The shared HTTP and TLS ports' settings, and how a claimed host name becomes a full one.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
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
    /// Visitor addresses whose `X-Forwarded-For` and `Forwarded` chains are believed (a
    /// load balancer in front of the relay). Empty: nobody's.
    pub trusted_proxies: Vec<Cidr>,
}

/// An address block, `ADDR/BITS` (or a bare address: one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Whether `ip` is in the block (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An address block that is not `ADDR/BITS`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address block {0:?}: use ADDR/BITS, e.g. 10.0.0.0/8")]
pub struct BadCidr(pub String);

/// A host name that cannot be claimed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Not a plain DNS name (or a wildcard one label up).
    #[error("invalid host name {0:?}")]
    Invalid(String),
    /// A bare name, and no domain to put it under.
    #[error("host {0:?} has no dot and the relay has no --domain to put it under")]
    NoDomain(String),
}

impl FromStr for Cidr {
    type Err = BadCidr;
    fn from_str(s: &str) -> Result<Self, BadCidr> {
        let bad = || BadCidr(s.to_string());
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b.parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr { addr, bits })
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
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
            trusted_proxies: Vec::new(),
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
        trusted_proxies: Vec<Cidr>,
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
            trusted_proxies,
        })
    }

    /// Whether the forwarding headers of a visitor from `ip` are believed.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }

    /// The full host name for a claimed `host`: names without a dot are subdomains of
    /// `--domain`. Errors if the name is invalid, or bare with no domain configured.
    /// A claim may also be a wildcard, `*.NAME`: it covers every host one label below `NAME`
    /// (`*.apps` → `*.apps.DOMAIN`, matching `x.apps.DOMAIN` but not `apps.DOMAIN` or
    /// `a.b.apps.DOMAIN`), like a wildcard certificate.
    pub fn qualify(&self, host: &str) -> Result<String, HostError> {
        let (wild, name) = match host.strip_prefix("*.") {
            Some(rest) => ("*.", rest),
            None => ("", host),
        };
        let norm = claimable_host(name).ok_or_else(|| HostError::Invalid(host.to_string()))?;
        if norm.contains('.') {
            return Ok(format!("{wild}{norm}"));
        }
        match &self.domain {
            Some(d) => Ok(format!("{wild}{norm}.{d}")),
            None => Err(HostError::NoDomain(host.to_string())),
        }
    }
}

/// `name` as a claimable host name (lower case, no trailing dot), or `None` if it is not a
/// plain DNS name: no port, no address literal, no wildcard.
pub(super) fn claimable_host(name: &str) -> Option<String> {
    crate::protocol::http::normalize_host(name.as_bytes())
        .filter(|n| !n.starts_with('[') && n.len() == name.trim_end_matches('.').len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_blocks_parse_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.1".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        let one: Cidr = "2001:db8::7".parse().unwrap();
        assert!(one.contains("2001:db8::7".parse().unwrap()));
        assert!(!one.contains("2001:db8::8".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
