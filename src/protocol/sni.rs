//! The server name a TLS ClientHello asks for, sans-IO. The relay reads only this far into a
//! TLS connection on its shared TLS port, then forwards every byte, these included, to the
//! service that owns the name: it never decrypts and never answers in TLS itself.
//!
//! A ClientHello may be split across several handshake records (large post-quantum key
//! shares make that more likely); fragments are joined before parsing.

/// Largest ClientHello (handshake message) the relay reads before giving up, in bytes.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// Most records a ClientHello may be split across. Real clients use one or two; a cap keeps
/// a visitor sending a record per byte from making the relay re-join thousands of fragments.
pub const MAX_HELLO_RECORDS: usize = 16;

const RECORD_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0x0000;
const EXT_ALPN: u16 = 0x0010;
const NAME_TYPE_HOST: u8 = 0x00;

/// What the bytes read so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sni {
    /// The ClientHello is not complete yet: read more.
    NeedMore,
    /// The ClientHello names this host (lower case, no trailing dot).
    Found(String),
    /// A complete ClientHello without a server name.
    Missing,
    /// A ringtunnel agent (its ALPN list offers [`super::AGENT_ALPN`]), whatever name it
    /// gives: for the relay's control plane, not a service.
    Agent,
    /// An ACME CA validating a TLS-ALPN-01 challenge for this host (its ALPN list offers
    /// [`ACME_TLS_ALPN`], RFC 8737).
    AcmeChallenge(String),
}

/// The ALPN protocol of TLS-ALPN-01 validation connections (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Which protocols of interest an ALPN list offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offer {
    Other,
    Agent,
    Acme,
}

/// Why the bytes are not a usable ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    /// The connection does not start with a TLS handshake record.
    #[error("not a TLS handshake")]
    NotTls,
    /// The ClientHello is larger than [`MAX_CLIENT_HELLO`].
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
    /// The records or the ClientHello do not parse.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// Reads the server name from the ClientHello at the start of `buf`.
pub fn parse_client_hello(buf: &[u8]) -> Result<Sni, SniError> {
    // Join handshake-record fragments until the whole handshake message is present.
    let mut hs = Vec::new();
    let mut rest = buf;
    let mut records = 0;
    loop {
        if rest.is_empty() {
            return Ok(Sni::NeedMore);
        }
        records += 1;
        if records > MAX_HELLO_RECORDS {
            return Err(SniError::Malformed(
                "ClientHello split into too many records",
            ));
        }
        if rest[0] != RECORD_HANDSHAKE {
            return Err(if hs.is_empty() {
                SniError::NotTls
            } else {
                SniError::Malformed("ClientHello interrupted by another record type")
            });
        }
        if rest.len() < 5 {
            return Ok(Sni::NeedMore);
        }
        if rest[1] != 0x03 {
            return Err(SniError::NotTls);
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > (1 << 14) {
            return Err(SniError::Malformed("record length"));
        }
        let available = (rest.len() - 5).min(len);
        hs.extend_from_slice(&rest[5..5 + available]);
        if hs.len() >= 4 {
            if hs[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(SniError::Malformed(
                    "first handshake message is not a ClientHello",
                ));
            }
            let body_len =
                (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
            if body_len > MAX_CLIENT_HELLO {
                return Err(SniError::TooLarge);
            }
            if hs.len() >= 4 + body_len {
                return parse_body(&hs[4..4 + body_len]);
            }
        }
        if available < len {
            return Ok(Sni::NeedMore);
        }
        rest = &rest[5 + len..];
    }
}

/// [`parse_client_hello`] for a buffer that grows read by read: the parse runs only when a
/// record (or record header) has completed, so the work per connection stays bounded by
/// [`MAX_HELLO_RECORDS`] parses however the bytes are chunked.
#[derive(Debug, Default)]
pub struct HelloScanner {
    next_at: usize,
}

impl HelloScanner {
    /// A scanner for a new connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same answer as `parse_client_hello(buf)`, where `buf` is everything read so far
    /// (each call's `buf` extends the previous one); `NeedMore` while no record completed.
    pub fn feed(&mut self, buf: &[u8]) -> Result<Sni, SniError> {
        if !buf.is_empty() && buf.len() < self.next_at {
            return Ok(Sni::NeedMore);
        }
        let answer = parse_client_hello(buf)?;
        if answer == Sni::NeedMore {
            self.next_at = next_boundary(buf);
        }
        Ok(answer)
    }
}

/// Length `buf` must reach before the next record header or record is complete.
fn next_boundary(buf: &[u8]) -> usize {
    let mut at = 0;
    while at + 5 <= buf.len() {
        let len = usize::from(u16::from_be_bytes([buf[at + 3], buf[at + 4]]));
        if at + 5 + len > buf.len() {
            return at + 5 + len;
        }
        at += 5 + len;
    }
    at + 5
}

/// Cursor that never reads past its slice.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SniError> {
        if self.0.len() < n {
            return Err(SniError::Malformed("truncated ClientHello"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, SniError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SniError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

fn parse_body(body: &[u8]) -> Result<Sni, SniError> {
    let mut c = Cur(body);
    let _legacy_version = c.u16()?;
    let _random = c.take(32)?;
    if c.vec8()?.len() > 32 {
        return Err(SniError::Malformed("session id longer than 32 bytes"));
    }
    let suites = c.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("cipher suites"));
    }
    if c.vec8()?.is_empty() {
        return Err(SniError::Malformed("compression methods"));
    }
    if c.0.is_empty() {
        return Ok(Sni::Missing); // no extensions at all
    }
    let mut exts = Cur(c.vec16()?);
    let mut found = None;
    let mut offer = Offer::Other;
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        match kind {
            EXT_SERVER_NAME if found.is_none() => found = Some(server_name(data)?),
            EXT_ALPN => offer = alpn_offer(data)?,
            _ => {}
        }
    }
    Ok(match (offer, found) {
        (Offer::Agent, _) => Sni::Agent,
        (Offer::Acme, Some(Some(name))) => Sni::AcmeChallenge(name),
        (_, Some(Some(name))) => Sni::Found(name),
        (_, _) => Sni::Missing,
    })
}

/// The host name in a `server_name` extension, if it has one.
fn server_name(data: &[u8]) -> Result<Option<String>, SniError> {
    let mut list = Cur(data);
    let mut names = Cur(list.vec16()?);
    while !names.0.is_empty() {
        let name_type = names.u8()?;
        let name = names.vec16()?;
        if name_type == NAME_TYPE_HOST {
            return normalize(name).map(Some);
        }
    }
    Ok(None)
}

/// Whether an ALPN extension's protocol list offers the agent's protocol or ACME's.
fn alpn_offer(data: &[u8]) -> Result<Offer, SniError> {
    let mut list = Cur(data);
    let mut protocols = Cur(list.vec16()?);
    let mut offer = Offer::Other;
    while !protocols.0.is_empty() {
        match protocols.vec8()? {
            p if p == super::AGENT_ALPN => return Ok(Offer::Agent),
            p if p == ACME_TLS_ALPN => offer = Offer::Acme,
            _ => {}
        }
    }
    Ok(offer)
}

fn normalize(name: &[u8]) -> Result<String, SniError> {
    let name = name.strip_suffix(b".").unwrap_or(name);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !ok {
        return Err(SniError::Malformed("server name is not a host name"));
    }
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal but well-formed ClientHello record carrying `sni` (if any), padded with an
    /// extra extension of `pad` bytes.
    pub(crate) fn client_hello(sni: Option<&str>, pad: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let mut entry = vec![NAME_TYPE_HOST];
            entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
            entry.extend_from_slice(name.as_bytes());
            let mut list = (entry.len() as u16).to_be_bytes().to_vec();
            list.extend_from_slice(&entry);
            exts.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
            exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
            exts.extend_from_slice(&list);
        }
        exts.extend_from_slice(&0x0015u16.to_be_bytes()); // padding extension
        exts.extend_from_slice(&(pad as u16).to_be_bytes());
        exts.extend(std::iter::repeat_n(0u8, pad));
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        records(&hs, 1 << 14)
    }

    fn records(hs: &[u8], max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in hs.chunks(max) {
            out.extend_from_slice(&[RECORD_HANDSHAKE, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A real ClientHello (rustls) for `name` offering `alpn`.
    fn rustls_hello(name: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let server = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn an_acme_validation_is_told_by_its_alpn() {
        let ca = rustls_hello("a.example", &[ACME_TLS_ALPN]);
        assert_eq!(
            parse_client_hello(&ca),
            Ok(Sni::AcmeChallenge("a.example".into()))
        );
        let browser = rustls_hello("a.example", &[b"h2", b"http/1.1"]);
        assert_eq!(
            parse_client_hello(&browser),
            Ok(Sni::Found("a.example".into()))
        );
    }

    #[test]
    fn an_agent_is_told_by_its_alpn_whatever_its_name() {
        let agent = rustls_hello("relay.example", &[b"h2", crate::protocol::AGENT_ALPN]);
        assert_eq!(parse_client_hello(&agent), Ok(Sni::Agent));
        let browser = rustls_hello("app.example", &[b"h2", b"http/1.1"]);
        assert_eq!(
            parse_client_hello(&browser),
            Ok(Sni::Found("app.example".into()))
        );
        let close = rustls_hello("app.example", &[b"ringtunnel2", b"ringtunne"]);
        assert_eq!(
            parse_client_hello(&close),
            Ok(Sni::Found("app.example".into()))
        );
    }

    #[test]
    fn finds_the_server_name() {
        let ch = client_hello(Some("App.Example.com."), 10);
        assert_eq!(
            parse_client_hello(&ch),
            Ok(Sni::Found("app.example.com".into()))
        );
        assert_eq!(
            parse_client_hello(&client_hello(None, 10)),
            Ok(Sni::Missing)
        );
    }

    #[test]
    fn fragmented_hello_is_joined() {
        let ch = client_hello(Some("a.example"), 3000);
        let hs = &ch[5..];
        let split = records(hs, 700);
        assert_eq!(
            parse_client_hello(&split),
            Ok(Sni::Found("a.example".into()))
        );
        assert_eq!(
            parse_client_hello(&split[..split.len() - 1]),
            Ok(Sni::NeedMore)
        );
    }

    #[test]
    fn reads_a_real_rustls_client_hello() {
        let roots = rustls::RootCertStore::empty();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("web.example.test").unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
        let mut wire = Vec::new();
        conn.write_tls(&mut wire).unwrap();
        assert_eq!(
            parse_client_hello(&wire),
            Ok(Sni::Found("web.example.test".into()))
        );
    }

    #[test]
    fn other_protocols_are_not_tls() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Err(SniError::NotTls)
        );
        assert_eq!(
            parse_client_hello(b"\x16\x02\x00\x00\x10"),
            Err(SniError::NotTls)
        );
        assert_eq!(parse_client_hello(b"\x16\x03"), Ok(Sni::NeedMore));
        assert!(matches!(
            parse_client_hello(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"),
            Err(SniError::Malformed(_))
        ));
    }

    #[test]
    fn hellos_in_tiny_records_are_refused() {
        let ch = client_hello(Some("a.example"), 100);
        let tiny = records(&ch[5..], 4);
        assert_eq!(
            parse_client_hello(&tiny),
            Err(SniError::Malformed(
                "ClientHello split into too many records"
            ))
        );
    }

    #[test]
    fn huge_hello_is_refused() {
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO, 0x01, 0x00, 0x00];
        hs.extend_from_slice(&[0; 16]);
        assert_eq!(
            parse_client_hello(&records(&hs, 100)),
            Err(SniError::TooLarge)
        );
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = parse_client_hello(&bytes);
        }

        #[test]
        fn never_panics_behind_a_valid_record_header(body in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
            hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
            hs.extend_from_slice(&body);
            let _ = parse_client_hello(&records(&hs, 256));
        }

        #[test]
        fn scanner_agrees_with_the_parser(name in "[a-z0-9]{1,20}(\\.[a-z0-9]{1,10}){0,2}", pad in 0usize..3000, record in 200usize..4000, chunk in 1usize..700) {
            let ch = client_hello(Some(&name), pad);
            let split = records(&ch[5..], record);
            let mut sc = HelloScanner::new();
            let mut end = 0;
            loop {
                end = (end + chunk).min(split.len());
                let got = sc.feed(&split[..end]);
                if got != Ok(Sni::NeedMore) || end == split.len() {
                    prop_assert_eq!(got, parse_client_hello(&split));
                    break;
                }
            }
        }

        #[test]
        fn every_prefix_needs_more(name in "[a-z0-9]{1,20}(\\.[a-z0-9]{1,10}){0,3}", pad in 0usize..600, cut in 0usize..2000) {
            let ch = client_hello(Some(&name), pad);
            prop_assert_eq!(parse_client_hello(&ch), Ok(Sni::Found(name.clone())));
            let cut = cut.min(ch.len() - 1);
            prop_assert_eq!(parse_client_hello(&ch[..cut]), Ok(Sni::NeedMore));
        }
    }
}
