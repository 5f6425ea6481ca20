//! Who may visit a service, as the relay enforces it: address allow and deny lists for every
//! kind of service ([`Access::permits`], asked by the service's gate before anything else),
//! and HTTP basic auth for `http` services ([`login`]). A visitor refused here never reaches
//! a data connection: the agent sees none of its bytes.
//!
//! The rules come from `relay.toml` ([`crate::config::AccessFile`]) and a reload replaces
//! them whole (visitors already in keep going; a kept-alive HTTP connection's later requests
//! are checked against the new password list).

pub mod login;

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{AccessFile, Cidr};
use login::{Login, LoginError};

/// One service's access rules in force.
#[derive(Debug, Default)]
pub struct Access {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    login: Option<Arc<Login>>,
    https_only: bool,
}

impl Access {
    /// The rules of `file` for service `service` (its name is the default basic-auth realm).
    /// Fails only on a password hash that does not parse, which validation already rejects.
    pub fn new(service: &str, file: &AccessFile) -> Result<Access, LoginError> {
        Ok(Access {
            allow: file.allow.clone(),
            deny: file.deny.clone(),
            login: match &file.basic_auth {
                Some(auth) => Some(Arc::new(Login::new(
                    auth.realm.as_deref().unwrap_or(service),
                    &auth.users,
                )?)),
                None => None,
            },
            https_only: file.https_only,
        })
    }

    /// The rules a service of this kind (`http` or not) runs with. Fails closed: rules that
    /// cannot be applied (basic auth for a `tcp` or `tls` service, which has no request to
    /// ask; a hash that does not parse) turn every visitor away, with an error in the log.
    pub fn for_service(service: &str, http: bool, file: &AccessFile) -> Access {
        let why = match (&file.basic_auth, http) {
            (Some(_), false) => "basic auth is for http services only".to_string(),
            _ => match Access::new(service, file) {
                Ok(a) => return a,
                Err(e) => e.to_string(),
            },
        };
        tracing::error!(
            service,
            "every visitor is refused: its access rules cannot be applied: {why}"
        );
        Access {
            deny: vec![
                "0.0.0.0/0".parse().expect("a valid block"),
                "::/0".parse().expect("a valid block"),
            ],
            ..Access::default()
        }
    }

    /// Whether a visitor from `ip` may come in by address: not in a deny block, and in an
    /// allow block if there is an allow list. An IPv4-mapped IPv6 address is its IPv4 one.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !self.deny.iter().any(|c| c.contains(ip))
            && (self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip)))
    }

    /// Whether there is an address list to check at all.
    pub fn has_lists(&self) -> bool {
        !self.allow.is_empty() || !self.deny.is_empty()
    }

    /// Whether plain-HTTP visitors are sent to `https://` and HTTPS responses carry HSTS
    /// (with `--https`).
    pub fn https_only(&self) -> bool {
        self.https_only
    }

    /// Basic auth, if the service wants a password.
    pub fn login(&self) -> Option<&Arc<Login>> {
        self.login.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn access(allow: &[&str], deny: &[&str]) -> Access {
        let file = AccessFile {
            allow: allow.iter().map(|c| c.parse().unwrap()).collect(),
            deny: deny.iter().map(|c| c.parse().unwrap()).collect(),
            basic_auth: None,
            https_only: false,
        };
        Access::new("t", &file).unwrap()
    }

    #[test]
    fn no_lists_let_everyone_in() {
        let a = access(&[], &[]);
        assert!(a.permits(ip("192.0.2.1")) && a.permits(ip("2001:db8::1")));
        assert!(a.login().is_none());
    }

    #[test]
    fn deny_wins_over_allow_for_both_families() {
        let a = access(
            &["10.0.0.0/8", "2001:db8::/32"],
            &["10.9.0.0/16", "2001:db8:bad::/48"],
        );
        assert!(a.permits(ip("10.1.2.3")));
        assert!(
            !a.permits(ip("10.9.2.3")),
            "denied inside the allowed block"
        );
        assert!(!a.permits(ip("192.0.2.1")), "not on the allow list");
        assert!(a.permits(ip("2001:db8:1::1")));
        assert!(!a.permits(ip("2001:db8:bad::1")));
        assert!(
            a.permits(ip("::ffff:10.1.2.3")),
            "IPv4-mapped is its IPv4 address"
        );
        assert!(!a.permits(ip("::ffff:10.9.0.1")));
    }

    #[test]
    fn rules_that_cannot_apply_refuse_everyone() {
        let file = AccessFile {
            basic_auth: Some(crate::config::BasicAuthFile {
                realm: None,
                users: [("a".to_string(), "not a hash".to_string())].into(),
            }),
            ..Default::default()
        };
        for http in [true, false] {
            let a = Access::for_service("t", http, &file);
            assert!(!a.permits(ip("192.0.2.1")) && !a.permits(ip("2001:db8::1")));
        }
        assert!(Access::for_service("t", false, &AccessFile::default()).permits(ip("192.0.2.1")));
    }

    #[test]
    fn a_deny_list_alone_lets_the_rest_in() {
        let a = access(&[], &["127.0.0.2/32"]);
        assert!(!a.permits(ip("127.0.0.2")));
        assert!(a.permits(ip("127.0.0.1")));
    }

    #[test]
    fn a_service_adds_its_own_rules_to_the_relays() {
        let relay = AccessFile {
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            deny: vec!["10.6.6.6".parse().unwrap()],
            basic_auth: None,
            https_only: false,
        };
        let own = AccessFile {
            deny: vec!["10.7.7.7".parse().unwrap()],
            ..Default::default()
        };
        let merged = own.over(&relay);
        assert_eq!(
            merged.allow, relay.allow,
            "the relay's allow list when it has none"
        );
        assert_eq!(merged.deny.len(), 2, "both deny lists");
        let own_allow = AccessFile {
            allow: vec!["192.0.2.0/24".parse().unwrap()],
            ..Default::default()
        };
        let merged = own_allow.over(&relay);
        assert_eq!(
            merged.allow, own_allow.allow,
            "its own allow list replaces the relay's"
        );
        assert_eq!(
            merged.deny, relay.deny,
            "the relay's deny list always holds"
        );
    }
}
