//! The ACME protocol (RFC 8555) from the relay's side: find or create the account, order a
//! certificate for one host, answer its HTTP-01 challenge (the shared HTTP port serves the
//! token from [`Challenges`]), finalize with a fresh key's CSR, download the chain.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::sign::CertifiedKey;
use serde_json::{json, Value};

use super::fetch::{Fetcher, Response};
use super::jws::{b64, AccountKey, Signer};
use super::AcmeError;

/// Longest wait for a challenge to be validated or an order to be issued.
pub const POLL_LIMIT: Duration = Duration::from_secs(90);
/// Longest pause between polls, whatever `Retry-After` asks.
const POLL_MAX_PAUSE: Duration = Duration::from_secs(5);
/// Tries of one request that the server refused for a stale nonce (`badNonce`).
const NONCE_TRIES: usize = 5;
/// Most challenge tokens answered at once (each issuance adds one per host).
const MAX_TOKENS: usize = 64;

/// Which challenge the relay answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// HTTP-01: a token over plain HTTP on port 80 (the shared HTTP port).
    Http01,
    /// TLS-ALPN-01 (RFC 8737): a certificate for ALPN `acme-tls/1` on port 443 (the shared
    /// TLS port), for a relay with no port 80.
    TlsAlpn01,
}

impl ChallengeKind {
    /// The ACME name of the challenge type.
    pub fn name(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// The challenges being validated now: HTTP-01 tokens and their key authorizations (what
/// `GET /.well-known/acme-challenge/TOKEN` on the shared HTTP port answers), and TLS-ALPN-01
/// certificates by host (what the shared TLS port shows a CA asking for `acme-tls/1`).
#[derive(Default)]
pub struct Challenges {
    tokens: Mutex<HashMap<String, String>>,
    tls_alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

/// The path prefix HTTP-01 validation requests use.
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

impl Challenges {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key authorization to answer for request path `path`, if it is a token being
    /// validated now.
    pub fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(CHALLENGE_PREFIX)?;
        self.lock().get(token).cloned()
    }

    fn insert(&self, token: &str, key_auth: String) -> Result<(), AcmeError> {
        let mut g = self.lock();
        if g.len() >= MAX_TOKENS {
            return Err(AcmeError::Protocol("too many challenges at once".into()));
        }
        g.insert(token.to_string(), key_auth);
        Ok(())
    }

    fn remove(&self, token: &str) {
        self.lock().remove(token);
    }

    fn alpn(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<CertifiedKey>>> {
        self.tls_alpn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The TLS-ALPN-01 certificate for `host`, if its challenge is being validated now.
    pub fn tls_alpn(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn().get(host).cloned()
    }
}

/// The TLS-ALPN-01 certificate for `host` (RFC 8737 section 3): self-signed, naming the host,
/// with the critical `acmeIdentifier` extension holding the SHA-256 of `key_auth`.
fn tls_alpn_certificate(host: &str, key_auth: &str) -> Result<Arc<CertifiedKey>, AcmeError> {
    let crypto = |e: rcgen::Error| AcmeError::Crypto(e.to_string());
    let digest = ring::digest::digest(&ring::digest::SHA256, key_auth.as_bytes());
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).map_err(crypto)?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest.as_ref()));
    let key = rcgen::KeyPair::generate().map_err(crypto)?;
    let cert = params.self_signed(&key).map_err(crypto)?;
    let key = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| AcmeError::Crypto(e.to_string()))?;
    // Not `CertifiedKey::from_der`: its check parses the certificate with webpki, which
    // refuses the critical extension the challenge is all about.
    let key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| AcmeError::Crypto(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], key)))
}

/// Serves the TLS-ALPN-01 certificates of [`Challenges`] by SNI.
#[derive(Debug)]
pub struct AlpnResolver(pub Arc<Challenges>);

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges").finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for AlpnResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.tls_alpn(&hello.server_name()?.to_ascii_lowercase())
    }
}

/// A certificate just issued: its chain and its key, both PEM.
pub struct Issued {
    /// Leaf first, then intermediates.
    pub chain_pem: String,
    /// The key the CSR was made with (PKCS#8 PEM).
    pub key_pem: String,
}

/// An account at one ACME directory.
pub struct Client {
    fetch: Fetcher,
    new_nonce: String,
    new_order: String,
    key: AccountKey,
    kid: String,
    nonce: Option<String>,
}

impl Client {
    /// Reads the directory at `url` and finds (or creates) the account of `key`, agreeing to
    /// the CA's terms, with `email` as its contact if given.
    pub async fn connect(
        fetch: Fetcher,
        url: &str,
        key: AccountKey,
        email: Option<&str>,
    ) -> Result<Self, AcmeError> {
        let dir = fetch.request("GET", url, None).await?;
        let dir: Value = json_of(&dir, "the directory")?;
        let field = |f: &str| -> Result<String, AcmeError> {
            dir[f]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| AcmeError::Protocol(format!("the directory at {url} has no {f}")))
        };
        let mut client = Client {
            fetch,
            new_nonce: field("newNonce")?,
            new_order: field("newOrder")?,
            key,
            kid: String::new(),
            nonce: None,
        };
        let mut account = json!({ "termsOfServiceAgreed": true });
        if let Some(email) = email {
            account["contact"] = json!([format!("mailto:{email}")]);
        }
        let new_account = field("newAccount")?;
        let r = client.post(&new_account, Some(account)).await?;
        client.kid = r
            .header("location")
            .ok_or_else(|| AcmeError::Protocol("the new account has no Location".into()))?
            .to_string();
        Ok(client)
    }

    /// Orders, validates and downloads a certificate for `host`, answering its HTTP-01
    /// challenge through `challenges`.
    pub async fn issue(
        &mut self,
        host: &str,
        challenges: &Challenges,
        kind: ChallengeKind,
    ) -> Result<Issued, AcmeError> {
        let order = json!({ "identifiers": [{ "type": "dns", "value": host }] });
        let new_order = self.new_order.clone();
        let r = self.post(&new_order, Some(order)).await?;
        let order_url = r
            .header("location")
            .ok_or_else(|| AcmeError::Protocol("the new order has no Location".into()))?
            .to_string();
        let order: Value = json_of(&r, "the order")?;
        for authz in strings(&order["authorizations"]) {
            self.authorize(&authz, host, challenges, kind).await?;
        }
        let finalize = order["finalize"]
            .as_str()
            .ok_or_else(|| AcmeError::Protocol("the order has no finalize URL".into()))?
            .to_string();
        let key = rcgen::KeyPair::generate().map_err(|e| AcmeError::Crypto(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
            .map_err(|e| AcmeError::Crypto(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| AcmeError::Crypto(e.to_string()))?;
        self.post(&finalize, Some(json!({ "csr": b64(csr.der()) })))
            .await?;
        let done = self
            .poll(&order_url, "the order", &["valid"], &["invalid"])
            .await?;
        let cert_url = done["certificate"]
            .as_str()
            .ok_or_else(|| AcmeError::Protocol("the valid order has no certificate URL".into()))?
            .to_string();
        let chain = self.post(&cert_url, None).await?;
        let chain_pem = String::from_utf8(chain.body)
            .map_err(|_| AcmeError::Protocol("the certificate is not PEM text".into()))?;
        Ok(Issued {
            chain_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Gets one authorization valid: answers its HTTP-01 challenge and waits for the CA.
    async fn authorize(
        &mut self,
        url: &str,
        host: &str,
        challenges: &Challenges,
        kind: ChallengeKind,
    ) -> Result<(), AcmeError> {
        let r = self.post(url, None).await?;
        let authz: Value = json_of(&r, "an authorization")?;
        if authz["status"] == "valid" {
            return Ok(());
        }
        let challenge = authz["challenges"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == kind.name()))
            .ok_or_else(|| {
                AcmeError::Protocol(format!("the CA offers no {} challenge", kind.name()))
            })?;
        let (Some(token), Some(chal_url)) =
            (challenge["token"].as_str(), challenge["url"].as_str())
        else {
            return Err(AcmeError::Protocol(format!(
                "the {} challenge has no token or URL",
                kind.name()
            )));
        };
        if token.is_empty()
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(AcmeError::Protocol(
                "the challenge token is not base64url".into(),
            ));
        }
        let (token, chal_url) = (token.to_string(), chal_url.to_string());
        let key_auth = self.key.key_authorization(&token);
        match kind {
            ChallengeKind::Http01 => challenges.insert(&token, key_auth)?,
            ChallengeKind::TlsAlpn01 => {
                let cert = tls_alpn_certificate(host, &key_auth)?;
                challenges.alpn().insert(host.to_string(), cert);
            }
        }
        let result = async {
            self.post(&chal_url, Some(json!({}))).await?;
            self.poll(
                url,
                "the authorization",
                &["valid"],
                &["invalid", "deactivated", "expired", "revoked"],
            )
            .await
        }
        .await;
        match kind {
            ChallengeKind::Http01 => challenges.remove(&token),
            ChallengeKind::TlsAlpn01 => {
                challenges.alpn().remove(host);
            }
        }
        result.map(|_| ())
    }

    /// POST-as-GET `url` until its `status` is one of `done` (returned) or `failed` (an
    /// error with the CA's reason), for at most [`POLL_LIMIT`].
    async fn poll(
        &mut self,
        url: &str,
        what: &str,
        done: &[&str],
        failed: &[&str],
    ) -> Result<Value, AcmeError> {
        let start = Instant::now();
        loop {
            let r = self.post(url, None).await?;
            let pause = retry_after(&r);
            let v: Value = json_of(&r, what)?;
            let status = v["status"].as_str().unwrap_or("");
            if done.contains(&status) {
                return Ok(v);
            }
            if failed.contains(&status) {
                return Err(AcmeError::Rejected(format!(
                    "{what} is {status}: {}",
                    reason(&v)
                )));
            }
            if start.elapsed() + pause > POLL_LIMIT {
                return Err(AcmeError::Protocol(format!(
                    "{what} is still {status:?} after {POLL_LIMIT:?}"
                )));
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// A signed POST (POST-as-GET when `payload` is `None`); a stale nonce is retried with
    /// the fresh one the refusal carries.
    async fn post(&mut self, url: &str, payload: Option<Value>) -> Result<Response, AcmeError> {
        for _ in 0..NONCE_TRIES {
            let nonce = match self.nonce.take() {
                Some(n) => n,
                None => self.fresh_nonce().await?,
            };
            let signer = match self.kid.is_empty() {
                true => Signer::Jwk,
                false => Signer::Kid(&self.kid),
            };
            let body = self.key.sign(signer, &nonce, url, payload.as_ref())?;
            let r = self
                .fetch
                .request("POST", url, Some(("application/jose+json", &body)))
                .await?;
            self.nonce = r.header("replay-nonce").map(str::to_string);
            if r.status < 400 {
                return Ok(r);
            }
            let problem: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            if problem["type"] == "urn:ietf:params:acme:error:badNonce" {
                continue;
            }
            return Err(AcmeError::Rejected(format!(
                "{url} answered {}: {}",
                r.status,
                reason(&problem)
            )));
        }
        Err(AcmeError::Protocol(format!(
            "{url}: {NONCE_TRIES} nonces in a row refused"
        )))
    }

    async fn fresh_nonce(&self) -> Result<String, AcmeError> {
        let r = self.fetch.request("HEAD", &self.new_nonce, None).await?;
        r.header("replay-nonce")
            .map(str::to_string)
            .ok_or_else(|| AcmeError::Protocol("newNonce gave no Replay-Nonce".into()))
    }
}

/// The body of a successful response as JSON.
fn json_of(r: &Response, what: &str) -> Result<Value, AcmeError> {
    if r.status >= 400 {
        return Err(AcmeError::Protocol(format!("{what}: status {}", r.status)));
    }
    serde_json::from_slice(&r.body)
        .map_err(|e| AcmeError::Protocol(format!("{what} is not JSON: {e}")))
}

/// The strings of a JSON array (nothing if it is not one).
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A problem document's (or failed object's) reason, in one line.
fn reason(v: &Value) -> String {
    let detail = v["detail"]
        .as_str()
        .or_else(|| v["error"]["detail"].as_str())
        .or_else(|| {
            v["challenges"]
                .as_array()?
                .iter()
                .find_map(|c| c["error"]["detail"].as_str())
        })
        .unwrap_or("no reason given");
    detail
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect()
}

/// How long to wait before polling again: `Retry-After` seconds, at least one and at most
/// [`POLL_MAX_PAUSE`].
fn retry_after(r: &Response) -> Duration {
    let secs = r
        .header("retry-after")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(secs.max(1)).min(POLL_MAX_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tokens_being_validated_are_answered() {
        let c = Challenges::default();
        c.insert("abc_-1", "abc_-1.thumb".into()).unwrap();
        assert_eq!(
            c.answer("/.well-known/acme-challenge/abc_-1").as_deref(),
            Some("abc_-1.thumb")
        );
        assert_eq!(c.answer("/.well-known/acme-challenge/other"), None);
        assert_eq!(c.answer("/abc_-1"), None);
        c.remove("abc_-1");
        assert_eq!(c.answer("/.well-known/acme-challenge/abc_-1"), None);
        for i in 0..MAX_TOKENS {
            c.insert(&i.to_string(), String::new()).unwrap();
        }
        assert!(c.insert("one-more", String::new()).is_err());
    }

    #[test]
    fn a_problem_reason_is_one_bounded_line() {
        let v = json!({ "detail": format!("bad\r\nthing{}", "x".repeat(1000)) });
        let r = reason(&v);
        assert!(r.starts_with("badthing") && r.len() == 300, "{r}");
        let failed = json!({ "status": "invalid", "challenges": [{ "error": { "detail": "connection refused" } }] });
        assert_eq!(reason(&failed), "connection refused");
    }
}
