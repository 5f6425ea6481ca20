//! Reaching the relay through an HTTP proxy (`CONNECT`), sans-IO: the proxy's URL, the
//! request the agent sends it, and reading the proxy's answer. Both agent backends dial the
//! proxy themselves and use this to get a tunnel to the relay's control port, over which the
//! control session and every data connection run as they would direct (TLS included: the
//! proxy sees only the relay's name and port).

use std::fmt;
use std::str::FromStr;

/// Largest answer head read from a proxy, in bytes.
pub const MAX_ANSWER: usize = 8 * 1024;

/// Port of a proxy URL without one (as curl does).
pub const DEFAULT_PORT: u16 = 1080;

/// An `http://[USER[:PASSWORD]@]HOST[:PORT]` proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// `Proxy-Authorization` value (`Basic ...`), from the URL's user and password.
    auth: Option<String>,
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Shown without its password.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = if self.auth.is_some() { "***@" } else { "" };
        if self.host.contains(':') {
            write!(f, "http://{at}[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{at}{}:{}", self.host, self.port)
        }
    }
}

/// Why a proxy URL or a proxy's answer is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The URL does not parse.
    #[error("invalid proxy URL {0:?}: use http://[USER:PASSWORD@]HOST[:PORT]")]
    BadUrl(String),
    /// A scheme other than `http://`.
    #[error("proxy URL {0:?}: only http:// proxies (HTTP CONNECT) are supported")]
    Scheme(String),
    /// The proxy answered something other than 2xx.
    #[error("the proxy refused the tunnel to the relay: {0}")]
    Refused(String),
    /// The answer is not an HTTP response head, or too long.
    #[error("the proxy's answer is not HTTP: {0}")]
    Garbled(&'static str),
}

impl FromStr for ProxyUrl {
    type Err = ProxyError;

    fn from_str(s: &str) -> Result<Self, ProxyError> {
        let bad = || ProxyError::BadUrl(s.to_string());
        let rest = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => return Err(ProxyError::Scheme(s.to_string())),
            None => s,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err(bad());
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(bad()),
            }
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad());
        }
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
            None => DEFAULT_PORT,
        };
        let auth = match userinfo {
            Some(u) => {
                let decoded = percent_decode(u).ok_or_else(bad)?;
                use base64ct::Encoding;
                Some(format!(
                    "Basic {}",
                    base64ct::Base64::encode_string(&decoded)
                ))
            }
            None => None,
        };
        Ok(ProxyUrl {
            host: host.to_string(),
            port,
            auth,
        })
    }
}

impl ProxyUrl {
    /// The `CONNECT` request for a tunnel to `host:port`.
    pub fn connect_request(&self, host: &str, port: u16) -> Vec<u8> {
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(auth) = &self.auth {
            req.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        req.push_str("\r\n");
        req.into_bytes()
    }
}

/// Reads the proxy's answer to `CONNECT` from `buf` (everything read so far): `Ok(Some(n))`
/// once a 2xx head of `n` bytes is complete (the tunnel is open after it), `Ok(None)` to read
/// more, an error for any other status or for bytes that are not an answer.
pub fn connect_answer(buf: &[u8]) -> Result<Option<usize>, ProxyError> {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2));
    let Some(end) = end else {
        if buf.len() >= MAX_ANSWER {
            return Err(ProxyError::Garbled("answer head too long"));
        }
        if buf.len() >= 5 && !buf.starts_with(b"HTTP/") {
            return Err(ProxyError::Garbled("no HTTP status line"));
        }
        return Ok(None);
    };
    let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(end);
    let line = String::from_utf8_lossy(&buf[..line_end]);
    let line = line.trim_end();
    let mut parts = line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(ProxyError::Garbled("no HTTP status line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ProxyError::Garbled("no HTTP status line"));
    }
    let code: u16 = code
        .parse()
        .map_err(|_| ProxyError::Garbled("no status code"))?;
    if !(200..300).contains(&code) {
        let hint = match code {
            // 407 is the standard answer; some proxies (tinyproxy) say 401.
            401 | 407 => " (proxy authentication: check USER:PASSWORD@ in the proxy URL)",
            403 => " (the proxy does not allow CONNECT to this port)",
            _ => "",
        };
        return Err(ProxyError::Refused(format!("{line}{hint}")));
    }
    Ok(Some(end))
}

/// Whether `host` is exempt from the proxy by a `NO_PROXY` list: `*`, the host itself, or a
/// domain it is under (`example.com` and `.example.com` both cover `relay.example.com`).
pub fn bypassed(no_proxy: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    no_proxy.split(',').map(str::trim).any(|entry| {
        let entry = entry.trim_start_matches('.').to_ascii_lowercase();
        !entry.is_empty() && (entry == "*" || host == entry || host.ends_with(&format!(".{entry}")))
    })
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_hide_their_password() {
        let p: ProxyUrl = "http://bob:p%40ss@proxy.example:3128/".parse().unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.example", 3128));
        assert_eq!(p.to_string(), "http://***@proxy.example:3128");
        assert!(!format!("{p:?}").contains("p@ss"));
        let req = String::from_utf8(p.connect_request("relay.example", 7843)).unwrap();
        assert_eq!(
            req,
            "CONNECT relay.example:7843 HTTP/1.1\r\nHost: relay.example:7843\r\nProxy-Authorization: Basic Ym9iOnBAc3M=\r\n\r\n"
        );
        let bare: ProxyUrl = "10.0.0.1".parse().unwrap();
        assert_eq!(bare.port, DEFAULT_PORT);
        let v6: ProxyUrl = "http://[::1]:8888".parse().unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8888));
        assert!(String::from_utf8(v6.connect_request("::1", 7))
            .unwrap()
            .starts_with("CONNECT [::1]:7 "));
        for bad in [
            "http://",
            "http://h:0",
            "http://h:x",
            "http://h/path",
            "http://a b:1",
            "http://u:%zz@h:1",
        ] {
            assert!(
                matches!(bad.parse::<ProxyUrl>(), Err(ProxyError::BadUrl(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "https://h:1".parse::<ProxyUrl>(),
            Err(ProxyError::Scheme(_))
        ));
        assert!(matches!(
            "socks5://h:1".parse::<ProxyUrl>(),
            Err(ProxyError::Scheme(_))
        ));
    }

    #[test]
    fn answers_open_the_tunnel_or_say_why_not() {
        assert_eq!(
            connect_answer(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Ok(Some(39))
        );
        assert_eq!(
            connect_answer(b"HTTP/1.0 200 OK\r\nProxy-agent: x\r\n\r\nX"),
            Ok(Some(35))
        );
        assert_eq!(connect_answer(b"HTTP/1.1 200 OK\r\n"), Ok(None));
        assert_eq!(connect_answer(b"HTTP/"), Ok(None));
        let e = connect_answer(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").unwrap_err();
        assert!(
            e.to_string().contains("407") && e.to_string().contains("USER:PASSWORD@"),
            "{e}"
        );
        assert!(matches!(
            connect_answer(b"SSH-2.0-OpenSSH\r\n"),
            Err(ProxyError::Garbled(_))
        ));
        assert!(matches!(
            connect_answer(&[b'H'; MAX_ANSWER]),
            Err(ProxyError::Garbled(_))
        ));
        assert!(matches!(
            connect_answer(b"HTTP/1.1 abc\r\n\r\n"),
            Err(ProxyError::Garbled(_))
        ));
    }

    #[test]
    fn no_proxy_lists_exempt_hosts_and_domains() {
        assert!(bypassed("localhost, .example.com", "relay.example.com"));
        assert!(bypassed("example.com", "Relay.Example.com."));
        assert!(bypassed("*", "anything"));
        assert!(bypassed("127.0.0.1", "127.0.0.1"));
        assert!(!bypassed("example.com", "badexample.com"));
        assert!(!bypassed("", "relay.example.com"));
        assert!(!bypassed(" , ", "relay.example.com"));
    }
}
