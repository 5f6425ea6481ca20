//! The admin endpoint: `GET /health` and `GET /metrics` (Prometheus text format) on a
//! loopback address by default, optionally behind a bearer token. One request per
//! connection, heads bounded in size and time like the shared HTTP port's.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::control::Shared;
use crate::protocol::http::parse_head;

/// Largest request head the admin endpoint reads.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the admin endpoint on `listener` forever.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(shared.clone(), stream));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting admin connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(shared: Arc<Shared>, mut stream: TcpStream) {
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await;
    let (status, body) = match head {
        Ok(Some(raw)) => respond(&shared, &raw),
        Ok(None) => (400, "bad request\n".to_string()),
        Err(_) => (408, "request timeout\n".to_string()),
    };
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        _ => "Bad Request",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        body.len()
    );
    if status == 401 {
        out.push_str("WWW-Authenticate: Bearer\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    let _ = stream.write_all(out.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads one request head; `None` if it is malformed, too large or cut short.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_head(&buf, MAX_HEAD) {
            Ok(Some(h)) => {
                buf.truncate(h.len);
                return Some(buf);
            }
            Ok(None) => continue,
            Err(_) => return None,
        }
    }
}

/// Status and body for one complete request head.
fn respond(shared: &Shared, raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n").flat_map(|l| l.split('\n'));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if let Some(token) = &shared.cfg.admin_token {
        let presented = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
            .and_then(|(_, v)| v.trim().strip_prefix("Bearer "))
            .unwrap_or("");
        if !token_matches(token.expose(), presented.trim().as_bytes()) {
            return (401, "a bearer token is required\n".into());
        }
    }
    if method != "GET" && method != "HEAD" {
        return (405, "only GET\n".into());
    }
    match target.split('?').next().unwrap_or("") {
        "/health" => (200, "ok\n".into()),
        "/metrics" => (200, metrics_text(shared)),
        _ => (404, "try /health or /metrics\n".into()),
    }
}

/// Compares in time independent of where the first difference is.
fn token_matches(want: &[u8], got: &[u8]) -> bool {
    let mut diff = want.len() ^ got.len();
    for (i, w) in want.iter().enumerate() {
        diff |= usize::from(w ^ got.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// Every counter as `ringtunnel_<name>_total`, and per-service gauges.
fn metrics_text(shared: &Shared) -> String {
    let mut out = String::with_capacity(4096);
    for (name, value) in shared.metrics.snapshot() {
        let _ = writeln!(out, "# TYPE ringtunnel_{name}_total counter");
        let _ = writeln!(out, "ringtunnel_{name}_total {value}");
    }
    let services = shared.registry.snapshot();
    let _ = writeln!(out, "# TYPE ringtunnel_service_online gauge");
    for s in &services {
        let _ = writeln!(
            out,
            "ringtunnel_service_online{{service=\"{}\",kind=\"{}\"}} {}",
            s.name,
            s.kind,
            u8::from(s.online)
        );
    }
    let _ = writeln!(out, "# TYPE ringtunnel_service_visitors gauge");
    for s in &services {
        let _ = writeln!(
            out,
            "ringtunnel_service_visitors{{service=\"{}\",kind=\"{}\"}} {}",
            s.name, s.kind, s.visitors
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_is_exact() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        assert!(!token_matches(b"s3cret", b"s3cre"));
        assert!(!token_matches(b"s3cret", b"s3cret!"));
        assert!(!token_matches(b"s3cret", b""));
        assert!(!token_matches(b"s3cret", b"S3cret"));
    }
}
