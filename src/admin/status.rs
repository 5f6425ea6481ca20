//! `ringtunnel status`: asks a relay's admin endpoint for its services and agents
//! (`/api/services`, `/api/agents`) and prints them as tables; with `--drain NAME` or
//! `--resume NAME` it first starts or ends the drain of one service; with `--health` it only
//! asks `/health`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{AgentSnapshot, ServiceSnapshot};
use crate::config::Secret;

/// How long the whole exchange with the admin endpoint may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read.
const MAX_ANSWER: u64 = 16 * 1024 * 1024;

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The endpoint could not be reached or the exchange failed.
    #[error("admin endpoint {addr}: {why}")]
    Unreachable {
        /// Where it was asked.
        addr: SocketAddr,
        /// What went wrong.
        why: String,
    },
    /// The endpoint answered with an error status.
    #[error("admin endpoint {addr} answered {status}{hint}")]
    Status {
        /// Where it was asked.
        addr: SocketAddr,
        /// The HTTP status.
        status: u16,
        /// What to do about it.
        hint: &'static str,
    },
    /// The answer was not what a relay's admin endpoint sends.
    #[error("admin endpoint {addr}: unexpected answer: {why}")]
    Garbled {
        /// Where it was asked.
        addr: SocketAddr,
        /// What was wrong with it.
        why: String,
    },
}

/// Sends `method path` to the admin endpoint at `addr` and returns the body of its `200`
/// answer.
async fn exchange(
    addr: SocketAddr,
    token: Option<&Secret>,
    method: &str,
    path: &str,
) -> Result<String, StatusError> {
    let unreachable = |why: String| StatusError::Unreachable { addr, why };
    let exchange = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let auth = token
            .map(|t| {
                format!(
                    "Authorization: Bearer {}\r\n",
                    String::from_utf8_lossy(t.expose())
                )
            })
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut raw = Vec::new();
        s.take(MAX_ANSWER)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(raw)
    };
    let raw = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {TIMEOUT:?}")))??;
    let garbled = |why: String| StatusError::Garbled { addr, why };
    let text = String::from_utf8(raw).map_err(|_| garbled("not UTF-8".into()))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| garbled("no HTTP head".into()))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| garbled("no HTTP status".into()))?;
    if status != 200 {
        let hint = match status {
            401 => " (pass the admin token: --admin-token or RINGTUNNEL_ADMIN_TOKEN)",
            404 if method == "POST" => " (no service by that name)",
            404 => " (a relay older than `ringtunnel status`?)",
            _ => "",
        };
        return Err(StatusError::Status { addr, status, hint });
    }
    Ok(body.to_string())
}

/// Sends `method path` to the admin endpoint at `addr` and parses the JSON body of its answer.
async fn fetch<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    token: Option<&Secret>,
    method: &str,
    path: &str,
) -> Result<T, StatusError> {
    let body = exchange(addr, token, method, path).await?;
    serde_json::from_str(&body).map_err(|e| StatusError::Garbled {
        addr,
        why: e.to_string(),
    })
}

/// Asks the relay's `/health`: `Ok` with its answer (`ok`) when it serves, for a container's
/// or a supervisor's health check.
pub async fn health(addr: SocketAddr, token: Option<&Secret>) -> Result<String, StatusError> {
    exchange(addr, token, "GET", "/health").await
}

/// The relay's services and agents, as `ringtunnel status` prints them.
pub async fn render(addr: SocketAddr, token: Option<&Secret>) -> Result<String, StatusError> {
    let services: Vec<ServiceSnapshot> = fetch(addr, token, "GET", "/api/services").await?;
    let agents: Vec<AgentSnapshot> = fetch(addr, token, "GET", "/api/agents").await?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut rows = vec![[
        "SERVICE", "KIND", "PUBLIC", "AGENT", "UP", "NOW", "VISITORS", "IN", "OUT", "REFUSED",
        "CUT",
    ]
    .map(String::from)
    .to_vec()];
    for s in &services {
        let count = |k: &str| s.counts.get(k).copied().unwrap_or(0);
        let public = match s.kind.as_str() {
            "tcp" | "udp" => format!(":{}", s.port),
            _ => s
                .hosts
                .iter()
                .map(|h| format!("{h}:{}{}", s.port, s.path))
                .collect::<Vec<_>>()
                .join(","),
        };
        rows.push(vec![
            s.name.clone(),
            s.kind.clone(),
            public,
            match (&s.agent, s.draining) {
                (Some(a), false) if s.agents > 1 => format!("{a} +{}", s.agents - 1),
                (Some(a), false) => a.clone(),
                (Some(a), true) => format!("{a} (draining)"),
                (None, false) => "(lingering)".into(),
                (None, true) => "(lingering, draining)".into(),
            },
            s.connected_since
                .map_or("-".into(), |t| duration(now.saturating_sub(t))),
            s.visitors_now.to_string(),
            count("visitors").to_string(),
            bytes(count("bytes_in")),
            bytes(count("bytes_out")),
            (count("refused_full")
                + count("refused_rate")
                + count("refused_draining")
                + count("refused_denied")
                + count("refused_login"))
            .to_string(),
            count("cut").to_string(),
        ]);
    }
    let mut out = table(&rows);
    out.push('\n');
    let mut rows = vec![["AGENT", "SESSION", "UP", "SERVICES"]
        .map(String::from)
        .to_vec()];
    for a in &agents {
        rows.push(vec![
            a.address.clone(),
            a.session.to_string(),
            duration(now.saturating_sub(a.connected_since)),
            a.services.join(","),
        ]);
    }
    out.push_str(&table(&rows));
    Ok(out)
}

/// Starts (`on`) or ends the drain of service `name` on the relay whose admin endpoint is
/// `addr`; one line saying what it is doing now.
pub async fn drain(
    addr: SocketAddr,
    token: Option<&Secret>,
    name: &str,
    on: bool,
) -> Result<String, StatusError> {
    let action = if on { "drain" } else { "resume" };
    let path = format!("/api/services/{name}/{action}");
    let s: ServiceSnapshot = fetch(addr, token, "POST", &path).await?;
    Ok(match s.draining {
        true => format!(
            "service {} is draining: new visitors are refused, {} in flight\n",
            s.name, s.visitors_now
        ),
        false => format!("service {} takes new visitors\n", s.name),
    })
}

/// Rows as left-aligned columns two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `n` bytes in the largest binary unit that keeps it at least 1.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ => format!("{v:.1} {}", UNITS[unit]),
    }
}

/// Seconds as `3d4h`, `2h5m`, `4m10s` or `9s`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_like_a_person_wrote_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(256 << 20), "256.0 MiB");
        assert_eq!(duration(9), "9s");
        assert_eq!(duration(250), "4m10s");
        assert_eq!(duration(2 * 3600 + 300), "2h5m");
        assert_eq!(duration(3 * 86400 + 4 * 3600), "3d4h");
    }

    #[test]
    fn columns_line_up() {
        let rows = vec![
            vec!["A".to_string(), "BB".to_string()],
            vec!["CCC".to_string(), "D".to_string()],
        ];
        assert_eq!(table(&rows), "A    BB\nCCC  D\n");
    }
}
