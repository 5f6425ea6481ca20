//! HTTP basic auth for one `http` service: users with Argon2 password hashes, checked before
//! a request reaches the agent.
//!
//! An Argon2 check costs tens of milliseconds of CPU on purpose, so the relay bounds what
//! visitors can make it spend:
//! - Credentials that passed once are remembered (a keyed hash of the header, never the
//!   password; at most [`MAX_REMEMBERED`] per service), so a browser's later requests cost a
//!   lookup. A reload forgets them with the old rules.
//! - Checks run on one thread of their own ([`verify`]), never on a data-plane worker or a
//!   tokio thread, behind a queue of [`QUEUE`]: one core at most, whatever the flood; a full
//!   queue answers 503 without checking.
//! - An address (an IPv6 /64) that fails often is throttled ([`FailureThrottle`]: answered
//!   429 without checking until its window ends).
//! - An unknown user costs the same check as a wrong password (against another user's
//!   hash), so timing does not tell which user names exist.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use argon2::password_hash::{PasswordHashString, SaltString};
use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use base64ct::{Base64, Encoding};
use ring::hmac;

pub use crate::config::access::{parse_hash, BadHash};
use crate::net::throttle::FailureThrottle;

/// Credentials remembered per service once they passed; past this, the memory starts over.
pub const MAX_REMEMBERED: usize = 4096;
/// Password checks waiting for the checking thread; more are answered 503 at once.
pub const QUEUE: usize = 64;

/// Why a password hash or a new one cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// A hash in the config that is not a usable Argon2 PHC string.
    #[error(transparent)]
    Hash(#[from] BadHash),
    /// Hashing a new password failed (no randomness for the salt).
    #[error("cannot hash the password: {0}")]
    Hashing(String),
}

/// Hashes `password` for `relay.toml` with Argon2id, a random salt and Argon2's default
/// parameters (19 MiB, 2 passes, 1 lane: OWASP's recommended minimum).
pub fn hash_password(password: &[u8]) -> Result<String, LoginError> {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| LoginError::Hashing("no randomness".into()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| LoginError::Hashing(e.to_string()))?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| LoginError::Hashing(e.to_string()))
}

/// A service's users and what the relay remembers about them.
pub struct Login {
    realm: String,
    users: HashMap<String, PasswordHashString>,
    /// Keys remembered credentials (an HMAC of the header value with a key of this process).
    key: hmac::Key,
    remembered: Mutex<HashSet<[u8; 32]>>,
    failures: FailureThrottle,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("realm", &self.realm)
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

/// What to do with a request, as far as the password goes.
#[derive(Debug)]
pub enum Check {
    /// Credentials that passed before: let it through.
    Pass,
    /// No or unusable credentials: answer 401 with the challenge.
    Challenge,
    /// The address failed too often: answer 429 without checking.
    Throttled,
    /// Credentials to check (off the caller's thread): [`Pending::verify`].
    Verify(Pending),
}

/// How a password check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The password matches: the credentials are remembered.
    Passed,
    /// Wrong password or unknown user (counted against the address).
    Failed,
    /// Too many checks waiting: not checked.
    Busy,
}

/// Credentials waiting to be checked.
pub struct Pending {
    login: Arc<Login>,
    remember_as: [u8; 32],
    hash: PasswordHashString,
    password: Vec<u8>,
    /// An unknown user: checked against another user's hash for the time it takes, then failed.
    known: bool,
    ip: IpAddr,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("ip", &self.ip)
            .finish_non_exhaustive()
    }
}

impl Login {
    /// Users `users` (name → PHC hash) under `realm`.
    pub fn new(realm: &str, users: &BTreeMap<String, String>) -> Result<Login, LoginError> {
        let users = users
            .iter()
            .map(|(u, h)| Ok((u.clone(), parse_hash(h)?)))
            .collect::<Result<HashMap<_, _>, LoginError>>()?;
        let mut key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| LoginError::Hashing("no randomness".into()))?;
        Ok(Login {
            realm: realm.to_string(),
            users,
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
            remembered: Mutex::new(HashSet::new()),
            failures: FailureThrottle::default(),
        })
    }

    /// The realm of the `WWW-Authenticate` challenge.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    fn key_of(&self, authorization: &[u8]) -> [u8; 32] {
        let tag = hmac::sign(&self.key, authorization);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `authorization` (a request's header value) passed before: how every later
    /// request of a kept-alive connection is checked, without a password check.
    pub fn remembers(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let key = self.key_of(value);
        self.remembered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&key)
    }

    fn remember(&self, key: [u8; 32]) {
        let mut set = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
        if set.len() >= MAX_REMEMBERED {
            set.clear();
        }
        set.insert(key);
    }

    /// What to do with a request from `ip` carrying `authorization` (the header's value).
    pub fn check(
        self: &Arc<Self>,
        authorization: Option<&[u8]>,
        ip: IpAddr,
        now: Instant,
    ) -> Check {
        let Some(value) = authorization else {
            return Check::Challenge; // a browser's first request: not a failure
        };
        if self.remembers(Some(value)) {
            return Check::Pass;
        }
        if self.failures.is_throttled(ip, now) {
            return Check::Throttled;
        }
        let Some((user, password)) = basic_credentials(value) else {
            self.failures.failed(ip, now);
            return Check::Challenge;
        };
        let (hash, known) = match self.users.get(&user) {
            Some(h) => (h.clone(), true),
            None => match self.users.values().next() {
                Some(h) => (h.clone(), false),
                None => return Check::Challenge,
            },
        };
        Check::Verify(Pending {
            login: self.clone(),
            remember_as: self.key_of(value),
            hash,
            password,
            known,
            ip,
        })
    }
}

impl Pending {
    /// Checks the password on the checking thread and waits for the answer; a pass is
    /// remembered, a failure counted against the address.
    pub async fn verify(self) -> Verdict {
        let Pending {
            login,
            remember_as,
            hash,
            mut password,
            known,
            ip,
        } = self;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let ok = Argon2::default()
                .verify_password(&password, &hash.password_hash())
                .is_ok();
            password.fill(0);
            let _ = tx.send(ok);
        });
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = checker().try_send(job)
        {
            return Verdict::Busy;
        }
        match rx.await {
            Ok(true) if known => {
                login.remember(remember_as);
                Verdict::Passed
            }
            Ok(_) => {
                login.failures.failed(ip, Instant::now());
                Verdict::Failed
            }
            Err(_) => Verdict::Busy,
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The queue of the one thread that checks passwords, started on first use.
fn checker() -> &'static SyncSender<Job> {
    static CHECKER: OnceLock<SyncSender<Job>> = OnceLock::new();
    CHECKER.get_or_init(|| {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("rt-passwords".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the password-checking thread: {e}");
        }
        tx
    })
}

/// The user and password of a `Basic` authorization value, if it is one.
fn basic_credentials(value: &[u8]) -> Option<(String, Vec<u8>)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let mut decoded = Base64::decode_vec(token.trim()).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    let password = decoded[colon + 1..].to_vec();
    decoded.fill(0);
    Some((user, password))
}

impl crate::protocol::http::requests::Remembers for Login {
    fn remembers(&self, authorization: Option<&[u8]>) -> bool {
        Login::remembers(self, authorization)
    }
}

/// The `WWW-Authenticate` value for `realm`.
pub fn challenge(realm: &str) -> String {
    format!("Basic realm=\"{realm}\", charset=\"UTF-8\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, password: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            Base64::encode_string(format!("{user}:{password}").as_bytes())
        )
        .into_bytes()
    }

    fn login() -> Arc<Login> {
        // Cheap parameters: the tests check behaviour, not cost.
        let params = argon2::Params::new(64, 1, 1, None).unwrap();
        let a = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let hash = a.hash_password(b"open sesame", &salt).unwrap().to_string();
        let users = BTreeMap::from([("alice".to_string(), hash)]);
        Arc::new(Login::new("web", &users).unwrap())
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn hashes_must_be_argon2_phc_strings() {
        let made = hash_password(b"pw").unwrap();
        assert!(
            made.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{made}"
        );
        assert!(parse_hash(&made).is_ok());
        assert!(matches!(parse_hash("hunter2"), Err(BadHash::NotPhc(_))));
        let pbkdf2 = "$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";
        assert!(matches!(
            parse_hash(pbkdf2),
            Err(BadHash::OtherAlgorithm(_))
        ));
    }

    #[test]
    fn a_right_password_passes_and_is_remembered() {
        let l = login();
        let ip: IpAddr = [192, 0, 2, 1].into();
        let h = header("alice", "open sesame");
        let Check::Verify(p) = l.check(Some(&h), ip, Instant::now()) else {
            panic!("expected a check");
        };
        assert_eq!(run(p.verify()), Verdict::Passed);
        assert!(matches!(l.check(Some(&h), ip, Instant::now()), Check::Pass));
        assert!(l.remembers(Some(&h)));
        assert!(!l.remembers(Some(&header("alice", "open sesame!"))));
        assert!(!l.remembers(None));
    }

    #[test]
    fn wrong_passwords_unknown_users_and_garbage_fail() {
        let l = login();
        let ip: IpAddr = [192, 0, 2, 2].into();
        for h in [header("alice", "wrong"), header("mallory", "open sesame")] {
            let Check::Verify(p) = l.check(Some(&h), ip, Instant::now()) else {
                panic!("expected a check");
            };
            assert_eq!(run(p.verify()), Verdict::Failed);
            assert!(!l.remembers(Some(&h)));
        }
        for garbage in [
            &b"Bearer abc"[..],
            b"Basic !!!",
            b"Basic",
            b"Basic Zm9v",
            b"\xff\xfe",
        ] {
            assert!(matches!(
                l.check(Some(garbage), ip, Instant::now()),
                Check::Challenge
            ));
        }
        assert!(matches!(
            l.check(None, ip, Instant::now()),
            Check::Challenge
        ));
    }

    #[test]
    fn an_address_that_fails_often_is_throttled_and_others_are_not() {
        let l = login();
        let now = Instant::now();
        let bad: IpAddr = [192, 0, 2, 3].into();
        for _ in 0..=crate::net::throttle::FREE_FAILURES {
            let _ = l.check(Some(b"Basic !!!"), bad, now);
        }
        let h = header("alice", "open sesame");
        assert!(matches!(l.check(Some(&h), bad, now), Check::Throttled));
        let good: IpAddr = [192, 0, 2, 4].into();
        assert!(matches!(l.check(Some(&h), good, now), Check::Verify(_)));
    }

    #[test]
    fn the_challenge_names_the_realm() {
        assert_eq!(challenge("web"), "Basic realm=\"web\", charset=\"UTF-8\"");
    }
}
