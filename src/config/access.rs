//! Who may visit a service (`[access]` and `[service.access]` in `relay.toml`): address
//! allow and deny lists for every kind of service, and HTTP basic auth with password hashes
//! for `http` services. The relay enforces it ([`crate::access`]) before a visitor's first
//! byte reaches the agent.

use std::collections::BTreeMap;

use argon2::password_hash::{PasswordHash, PasswordHashString};
use serde::Deserialize;

use super::{Cidr, ConfigError};

/// Address lists and, for one service, basic auth. Every key is optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessFile {
    /// Only visitors from these blocks may visit (empty: everyone not denied).
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Visitors from these blocks are refused, even when an allow list has them too.
    #[serde(default)]
    pub deny: Vec<Cidr>,
    /// `http` services: visitors must send one of these users' passwords.
    pub basic_auth: Option<BasicAuthFile>,
    /// `http` services on a relay with `--https`: plain-HTTP requests are redirected (308) to
    /// `https://`, and the first response on each HTTPS connection carries
    /// `Strict-Transport-Security: max-age=31536000` (never `includeSubDomains`: sibling
    /// hosts may belong to others).
    #[serde(default)]
    pub https_only: bool,
}

/// `[service.access.basic_auth]`: the realm browsers show, and users with their password
/// hashes (PHC strings, `ringtunnel hash-password`); never a password in clear.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthFile {
    /// The realm in the `WWW-Authenticate` challenge (default: the service's name).
    pub realm: Option<String>,
    /// User name → Argon2 password hash (`$argon2id$v=19$m=...`).
    pub users: BTreeMap<String, String>,
}

/// A password hash that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadHash {
    /// Not a PHC string (`$argon2id$v=19$m=...,t=...,p=...$SALT$HASH`).
    #[error("not a password hash ({0}): make one with `ringtunnel hash-password`")]
    NotPhc(String),
    /// A PHC string for another algorithm.
    #[error("a {0} hash: only Argon2 (argon2id, argon2i, argon2d) is accepted")]
    OtherAlgorithm(String),
}

/// Parses an Argon2 password hash in PHC form, checking its algorithm and parameters.
pub fn parse_hash(s: &str) -> Result<PasswordHashString, BadHash> {
    let hash = PasswordHash::new(s).map_err(|e| BadHash::NotPhc(e.to_string()))?;
    argon2::Algorithm::try_from(hash.algorithm)
        .map_err(|_| BadHash::OtherAlgorithm(hash.algorithm.to_string()))?;
    argon2::Params::try_from(&hash).map_err(|e| BadHash::NotPhc(e.to_string()))?;
    if hash.hash.is_none() {
        return Err(BadHash::NotPhc("no hash part".into()));
    }
    Ok(hash.serialize())
}

impl AccessFile {
    /// A service's own access rules over the relay-wide ones (`base`): its allow list if it
    /// has one, else the relay's; the relay's deny list and its own together; its basic auth.
    pub fn over(&self, base: &AccessFile) -> AccessFile {
        AccessFile {
            allow: match self.allow.is_empty() {
                true => base.allow.clone(),
                false => self.allow.clone(),
            },
            deny: base.deny.iter().chain(&self.deny).copied().collect(),
            basic_auth: self.basic_auth.clone(),
            https_only: self.https_only || base.https_only,
        }
    }

    /// Whether every visitor is let in (no list, no password): nothing to check.
    pub fn is_open(&self) -> bool {
        self.allow.is_empty()
            && self.deny.is_empty()
            && self.basic_auth.is_none()
            && !self.https_only
    }

    /// Checks names, realm and hashes; `what` names the table in errors.
    pub fn validate(&self, what: &str) -> Result<(), ConfigError> {
        let Some(auth) = &self.basic_auth else {
            return Ok(());
        };
        let bad = |why: String| ConfigError::Invalid(format!("{what}.basic_auth: {why}"));
        if auth.users.is_empty() {
            return Err(bad("no users: add `users = { NAME = \"HASH\" }`".into()));
        }
        if let Some(realm) = &auth.realm {
            if realm.is_empty()
                || realm.len() > 128
                || realm
                    .chars()
                    .any(|c| c == '"' || c == '\\' || c.is_control())
            {
                return Err(bad(format!(
                    "realm {realm:?}: 1 to 128 characters, no quotes, backslashes or control characters"
                )));
            }
        }
        for (user, hash) in &auth.users {
            if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
                return Err(bad(format!(
                    "user {user:?}: a user name is not empty and has no ':' or control characters"
                )));
            }
            parse_hash(hash).map_err(|e| bad(format!("user {user:?}: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{parse_toml, RelayFile};

    fn check(toml: &str) -> Result<(), String> {
        let file: RelayFile = parse_toml(toml).map_err(|e| e.to_string())?;
        let cfg = crate::config::RelayConfig {
            access: file.access,
            service_secrets: file.services,
            ..crate::config::tests::relay_config()
        };
        cfg.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn access_rules_parse_and_bad_ones_say_why() {
        let hash = crate::access::login::hash_password(b"pw").unwrap();
        let good = format!(
            "[access]\ndeny = [\"192.0.2.0/24\", \"2001:db8::/32\"]\n[[service]]\nname = \"web\"\n[service.access]\nallow = [\"10.0.0.0/8\"]\n[service.access.basic_auth]\nusers = {{ alice = \"{hash}\" }}\n"
        );
        assert_eq!(check(&good), Ok(()));
        for (toml, says) in [
            ("[access]\nallow = [\"10.0.0.0/33\"]\n", "invalid address block"),
            ("[access]\nallwo = []\n", "allwo"),
            (
                "[access.basic_auth]\nusers = { a = \"x\" }\n",
                "[access] takes address lists only",
            ),
            (
                "[[service]]\nname = \"web\"\n[service.access.basic_auth]\nusers = { alice = \"hunter2\" }\n",
                "not a password hash",
            ),
            (
                "[[service]]\nname = \"web\"\n[service.access.basic_auth]\nusers = {}\n",
                "no users",
            ),
        ] {
            let e = check(toml).unwrap_err();
            assert!(e.contains(says), "{toml}: {e}");
        }
        let colon = format!(
            "[[service]]\nname = \"web\"\n[service.access.basic_auth]\nusers = {{ \"a:b\" = \"{hash}\" }}\n"
        );
        assert!(check(&colon).unwrap_err().contains("no ':'"));
        let realm = format!(
            "[[service]]\nname = \"web\"\n[service.access.basic_auth]\nrealm = \"a\\\"b\"\nusers = {{ a = \"{hash}\" }}\n"
        );
        assert!(check(&realm).unwrap_err().contains("realm"));
    }
}
