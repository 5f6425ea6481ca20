//! HTTP/1.x request heads, sans-IO: find where a request head ends, read the host and path it
//! is for and how its body is framed, and write the visitor's address into it. The relay
//! routes a connection on its first head; [`requests`] follows the rest of the requests on it
//! to rewrite each head the same way.
//!
//! The parser is strict where leniency would let two parties read one head differently
//! (obsolete line folding, whitespace before a colon, two `Host` headers, a control character
//! in a value): those are [`HeadError::Malformed`], answered with 400.

use std::net::{IpAddr, SocketAddr};

pub mod page;
pub mod requests;
pub mod response;

/// Default largest request head the relay reads before answering 431, in bytes.
pub const DEFAULT_MAX_HEAD: usize = 16 * 1024;

/// Why a request head cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The head did not end within the size limit (answered 431).
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    /// The bytes are not an HTTP/1.x request head (answered 400).
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
}

/// A complete, parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the buffer the head takes, including the blank line that ends it.
    pub len: usize,
    /// The host the request is for: lower case, without port or trailing dot.
    pub host: String,
    /// The path of the request target (starts with `/`; `*` for `OPTIONS *`).
    pub path: String,
    /// What follows the head on the connection.
    pub body: Body,
    /// The `Authorization` header's value, as sent (for basic auth at the relay).
    pub authorization: Option<Vec<u8>>,
}

/// What follows a request head (RFC 9112 section 6.3, as a server reads a request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// Nothing: the next request head, if any.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// A chunked body, ended by a zero-size chunk and the trailer section.
    Chunked,
    /// The connection stops being HTTP/1.1 if the origin agrees (`Upgrade`, `CONNECT`): the
    /// rest is not requests the relay can read.
    Tunnel,
}

/// Parses the request head at the start of `buf`. `Ok(None)` means the head has not ended
/// yet and is still within `max` bytes: read more. Empty lines before the request line are
/// skipped (RFC 9112 section 2.2) and counted in [`Head::len`].
pub fn parse_head(buf: &[u8], max: usize) -> Result<Option<Head>, HeadError> {
    let skip = leading_empty_lines(buf);
    if skip >= max {
        return Err(HeadError::TooLarge(max));
    }
    Ok(parse_request(&buf[skip..], max - skip)?.map(|mut h| {
        h.len += skip;
        h
    }))
}

/// [`parse_head`] for a buffer that grows read by read, in linear time overall: the full parse
/// runs only when the newest bytes could have ended the head (or on the first read, to turn
/// away garbage at once, or at the size limit). Re-parsing on every read would let a visitor
/// sending one byte per packet cost the relay quadratic work.
#[derive(Debug)]
pub struct HeadScanner {
    max: usize,
    scanned: usize,
}

impl HeadScanner {
    /// A scanner for heads of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        HeadScanner { max, scanned: 0 }
    }

    /// The same answer as `parse_head(buf, max)`, where `buf` is everything read so far
    /// (each call's `buf` extends the previous one).
    pub fn feed(&mut self, buf: &[u8]) -> Result<Option<Head>, HeadError> {
        let first = self.scanned == 0;
        // The blank line that ends a head is "\n\n" or "\n\r\n": look only at new bytes and
        // the two before them.
        let from = self.scanned.saturating_sub(2);
        self.scanned = buf.len();
        let new = &buf[from.min(buf.len())..];
        let may_end =
            new.windows(2).any(|w| w == b"\n\n") || new.windows(3).any(|w| w == b"\n\r\n");
        if first || may_end || buf.len() >= self.max {
            parse_head(buf, self.max)
        } else {
            Ok(None)
        }
    }
}

/// Bytes of empty lines (CRLF or LF) at the start of `buf`.
fn leading_empty_lines(buf: &[u8]) -> usize {
    let mut i = 0;
    loop {
        match &buf[i..] {
            [b'\r', b'\n', ..] => i += 2,
            [b'\n', ..] => i += 1,
            _ => return i,
        }
    }
}

fn parse_request(buf: &[u8], max: usize) -> Result<Option<Head>, HeadError> {
    let Some(len) = head_end(buf) else {
        return if buf.len() >= max {
            Err(HeadError::TooLarge(max))
        } else {
            // Fail early on bytes that can never become a request line.
            check_partial_request_line(buf)?;
            Ok(None)
        };
    };
    if len > max {
        return Err(HeadError::TooLarge(max));
    }
    let head = &buf[..len];
    let mut lines = Lines(head);
    let request_line = lines.next().ok_or(HeadError::Malformed("empty head"))?;
    let RequestLine { method, target } = parse_request_line(request_line)?;
    let (host, path) = split_target(target)?;
    let mut host_header = None;
    let mut length: Option<u64> = None;
    let mut chunked: Option<bool> = None;
    let mut upgrade = method == b"CONNECT";
    let mut authorization = None;
    for line in lines {
        if line.is_empty() {
            break;
        }
        let (name, value) = parse_header(line)?;
        if name.eq_ignore_ascii_case(b"host") {
            if host_header.is_some() {
                return Err(HeadError::Malformed("more than one Host header"));
            }
            host_header = Some(value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            // Every value, on every line, must agree: two lengths are how requests get
            // smuggled past a proxy that reads one and an origin that reads the other.
            for v in value.split(|&b| b == b',').map(trim) {
                let n = parse_length(v)?;
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::Malformed("conflicting Content-Length values"));
                }
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // The last coding decides; a later line extends the list.
            if let Some(last) = value.rsplit(|&b| b == b',').map(trim).next() {
                chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
        } else if name.eq_ignore_ascii_case(b"authorization") {
            // One value only (not a list header): with two, the relay could check one and
            // the origin read the other.
            if authorization.is_some() {
                return Err(HeadError::Malformed("more than one Authorization header"));
            }
            authorization = Some(value.to_vec());
        } else if name.eq_ignore_ascii_case(b"upgrade") && !value.is_empty() {
            upgrade = true;
        }
    }
    let body = match (chunked, length) {
        (Some(_), Some(_)) => {
            return Err(HeadError::Malformed(
                "both Transfer-Encoding and Content-Length",
            ))
        }
        (Some(false), None) => {
            return Err(HeadError::Malformed(
                "a Transfer-Encoding that does not end in chunked",
            ))
        }
        _ if upgrade => Body::Tunnel,
        (Some(true), None) => Body::Chunked,
        (None, Some(0)) | (None, None) => Body::None,
        (None, Some(n)) => Body::Length(n),
    };
    // An absolute-form target names the host itself (RFC 9112 section 3.2.2). The relay routes
    // on it while the origin may read the Host header, so the two must name the same host:
    // otherwise one request would be routed to one service and read as another's.
    if let (Some(target), Some(header)) = (host, host_header) {
        if normalize_host(target) != normalize_host(header) {
            return Err(HeadError::Malformed(
                "the Host header and the request target name different hosts",
            ));
        }
    }
    let host = host
        .or(host_header)
        .ok_or(HeadError::Malformed("no Host header"))?;
    let host = normalize_host(host).ok_or(HeadError::Malformed("invalid Host"))?;
    Ok(Some(Head {
        len,
        host,
        path: String::from_utf8_lossy(path).into_owned(),
        body,
        authorization,
    }))
}

/// Offset just past the blank line that ends the head, if it is in `buf`. Lines end in CRLF;
/// a bare LF is accepted as well, as RFC 9112 allows.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(i) = buf[start..].iter().position(|&b| b == b'\n') {
        let line_end = start + i;
        let line = &buf[start..line_end];
        if (line.is_empty() || line == b"\r") && start > 0 {
            return Some(line_end + 1);
        }
        start = line_end + 1;
    }
    None
}

/// The lines of a head, without their line endings.
struct Lines<'a>(&'a [u8]);

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let i = self.0.iter().position(|&b| b == b'\n')?;
        let line = &self.0[..i];
        self.0 = &self.0[i + 1..];
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn check_partial_request_line(buf: &[u8]) -> Result<(), HeadError> {
    if buf == b"\r" {
        return Ok(()); // the start of another empty line
    }
    let method_end = buf.iter().position(|&b| b == b' ').unwrap_or(buf.len());
    if !buf[..method_end].iter().all(|&b| is_tchar(b)) {
        return Err(HeadError::Malformed("invalid method"));
    }
    Ok(())
}

/// `Content-Length` digits (no sign, no spaces, at most 18 digits so it fits a u64).
fn parse_length(v: &[u8]) -> Result<u64, HeadError> {
    let bad = HeadError::Malformed("invalid Content-Length");
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return Err(bad);
    }
    Ok(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// A request line's parts.
struct RequestLine<'a> {
    method: &'a [u8],
    target: &'a [u8],
}

/// The method and target of a request line (the version checked).
fn parse_request_line(line: &[u8]) -> Result<RequestLine<'_>, HeadError> {
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts
        .next()
        .ok_or(HeadError::Malformed("no request target"))?;
    let version = parts
        .next()
        .ok_or(HeadError::Malformed("no HTTP version"))?;
    if parts.next().is_some() {
        return Err(HeadError::Malformed("extra spaces in request line"));
    }
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(HeadError::Malformed("invalid method"));
    }
    if target.is_empty() || !target.iter().all(|&b| b.is_ascii_graphic()) {
        return Err(HeadError::Malformed("invalid request target"));
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(HeadError::Malformed("not HTTP/1.0 or HTTP/1.1"));
    }
    Ok(RequestLine { method, target })
}

/// Splits a request target into the host it names (absolute form only) and its path.
fn split_target(target: &[u8]) -> Result<(Option<&[u8]>, &[u8]), HeadError> {
    if target.starts_with(b"/") || target == b"*" {
        return Ok((None, target));
    }
    let lower = target.to_ascii_lowercase();
    let rest = if lower.starts_with(b"http://") {
        &target[7..]
    } else if lower.starts_with(b"https://") {
        &target[8..]
    } else {
        // Authority form (CONNECT host:port): route by the Host header, path "/".
        return Ok((None, b"/"));
    };
    let end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    // Drop any userinfo.
    let authority = match authority.iter().rposition(|&b| b == b'@') {
        Some(i) => &authority[i + 1..],
        None => authority,
    };
    let path: &[u8] = if end < rest.len() && rest[end] == b'/' {
        &rest[end..]
    } else {
        b"/"
    };
    Ok((Some(authority), path))
}

fn parse_header(line: &[u8]) -> Result<(&[u8], &[u8]), HeadError> {
    if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        return Err(HeadError::Malformed("obsolete line folding"));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(HeadError::Malformed("header line without a colon"))?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(HeadError::Malformed("invalid header name"));
    }
    let value = trim(&line[colon + 1..]);
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(HeadError::Malformed("control character in header value"));
    }
    Ok((name, value))
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// `Host` value → routing key: lower case, port and trailing dot removed. `None` if it is not
/// a plausible host name or address literal.
pub fn normalize_host(raw: &[u8]) -> Option<String> {
    let host = if raw.starts_with(b"[") {
        // IPv6 literal, optionally with a port.
        let close = raw.iter().position(|&b| b == b']')?;
        let after = &raw[close + 1..];
        if !(after.is_empty() || valid_port(after.strip_prefix(b":")?)) {
            return None;
        }
        let inner = std::str::from_utf8(&raw[1..close]).ok()?;
        inner.parse::<std::net::Ipv6Addr>().ok()?;
        return Some(format!("[{}]", inner.to_ascii_lowercase()));
    } else {
        match raw.iter().position(|&b| b == b':') {
            Some(i) if valid_port(&raw[i + 1..]) => &raw[..i],
            Some(_) => return None,
            None => raw,
        }
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !host.starts_with(b".")
        && !host.windows(2).any(|w| w == b"..");
    ok.then(|| String::from_utf8_lossy(host).to_ascii_lowercase())
}

fn valid_port(p: &[u8]) -> bool {
    (1..=5).contains(&p.len()) && p.iter().all(u8::is_ascii_digit)
}

/// Headers that say who the visitor is and how it connected. The relay writes each of them
/// itself; copies the visitor sent are dropped (or, from a trusted proxy, the address chains
/// are extended), so the origin never mistakes a visitor's claim for the relay's word.
const XFF: &[u8] = b"x-forwarded-for";
const XFP: &[u8] = b"x-forwarded-proto";
const XFH: &[u8] = b"x-forwarded-host";
const X_REAL_IP: &[u8] = b"x-real-ip";
const FORWARDED: &[u8] = b"forwarded";

/// Whether the visitor's own forwarding headers are believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// A visitor like any other: what it says about itself is dropped.
    None,
    /// A proxy the operator trusts (`trusted_proxies`): its `X-Forwarded-For` and
    /// `Forwarded` chains are kept and the relay's entry appended.
    Proxy,
}

/// Rewrites a complete request head (`head`, as measured by [`Head::len`]) so it names the
/// visitor: `X-Forwarded-For`, `X-Real-IP`, `X-Forwarded-Proto` (`proto`),
/// `X-Forwarded-Host` (`host`, as the relay routed the request) and `Forwarded`, written by
/// the relay. With [`Trust::None`] every copy the visitor sent is dropped; with
/// [`Trust::Proxy`] the visitor's address chains are kept in front of the relay's entry
/// (a `Forwarded` value with an unbalanced quote, which would swallow that entry, is
/// dropped). Everything else is kept byte for byte.
pub fn add_forwarded(
    head: &[u8],
    visitor: SocketAddr,
    proto: &str,
    host: &str,
    trust: Trust,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 192);
    add_forwarded_into(head, visitor, proto, host, trust, &mut out);
    out
}

/// [`add_forwarded`], appending to `out` (the hot path: no buffer of its own).
pub fn add_forwarded_into(
    head: &[u8],
    visitor: SocketAddr,
    proto: &str,
    host: &str,
    trust: Trust,
    out: &mut Vec<u8>,
) {
    use std::io::Write as _;
    // Kept chains are rare (a trusted proxy's): no allocation unless there is one.
    let mut xff: Vec<&[u8]> = Vec::new();
    let mut fwd: Vec<&[u8]> = Vec::new();
    // Empty lines before the request line are dropped: they carry nothing.
    let mut rest = &head[leading_empty_lines(head)..];
    let mut first = true;
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        let raw = &rest[..=i];
        rest = &rest[i + 1..];
        let line = raw
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(raw);
        if first {
            first = false;
            out.extend_from_slice(raw);
            continue;
        }
        if line.is_empty() {
            break;
        }
        if let Ok((name, value)) = parse_header(line) {
            if name.eq_ignore_ascii_case(XFF) {
                if trust == Trust::Proxy {
                    xff.push(value);
                }
                continue;
            }
            if name.eq_ignore_ascii_case(FORWARDED) {
                if trust == Trust::Proxy && value.iter().filter(|&&b| b == b'"').count() % 2 == 0 {
                    fwd.push(value);
                }
                continue;
            }
            if name.eq_ignore_ascii_case(XFP)
                || name.eq_ignore_ascii_case(XFH)
                || name.eq_ignore_ascii_case(X_REAL_IP)
            {
                continue;
            }
        }
        out.extend_from_slice(raw);
    }
    let ip = visitor.ip();
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    out.extend_from_slice(b"X-Forwarded-For: ");
    for v in &xff {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "{ip}\r\nX-Real-IP: {ip}\r\nX-Forwarded-Proto: {proto}\r\nX-Forwarded-Host: {host}\r\nForwarded: "
    );
    for v in &fwd {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    let _ = match ip {
        IpAddr::V4(v4) => write!(out, "for={v4};host={host};proto={proto}\r\n\r\n"),
        IpAddr::V6(v6) => write!(out, "for=\"[{v6}]\";host={host};proto={proto}\r\n\r\n"),
    };
}

/// A path prefix that cannot be claimed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path prefix {0:?} must start with '/' and hold no spaces, '?' or '#'")]
pub struct BadPrefix(pub String);

/// A claimed path prefix in canonical form: starts with `/`, no trailing `/` except the root.
/// An empty prefix means the root.
pub fn normalize_prefix(p: &str) -> Result<String, BadPrefix> {
    if p.is_empty() {
        return Ok("/".into());
    }
    if !p.starts_with('/')
        || p.bytes()
            .any(|b| !b.is_ascii_graphic() || b == b'?' || b == b'#')
    {
        return Err(BadPrefix(p.to_string()));
    }
    let trimmed = p.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.to_string()
    })
}

/// The wildcard claim that would cover `host`: its first label replaced by `*`
/// (`a.example.com` → `*.example.com`); `None` for a single-label host.
pub fn wildcard_for(host: &str) -> Option<String> {
    let (_, parent) = host.split_once('.')?;
    Some(format!("*.{parent}"))
}

/// Whether request path `path` falls under `prefix` (canonical): `/api` covers `/api`,
/// `/api/x` and `/api?q`, but not `/apix`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<Option<Head>, HeadError> {
        parse_head(s.as_bytes(), DEFAULT_MAX_HEAD)
    }

    #[test]
    fn routes_by_host_and_path() {
        let h = parse(
            "GET /api/v1?q=1 HTTP/1.1\r\nHost: Blog.Example.COM:8080\r\nAccept: */*\r\n\r\nBODY",
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.host, "blog.example.com");
        assert_eq!(h.path, "/api/v1?q=1");
        assert_eq!(
            h.len,
            "GET /api/v1?q=1 HTTP/1.1\r\nHost: Blog.Example.COM:8080\r\nAccept: */*\r\n\r\n".len()
        );
    }

    #[test]
    fn absolute_form_and_bare_lf_and_ipv6() {
        let h = parse("GET http://a.example/x HTTP/1.1\nHost: A.example:80\n\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.host.as_str(), h.path.as_str()), ("a.example", "/x"));
        // Routed to one host, read by the origin as another: refused.
        assert!(matches!(
            parse("GET http://blog.example/ HTTP/1.1\r\nHost: billing.example\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        let h = parse("GET / HTTP/1.0\r\nhost: [::1]:80\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.host, "[::1]");
        let h = parse("GET / HTTP/1.1\r\nHost: app.example.\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.host, "app.example");
    }

    #[test]
    fn empty_lines_before_the_request_are_skipped() {
        let head = "\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let h = parse(head).unwrap().unwrap();
        assert_eq!((h.host.as_str(), h.len), ("a", head.len()));
        assert_eq!(parse("\r\n"), Ok(None));
        assert_eq!(parse("\r\n\r"), Ok(None));
        assert_eq!(parse_head(&[b'\n'; 64], 64), Err(HeadError::TooLarge(64)));
    }

    #[test]
    fn the_authorization_header_is_kept_and_only_once() {
        let h = parse("GET / HTTP/1.1\r\nHost: a\r\nauthorization:  Basic YTpi \r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.authorization.as_deref(), Some(&b"Basic YTpi"[..]));
        let none = parse("GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap().unwrap();
        assert_eq!(none.authorization, None);
        assert_eq!(
            parse("GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Basic YTpi\r\nAuthorization: Basic Yjpj\r\n\r\n"),
            Err(HeadError::Malformed("more than one Authorization header"))
        );
    }

    #[test]
    fn partial_heads_ask_for_more() {
        assert_eq!(parse(""), Ok(None));
        assert_eq!(parse("GE"), Ok(None));
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: a\r\n\r"), Ok(None));
    }

    #[test]
    fn bad_heads_are_malformed() {
        for bad in [
            "\x16\x03\x01\x02\x00",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a:99999x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HeadError::Malformed(_))),
                "{bad:?} → {:?}",
                parse(bad)
            );
        }
    }

    #[test]
    fn oversized_heads_are_refused() {
        let mut s = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        while s.len() < 100 {
            s.push_str("X-Pad: aaaaaaaaaa\r\n");
        }
        assert_eq!(parse_head(s.as_bytes(), 64), Err(HeadError::TooLarge(64)));
        s.push_str("\r\n");
        assert_eq!(parse_head(s.as_bytes(), 64), Err(HeadError::TooLarge(64)));
    }

    #[test]
    fn forwarded_headers_replace_a_visitors_and_extend_a_trusted_proxys() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Proto: https\r\nForwarded: for=1.2.3.4\r\nAccept: */*\r\n\r\n";
        let v = "10.0.0.9:5555".parse().unwrap();
        let ours = "X-Forwarded-For: 10.0.0.9\r\nX-Real-IP: 10.0.0.9\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: a\r\nForwarded: for=10.0.0.9;host=a;proto=http\r\n\r\n";
        let out = String::from_utf8(add_forwarded(head, v, "http", "a", Trust::None)).unwrap();
        assert_eq!(
            out,
            format!("GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n{ours}")
        );
        let out = String::from_utf8(add_forwarded(head, v, "http", "a", Trust::Proxy)).unwrap();
        assert_eq!(
            out,
            "GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nX-Forwarded-For: 1.2.3.4, 10.0.0.9\r\nX-Real-IP: 10.0.0.9\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: a\r\nForwarded: for=1.2.3.4, for=10.0.0.9;host=a;proto=http\r\n\r\n"
        );
        // An unclosed quote would make the relay's element part of the visitor's string.
        let sneaky = b"GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=\"6.6.6.6\r\n\r\n";
        let out = String::from_utf8(add_forwarded(sneaky, v, "http", "a", Trust::Proxy)).unwrap();
        assert!(
            out.contains("\r\nForwarded: for=10.0.0.9;host=a;proto=http\r\n"),
            "{out}"
        );
        assert!(!out.contains("6.6.6.6"), "{out}");

        let out = add_forwarded(
            b"GET / HTTP/1.1\nHost: a\n\n",
            "[2001:db8::1]:1".parse().unwrap(),
            "http",
            "a",
            Trust::None,
        );
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("X-Forwarded-For: 2001:db8::1\r\n"));
        assert!(out.contains("Forwarded: for=\"[2001:db8::1]\";host=a;proto=http\r\n"));
        let reparsed = parse(&out).unwrap().unwrap();
        assert_eq!(reparsed.len, out.len());
        let out = add_forwarded(
            b"\r\n\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n",
            "10.0.0.9:1".parse().unwrap(),
            "http",
            "a",
            Trust::None,
        );
        let h = parse_head(&out, DEFAULT_MAX_HEAD).unwrap().unwrap();
        assert_eq!(
            (h.host.as_str(), h.path.as_str(), h.len),
            ("a", "/x", out.len())
        );
        assert!(out.starts_with(b"GET /x HTTP/1.1\r\n"));
    }

    fn host_strategy() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,10}(\\.[a-z0-9]{1,10}){0,3}"
    }

    proptest! {
        #[test]
        fn never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048), max in 1usize..4096) {
            if let Ok(Some(h)) = parse_head(&bytes, max) {
                prop_assert!(h.len <= bytes.len() && h.len <= max);
            }
        }

        #[test]
        fn any_split_point_gives_the_same_answer(host in host_strategy(), path in "/[a-z0-9/]{0,20}", pad in 0usize..40, cut in 0usize..400) {
            let head = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nX-Pad: {}\r\nContent-Length: 0\r\n\r\n", "p".repeat(pad));
            let full = parse(&head).unwrap().unwrap();
            prop_assert_eq!(&full.host, &host);
            prop_assert_eq!(&full.path, &path);
            prop_assert_eq!(full.len, head.len());
            let cut = cut.min(head.len() - 1);
            prop_assert_eq!(parse(&head[..cut]), Ok(None));
        }

        #[test]
        fn scanner_agrees_with_parse_head_at_every_split(host in host_strategy(), lead in 0usize..3, chunks in proptest::collection::vec(1usize..9, 1..80), garbage in any::<bool>()) {
            let mut head = "\r\n".repeat(lead);
            head.push_str(&format!("GET /a HTTP/1.1\r\nHost: {host}\r\nX: y\r\n\r\nbody"));
            if garbage {
                head = head.replace("GET", "G\x01T");
            }
            let bytes = head.as_bytes();
            let mut sc = HeadScanner::new(DEFAULT_MAX_HEAD);
            let mut end = 0;
            for c in chunks.iter().cycle() {
                end = (end + c).min(bytes.len());
                let got = sc.feed(&bytes[..end]);
                let want = parse_head(&bytes[..end], DEFAULT_MAX_HEAD);
                match (&got, &want) {
                    // The scanner may answer later than parse_head, never differently.
                    (Ok(None), _) => {}
                    _ => { prop_assert_eq!(&got, &want); break; }
                }
                prop_assert!(end < bytes.len(), "the whole input must get an answer");
            }
        }

        #[test]
        fn forwarded_rewrite_reparses(host in host_strategy(), a in any::<[u8; 4]>(), port in 1u16..) {
            let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            let v = SocketAddr::from((a, port));
            let out = add_forwarded(head.as_bytes(), v, "http", &host, Trust::None);
            let h = parse_head(&out, DEFAULT_MAX_HEAD).unwrap().unwrap();
            prop_assert_eq!(h.host, host);
            prop_assert_eq!(h.len, out.len());
        }
    }

    #[test]
    fn prefixes_normalize_and_match_on_segment_boundaries() {
        assert_eq!(normalize_prefix("").unwrap(), "/");
        assert_eq!(normalize_prefix("/").unwrap(), "/");
        assert_eq!(normalize_prefix("/api/").unwrap(), "/api");
        assert!(normalize_prefix("api").is_err());
        assert!(normalize_prefix("/a b").is_err());
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/v1"));
        assert!(prefix_matches("/api", "/api?x=1"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(!prefix_matches("/api", "/"));
    }
}
