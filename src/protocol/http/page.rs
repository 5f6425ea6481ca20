//! Error pages for HTTP visitors, as bytes: a status line, `Connection: close` and a short
//! plain-text body saying what went wrong.

/// The error pages the relay answers HTTP visitors with (shared HTTP port, and HTTP visitors
/// whose agent could not reach its local service).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// 400: the request head does not parse.
    BadRequest,
    /// 401: the service wants a password (basic auth) and got none that passed.
    Unauthorized,
    /// 403: the service's address lists turn this visitor away.
    Forbidden,
    /// 404: no service claims this host (and path).
    UnknownHost,
    /// 421: an HTTPS request for a host other than the one its TLS connection was for.
    Misdirected,
    /// 408: the head did not arrive in time.
    Timeout,
    /// 431: the head is larger than the relay reads.
    TooLarge,
    /// 502: the service's agent is offline.
    AgentOffline,
    /// 502: the agent could not reach its local service.
    OriginUnreachable,
    /// 503: the service is at a limit.
    OverLimit,
    /// 429: the visitor's address failed basic auth too often.
    TooManyRequests,
}

impl Page {
    /// The status code.
    pub fn code(self) -> u16 {
        self.status().0
    }

    fn status(self) -> (u16, &'static str) {
        match self {
            Page::BadRequest => (400, "Bad Request"),
            Page::Unauthorized => (401, "Unauthorized"),
            Page::Forbidden => (403, "Forbidden"),
            Page::TooManyRequests => (429, "Too Many Requests"),
            Page::UnknownHost => (404, "Not Found"),
            Page::Misdirected => (421, "Misdirected Request"),
            Page::Timeout => (408, "Request Timeout"),
            Page::TooLarge => (431, "Request Header Fields Too Large"),
            Page::AgentOffline | Page::OriginUnreachable => (502, "Bad Gateway"),
            Page::OverLimit => (503, "Service Unavailable"),
        }
    }

    /// The whole response: status line, headers (`Connection: close`) and `detail` as a
    /// plain-text body.
    pub fn response(self, detail: &str) -> Vec<u8> {
        self.response_with(detail, &[])
    }

    /// [`Self::response`] with more headers (`(name, value)`, values already safe to send),
    /// e.g. a 401's `WWW-Authenticate`.
    pub fn response_with(self, detail: &str, headers: &[(&str, &str)]) -> Vec<u8> {
        let (code, reason) = self.status();
        let body = format!("{code} {reason}: {detail}\n");
        let mut out = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\nServer: ringtunnel\r\n",
            body.len()
        );
        match self {
            Page::OverLimit => out.push_str("Retry-After: 1\r\n"),
            Page::TooManyRequests => out.push_str("Retry-After: 10\r\n"),
            _ => {}
        }
        for (name, value) in headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&body);
        out.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_well_formed_responses() {
        for page in [
            Page::BadRequest,
            Page::Unauthorized,
            Page::Forbidden,
            Page::TooManyRequests,
            Page::UnknownHost,
            Page::Misdirected,
            Page::Timeout,
            Page::TooLarge,
            Page::AgentOffline,
            Page::OriginUnreachable,
            Page::OverLimit,
        ] {
            let r = String::from_utf8(page.response("why")).unwrap();
            let (head, body) = r.split_once("\r\n\r\n").unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, body.len());
            assert!(head.starts_with(&format!("HTTP/1.1 {} ", page.status().0)));
            assert!(head.contains("\r\nConnection: close\r\n"));
        }
    }
}
