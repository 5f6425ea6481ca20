//! The relay's TLS identity: from `--cert`/`--key` files, or a self-signed certificate made on
//! first start and kept (key mode 0600) in the state directory so its fingerprint stays stable
//! (see [`super::state`] for what the directory must look like).

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::state::{self, Secrecy};
use super::{Fingerprint, TlsError};

/// File name of the self-signed certificate inside the state directory.
pub const CERT_FILE: &str = "relay-cert.pem";
/// File name of its private key inside the state directory.
pub const KEY_FILE: &str = "relay-key.pem";

/// A certificate chain with its private key, and the leaf's fingerprint.
#[derive(Debug)]
pub struct RelayIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf certificate.
    pub fingerprint: Fingerprint,
    /// True when this start generated the certificate.
    pub generated: bool,
}

impl RelayIdentity {
    /// Loads a PEM chain and key from explicit files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| TlsError::BadFile {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        };
        Self::from_pem(&read(cert)?, cert, &read(key)?, key)
    }

    /// Loads the self-signed identity from `state_dir`, creating it (and the directory) if it
    /// does not exist yet. Refuses a directory or file another user could have written (or
    /// could read, for the key), a symbolic link, and half an identity: a certificate without
    /// its key (or the reverse) is never silently replaced by a new identity, since agents
    /// pinned to the old fingerprint would then refuse the relay.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, TlsError> {
        let cert_path = state_dir.join(CERT_FILE);
        let key_path = state_dir.join(KEY_FILE);
        state::ensure_dir(state_dir)?;
        match (state::exists(&cert_path)?, state::exists(&key_path)?) {
            (true, true) => {
                let cert = state::read(&cert_path, Secrecy::Public)?;
                let key = state::read(&key_path, Secrecy::Secret)?;
                return Self::from_pem(&cert, &cert_path, &key, &key_path);
            }
            (false, false) => {}
            (has_cert, _) => {
                let (present, missing) = match has_cert {
                    true => (CERT_FILE, KEY_FILE),
                    false => (KEY_FILE, CERT_FILE),
                };
                return Err(TlsError::UnsafeState {
                    path: state_dir.to_path_buf(),
                    problem: format!(
                        "has {present} but not {missing}: restore {missing}, or remove {present} to make a new identity (agents pinned to the old fingerprint will then refuse the relay until given the new one)"
                    ),
                });
            }
        }
        let certified = rcgen::generate_simple_self_signed(vec![
            "ringtunnel-relay".to_string(),
            "localhost".to_string(),
        ])?;
        let key_pem = certified.key_pair.serialize_pem();
        let cert_pem = certified.cert.pem();
        state::write_new(&key_path, key_pem.as_bytes(), 0o600)?;
        state::write_new(&cert_path, cert_pem.as_bytes(), 0o644)?;
        let mut identity = Self::from_pem(
            cert_pem.as_bytes(),
            &cert_path,
            key_pem.as_bytes(),
            &key_path,
        )?;
        identity.generated = true;
        Ok(identity)
    }

    /// The identity of a PEM chain and key already read (see [`parse_pem_pair`]).
    fn from_pem(
        cert: &[u8],
        cert_path: &Path,
        key: &[u8],
        key_path: &Path,
    ) -> Result<Self, TlsError> {
        let (chain, key) = parse_pem_pair(cert, cert_path, key, key_path)?;
        let fingerprint = Fingerprint::of(&chain[0]);
        Ok(Self {
            chain,
            key,
            fingerprint,
            generated: false,
        })
    }
}

/// Parses a PEM certificate chain (at least one certificate, leaf first) and its private key,
/// already read (`cert_path` and `key_path` name them in errors): the one parser for
/// `--cert`/`--key` files and the state directory's (the relay's own identity and the ACME
/// certificates).
pub fn parse_pem_pair(
    cert: &[u8],
    cert_path: &Path,
    key: &[u8],
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let bad = |path: &Path, reason: String| TlsError::BadFile {
        path: path.to_path_buf(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert_path, "no certificate found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad(key_path, e.to_string()))?;
    Ok((chain, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn half_an_identity_is_never_replaced() {
        let dir = std::env::temp_dir().join(format!("ringtunnel-half-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = RelayIdentity::load_or_create(&dir).unwrap();
        fs::remove_file(dir.join(KEY_FILE)).unwrap();
        let err = RelayIdentity::load_or_create(&dir).unwrap_err().to_string();
        assert!(
            err.contains("has relay-cert.pem but not relay-key.pem"),
            "{err}"
        );
        assert!(!dir.join(KEY_FILE).exists(), "no new key made");
        drop(first);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn self_signed_identity_is_created_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("ringtunnel-cert-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let first = RelayIdentity::load_or_create(&dir).unwrap();
        assert!(first.generated);
        let mode = fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = RelayIdentity::load_or_create(&dir).unwrap();
        assert!(!second.generated);
        assert_eq!(first.fingerprint, second.fingerprint);
        fs::remove_dir_all(&dir).unwrap();
    }
}
