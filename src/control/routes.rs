//! The routing table of the shared ports: host name (and, for HTTP, path prefix) → service.
//! Read on every visitor of a shared port, written only when services come and go, so it
//! sits behind a read-write lock of its own, apart from the registry's mutex.

use std::collections::HashMap;
use std::sync::Arc;

use super::service::Service;
use crate::protocol::http::prefix_matches;

/// Host → services, for both shared ports.
#[derive(Default)]
pub struct Routes {
    /// Per host: `(prefix, service)`, longest prefix first.
    http: HashMap<String, Vec<(String, Arc<Service>)>>,
    tls: HashMap<String, Arc<Service>>,
}

/// The wildcard claim that would cover `host`: its first label replaced by `*`
/// (`a.example.com` → `*.example.com`); `None` for a single-label host.
pub fn wildcard_for(host: &str) -> Option<String> {
    let (_, parent) = host.split_once('.')?;
    Some(format!("*.{parent}"))
}

impl Routes {
    /// The service for `host` + `path`: the exact host's claims first (longest matching
    /// prefix), then a wildcard claim one label up (`*.example.com` for `a.example.com`).
    pub fn http(&self, host: &str, path: &str) -> Option<Arc<Service>> {
        let find = |h: &str| {
            self.http
                .get(h)?
                .iter()
                .find(|(prefix, _)| prefix_matches(prefix, path))
                .map(|(_, s)| s.clone())
        };
        find(host).or_else(|| find(&wildcard_for(host)?))
    }

    /// The service for SNI name `host`: exact claim first, then a wildcard one label up.
    pub fn tls(&self, host: &str) -> Option<Arc<Service>> {
        self.tls
            .get(host)
            .or_else(|| self.tls.get(&wildcard_for(host)?))
            .cloned()
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
                crate::protocol::ServiceKind::Http => {
                    let list = self.http.entry(h.clone()).or_default();
                    list.retain(|(p, _)| *p != svc.path);
                    list.push((svc.path.clone(), svc.clone()));
                    list.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
                }
                crate::protocol::ServiceKind::Tls => {
                    self.tls.insert(h.clone(), svc.clone());
                }
                crate::protocol::ServiceKind::Tcp => {}
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
