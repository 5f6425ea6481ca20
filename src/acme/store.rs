//! The certificates the relay holds for the hosts it terminates HTTPS for: loaded from and
//! kept in the state directory (keys mode 0600), served by SNI, and waited for (bounded) by a
//! visitor that arrives before its host's first certificate.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;

use super::validity::Validity;
use super::AcmeError;
use crate::tls::cert::parse_pem_pair;
use crate::tls::state::{self, Secrecy};

/// Most hosts waiting for a first certificate at once; a visitor for one more is refused
/// rather than queued.
pub const MAX_WANTED: usize = 1024;
/// First pause after a failed issuance for a host; doubled on each failure after it.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(60);
/// Longest pause between issuance attempts for a host.
pub const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);

/// One host's certificate.
struct Held {
    key: Arc<CertifiedKey>,
    validity: Validity,
}

/// A host whose last issuance failed: not tried again before `until`.
struct Failing {
    until: Instant,
    backoff: Duration,
}

#[derive(Default)]
struct Queue {
    wanted: HashSet<String>,
    failing: HashMap<String, Failing>,
}

/// The certificates, by host.
pub struct Certs {
    dir: PathBuf,
    held: RwLock<HashMap<String, Held>>,
    queue: Mutex<Queue>,
    /// Wakes the issuer: a host is wanted.
    pub(super) kick: Notify,
    /// Wakes visitors waiting for a certificate: an issuance ended (either way).
    ended: Notify,
}

impl Certs {
    /// The store in `dir` (created 0700 if missing), with every certificate already there.
    /// A pair that does not load is skipped with a warning and issued again.
    pub fn open(dir: &Path) -> Result<Self, AcmeError> {
        state::ensure_dir(dir)?;
        let certs = Certs {
            dir: dir.to_path_buf(),
            held: RwLock::default(),
            queue: Mutex::default(),
            kick: Notify::new(),
            ended: Notify::new(),
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| AcmeError::Config(format!("{}: {e}", dir.display())))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(host) = name.to_str().and_then(|n| n.strip_suffix(".crt")) else {
                continue;
            };
            match certs.load(host) {
                Ok(held) => {
                    certs.write().insert(host.to_string(), held);
                }
                Err(e) => tracing::warn!(host, "stored certificate not used: {e}"),
            }
        }
        Ok(certs)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Held>> {
        self.held.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Held>> {
        self.held.read().unwrap_or_else(|e| e.into_inner())
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn paths(&self, host: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{host}.crt")),
            self.dir.join(format!("{host}.key")),
        )
    }

    fn load(&self, host: &str) -> Result<Held, AcmeError> {
        let (crt, key) = self.paths(host);
        let chain_pem = state::read(&crt, Secrecy::Public)?;
        let key_pem = state::read(&key, Secrecy::Secret)?;
        held_from_pem(&chain_pem, &crt, &key_pem, &key)
    }

    /// Keeps a newly issued certificate for `host` (files first, then served).
    pub fn install(
        &self,
        host: &str,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<SystemTime, AcmeError> {
        let (crt, key) = self.paths(host);
        let held = held_from_pem(chain_pem.as_bytes(), &crt, key_pem.as_bytes(), &key)?;
        state::write_new(&key, key_pem.as_bytes(), 0o600)?;
        state::write_new(&crt, chain_pem.as_bytes(), 0o644)?;
        let not_after = held.validity.not_after;
        self.write().insert(host.to_string(), held);
        let mut q = self.queue();
        q.wanted.remove(host);
        q.failing.remove(host);
        Ok(not_after)
    }

    /// The certificate for `host`, if one is held and not expired.
    pub fn get(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let held = self.read();
        let h = held.get(host)?;
        (SystemTime::now() < h.validity.not_after).then(|| h.key.clone())
    }

    /// Whether `host` has a certificate not yet due for renewal.
    pub fn fresh(&self, host: &str) -> bool {
        self.read()
            .get(host)
            .is_some_and(|h| SystemTime::now() < h.validity.renew_at())
    }

    /// Hosts whose certificates are held (for renewal).
    pub fn hosts(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Whether `host`'s last issuance failed and its pause is not over.
    pub fn failing(&self, host: &str) -> bool {
        self.queue()
            .failing
            .get(host)
            .is_some_and(|f| Instant::now() < f.until)
    }

    /// Records a failed issuance for `host`: no new try before the pause, which doubles.
    pub fn failed(&self, host: &str) -> Duration {
        let mut q = self.queue();
        q.wanted.remove(host);
        let backoff = q
            .failing
            .get(host)
            .map_or(FIRST_BACKOFF, |f| (f.backoff * 2).min(MAX_BACKOFF));
        q.failing.insert(
            host.to_string(),
            Failing {
                until: Instant::now() + backoff,
                backoff,
            },
        );
        backoff
    }

    /// Asks the issuer for `host`; false if too many hosts wait already.
    fn want(&self, host: &str) -> bool {
        let mut q = self.queue();
        if !q.wanted.contains(host) {
            if q.wanted.len() >= MAX_WANTED {
                return false;
            }
            q.wanted.insert(host.to_string());
        }
        drop(q);
        self.kick.notify_one();
        true
    }

    /// The hosts visitors are waiting for (each leaves the set when it is issued, fails or
    /// is no longer eligible).
    pub(super) fn take_wanted(&self) -> Vec<String> {
        self.queue().wanted.iter().cloned().collect()
    }

    /// Drops `host` from the wanted set (no longer eligible).
    pub(super) fn unwant(&self, host: &str) {
        self.queue().wanted.remove(host);
    }

    /// Wakes every visitor waiting in [`Self::wait_for`].
    pub(super) fn ended(&self) {
        self.ended.notify_waiters();
    }

    /// The certificate for `host` (which the caller checked is eligible), waiting up to
    /// `bound` for its first issuance. `None`: not in time, or its issuance is failing.
    pub async fn wait_for(&self, host: &str, bound: Duration) -> Option<Arc<CertifiedKey>> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let ended = self.ended.notified();
            let mut ended = std::pin::pin!(ended);
            ended.as_mut().enable();
            if let Some(k) = self.get(host) {
                return Some(k);
            }
            if self.failing(host) || !self.want(host) {
                return None;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return None;
            }
        }
    }
}

/// Serves the certificate named by a ClientHello's SNI, if held.
#[derive(Debug)]
pub struct Resolver(pub Arc<Certs>);

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs").field("dir", &self.dir).finish()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.get(&hello.server_name()?.to_ascii_lowercase())
    }
}

/// A chain and key (to be kept at, or read from, `crt` and `key_path`), checked to load and
/// to match.
fn held_from_pem(chain: &[u8], crt: &Path, key: &[u8], key_path: &Path) -> Result<Held, AcmeError> {
    let bad = |why: String| AcmeError::Protocol(format!("certificate: {why}"));
    let (chain, key) = parse_pem_pair(chain, crt, key, key_path)?;
    let validity =
        Validity::of(&chain[0]).ok_or_else(|| bad("the validity does not parse".into()))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified =
        CertifiedKey::from_der(chain, key, &provider).map_err(|e| bad(e.to_string()))?;
    Ok(Held {
        key: Arc::new(certified),
        validity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ringtunnel-certs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn issued(host: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![host.into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn an_installed_certificate_is_kept_private_and_loaded_again() {
        let dir = scratch("keep");
        let certs = Certs::open(&dir).unwrap();
        assert!(certs.get("a.example").is_none());
        let (chain, key) = issued("a.example");
        certs.install("a.example", &chain, &key).unwrap();
        assert!(certs.get("a.example").is_some() && certs.fresh("a.example"));
        let mode = std::fs::metadata(dir.join("a.example.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Certs::open(&dir).unwrap();
        assert!(again.get("a.example").is_some());
        assert_eq!(again.hosts(), vec!["a.example".to_string()]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_mismatched_or_broken_pair_is_refused() {
        let dir = scratch("bad");
        let certs = Certs::open(&dir).unwrap();
        let (chain, _) = issued("a.example");
        let (_, other_key) = issued("b.example");
        assert!(certs.install("a.example", &chain, &other_key).is_err());
        assert!(certs.install("a.example", "garbage", "garbage").is_err());
        assert!(certs.get("a.example").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn failures_back_off_doubling_to_a_cap() {
        let dir = scratch("fail");
        let certs = Certs::open(&dir).unwrap();
        assert_eq!(certs.failed("a.example"), FIRST_BACKOFF);
        assert_eq!(certs.failed("a.example"), FIRST_BACKOFF * 2);
        assert!(certs.failing("a.example") && !certs.failing("b.example"));
        for _ in 0..20 {
            certs.failed("a.example");
        }
        assert_eq!(certs.failed("a.example"), MAX_BACKOFF);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn waiting_visitors_are_bounded_in_time_and_in_number() {
        let dir = scratch("wait");
        let certs = Arc::new(Certs::open(&dir).unwrap());
        // Nothing issues: the wait ends at its bound.
        assert!(certs
            .wait_for("a.example", Duration::from_millis(50))
            .await
            .is_none());
        // "a.example" is wanted still: the bound counts it.
        for i in 1..MAX_WANTED {
            assert!(certs.want(&format!("h{i}.example")));
        }
        assert!(!certs.want("one-more.example"));
        // An issuance while a visitor waits ends its wait with the certificate.
        let (chain, key) = issued("h1.example");
        let waiter = {
            let certs = certs.clone();
            tokio::spawn(async move { certs.wait_for("h1.example", Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        certs.install("h1.example", &chain, &key).unwrap();
        certs.ended();
        assert!(waiter.await.unwrap().is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
