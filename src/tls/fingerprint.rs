//! SHA-256 certificate fingerprints, and the verifier that pins one.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use ring::digest;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// SHA-256 of a certificate's DER encoding. Printed as 64 lowercase hex digits; parsed from
/// hex with or without `:` separators and an optional `sha256:` prefix, in any case.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER-encoded certificate.
    pub fn of(cert: &[u8]) -> Self {
        let d = digest::digest(&digest::SHA256, cert);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A fingerprint string that is not 32 bytes of hex.
#[derive(Debug, thiserror::Error)]
#[error("invalid SHA-256 fingerprint {0:?}: expected 64 hex digits")]
pub struct BadFingerprint(String);

impl FromStr for Fingerprint {
    type Err = BadFingerprint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let body = trimmed
            .strip_prefix("sha256:")
            .or_else(|| trimmed.strip_prefix("SHA256:"))
            .unwrap_or(trimmed);
        let hex: Vec<u8> = body.bytes().filter(|b| *b != b':').collect();
        if hex.len() != 64 {
            return Err(BadFingerprint(s.to_string()));
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            let pair = std::str::from_utf8(pair).map_err(|_| BadFingerprint(s.to_string()))?;
            out[i] = u8::from_str_radix(pair, 16).map_err(|_| BadFingerprint(s.to_string()))?;
        }
        Ok(Fingerprint(out))
    }
}

/// The relay presented a certificate other than the pinned one.
#[derive(Debug, thiserror::Error)]
#[error("relay certificate fingerprint mismatch: expected {expected}, relay presented {presented}")]
pub struct FingerprintMismatch {
    /// The pinned fingerprint.
    pub expected: Fingerprint,
    /// What the relay sent.
    pub presented: Fingerprint,
}

/// Accepts exactly one end-entity certificate, identified by fingerprint, whatever its name or
/// issuer; handshake signatures are still verified against that certificate's key, so only the
/// holder of the private key can pass.
#[derive(Debug)]
pub struct PinnedVerifier {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    /// A verifier for `pin`, checking signatures with `provider`'s algorithms.
    pub fn new(pin: Fingerprint, provider: Arc<CryptoProvider>) -> Self {
        Self { pin, provider }
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Fingerprint::of(end_entity);
        if presented == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(FingerprintMismatch {
                    expected: self.pin,
                    presented,
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_spellings() {
        let fp = Fingerprint::of(b"cert");
        let plain = fp.to_string();
        let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(plain.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(colons.join(":").parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(
            format!("sha256:{plain}").parse::<Fingerprint>().unwrap(),
            fp
        );
        assert!("abcd".parse::<Fingerprint>().is_err());
        assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
    }
}
