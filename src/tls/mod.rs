//! TLS for control and data connections (rustls with the `ring` provider).
//!
//! - [`cert`]: the relay's certificate — loaded from files, or self-signed on first start and
//!   kept in the state directory.
//! - [`fingerprint`]: SHA-256 certificate fingerprints and the pinning verifier the agent uses.
//! - [`ktls`]: handing a data connection's keys to the kernel after the handshake.
//! - [`records`]: the same keys used in user space, sealing and opening records in place where
//!   the kernel has no kTLS.

pub mod cert;
pub mod fingerprint;
pub mod ktls;
pub mod records;
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

pub use cert::RelayIdentity;
pub use fingerprint::Fingerprint;

/// Errors setting up TLS. Each says which file or setting is at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("relay certificate file {path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// The state directory could not be created or written.
    #[error("state directory {path}: {error}")]
    StateDir {
        /// The directory or file inside it.
        path: PathBuf,
        /// The I/O error (part of the message, so it is printed once).
        error: std::io::Error,
    },
    /// The state directory or a file in it is not safe to trust (owner, mode, a link), or
    /// holds half an identity.
    #[error("state directory: {path}: {problem}")]
    UnsafeState {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// Generating the self-signed certificate failed.
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto provider used everywhere in ringtunnel.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server configuration for the relay's control port (control and data connections alike).
pub fn server_config(identity: &RelayIdentity) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    // Data connections may go to kTLS (see `ktls`): the keys must be extractable. Where the
    // kernel has kTLS, the relay sends no session tickets, so nothing but the agent's own records can
    // follow the handshake (a kTLS agent skips tickets; see `ktls::after_read_error`). Agents
    // then do full handshakes instead of resumed ones; relays without kTLS keep tickets.
    config.enable_secret_extraction = true;
    if ktls::available() {
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

/// How the agent decides to trust the relay's certificate.
#[derive(Debug, Clone)]
pub enum RelayTrust {
    /// Accept exactly the certificate with this SHA-256 fingerprint (self-signed relays).
    Pinned(Fingerprint),
    /// Verify the chain against these extra CA certificates (PEM file) plus the public roots.
    CaFile(PathBuf),
    /// Verify the chain against the public web roots.
    PublicRoots,
}

/// The public web roots, plus the CA certificates in the PEM file `ca` if given.
fn roots(ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca {
        let bad = |reason: String| TlsError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let iter = CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))?;
        for cert in iter {
            let cert = cert.map_err(|e| bad(e.to_string()))?;
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
    }
    Ok(roots)
}

/// Client configuration a relay uses toward its fleet's etcd over TLS: etcd's certificate
/// checked against the public roots plus `ca`, and the client certificate `client` (chain
/// and key files) presented if given.
pub fn registry_client_config(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let id = RelayIdentity::from_files(cert, key)?;
            builder.with_client_auth_cert(id.chain, id.key)?
        }
    };
    Ok(Arc::new(config))
}

/// Client configuration the agent uses for control and data connections.
pub fn client_config(trust: &RelayTrust) -> Result<Arc<ClientConfig>, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match trust {
        RelayTrust::Pinned(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(fingerprint::PinnedVerifier::new(
                *fp,
                provider(),
            )))
            .with_no_client_auth(),
        RelayTrust::CaFile(path) => builder
            .with_root_certificates(roots(Some(path))?)
            .with_no_client_auth(),
        RelayTrust::PublicRoots => builder
            .with_root_certificates(roots(None)?)
            .with_no_client_auth(),
    };
    let mut config = config;
    // Tells the relay's shared TLS port this is an agent, not a visitor (the control port
    // needs no telling and ignores it).
    config.alpn_protocols = vec![crate::protocol::AGENT_ALPN.to_vec()];
    // Data connections may go to kTLS (see `ktls`).
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}
