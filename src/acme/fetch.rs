//! The HTTPS client the ACME client needs, and no more: one HTTP/1.1 request per connection
//! (`Connection: close`), bounded in time and size, verified against the web's roots plus an
//! optional extra root (a private or test CA's directory).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::AcmeError;
use crate::protocol::http::response::parse_response;
pub use crate::protocol::http::response::Response;

/// Longest time one request may take, connect to last byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response read (a certificate chain is a few KiB).
pub const MAX_RESPONSE: usize = 1 << 20;

/// Makes HTTPS requests.
#[derive(Clone)]
pub struct Fetcher {
    tls: TlsConnector,
}

impl Fetcher {
    /// A client trusting the web's roots, and `extra_root` (a PEM file of CA certificates)
    /// if given.
    pub fn new(extra_root: Option<&Path>) -> Result<Self, AcmeError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = extra_root {
            let bad = |why: String| AcmeError::Config(format!("{}: {why}", path.display()));
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let mut found = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad(e.to_string()))?;
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
                found += 1;
            }
            if found == 0 {
                return Err(bad("holds no PEM certificate".into()));
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| AcmeError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Fetcher {
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    /// `method` `url` (https only), with `body` of content type `ctype` if given.
    pub async fn request(
        &self,
        method: &str,
        url: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<Response, AcmeError> {
        let fail = |why: String| AcmeError::Http(format!("{method} {url}: {why}"));
        let target = Target::parse(url).map_err(|e| fail(e.into()))?;
        let work = async {
            let tcp = TcpStream::connect((target.host.as_str(), target.port))
                .await
                .map_err(|e| fail(format!("connecting: {e}")))?;
            let name = ServerName::try_from(target.host.clone())
                .map_err(|e| fail(format!("server name: {e}")))?;
            let mut tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| fail(format!("TLS: {e}")))?;
            let mut req = format!(
                "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ringtunnel/{}\r\nAccept: */*\r\nConnection: close\r\n",
                target.path,
                target.authority,
                env!("CARGO_PKG_VERSION")
            )
            .into_bytes();
            if let Some((ctype, b)) = body {
                req.extend_from_slice(
                    format!("Content-Type: {ctype}\r\nContent-Length: {}\r\n", b.len()).as_bytes(),
                );
            }
            req.extend_from_slice(b"\r\n");
            if let Some((_, b)) = body {
                req.extend_from_slice(b);
            }
            tls.write_all(&req)
                .await
                .map_err(|e| fail(format!("sending: {e}")))?;
            let mut raw = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                match tls.read(&mut chunk).await {
                    Ok(0) => break,
                    Ok(n) => raw.extend_from_slice(&chunk[..n]),
                    // A server that closes without close_notify: what it sent is framed
                    // by its length or chunks, which parsing checks.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(fail(format!("reading: {e}"))),
                }
                if raw.len() > MAX_RESPONSE {
                    return Err(fail(format!("response larger than {MAX_RESPONSE} bytes")));
                }
            }
            parse_response(&raw).map_err(|e| fail(e.into()))
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(fail(format!("no answer within {REQUEST_TIMEOUT:?}"))),
        }
    }
}

/// Where an `https://` URL points.
struct Target {
    host: String,
    port: u16,
    /// `host[:port]` as written, for the Host header.
    authority: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, &'static str> {
        let rest = url
            .strip_prefix("https://")
            .ok_or("only https:// URLs are fetched")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err("the URL has no host, or has credentials");
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| "bad port")?,
                None if after.is_empty() => 443,
                None => return Err("bad host"),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| "bad port")?),
                None => (authority.to_string(), 443),
            }
        };
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err("the path holds spaces or control characters");
        }
        Ok(Target {
            host,
            port,
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_with_a_host() {
        let t = Target::parse("https://127.0.0.1:14000/dir").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 14000, "/dir")
        );
        let t = Target::parse("https://[::1]/x").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 443));
        let t = Target::parse("https://acme.example").unwrap();
        assert_eq!((t.port, t.path.as_str()), (443, "/"));
        for bad in [
            "http://a/",
            "https://",
            "https://u@a/",
            "https://a:x/",
            "https://a/b c",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
