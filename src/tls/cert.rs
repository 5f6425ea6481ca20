//! The relay's TLS identity: from `--cert`/`--key` files, or a self-signed certificate made on
//! first start and kept (key mode 0600) in the state directory so its fingerprint stays stable.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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
        let bad = |path: &Path, reason: String| TlsError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad(cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(cert, e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| bad(cert, "no certificate found".into()))?;
        let fingerprint = Fingerprint::of(leaf);
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
        Ok(Self {
            chain,
            key,
            fingerprint,
            generated: false,
        })
    }

    /// Loads the self-signed identity from `state_dir`, creating it (and the directory) if it
    /// does not exist yet.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, TlsError> {
        let cert_path = state_dir.join(CERT_FILE);
        let key_path = state_dir.join(KEY_FILE);
        if cert_path.exists() && key_path.exists() {
            return Self::from_files(&cert_path, &key_path);
        }
        let state_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::StateDir { path, source }
        };
        fs::create_dir_all(state_dir).map_err(state_err(state_dir))?;
        let _ = fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700));
        let certified = rcgen::generate_simple_self_signed(vec![
            "ringtunnel-relay".to_string(),
            "localhost".to_string(),
        ])?;
        write_new(
            &key_path,
            certified.key_pair.serialize_pem().as_bytes(),
            0o600,
        )
        .map_err(state_err(&key_path))?;
        write_new(&cert_path, certified.cert.pem().as_bytes(), 0o644)
            .map_err(state_err(&cert_path))?;
        let mut identity = Self::from_files(&cert_path, &key_path)?;
        identity.generated = true;
        Ok(identity)
    }
}

/// Writes a file created with `mode` from the start, so a key is never briefly world-readable.
fn write_new(path: &PathBuf, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

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
