//! Certificates from an ACME CA (RFC 8555; Let's Encrypt by default) for the hosts the
//! relay terminates HTTPS for:
//!
//! - [`fetch`]: the HTTPS client (one request per connection, bounded).
//! - [`jws`]: the account key and the signed requests.
//! - [`client`]: the protocol: account, order, HTTP-01 challenge, finalize, download.
//! - [`validity`]: a certificate's validity period, for renewal.
//! - [`store`]: the certificates in the state directory and in memory, served by SNI.
//! - [`issuer`]: the task that issues ahead of visitors and renews before expiry.
//!
//! HTTP-01 is answered on the shared HTTP port (port 80 as the CA sees it); TLS-ALPN-01 on
//! the shared TLS port, for a relay with no port 80.

pub mod client;
pub mod fetch;
pub mod issuer;
pub mod jws;
pub mod store;
pub mod validity;

use std::path::PathBuf;
use std::sync::Arc;

pub use client::{ChallengeKind, Challenges};
pub use store::Certs;

/// Let's Encrypt's production directory, the default CA.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Where and how certificates are got.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The CA's directory URL.
    pub directory: String,
    /// Contact address for the account, if any.
    pub email: Option<String>,
    /// An extra root (PEM) the directory's own certificate is checked against (a private or
    /// test CA).
    pub ca_file: Option<PathBuf>,
    /// Where the account key and certificates of this directory are kept.
    pub dir: PathBuf,
    /// The challenge answered.
    pub challenge: ChallengeKind,
}

impl AcmeSettings {
    /// Settings for `directory`, kept under `state_dir/acme/<directory's hash>`, so that
    /// switching CAs (staging, production) never serves one's certificates for the other.
    pub fn new(
        directory: String,
        email: Option<String>,
        ca_file: Option<PathBuf>,
        state_dir: &std::path::Path,
    ) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, directory.as_bytes());
        let tag: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        AcmeSettings {
            directory,
            email,
            ca_file,
            dir: state_dir.join("acme").join(tag),
            challenge: ChallengeKind::Http01,
        }
    }
}

/// What an ACME operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// A setting or file is wrong.
    #[error("ACME settings: {0}")]
    Config(String),
    /// A request to the CA failed on the way.
    #[error("ACME request: {0}")]
    Http(String),
    /// The CA answered something this client does not understand.
    #[error("ACME protocol: {0}")]
    Protocol(String),
    /// The CA refused (a problem document, a failed challenge).
    #[error("the CA refused: {0}")]
    Rejected(String),
    /// A key or signature operation failed.
    #[error("ACME key: {0}")]
    Crypto(String),
    /// The state directory.
    #[error(transparent)]
    State(#[from] crate::tls::TlsError),
}

/// The relay's HTTPS termination state: certificates, and the challenges being answered.
pub struct Acme {
    /// Certificates by host.
    pub certs: Arc<Certs>,
    /// HTTP-01 tokens being validated.
    pub challenges: Arc<Challenges>,
}
