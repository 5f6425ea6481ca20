//! What other relays of the fleet serve and this one does not: each such service (read from
//! etcd every round), and the table of their `http` and `tls` host names, where a visitor of
//! the shared ports goes when no service here claims its host. Hosts match as the relay's own
//! routes do: the host's own claims, else the wildcard one label up, and for `http` the
//! longest path prefix.

use std::collections::HashMap;
use std::sync::Arc;

use crate::protocol::http::{prefix_matches, wildcard_for};
use crate::protocol::ServiceKind;

/// A service of the fleet that other relays serve, as this relay sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elsewhere {
    /// `tcp` (handed over from its port here), `http` or `tls` (from the shared ports).
    pub kind: ServiceKind,
    /// `tcp`: its public port.
    pub port: u16,
    /// `http`/`tls`: the full host names it claims.
    pub hosts: Vec<String>,
    /// `http`: its path prefix.
    pub path: String,
    /// Where the relays with a session of its agent are reached (their `--advertise`).
    pub relays: Vec<String>,
}

/// A service served elsewhere, and the relays with an agent of it.
#[derive(Debug, PartialEq, Eq)]
pub struct Remote {
    /// The service's name (its secret proves the hand-over).
    pub service: String,
    /// The relays to hand its visitors to (their `--advertise`).
    pub relays: Vec<String>,
}

/// Host → services other relays serve.
#[derive(Debug, Default)]
pub struct RemoteHosts {
    /// Per host: `(prefix, service)`, longest prefix first.
    http: HashMap<String, Vec<(String, Arc<Remote>)>>,
    tls: HashMap<String, Arc<Remote>>,
}

impl RemoteHosts {
    /// The table for `elsewhere`'s `http` and `tls` services.
    pub fn new<'a>(elsewhere: impl Iterator<Item = (&'a String, &'a Elsewhere)>) -> Self {
        let mut t = Self::default();
        for (name, e) in elsewhere {
            let remote = Arc::new(Remote {
                service: name.clone(),
                relays: e.relays.clone(),
            });
            for host in &e.hosts {
                match e.kind {
                    ServiceKind::Http => {
                        let path = if e.path.is_empty() { "/" } else { &e.path };
                        let claims = t.http.entry(host.clone()).or_default();
                        claims.push((path.to_string(), remote.clone()));
                        claims.sort_by_key(|c| std::cmp::Reverse(c.0.len()));
                    }
                    ServiceKind::Tls => {
                        t.tls.insert(host.clone(), remote.clone());
                    }
                    ServiceKind::Tcp | ServiceKind::Udp => {}
                }
            }
        }
        t
    }

    /// The services in the table, sorted (for logs).
    pub fn services(&self) -> Vec<String> {
        let http = self.http.values().flatten().map(|(_, r)| &r.service);
        let mut names: Vec<String> = http
            .chain(self.tls.values().map(|r| &r.service))
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        names
    }

    fn http_claims(&self, host: &str) -> Option<&[(String, Arc<Remote>)]> {
        self.http
            .get(host)
            .or_else(|| self.http.get(&wildcard_for(host)?))
            .map(Vec::as_slice)
    }

    /// The service elsewhere for a plain HTTP request to `host` with `path`.
    pub fn http(&self, host: &str, path: &str) -> Option<Arc<Remote>> {
        self.http_claims(host)?
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .map(|(_, r)| r.clone())
    }

    /// The service elsewhere for a TLS visitor naming `host`: a `tls` service's, else one of
    /// the `http` services on that host (a relay that terminates HTTPS for them routes the
    /// requests by path itself; every path under a host belongs to one secret).
    pub fn tls(&self, host: &str) -> Option<Arc<Remote>> {
        let tls = self
            .tls
            .get(host)
            .or_else(|| self.tls.get(&wildcard_for(host)?));
        tls.cloned()
            .or_else(|| Some(self.http_claims(host)?.first()?.1.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(kind: ServiceKind, hosts: &[&str], path: &str, relay: &str) -> Elsewhere {
        Elsewhere {
            kind,
            port: 0,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            path: path.into(),
            relays: vec![relay.into()],
        }
    }

    #[test]
    fn hosts_match_as_the_relays_own_routes_do() {
        let services: HashMap<String, Elsewhere> = [
            (
                "blog",
                e(ServiceKind::Http, &["blog.example.com"], "", "r1"),
            ),
            (
                "api",
                e(ServiceKind::Http, &["blog.example.com"], "/api", "r2"),
            ),
            ("any", e(ServiceKind::Http, &["*.example.com"], "/", "r3")),
            (
                "vault",
                e(ServiceKind::Tls, &["vault.example.com"], "", "r4"),
            ),
            ("db", e(ServiceKind::Tcp, &[], "", "r5")),
        ]
        .into_iter()
        .map(|(n, e)| (n.to_string(), e))
        .collect();
        let t = RemoteHosts::new(services.iter());
        let name = |r: Option<Arc<Remote>>| r.map(|r| r.service.clone());
        assert_eq!(
            name(t.http("blog.example.com", "/api/x")),
            Some("api".into())
        );
        assert_eq!(
            name(t.http("blog.example.com", "/apix")),
            Some("blog".into())
        );
        assert_eq!(name(t.http("shop.example.com", "/")), Some("any".into()));
        assert_eq!(name(t.http("example.org", "/")), None);
        assert_eq!(name(t.tls("vault.example.com")), Some("vault".into()));
        assert_eq!(
            name(t.tls("blog.example.com")),
            Some("api".into()),
            "an http host's TLS visitor goes to a service of that host"
        );
        assert_eq!(name(t.tls("nothing.example.org")), None);
        assert!(RemoteHosts::new(std::iter::empty()).services().is_empty());
    }
}
