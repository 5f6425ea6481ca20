//! Hostile tests: the relay attacked as docs/SECURITY.md says it must hold, with the real
//! binary on loopback. Each test is one attack; several addresses come from 127.0.0.0/8 so
//! an attacker and a legitimate agent or visitor can be told apart.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use ringtunnel::protocol::auth::Ticket;
use ringtunnel::protocol::msg::Message;
use ringtunnel::protocol::{AgentMsg, ErrorCode, RelayMsg, ServiceKind, ServiceRequest};
use ringtunnel::protocol::{ServiceOutcome, PROTOCOL_VERSION};
use ringtunnel::transport::Framed;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const DOMAIN: &str = "example.test";
const BILLING_SECRET: &str = "billing's own secret, not the relay's";

/// A relay with a shared HTTP port under [`DOMAIN`], an admin endpoint and `toml` as its
/// config file (kept alive by the caller).
fn http_relay(backend: Backend, toml: &str, extra: &[&str]) -> (Relay, TempDir) {
    let (dir, path) = config_file(toml);
    let mut args = vec![
        "--http",
        "127.0.0.1:0",
        "--domain",
        DOMAIN,
        "--admin",
        "127.0.0.1:0",
        "--config",
        &path,
    ];
    args.extend_from_slice(extra);
    (Relay::spawn(backend, &args), dir)
}

fn billing_config(extra: &str) -> String {
    format!("[[service]]\nname = \"billing\"\nsecret = \"{BILLING_SECRET}\"\n{extra}")
}

/// `args` with `extra` appended and the `--secret` value replaced by `secret`.
fn agent_with(mut args: Vec<String>, secret: &str, extra: &[&str]) -> Vec<String> {
    let i = args.iter().position(|a| a == "--secret").unwrap();
    args[i + 1] = secret.to_string();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// An HTTP origin that answers every request with `NAME` and the request head it received,
/// then closes.
async fn named_origin(name: &'static str) -> SocketAddr {
    origin(move |mut s| async move {
        let Some(head) = next_head(&mut s, &mut Vec::new()).await else {
            return;
        };
        let body = format!("{name}\n{head}");
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(resp.as_bytes()).await;
        let _ = s.shutdown().await;
    })
    .await
}

/// Sends `request` from `from` (an address of 127.0.0.0/8) and reads the whole answer.
async fn send_from(from: [u8; 4], to: SocketAddr, request: &[u8]) -> String {
    let mut s = connect_from(from, to).await;
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("answered within the wait")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((from, 0))).unwrap();
    sock.connect(to).await.unwrap()
}

/// `GET path` for `host` with `Connection: close`: (status, body).
async fn get(http: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let resp = send_from([127, 0, 0, 1], http, req.as_bytes()).await;
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

fn refused(mut p: Proc, needle: &str) {
    assert!(!p.wait_exit().success(), "{}", p.stderr());
    assert!(
        p.stderr().contains(needle),
        "{needle:?} not in:\n{}",
        p.stderr()
    );
}

// ------------------------------------------------------------- 1, 2: tenants isolated

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_and_every_path_under_it_belong_to_one_secret() {
    let (relay, _cfg) = http_relay(Backend::Tokio, &billing_config(""), &[]);
    let http = relay.http.unwrap();
    let (billing, evil) = (named_origin("billing").await, named_origin("evil").await);
    let _billing = Agent::spawn(agent_with(
        relay.agent_args(billing, "billing"),
        BILLING_SECRET,
        &["--http-host", "billing"],
    ));
    // The relay-wide secret, another name, a path under billing's host: refused.
    let thief = Proc::spawn(&agent_with(
        relay.agent_args(evil, "evil"),
        SECRET,
        &["--http-host", "billing", "--path", "/admin"],
    ));
    refused(thief, "belongs to service billing");
    let (st, body) = get(http, "billing.example.test", "/admin/users").await;
    assert_eq!((st, body.lines().next()), (200, Some("billing")), "{body}");

    // A wildcard over the domain is the wildcard holder's, but never takes a host (or any of
    // its paths) that has claims of its own.
    let _wild = Agent::spawn(agent_with(
        relay.agent_args(evil, "evil-wild"),
        SECRET,
        &["--http-host", "*.example.test"],
    ));
    let (_, body) = get(http, "billing.example.test", "/admin").await;
    assert!(body.starts_with("billing\n"), "{body}");
    let (_, body) = get(http, "anything.example.test", "/").await;
    assert!(body.starts_with("evil\n"), "{body}");
    // And a host the wildcard serves now cannot be taken from it by another secret.
    let taker = Proc::spawn(&agent_with(
        relay.agent_args(billing, "billing"),
        BILLING_SECRET,
        &["--http-host", "anything"],
    ));
    refused(taker, "belongs to service evil-wild");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_hosts_and_names_that_differ_by_case_stop_squatters() {
    let toml = billing_config("hosts = [\"billing\"]\n");
    let (relay, _cfg) = http_relay(Backend::Tokio, &toml, &[]);
    let http = relay.http.unwrap();
    let (billing, evil) = (named_origin("billing").await, named_origin("evil").await);
    // billing is offline. Its name with another case needs billing's secret.
    let shout = Proc::spawn(&agent_with(
        relay.agent_args(evil, "BILLING"),
        SECRET,
        &["--http-host", "shout"],
    ));
    refused(shout, "relay rejected the agent");
    // A wildcard does not serve the reserved host...
    let _wild = Agent::spawn(agent_with(
        relay.agent_args(evil, "squatter"),
        SECRET,
        &["--http-host", "*.example.test"],
    ));
    let (st, body) = get(http, "billing.example.test", "/").await;
    assert_eq!(st, 404, "{body}");
    let (_, body) = get(http, "other.example.test", "/").await;
    assert!(body.starts_with("evil\n"), "{body}");
    // ...nor can another service claim it...
    let claim = Proc::spawn(&agent_with(
        relay.agent_args(evil, "billing2"),
        SECRET,
        &["--http-host", "billing"],
    ));
    refused(claim, "reserved for service billing");
    // ...and the real service gets it whenever it comes.
    let _billing = Agent::spawn(agent_with(
        relay.agent_args(billing, "Billing"),
        BILLING_SECRET,
        &["--http-host", "billing"],
    ));
    let (st, body) = get(http, "billing.example.test", "/").await;
    assert_eq!((st, body.lines().next()), (200, Some("billing")), "{body}");
}

// ------------------------------------------------------ 3: one secret cannot freeze the relay

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_hoarding_by_one_secret_freezes_nothing() {
    let (relay, _cfg) = http_relay(Backend::Tokio, &billing_config(""), &[]);
    let admin = relay.admin.unwrap();
    // 17 sessions × 64 services × pool 64 never redeem a ticket: more than the whole store.
    let mut hoarders = Vec::new();
    for i in 0..17 {
        let requests = (0..64)
            .map(|j| ServiceRequest {
                name: format!("h{i}x{j}"),
                kind: ServiceKind::Http,
                hosts: vec![format!("h{i}x{j}")],
                pool: 64,
                ..Default::default()
            })
            .collect();
        let (mut ctl, results) = fake_session(&relay, SECRET, requests).await;
        assert!(results
            .iter()
            .all(|r| matches!(r.outcome, ServiceOutcome::Online { .. })));
        // Keep reading, so the relay's writes never block: only the store is under test.
        hoarders.push(tokio::spawn(async move {
            while ctl.read_msg::<RelayMsg>().await.is_ok() {}
        }));
    }
    wait_metric(admin, "ringtunnel_tickets_withheld_total", 1).await;
    // The control plane still answers: another secret's agent gets tickets and serves.
    let origin = named_origin("billing").await;
    let _billing = Agent::spawn(agent_with(
        relay.agent_args(origin, "billing"),
        BILLING_SECRET,
        &["--http-host", "billing"],
    ));
    let (st, body) = get(relay.http.unwrap(), "billing.example.test", "/").await;
    assert_eq!((st, body.lines().next()), (200, Some("billing")), "{body}");
    assert!(metric(admin, "ringtunnel_sessions_accepted_total").await >= Some(18));
    for h in hoarders {
        h.abort();
    }
}

// ------------------------------------------------------------- 4, 10: honest HTTP heads

async fn forged_forwarding_headers_never_reach_the_origin(backend: Backend) {
    let (relay, _cfg) = http_relay(backend, "", &[]);
    let origin = named_origin("app").await;
    let _a = Agent::spawn(agent_with(
        relay.agent_args(origin, "app"),
        SECRET,
        &["--http-host", "app"],
    ));
    let forged = b"GET / HTTP/1.1\r\nHost: app.example.test\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Host: bank.test\r\nX-Forwarded-Proto: https\r\nForwarded: for=\"6.6.6.6\r\nConnection: close\r\n\r\n";
    let resp = send_from([127, 0, 0, 1], relay.http.unwrap(), forged).await;
    assert!(resp.contains("\r\n\r\napp\n"), "{resp}");
    for bad in ["6.6.6.6", "bank.test", "https"] {
        assert!(!resp.contains(bad), "{bad} reached the origin:\n{resp}");
    }
    for good in [
        "X-Forwarded-For: 127.0.0.1\r\n",
        "X-Real-IP: 127.0.0.1\r\n",
        "X-Forwarded-Host: app.example.test\r\n",
        "X-Forwarded-Proto: http\r\n",
        "Forwarded: for=127.0.0.1;host=app.example.test;proto=http\r\n",
    ] {
        assert!(resp.contains(good), "{good:?} missing:\n{resp}");
    }
}

/// An HTTP/1.1 origin that keeps the connection and answers every request with the head it
/// received (bodies, by Content-Length or chunked, are read and counted, not echoed).
async fn keepalive_origin() -> SocketAddr {
    origin(|mut s| async move {
        let mut buf = Vec::new();
        while let Some(head) = next_head(&mut s, &mut buf).await {
            let lower = head.to_ascii_lowercase();
            let mut body = 0usize;
            if let Some(l) = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
            {
                body = l.trim().parse().unwrap();
            } else if lower.contains("transfer-encoding: chunked") {
                // The test's chunked bodies end with "0\r\n\r\n".
                loop {
                    if let Some(i) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                        body = i + 5;
                        break;
                    }
                    if !read_more(&mut s, &mut buf).await {
                        return;
                    }
                }
            }
            while buf.len() < body {
                if !read_more(&mut s, &mut buf).await {
                    return;
                }
            }
            buf.drain(..body);
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{head}",
                head.len()
            );
            if s.write_all(reply.as_bytes()).await.is_err() || lower.contains("connection: close") {
                let _ = s.shutdown().await;
                return;
            }
        }
    })
    .await
}

async fn every_request_of_a_kept_alive_connection_is_rewritten(backend: Backend) {
    for data_tls in ["off", "on"] {
        let (relay, _cfg) = http_relay(backend, "", &["--data-tls", data_tls]);
        let origin = keepalive_origin().await;
        let _a = Agent::spawn(agent_with(
            relay.agent_args(origin, "app"),
            SECRET,
            &["--http-host", "app"],
        ));
        let forged = "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n";
        let body = format!("{forged}\r\n");
        let stream = format!(
            "GET /1 HTTP/1.1\r\nHost: app.example.test\r\n{forged}\r\n\
             POST /2 HTTP/1.1\r\nHost: app.example.test\r\nContent-Length: {}\r\n{forged}\r\n{body}\
             POST /3 HTTP/1.1\r\nHost: app.example.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
             GET /4 HTTP/1.1\r\nHost: app.example.test\r\n{forged}Connection: close\r\n\r\n",
            body.len()
        );
        let resp = send_from([127, 0, 0, 1], relay.http.unwrap(), stream.as_bytes()).await;
        assert_eq!(
            resp.matches("HTTP/1.1 200 OK").count(),
            4,
            "{data_tls}: {resp}"
        );
        assert_eq!(
            resp.matches("X-Forwarded-For: 127.0.0.1\r\n").count(),
            4,
            "{resp}"
        );
        assert_eq!(
            resp.matches("X-Real-IP: 127.0.0.1\r\n").count(),
            4,
            "{resp}"
        );
        assert!(
            !resp.contains("6.6.6.6"),
            "a forged header reached the origin: {resp}"
        );
        // A request for another host cannot ride a connection routed to this one.
        let other = "GET / HTTP/1.1\r\nHost: app.example.test\r\n\r\nGET / HTTP/1.1\r\nHost: billing.example.test\r\n\r\n";
        let resp = send_from([127, 0, 0, 1], relay.http.unwrap(), other.as_bytes()).await;
        // (Both requests may arrive in the first read, when the whole connection is refused.)
        assert!(resp.matches("HTTP/1.1 200 OK").count() <= 1, "{resp}");
        assert!(!resp.contains("Host: billing"), "{resp}");
    }
}

async fn an_absolute_target_cannot_name_another_host_than_host(backend: Backend) {
    let (relay, _cfg) = http_relay(backend, "", &[]);
    let (blog, billing) = (named_origin("blog").await, named_origin("billing").await);
    let _blog = Agent::spawn(agent_with(
        relay.agent_args(blog, "blog"),
        SECRET,
        &["--http-host", "blog"],
    ));
    let _billing = Agent::spawn(agent_with(
        relay.agent_args(billing, "billing"),
        SECRET,
        &["--http-host", "billing"],
    ));
    let smuggled = b"GET http://blog.example.test/ HTTP/1.1\r\nHost: billing.example.test\r\nConnection: close\r\n\r\n";
    let resp = send_from([127, 0, 0, 1], relay.http.unwrap(), smuggled).await;
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    assert!(
        !resp.contains("blog\n") && !resp.contains("billing\n"),
        "{resp}"
    );
    // Target and Host agreeing is a normal request.
    let fine = b"GET http://blog.example.test/x HTTP/1.1\r\nHost: blog.example.test\r\nConnection: close\r\n\r\n";
    let resp = send_from([127, 0, 0, 1], relay.http.unwrap(), fine).await;
    assert!(resp.contains("\r\n\r\nblog\n"), "{resp}");
}

// --------------------------------------------------------------------- 5: state directory

fn relay_args(state: &std::path::Path) -> Vec<String> {
    relay_command(state, &["--backend", "tokio"])
}

#[test]
fn the_state_directory_is_never_trusted_blindly() {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let fs_mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    // A key others can read is refused, naming the fix.
    let dir = TempDir::new("state-modes");
    let state = dir.0.join("state");
    let mut first = Proc::spawn(&relay_args(&state));
    first.wait_line("ready ");
    first.kill();
    let key = state.join("relay-key.pem");
    fs_mode(&key, 0o644);
    refused(Proc::spawn(&relay_args(&state)), "chmod 600");
    fs_mode(&key, 0o600);
    // A directory others can write is refused.
    fs_mode(&state, 0o777);
    refused(Proc::spawn(&relay_args(&state)), "chmod 700");
    fs_mode(&state, 0o700);
    // Half an identity is refused, never silently replaced.
    std::fs::remove_file(&key).unwrap();
    refused(Proc::spawn(&relay_args(&state)), "restore relay-key.pem");
    assert!(!key.exists());

    // A link planted where the key is written first: the file it points to is untouched.
    let dir = TempDir::new("state-link");
    let state = dir.0.join("state");
    std::fs::create_dir(&state).unwrap();
    fs_mode(&state, 0o700);
    let victim = dir.0.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    symlink(&victim, state.join("relay-key.tmp")).unwrap();
    let mut relay = Proc::spawn(&relay_args(&state));
    relay.wait_line("ready ");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let mode = std::fs::metadata(state.join("relay-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    relay.kill();
    // A link in place of the key is refused.
    std::fs::remove_file(state.join("relay-key.pem")).unwrap();
    symlink(&victim, state.join("relay-key.pem")).unwrap();
    refused(Proc::spawn(&relay_args(&state)), "symbolic link");
}

// ------------------------------------------------- 6, 7, 9, 11: the control port before auth

/// A `DataHello` frame for `ticket`.
fn data_hello(ticket: Ticket) -> Vec<u8> {
    AgentMsg::DataHello {
        version: PROTOCOL_VERSION,
        ticket,
    }
    .to_frame()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_flood_on_the_control_port_leaves_room_for_agents() {
    let relay = Relay::spawn(Backend::Tokio, &["--admin", "127.0.0.1:0"]);
    let admin = relay.admin.unwrap();
    // The relay raised its descriptor limit to the hard one.
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", relay.proc.child.id())).unwrap();
    let files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<&str> = files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(
        nums[0], nums[1],
        "soft limit raised to the hard one: {files}"
    );
    // 300 idle connections from one address: the relay holds at most its per-address share.
    let mut flood = Vec::new();
    for _ in 0..300 {
        flood.push(connect_from([127, 0, 0, 2], relay.control).await);
    }
    wait_metric(admin, "ringtunnel_unauthenticated_shed_total", 300 - 256).await;
    // An agent from another address still gets in, and its visitors through.
    let origin = echo_origin().await;
    let agent = Agent::spawn(relay.agent_args(origin, "svc"));
    assert_echo(agent.public).await;
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_first_frame_is_refused_before_its_body_is_read() {
    let relay = Relay::spawn(Backend::Tokio, &["--data-tls", "off"]);
    let mut s = TcpStream::connect(relay.control).await.unwrap();
    // Declares a maximum-size frame (64 KiB); sends a little of it.
    s.write_all(&65_536u32.to_be_bytes()).await.unwrap();
    let _ = s.write_all(&[0u8; 100]).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
    relay
        .proc
        .wait_stderr("frame of 65536 bytes exceeds the 64-byte limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_floods_are_throttled_and_summarised() {
    let relay = Relay::spawn(
        Backend::Tokio,
        &["--data-tls", "off", "--admin", "127.0.0.1:0"],
    );
    let admin = relay.admin.unwrap();
    // 60 guessed tickets at once from one address.
    let guesses = (0..60u8).map(|i| {
        let control = relay.control;
        tokio::spawn(async move {
            let mut s = connect_from([127, 0, 0, 4], control).await;
            s.write_all(&data_hello(Ticket([i; 16]))).await.unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
            out
        })
    });
    // Each is refused, or (once its address is throttled and holds its few places) closed
    // at accept; none gets further.
    for g in guesses.collect::<Vec<_>>() {
        let answer = g.await.unwrap();
        match RelayMsg::decode(&answer) {
            Ok(Some((RelayMsg::Error { code, .. }, _))) => assert_eq!(code, ErrorCode::BadTicket),
            Ok(None) if answer.is_empty() => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(metric(admin, "ringtunnel_failures_throttled_total").await >= Some(1));
    // Five lines, then one summary for the rest (counted in the first interval, the one the
    // summary closes).
    relay.proc.wait_stderr("more refusals in the last 10s");
    let stderr = relay.proc.stderr();
    let first_interval = &stderr[..stderr.find("more refusals in the last 10s").unwrap()];
    let lines = first_interval
        .matches("WARN data connection refused")
        .count();
    assert!(
        lines <= 5,
        "{lines} refusal lines:\n{}",
        relay.proc.stderr()
    );
    // A throttled address may hold only a few unauthenticated connections. Its throttle may
    // have lapsed while the summary was awaited; failing again renews it, so keep failing
    // (bounded in count) until a connection is closed at accept.
    let shed = "ringtunnel_unauthenticated_shed_total";
    let before = metric(admin, shed).await.unwrap();
    let mut held = Vec::new();
    for i in 0..400u16 {
        let mut s = connect_from([127, 0, 0, 4], relay.control).await;
        let _ = s.write_all(&data_hello(Ticket([i as u8; 16]))).await;
        held.push(s);
        if i % 20 == 19 && metric(admin, shed).await > Some(before) {
            break;
        }
    }
    wait_metric(admin, shed, before + 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_connection_does_not_burn_a_ticket_when_tls_is_required() {
    let relay = Relay::spawn(
        Backend::Tokio,
        &["--data-tls", "on", "--admin", "127.0.0.1:0"],
    );
    let (_ctl, _port, tickets) = fake_agent(&relay, "svc").await;
    let limit = Duration::from_secs(10);
    let mut plain = Framed::new(connect_data(&relay, false).await);
    let hello = AgentMsg::DataHello {
        version: PROTOCOL_VERSION,
        ticket: tickets[0],
    };
    plain.write_msg(&hello, limit).await.unwrap();
    match plain.read_msg_within::<RelayMsg>(limit).await.unwrap() {
        RelayMsg::Error { code, .. } => assert_eq!(code, ErrorCode::BadRequest),
        other => panic!("{other:?}"),
    }
    // The same ticket over TLS is still good.
    let mut tls = Framed::new(connect_data(&relay, true).await);
    tls.write_msg(&hello, limit).await.unwrap();
    wait_metric(relay.admin.unwrap(), &idle_series("svc"), 1).await;
}

// -------------------------------------------------------------- 8: slow heads on a shared port

async fn slow_heads_from_one_address_are_shed_and_others_served(backend: Backend) {
    let (relay, _cfg) = http_relay(backend, "", &[]);
    let admin = relay.admin.unwrap();
    let http = relay.http.unwrap();
    let origin = named_origin("app").await;
    let _a = Agent::spawn(agent_with(
        relay.agent_args(origin, "app"),
        SECRET,
        &["--http-host", "app"],
    ));
    let mut slow = Vec::new();
    for _ in 0..80 {
        let mut s = connect_from([127, 0, 0, 3], http).await;
        let _ = s.write_all(b"GET / HTTP/1.1\r\n").await;
        slow.push(s);
    }
    wait_metric(admin, "ringtunnel_visitors_shed_total", 80 - 64).await;
    let (st, body) = get(http, "app.example.test", "/").await;
    assert_eq!((st, body.lines().next()), (200, Some("app")), "{body}");
    drop(slow);
}

both_backends!(
    forged_forwarding_headers_never_reach_the_origin,
    every_request_of_a_kept_alive_connection_is_rewritten,
    an_absolute_target_cannot_name_another_host_than_host,
    slow_heads_from_one_address_are_shed_and_others_served,
);
