//! The admin endpoint, on a loopback address by default, optionally behind a bearer token:
//! `GET /` (a self-contained live page of the services and agents: no CDN, no data in it,
//! so it is served without the token and asks for it), `GET /health`, `GET /metrics` (Prometheus text format, with `# HELP` lines and
//! per-service counts), `GET /api/services` and `GET /api/agents` (JSON, what
//! `ringtunnel status` prints), and `POST /api/reload` (re-read the settings, as SIGHUP
//! does). One request per connection, heads bounded in size and time
//! like the shared HTTP port's.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::{AgentSnapshot, Metrics, ServiceSnapshot};
use crate::config::Secret;
use crate::net::AcceptErrors;
use crate::protocol::http::parse_head;

/// The live page served at `/`: polls `/api/services` and `/api/agents` once a second.
const PAGE: &str = include_str!("page.html");
/// The page may run its own inline script and style and talk to this endpoint, nothing else.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What a `GET` reaches (a `POST` to one of them is 405, not 404).
const GET_PATHS: [&str; 5] = ["/", "/health", "/metrics", "/api/services", "/api/agents"];
/// Largest request head the admin endpoint reads.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts or ends one service's drain (see [`AdminView::drain`]).
pub type DrainFn = dyn Fn(&str, bool) -> Option<ServiceSnapshot> + Send + Sync;

/// What the admin endpoint reads: the counters, the services as they are now, and the token
/// requests must present. It sees nothing else of the relay.
pub struct AdminView {
    /// The relay's counters.
    pub metrics: Arc<Metrics>,
    /// Every service as it is at the moment of the call.
    pub services: Box<dyn Fn() -> Vec<ServiceSnapshot> + Send + Sync>,
    /// Every connected agent as it is at the moment of the call.
    pub agents: Box<dyn Fn() -> Vec<AgentSnapshot> + Send + Sync>,
    /// Starts (`true`) or ends (`false`) the drain of the named service: the service as it is
    /// then, or `None` if there is none by that name.
    pub drain: Box<DrainFn>,
    /// Reloads the relay's settings: what it did, as JSON, or why nothing changed.
    pub reload: Box<dyn Fn() -> Result<String, String> + Send + Sync>,
    /// When set, every request needs `Authorization: Bearer <token>`.
    pub token: Option<Secret>,
}

/// Serves the admin endpoint on `listener` until the task is dropped; each request in its own
/// task, which ends with the loop.
pub async fn serve(view: Arc<AdminView>, listener: TcpListener) {
    let mut conns = JoinSet::new();
    let mut errors = AcceptErrors::new("admin");
    loop {
        tokio::select! {
            got = listener.accept() => match got {
                Ok((stream, _)) => {
                    if let Some(stream) = errors.admit(stream, std::time::Instant::now()) {
                        conns.spawn(answer(view.clone(), stream));
                    }
                }
                Err(e) => errors.back_off(&e).await,
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

/// What the endpoint answers to one request.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
    /// A `HEAD` request: the headers of the `GET` answer (its length included), no body.
    head_only: bool,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Reply {
            status,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: body.into(),
            head_only: false,
        }
    }

    fn json(body: String) -> Self {
        Reply {
            status: 200,
            content_type: "application/json",
            body,
            head_only: false,
        }
    }
}

async fn answer(view: Arc<AdminView>, mut stream: TcpStream) {
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await;
    let reply = match head {
        Ok(Some(raw)) => respond(&view, &raw),
        Ok(None) => Reply::text(400, "bad request\n"),
        Err(_) => Reply::text(408, "request timeout\n"),
    };
    let reason = match reply.status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        _ => "Bad Request",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        reply.status,
        reply.content_type,
        reply.body.len()
    );
    if reply.status == 401 {
        out.push_str("WWW-Authenticate: Bearer\r\n");
    }
    if reply.content_type.starts_with("text/html") {
        out.push_str(&format!(
            "Content-Security-Policy: {PAGE_POLICY}\r\nX-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n"
        ));
    }
    out.push_str("\r\n");
    if !reply.head_only {
        out.push_str(&reply.body);
    }
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

/// The answer to one complete request head.
fn respond(view: &AdminView, raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n").flat_map(|l| l.split('\n'));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let head_only = method == "HEAD";
    let path = target.split('?').next().unwrap_or("");
    if path == "/" && (method == "GET" || head_only) {
        return Reply {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: PAGE.to_string(),
            head_only,
        };
    }
    if let Some(token) = &view.token {
        let presented = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
            .and_then(|(_, v)| v.trim().strip_prefix("Bearer "))
            .unwrap_or("");
        if !token_matches(token.expose(), presented.trim().as_bytes()) {
            return Reply {
                head_only,
                ..Reply::text(401, "a bearer token is required\n")
            };
        }
    }
    if method == "POST" {
        return post(view, path);
    }
    if method != "GET" && method != "HEAD" {
        return Reply::text(405, "only GET, HEAD and POST\n");
    }
    let reply = match path {
        "/health" => Reply::text(200, "ok\n"),
        "/metrics" => Reply::text(200, metrics_text(view)),
        "/api/services" => Reply::json(to_json(&(view.services)())),
        "/api/agents" => Reply::json(to_json(&(view.agents)())),
        _ => Reply::text(
            404,
            "try /, /health, /metrics, /api/services or /api/agents\n",
        ),
    };
    Reply { head_only, ..reply }
}

/// The answer to a `POST`: `/api/reload`, `/api/services/NAME/drain` or
/// `/api/services/NAME/resume`.
fn post(view: &AdminView, path: &str) -> Reply {
    if path == "/api/reload" {
        return match (view.reload)() {
            Ok(done) => Reply::json(done + "\n"),
            Err(why) => Reply::text(400, format!("reload refused, nothing changed: {why}\n")),
        };
    }
    let action = path
        .strip_prefix("/api/services/")
        .and_then(|rest| rest.split_once('/'));
    let on = match action {
        Some((_, "drain")) => true,
        Some((_, "resume")) => false,
        _ if GET_PATHS.contains(&path) => return Reply::text(405, "GET only\n"),
        _ => {
            return Reply::text(
                404,
                "POST /api/reload, /api/services/NAME/drain or /api/services/NAME/resume\n",
            )
        }
    };
    let name = action.map(|(name, _)| name).unwrap_or_default();
    match (view.drain)(name, on) {
        Some(service) => Reply::json(to_json(&service)),
        None => Reply::text(404, format!("no service named {name:?}\n")),
    }
}

/// `value` as pretty JSON with a final newline.
fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Serializing plain structs of strings and numbers cannot fail.
    let mut out = serde_json::to_string_pretty(value).unwrap_or_default();
    out.push('\n');
    out
}

/// Compares in time independent of where the first difference is.
fn token_matches(want: &[u8], got: &[u8]) -> bool {
    let mut diff = want.len() ^ got.len();
    for (i, w) in want.iter().enumerate() {
        diff |= usize::from(w ^ got.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// Reads one per-service gauge off a service's snapshot.
type Gauge = fn(&ServiceSnapshot) -> usize;

/// Every counter as `ringtunnel_<name>_total` with its help, then per-service gauges and
/// per-service counts (`ringtunnel_service_<count>_total{service=...}`).
fn metrics_text(view: &AdminView) -> String {
    let mut out = String::with_capacity(8192);
    for (name, help, value) in view.metrics.snapshot() {
        let _ = writeln!(out, "# HELP ringtunnel_{name}_total {}", help.trim());
        let _ = writeln!(out, "# TYPE ringtunnel_{name}_total counter");
        let _ = writeln!(out, "ringtunnel_{name}_total {value}");
    }
    let services = (view.services)();
    let gauges: [(&str, &str, Gauge); 3] = [
        (
            "online",
            "Whether an agent owns the service now (1) or it lingers (0).",
            |s| usize::from(s.online),
        ),
        ("visitors", "Visitors connected to the service now.", |s| {
            s.visitors_now
        }),
        (
            "idle_connections",
            "Data connections parked for the service, waiting for a visitor.",
            |s| s.idle_connections,
        ),
    ];
    let label = |s: &ServiceSnapshot| format!("service=\"{}\",kind=\"{}\"", s.name, s.kind);
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP ringtunnel_service_{name} {help}");
        let _ = writeln!(out, "# TYPE ringtunnel_service_{name} gauge");
        for s in &services {
            let _ = writeln!(
                out,
                "ringtunnel_service_{name}{{{}}} {}",
                label(s),
                value(s)
            );
        }
    }
    for (name, help, _) in super::ServiceStats::default().snapshot() {
        let _ = writeln!(
            out,
            "# HELP ringtunnel_service_{name}_total {}",
            help.trim()
        );
        let _ = writeln!(out, "# TYPE ringtunnel_service_{name}_total counter");
        for s in &services {
            let value = s.counts.get(name).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "ringtunnel_service_{name}_total{{{}}} {value}",
                label(s)
            );
        }
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
