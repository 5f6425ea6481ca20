//! The routing table of the shared ports: host name (and, for HTTP, path prefix) → service.
//! Read on every visitor of a shared port, written only when services come and go, so it
//! sits behind a read-write lock of its own, apart from the registry's mutex.
//!
//! A host that has a claim of its own is served by its claims only, for every path: a
//! wildcard never picks up the paths its claims leave out. A host reserved in the relay's
//! config is never served by a wildcard, whether its service is online or not.

use std::collections::HashMap;
use std::sync::Arc;

use super::service::Service;
use crate::protocol::http::{prefix_matches, wildcard_for};
use crate::protocol::ServiceKind;

/// Host → services, for both shared ports.
#[derive(Default)]
pub struct Routes {
    /// Per host: `(prefix, service)`, longest prefix first.
    http: HashMap<String, Vec<(String, Arc<Service>)>>,
    tls: HashMap<String, Arc<Service>>,
    /// Reserved host → the service it is reserved for.
    reserved: HashMap<String, String>,
}

impl Routes {
    /// An empty table with `reserved` hosts (host → service).
    pub fn new(reserved: Vec<(String, String)>) -> Self {
        Self {
            reserved: reserved.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Replaces the reserved hosts (a reload). Claims already made stay; the caller ends the
    /// sessions of services that claim a host now reserved for another.
    pub fn set_reserved(&mut self, reserved: Vec<(String, String)>) {
        self.reserved = reserved.into_iter().collect();
    }

    /// The claims that serve visitors of `host` now: the host's own, or if it has none and
    /// is not reserved, those of the wildcard one label up.
    fn http_claims(&self, host: &str) -> &[(String, Arc<Service>)] {
        if let Some(own) = self.http.get(host) {
            return own;
        }
        if self.reserved.contains_key(host) {
            return &[];
        }
        wildcard_for(host)
            .and_then(|w| self.http.get(&w))
            .map_or(&[], |v| v.as_slice())
    }

    /// The service for `host` + `path`: the longest matching prefix among the claims that
    /// serve the host (its own, else a wildcard's: `*.example.com` for `a.example.com`).
    pub fn http(&self, host: &str, path: &str) -> Option<Arc<Service>> {
        self.http_claims(host)
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .map(|(_, s)| s.clone())
    }

    /// The service for SNI name `host`: its own claim, else (unless it is reserved) a
    /// wildcard one label up.
    pub fn tls(&self, host: &str) -> Option<Arc<Service>> {
        match self.tls.get(host) {
            Some(s) => Some(s.clone()),
            None if self.reserved.contains_key(host) => None,
            None => self.tls.get(&wildcard_for(host)?).cloned(),
        }
    }

    /// The services that serve visitors of `host` now (any path): whose traffic a new claim
    /// of `host` would take.
    pub fn serving(&self, kind: ServiceKind, host: &str) -> Vec<Arc<Service>> {
        match kind {
            ServiceKind::Http => self
                .http_claims(host)
                .iter()
                .map(|(_, s)| s.clone())
                .collect(),
            ServiceKind::Tls => self.tls(host).into_iter().collect(),
            ServiceKind::Tcp | ServiceKind::Udp => Vec::new(),
        }
    }

    /// Whether the relay may terminate HTTPS for `host` and get it a certificate: an `http`
    /// service claims exactly this name (not through a wildcard), or it is reserved, and no
    /// `tls` service claims it (whose visitors pass through untouched).
    pub fn terminates(&self, host: &str) -> bool {
        !self.tls.contains_key(host)
            && (self.http.contains_key(host) || self.reserved.contains_key(host))
    }

    /// The exact (not wildcard) host names `http` services claim now.
    pub fn http_hosts(&self) -> Vec<String> {
        self.http
            .keys()
            .filter(|h| !h.starts_with("*."))
            .cloned()
            .collect()
    }

    /// The service `host` is reserved for, if any.
    pub fn reserved_for(&self, host: &str) -> Option<&str> {
        self.reserved.get(host).map(String::as_str)
    }

    /// Name of the service holding exactly `host` + `prefix`, if any.
    pub fn http_holder(&self, host: &str, prefix: &str) -> Option<&str> {
        self.http
            .get(host)?
            .iter()
            .find(|(p, _)| p == prefix)
            .map(|(_, s)| s.name.as_str())
    }

    /// Name of the service holding SNI name `host`, if any.
    pub fn tls_holder(&self, host: &str) -> Option<&str> {
        self.tls.get(host).map(|s| s.name.as_str())
    }

    /// Adds every claim of `svc` (whose claims were checked free).
    pub fn insert(&mut self, svc: &Arc<Service>) {
        for h in &svc.hosts {
            match svc.kind {
                ServiceKind::Http => {
                    let list = self.http.entry(h.clone()).or_default();
                    list.retain(|(p, _)| *p != svc.path);
                    list.push((svc.path.clone(), svc.clone()));
                    list.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
                }
                ServiceKind::Tls => {
                    self.tls.insert(h.clone(), svc.clone());
                }
                ServiceKind::Tcp | ServiceKind::Udp => {}
            }
        }
    }

    /// Removes every claim held by `svc` (this very service, not a successor of its name).
    pub fn remove(&mut self, svc: &Arc<Service>) {
        for h in &svc.hosts {
            if let Some(list) = self.http.get_mut(h) {
                list.retain(|(_, s)| !Arc::ptr_eq(s, svc));
                if list.is_empty() {
                    self.http.remove(h);
                }
            }
            if self.tls.get(h).is_some_and(|s| Arc::ptr_eq(s, svc)) {
                self.tls.remove(h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_exactly_one_label() {
        assert_eq!(
            wildcard_for("a.apps.example.com").as_deref(),
            Some("*.apps.example.com")
        );
        assert_eq!(wildcard_for("localhost"), None);
        // "*.apps.example.com" is what a.apps.example.com looks up, never a.b.apps.example.com.
        assert_ne!(
            wildcard_for("a.b.apps.example.com").as_deref(),
            Some("*.apps.example.com")
        );
    }
}
