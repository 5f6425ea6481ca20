//! End-to-end: the relay's admin endpoint serves health, Prometheus metrics and the JSON
//! API behind its bearer token, `ringtunnel status` prints it, and everything else is
//! refused clearly.

mod common;

use std::net::SocketAddr;

use common::*;
use ringtunnel::admin::{AgentSnapshot, ServiceSnapshot};

use common::http_request as request;

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
    // The live page holds no data (its script asks the API, with the token), so it is served
    // without one.
    let (status, page) = request(admin, &get("/", None)).await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>ringtunnel relay</title>"), "{page}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "self-contained"
    );
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

/// `/api/services` once `ready` holds for it (the counts of a visitor land as it ends).
async fn services_once(
    admin: SocketAddr,
    token: &str,
    ready: impl Fn(&[ServiceSnapshot]) -> bool,
) -> Vec<ServiceSnapshot> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = request(admin, &get("/api/services", Some(token))).await;
        assert_eq!(status, 200, "{body}");
        let services: Vec<ServiceSnapshot> = serde_json::from_str(&body).expect(&body);
        if ready(&services) {
            return services;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn the_api_and_status_show_services_agents_and_their_bytes(backend: Backend) {
    let relay = Relay::spawn(backend, &["--admin", "127.0.0.1:0", "--admin-token", "tok"]);
    let admin = relay.admin.unwrap();
    let origin = echo_origin().await;
    let agent = Agent::spawn(relay.agent_args(origin, "web"));
    let payload = pseudo_random(7, 100_000);
    assert_eq!(roundtrip(agent.public, &payload).await.unwrap(), payload);

    let services = services_once(admin, "tok", |s| {
        s.first().and_then(|s| s.counts.get("bytes_out")) == Some(&100_000)
    })
    .await;
    let web = &services[0];
    assert_eq!((web.name.as_str(), web.kind.as_str()), ("web", "tcp"));
    assert_eq!(web.port, agent.public.port());
    assert!(web.online);
    assert!(
        web.agent.as_deref().unwrap().starts_with("127.0.0.1:"),
        "{web:?}"
    );
    assert!(web.connected_since.is_some());
    assert_eq!(web.counts["visitors"], 1);
    assert_eq!(web.counts["bytes_in"], 100_000);
    assert_eq!(web.counts["cut"], 0);

    let (status, body) = request(admin, &get("/api/agents", Some("tok"))).await;
    assert_eq!(status, 200);
    let agents: Vec<AgentSnapshot> = serde_json::from_str(&body).expect(&body);
    assert_eq!(agents.len(), 1, "{body}");
    assert_eq!(agents[0].services, ["web"]);
    assert_eq!(Some(&agents[0].address), web.agent.as_ref());

    let (_, metrics) = request(admin, &get("/metrics", Some("tok"))).await;
    assert!(
        metrics.contains(
            "# HELP ringtunnel_visitors_accepted_total Visitors accepted on public ports."
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("ringtunnel_service_bytes_out_total{service=\"web\",kind=\"tcp\"} 100000"),
        "{metrics}"
    );
    // Every series has its HELP and TYPE.
    let helps = metrics.lines().filter(|l| l.starts_with("# HELP ")).count();
    let types = metrics.lines().filter(|l| l.starts_with("# TYPE ")).count();
    assert_eq!(helps, types, "{metrics}");

    let (ok, table, err) = status_cmd(admin, Some("tok"), &[]);
    assert!(ok, "{err}");
    let row = table
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains(&format!(":{}", agent.public.port())),
        "{table}"
    );
    assert!(row.contains("97.7 KiB"), "bytes each way: {table}");
    assert!(table.contains("SERVICES"), "the agents table: {table}");
    let (ok, _, err) = status_cmd(admin, None, &[]);
    assert!(!ok);
    assert!(
        err.contains("answered 401") && err.contains("--admin-token"),
        "{err}"
    );
}

async fn bytes_show_while_a_visitor_is_still_downloading(backend: Backend) {
    // Plain data connections: the download is spliced, and each splice counts.
    for data_tls in ["on", "off"] {
        bytes_show_during_a_download(backend, data_tls).await;
    }
}

async fn bytes_show_during_a_download(backend: Backend, data_tls: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = Relay::spawn(backend, &["--admin", "127.0.0.1:0", "--data-tls", data_tls]);
    let admin = relay.admin.unwrap();
    let origin = bulk_origin(std::sync::Arc::new(pseudo_random(3, 32 << 20))).await;
    let agent = Agent::spawn(relay.agent_args(origin, "files"));
    let mut v = tokio::net::TcpStream::connect(agent.public).await.unwrap();
    v.write_all(b"go").await.unwrap();
    let mut got = vec![0u8; 4 << 20];
    v.read_exact(&mut got).await.unwrap();
    // The visitor stops reading with most of the download still to come: what it has read
    // already shows, long before it ends.
    let services = services_once(admin, "", |s| s[0].counts["bytes_out"] >= 4 << 20).await;
    assert_eq!(services[0].visitors_now, 1);
    assert_eq!(services[0].counts["bytes_in"], 2);
    assert!(services[0].counts["bytes_out"] < 32 << 20, "{services:?}");
}

/// `ringtunnel status` against `admin` with `args`, and `token` as RINGTUNNEL_ADMIN_TOKEN:
/// (success, stdout, stderr).
fn status_cmd(admin: SocketAddr, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ringtunnel"));
    cmd.args(["status", "--admin", &admin.to_string()])
        .args(args)
        .env_remove("RINGTUNNEL_ADMIN_TOKEN");
    if let Some(t) = token {
        cmd.env("RINGTUNNEL_ADMIN_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

async fn a_drained_service_finishes_its_visitors_and_refuses_new_ones(backend: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = Relay::spawn(backend, &["--admin", "127.0.0.1:0"]);
    let admin = relay.admin.unwrap();
    let origin = echo_origin().await;
    let agent = Agent::spawn(relay.agent_args(origin, "web"));
    let mut inside = tokio::net::TcpStream::connect(agent.public).await.unwrap();
    let mut echoed = [0u8; 5];
    inside.write_all(b"first").await.unwrap();
    inside.read_exact(&mut echoed).await.unwrap();

    let (ok, out, err) = status_cmd(admin, None, &["--drain", "web"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("service web is draining: new visitors are refused, 1 in flight"),
        "{out}"
    );
    assert!(out.contains("(draining)"), "the table says so: {out}");

    // A new visitor is closed without reaching the service...
    let refused = roundtrip(agent.public, b"hello").await;
    assert!(
        refused.as_ref().map_or(true, |got| got.is_empty()),
        "{refused:?}"
    );
    // ...while the one inside carries on.
    inside.write_all(b"second").await.unwrap();
    let mut more = [0u8; 6];
    inside.read_exact(&mut more).await.unwrap();
    assert_eq!(&more, b"second");
    drop(inside);
    let services = services_once(admin, "", |s| s[0].visitors_now == 0).await;
    assert!(services[0].draining);
    assert!(services[0].counts["refused_draining"] >= 1, "{services:?}");
    assert_eq!(services[0].counts["bytes_out"], 11);

    let (ok, _, err) = status_cmd(admin, None, &["--drain", "nope"]);
    assert!(!ok);
    assert!(
        err.contains("answered 404") && err.contains("no service by that name"),
        "{err}"
    );
    let (ok, out, err) = status_cmd(admin, None, &["--resume", "web"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("service web takes new visitors"), "{out}");
    assert_echo(agent.public).await;
}

#[test]
fn status_names_an_admin_endpoint_that_is_not_there() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringtunnel"))
        .args(["status", "--admin", &addr.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("admin endpoint {addr}")), "{err}");
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

both_backends!(
    health_and_metrics_behind_a_token,
    the_api_and_status_show_services_agents_and_their_bytes,
    a_drained_service_finishes_its_visitors_and_refuses_new_ones,
    bytes_show_while_a_visitor_is_still_downloading,
);
