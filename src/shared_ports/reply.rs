//! What a visitor hears when it cannot be routed: a short HTTP error page on the HTTP port,
//! a TLS alert on the TLS port; then a clean close.

use std::future::Future;
use std::time::Duration;

use super::conn::VisitorConn;
use crate::dataplane::wait::race;

/// Longest time spent writing an answer and draining what the visitor still sends.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Most bytes drained after answering, so the close is a FIN and not a reset that could
/// destroy the answer before the visitor reads it.
const DRAIN_LIMIT: usize = 256 * 1024;

/// The error pages of the shared HTTP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// 400: the request head does not parse.
    BadRequest,
    /// 404: no service claims this host (and path).
    UnknownHost,
    /// 408: the head did not arrive in time.
    Timeout,
    /// 431: the head is larger than the relay reads.
    TooLarge,
    /// 502: the service's agent is offline.
    AgentOffline,
    /// 503: the service is at a limit.
    OverLimit,
}

impl Page {
    fn status(self) -> (u16, &'static str) {
        match self {
            Page::BadRequest => (400, "Bad Request"),
            Page::UnknownHost => (404, "Not Found"),
            Page::Timeout => (408, "Request Timeout"),
            Page::TooLarge => (431, "Request Header Fields Too Large"),
            Page::AgentOffline => (502, "Bad Gateway"),
            Page::OverLimit => (503, "Service Unavailable"),
        }
    }

    /// The whole response: status line, headers (`Connection: close`) and `detail` as a
    /// plain-text body.
    pub fn response(self, detail: &str) -> Vec<u8> {
        let (code, reason) = self.status();
        let body = format!("{code} {reason}: {detail}\n");
        let mut out = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\nServer: ringtunnel\r\n",
            body.len()
        );
        if self == Page::OverLimit {
            out.push_str("Retry-After: 1\r\n");
        }
        out.push_str("\r\n");
        out.push_str(&body);
        out.into_bytes()
    }
}

/// A fatal TLS alert (`unrecognized_name`), so a TLS client sees a clear error rather
/// than a bare reset.
pub const TLS_ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

/// Writes `bytes`, closes the writing side, and drains (bounded) what the visitor still
/// sends before the caller drops the socket. `deadline` should fire after [`CLOSE_GRACE`].
pub(crate) async fn answer_and_close(
    conn: &mut impl VisitorConn,
    bytes: &[u8],
    deadline: impl Future<Output = ()>,
) {
    let answer = async {
        conn.write_all(bytes).await?;
        conn.shutdown_write();
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < DRAIN_LIMIT {
            match conn.read_some(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = race(answer, deadline).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_well_formed_responses() {
        for page in [
            Page::BadRequest,
            Page::UnknownHost,
            Page::Timeout,
            Page::TooLarge,
            Page::AgentOffline,
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
