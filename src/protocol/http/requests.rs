//! Every request of an HTTP/1.1 connection, sans-IO: the visitor's bytes go in, and come out
//! with each request head rewritten ([`super::add_forwarded`]), bodies passed through as they
//! are. Without this only the first head would carry the relay's forwarding headers, and a
//! visitor could forge them on every later request of a kept-alive connection.
//!
//! The reader follows message framing exactly as an origin does (RFC 9112 section 6): a
//! `Content-Length` body, a chunked body up to its last chunk and trailers, or none. Anything
//! an origin could read differently (two lengths, a coding other than chunked last, a bad chunk
//! size) ends the connection. A request for another host than the one the connection was
//! routed to ends it too: the relay routes connections, not requests. After an `Upgrade` or
//! `CONNECT` request the rest of the connection passes through untouched; that request gets a
//! `Connection: close`, so an origin that declines the upgrade ends the connection instead of
//! reading what follows as requests no one rewrote.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{add_forwarded_into, Body, HeadError, HeadScanner, Trust};

/// Longest chunk-size or trailer line accepted, in bytes.
const MAX_LINE: usize = 4096;

/// Where the reader is in the request stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head (into `head`).
    Head,
    /// Passing this many more body bytes.
    Length(u64),
    /// Reading a chunk-size line (into `line`).
    ChunkSize,
    /// Passing this many more bytes of chunk data.
    ChunkData(u64),
    /// Expecting the CRLF after a chunk's data.
    ChunkEnd,
    /// Reading trailer lines after the last chunk (into `line`), until an empty one.
    Trailers,
    /// After an upgrade: everything passes untouched.
    Tunnel,
}

/// Rewrites the request heads of one visitor's connection.
#[derive(Debug)]
pub struct Requests {
    state: State,
    /// Head bytes read so far (state `Head`).
    head: Vec<u8>,
    scanner: HeadScanner,
    /// Line bytes read so far (chunk size, trailer).
    line: Vec<u8>,
    max_head: usize,
    visitor: SocketAddr,
    trust: Trust,
    /// The host the connection was routed to; every request must be for it.
    host: Option<String>,
    proto: &'static str,
    /// Whether heads get the relay's forwarding headers (otherwise they pass as they are).
    forwarded: bool,
    /// Basic auth: every head must carry credentials that already passed.
    login: Option<Arc<dyn Remembers>>,
}

impl std::fmt::Debug for dyn Remembers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Remembers")
    }
}

/// Credentials that passed a password check (the relay's basic auth), asked for every
/// request head after the first: a kept-alive connection cannot switch to a request without
/// them, or with others the relay has not checked.
pub trait Remembers: Send + Sync {
    /// Whether this `Authorization` value (none: `None`) passed before.
    fn remembers(&self, authorization: Option<&[u8]>) -> bool;
}

/// Why the request stream cannot go on (the connection is closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A head the relay (or an origin) would reject or could read two ways.
    #[error("request {0}")]
    Head(#[from] HeadError),
    /// A request for another host than the connection's.
    #[error("a request for {0} on a connection routed to {1}")]
    OtherHost(String, String),
    /// Broken chunked framing.
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
    /// A later request without credentials that passed (basic auth).
    #[error("a request without a password that passed, on a connection that needs one")]
    Unauthorized,
}

impl Requests {
    /// A reader for a connection from `visitor` (trusted as `trust`) whose heads may be up
    /// to `max_head` bytes. The first head fixes the connection's host.
    pub fn new(visitor: SocketAddr, trust: Trust, max_head: usize) -> Self {
        Requests {
            state: State::Head,
            head: Vec::new(),
            scanner: HeadScanner::new(max_head),
            line: Vec::new(),
            max_head,
            visitor,
            trust,
            host: None,
            proto: "http",
            forwarded: true,
            login: None,
        }
    }

    /// The scheme the visitor used, for `X-Forwarded-Proto` and `Forwarded: proto=`
    /// (`"http"` unless set).
    pub fn with_proto(mut self, proto: &'static str) -> Self {
        self.proto = proto;
        self
    }

    /// Passes heads as they are, without forwarding headers (the service asked for none,
    /// and the reader is here for [`Self::with_login`]).
    pub fn without_forwarded(mut self) -> Self {
        self.forwarded = false;
        self
    }

    /// Ends the connection at any head whose `Authorization` `login` does not remember.
    pub fn with_login(mut self, login: Arc<dyn Remembers>) -> Self {
        self.login = Some(login);
        self
    }

    /// Whether the reader is between requests with nothing buffered: the bytes so far ended
    /// exactly at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.state == State::Head && self.head.is_empty()
    }

    /// Feeds visitor bytes; what the origin should get is appended to `out`. A head not
    /// complete yet is held back until it is.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RequestError> {
        while !input.is_empty() {
            match self.state {
                State::Tunnel => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                State::Length(n) => {
                    self.state = match pass(n, &mut input, out) {
                        0 => State::Head,
                        left => State::Length(left),
                    };
                }
                State::ChunkData(n) => {
                    self.state = match pass(n, &mut input, out) {
                        0 => State::ChunkEnd,
                        left => State::ChunkData(left),
                    };
                }
                State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    let Some(line) = self.take_line(&mut input, out)? else {
                        continue;
                    };
                    self.state = match self.state {
                        State::ChunkSize => match chunk_size(&line)? {
                            0 => State::Trailers,
                            n => State::ChunkData(n),
                        },
                        State::ChunkEnd if line.is_empty() => State::ChunkSize,
                        State::ChunkEnd => {
                            return Err(RequestError::Chunked("data longer than its size"))
                        }
                        _ if line.is_empty() => State::Head,
                        _ => State::Trailers,
                    };
                }
                State::Head => input = self.head_bytes(input, out)?,
            }
        }
        Ok(())
    }

    /// Reads one line (through its `\n`) into `self.line`, passing its bytes to `out`; the
    /// line without its ending once it is complete.
    fn take_line(
        &mut self,
        input: &mut &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<Vec<u8>>, RequestError> {
        let (part, done) = match input.iter().position(|&b| b == b'\n') {
            Some(i) => (&input[..=i], true),
            None => (*input, false),
        };
        out.extend_from_slice(part);
        self.line.extend_from_slice(part);
        *input = &input[part.len()..];
        if self.line.len() > MAX_LINE {
            return Err(RequestError::Chunked("line too long"));
        }
        if !done {
            return Ok(None);
        }
        let mut line = std::mem::take(&mut self.line);
        line.pop(); // '\n'
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(Some(line))
    }

    /// Head bytes: held until the head is complete, then rewritten into `out`. Returns the
    /// input after the head.
    fn head_bytes<'a>(
        &mut self,
        input: &'a [u8],
        out: &mut Vec<u8>,
    ) -> Result<&'a [u8], RequestError> {
        // Usually a head arrives whole in one read: parse it where it is.
        let parsed = if self.head.is_empty() {
            let mut fresh = HeadScanner::new(self.max_head);
            match fresh.feed(input)? {
                Some(head) => Some((head, None)),
                None => {
                    self.head.extend_from_slice(input);
                    self.scanner = fresh;
                    return Ok(&[]);
                }
            }
        } else {
            let before = self.head.len();
            self.head.extend_from_slice(input);
            match self.scanner.feed(&self.head)? {
                Some(head) => Some((head, Some(before))),
                None => return Ok(&[]),
            }
        };
        let Some((head, held)) = parsed else {
            return Ok(&[]);
        };
        if let Some(login) = &self.login {
            if !login.remembers(head.authorization.as_deref()) {
                return Err(RequestError::Unauthorized);
            }
        }
        let rest = match held {
            None => {
                self.emit(&input[..head.len], &head.host, out);
                &input[head.len..]
            }
            Some(before) => {
                let used = head.len - before;
                let bytes = std::mem::take(&mut self.head);
                self.emit(&bytes[..head.len], &head.host, out);
                &input[used..]
            }
        };
        self.head.clear();
        self.scanner = HeadScanner::new(self.max_head);
        match &self.host {
            None => self.host = Some(head.host.clone()),
            Some(h) if *h != head.host => {
                return Err(RequestError::OtherHost(head.host, h.clone()));
            }
            Some(_) => {}
        }
        if head.body == Body::Tunnel {
            // Before the blank line that ends the head.
            out.truncate(out.len() - 2);
            out.extend_from_slice(b"Connection: close\r\n\r\n");
        }
        self.state = match head.body {
            Body::None => State::Head,
            Body::Length(n) => State::Length(n),
            Body::Chunked => State::ChunkSize,
            Body::Tunnel => State::Tunnel,
        };
        Ok(rest)
    }
}

impl Requests {
    /// Writes a complete head to `out`, with the forwarding headers if they are on.
    fn emit(&self, head: &[u8], host: &str, out: &mut Vec<u8>) {
        match self.forwarded {
            true => add_forwarded_into(head, self.visitor, self.proto, host, self.trust, out),
            false => out.extend_from_slice(head),
        }
    }
}

/// Passes up to `n` body bytes from `input` to `out`; returns how many are still to come.
fn pass(n: u64, input: &mut &[u8], out: &mut Vec<u8>) -> u64 {
    let take = n.min(input.len() as u64) as usize;
    out.extend_from_slice(&input[..take]);
    *input = &input[take..];
    n - take as u64
}

/// The size on a chunk-size line (hex, optional `;extensions`).
fn chunk_size(line: &[u8]) -> Result<u64, RequestError> {
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = super::trim(digits);
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(RequestError::Chunked("invalid chunk size"));
    }
    Ok(digits.iter().fold(0u64, |n, d| {
        n * 16 + u64::from((*d as char).to_digit(16).unwrap_or(0))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Only(&'static [u8]);

    impl Remembers for Only {
        fn remembers(&self, authorization: Option<&[u8]>) -> bool {
            authorization == Some(self.0)
        }
    }

    #[test]
    fn with_a_login_every_head_needs_credentials_that_passed() {
        let mut r = reader()
            .without_forwarded()
            .with_login(Arc::new(Only(b"Basic ok")));
        let good = b"POST /a HTTP/1.1\r\nHost: h\r\nAuthorization: Basic ok\r\nContent-Length: 3\r\n\r\nabc";
        let mut out = Vec::new();
        r.feed(good, &mut out).unwrap();
        assert_eq!(
            out, good,
            "without forwarding headers a head passes as it is"
        );
        // A body that looks like a head is a body.
        let mut out = Vec::new();
        let sneaky = b"POST /b HTTP/1.1\r\nHost: h\r\nAuthorization: Basic ok\r\nContent-Length: 27\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n";
        r.feed(sneaky, &mut out).unwrap();
        for bad in [
            &b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n"[..],
            b"GET /c HTTP/1.1\r\nHost: h\r\nAuthorization: Basic no\r\n\r\n",
        ] {
            let mut r2 = reader().with_login(Arc::new(Only(b"Basic ok")));
            let mut out = Vec::new();
            assert_eq!(r2.feed(bad, &mut out), Err(RequestError::Unauthorized));
            assert!(out.is_empty(), "nothing of the refused head goes up");
        }
        let mut out = Vec::new();
        assert_eq!(
            r.feed(b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n", &mut out),
            Err(RequestError::Unauthorized)
        );
    }

    fn reader() -> Requests {
        Requests::new("10.0.0.9:5555".parse().unwrap(), Trust::None, 16 * 1024)
    }

    fn run(input: &[u8]) -> Result<String, RequestError> {
        let mut r = reader();
        let mut out = Vec::new();
        r.feed(input, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    const XFF: &str = "X-Forwarded-For: 10.0.0.9\r\n";

    #[test]
    fn every_head_is_rewritten_and_bodies_pass_untouched() {
        let stream = concat!(
            "GET /1 HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
            "POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 27\r\n\r\n",
            "X-Forwarded-For: 6.6.6.6\r\n\r",
            "POST /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "5;ext=1\r\nhello\r\n1a\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n0\r\nTrailer: t\r\n\r\n",
            "GET /4 HTTP/1.1\r\nHost: a\r\nX-Real-IP: 6.6.6.6\r\n\r\n",
        );
        let out = run(stream.as_bytes()).unwrap();
        assert_eq!(out.matches(XFF).count(), 4, "{out}");
        assert_eq!(out.matches("X-Real-IP: 10.0.0.9").count(), 4, "{out}");
        // The forged headers in heads are gone; the same bytes inside bodies are kept.
        assert_eq!(out.matches("6.6.6.6").count(), 1, "{out}");
        assert!(out.contains("\r\n\r\nX-Forwarded-For: 6.6.6.6\r\n\rPOST /3"));
        assert!(
            out.contains("1a\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n0\r\nTrailer: t\r\n\r\nGET /4")
        );
    }

    #[test]
    fn any_split_gives_the_same_output() {
        let stream = b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nxyGET /c HTTP/1.1\r\nHost: a\r\n\r\n";
        let whole = run(stream).unwrap();
        for step in 1..stream.len() {
            let mut r = reader();
            let mut out = Vec::new();
            for piece in stream.chunks(step) {
                r.feed(piece, &mut out).unwrap();
            }
            assert_eq!(String::from_utf8(out).unwrap(), whole, "step {step}");
            assert!(r.at_boundary());
        }
    }

    #[test]
    fn ambiguous_or_foreign_requests_end_the_connection() {
        let second = |h: &str| format!("GET / HTTP/1.1\r\nHost: a\r\n\r\n{h}");
        for bad in [
            second("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            second("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
            second("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"),
            second("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            second("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n"),
        ] {
            assert!(matches!(run(bad.as_bytes()), Err(RequestError::Head(_) | RequestError::Chunked(_))), "{bad:?}");
        }
        assert_eq!(
            run(second("GET / HTTP/1.1\r\nHost: billing\r\n\r\n").as_bytes()),
            Err(RequestError::OtherHost("billing".into(), "a".into()))
        );
        let mut r = Requests::new("10.0.0.9:1".parse().unwrap(), Trust::None, 64);
        let huge = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "y".repeat(100)
        );
        assert!(r.feed(huge.as_bytes(), &mut Vec::new()).is_err());
    }

    #[test]
    fn an_upgrade_passes_the_rest_through_and_asks_for_close() {
        let stream = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n<frame> GET / HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n";
        let out = run(stream).unwrap();
        assert!(out.contains("Connection: Upgrade\r\n"), "{out}");
        assert!(
            out.contains(
                "Connection: close\r\n\r\n<frame> GET / HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6"
            ),
            "{out}"
        );
    }

    proptest! {
        #[test]
        fn never_panics_and_holds_at_most_one_head(bytes in proptest::collection::vec(any::<u8>(), 0..4096), cut in 0usize..4096) {
            let mut r = Requests::new("10.0.0.1:1".parse().unwrap(), Trust::None, 1024);
            let mut out = Vec::new();
            let cut = cut.min(bytes.len());
            if r.feed(&bytes[..cut], &mut out).is_ok() {
                let _ = r.feed(&bytes[cut..], &mut out);
            }
            prop_assert!(r.head.len() <= 1024 + 4096 && r.line.len() <= MAX_LINE + 4096);
        }
    }
}
