//! End-to-end: the relay's admin endpoint serves health and Prometheus metrics behind its
//! bearer token, and refuses everything else clearly.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn request(addr: SocketAddr, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn get(path: &str, token: Option<&str>) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n")
}

async fn health_and_metrics_behind_a_token(backend: Backend) {
    let relay = Relay::spawn(
        backend,
        &["--admin", "127.0.0.1:0", "--admin-token", "let-me-in"],
    );
    let admin = relay.admin.expect("ready line names the admin address");
    let origin = echo_origin().await;
    let agent = Agent::spawn(relay.agent_args(origin, "web"));
    assert_echo(agent.public).await;

    assert_eq!(request(admin, &get("/metrics", None)).await.0, 401);
    assert_eq!(request(admin, &get("/metrics", Some("wrong"))).await.0, 401);
    assert_eq!(
        request(admin, &get("/health", Some("let-me-in"))).await,
        (200, "ok\n".into())
    );
    let (status, body) = request(admin, &get("/metrics", Some("let-me-in"))).await;
    assert_eq!(status, 200);
    let accepted: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("ringtunnel_visitors_accepted_total "))
        .expect("visitor counter")
        .parse()
        .unwrap();
    assert!(accepted >= 1, "{body}");
    assert!(
        body.contains("ringtunnel_service_online{service=\"web\",kind=\"tcp\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("ringtunnel_sessions_accepted_total 1"),
        "{body}"
    );
    // The agent keeps a pool of data connections parked for visitors.
    assert!(
        body.contains("ringtunnel_service_idle_connections{service=\"web\",kind=\"tcp\"} "),
        "{body}"
    );

    assert_eq!(
        request(admin, &get("/nothing", Some("let-me-in"))).await.0,
        404
    );
    // HEAD: the GET response's status and headers, and not one byte of body.
    let (status, body) = request(
        admin,
        "HEAD /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer let-me-in\r\n\r\n",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(request(admin, "garbage\r\n\r\n").await.0, 400);
    assert_eq!(
        request(
            admin,
            "POST /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer let-me-in\r\n\r\n"
        )
        .await
        .0,
        405
    );
}

#[test]
fn admin_beyond_loopback_needs_a_token() {
    let mut relay = Proc::spawn(&[
        "relay".into(),
        "--secret".into(),
        "s".into(),
        "--control".into(),
        "127.0.0.1:0".into(),
        "--admin".into(),
        "0.0.0.0:0".into(),
    ]);
    assert!(!relay.wait_exit().success());
    assert!(relay.stderr().contains("admin token"), "{}", relay.stderr());
}

both_backends!(health_and_metrics_behind_a_token);
