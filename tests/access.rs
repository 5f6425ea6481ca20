//! Who may visit a service (`[access]` in relay.toml), end to end on both backends: address
//! lists refuse visitors of every kind before a byte reaches the agent (a close for tcp and
//! on the shared TLS port, a 403 on the shared HTTP port) and change on reload; basic auth answers 401 with a challenge,
//! lets the right password through (checked once, remembered for the connection's later
//! requests), ends a kept-alive connection at a request without it, and throttles an address
//! that keeps guessing. Visitors come from different loopback addresses (127.0.0.1-3).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const DOMAIN: &str = "example.test";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A connection to `to` from loopback address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from, 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// Whether a visitor from `from` gets its bytes echoed by the tcp service at `public`.
async fn echoed_from(from: IpAddr, public: SocketAddr) -> bool {
    let mut s = connect_from(from, public).await;
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut got = [0u8; 4];
    matches!(
        tokio::time::timeout(WAIT, s.read_exact(&mut got)).await,
        Ok(Ok(_)) if &got == b"ping"
    )
}

/// An echo origin that counts the connections that sent it something (not the agent's
/// check of its local service, which only connects).
async fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let addr = origin(move |mut s| {
        let counter = counter.clone();
        async move {
            let mut first = [0u8; 1];
            if matches!(s.read(&mut first).await, Ok(1)) {
                counter.fetch_add(1, Ordering::SeqCst);
                if s.write_all(&first).await.is_ok() {
                    serve_echo(s).await;
                }
            }
        }
    })
    .await;
    (addr, seen)
}

/// An HTTP/1.1 keep-alive origin answering each request `ok PATH`, counting requests.
async fn counting_http() -> (SocketAddr, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let addr = origin(move |mut s| {
        let counter = counter.clone();
        async move {
            let mut buf = Vec::new();
            while let Some(head) = next_head(&mut s, &mut buf).await {
                counter.fetch_add(1, Ordering::SeqCst);
                let body = format!("ok {}", head.split(' ').nth(1).unwrap_or("?"));
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, seen)
}

/// Whether a TLS visitor from `from` reaches the origin behind the TLS port at `port` (the
/// counting echo origin sends its ClientHello back).
async fn tls_reaches_from(from: IpAddr, port: SocketAddr, name: &str) -> bool {
    let hello = client_hello(name);
    let mut s = connect_from(from, port).await;
    if s.write_all(&hello).await.is_err() {
        return false;
    }
    let mut back = vec![0u8; hello.len()];
    matches!(tokio::time::timeout(WAIT, s.read_exact(&mut back)).await, Ok(Ok(_)) if back == hello)
}

/// One request on `s` (kept alive); the response's status and head, or `None` if the relay
/// closed the connection instead.
async fn request(s: &mut TcpStream, host: &str, auth: Option<&str>) -> Option<(u16, String)> {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let req = format!("GET /x HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let head = tokio::time::timeout(WAIT, next_head(s, &mut buf))
        .await
        .ok()??;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    // The body: Content-Length bytes (the relay's pages and the origin's both send one).
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < len {
        if !read_more(s, &mut buf).await {
            break;
        }
    }
    Some((status, head))
}

/// `Basic` credentials for `user:password`.
fn basic(user: &str, password: &str) -> String {
    use base64ct::Encoding;
    format!(
        "Basic {}",
        base64ct::Base64::encode_string(format!("{user}:{password}").as_bytes())
    )
}

/// A password hash made by `ringtunnel hash-password`, as an operator makes one.
fn hash_password(password: &str) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringtunnel"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{password}").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    hash
}

async fn address_lists_refuse_before_the_agent_and_reload(backend: Backend) {
    let rules = |echo_allow: &str| {
        format!(
            "[access]\ndeny = [\"127.0.0.3\"]\n\
             [[service]]\nname = \"echo\"\n[service.access]\nallow = [{echo_allow}]\n\
             [[service]]\nname = \"web\"\n[service.access]\nallow = [\"127.0.0.0/30\"]\ndeny = [\"127.0.0.2/32\"]\n\
             [[service]]\nname = \"vault\"\n[service.access]\nallow = [\"127.0.0.1\"]\n"
        )
    };
    let (_dir, path) = config_file(&rules("\"127.0.0.1\", \"127.0.0.3\""));
    let relay = Relay::spawn(
        backend,
        &[
            "--config",
            &path,
            "--admin",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--tls",
            "127.0.0.1:0",
            "--domain",
            DOMAIN,
        ],
    );
    let admin = relay.admin.unwrap();
    let (echo, echo_seen) = counting_echo().await;
    let (web, web_seen) = counting_http().await;
    let (vault, vault_seen) = counting_echo().await;
    let mut vault_args = relay.agent_args(vault, "vault");
    vault_args.extend(["--tls-host".into(), "vault".into()]);
    let _vault_agent = Agent::spawn(vault_args);
    let echo_agent = Agent::spawn(relay.agent_args(echo, "echo"));
    let mut web_args = relay.agent_args(web, "web");
    web_args.extend(["--http-host".into(), "web".into()]);
    let _web_agent = Agent::spawn(web_args);

    // tcp: allowed from .1; .2 is not on the allow list; .3 is on it but the relay denies it.
    assert!(echoed_from(ip("127.0.0.1"), echo_agent.public).await);
    assert!(!echoed_from(ip("127.0.0.2"), echo_agent.public).await);
    assert!(
        !echoed_from(ip("127.0.0.3"), echo_agent.public).await,
        "the relay-wide deny holds"
    );
    assert_eq!(
        echo_seen.load(Ordering::SeqCst),
        1,
        "refused visitors never reach the origin"
    );

    // http: 403 for the denied address, 200 for the allowed one.
    let http = relay.http.unwrap();
    let host = format!("web.{DOMAIN}");
    let mut denied = connect_from(ip("127.0.0.2"), http).await;
    let (status, _) = request(&mut denied, &host, None).await.expect("a 403 page");
    assert_eq!(status, 403);
    let mut allowed = connect_from(ip("127.0.0.1"), http).await;
    assert_eq!(
        request(&mut allowed, &host, None).await.map(|r| r.0),
        Some(200)
    );
    assert_eq!(web_seen.load(Ordering::SeqCst), 1);

    // tls (passthrough): closed for the address off the list, before the origin sees a byte.
    let tls = relay.tls.unwrap();
    let vault_host = format!("vault.{DOMAIN}");
    assert!(!tls_reaches_from(ip("127.0.0.2"), tls, &vault_host).await);
    assert_eq!(vault_seen.load(Ordering::SeqCst), 0);
    assert!(tls_reaches_from(ip("127.0.0.1"), tls, &vault_host).await);
    assert_eq!(admin_counter(admin, "visitors_denied").await, 4);

    // A reload lets .2 in to the echo service, for the next visitor.
    std::fs::write(&path, rules("\"127.0.0.1\", \"127.0.0.2\"")).unwrap();
    relay.proc.signal("-HUP");
    relay.proc.wait_stderr("settings reloaded: changed=service");
    assert!(
        echoed_from(ip("127.0.0.2"), echo_agent.public).await,
        "allowed after the reload"
    );
    assert!(!echoed_from(ip("127.0.0.3"), echo_agent.public).await);
}

async fn basic_auth_guards_every_request(backend: Backend) {
    let toml = format!(
        "[[service]]\nname = \"staff\"\n[service.access.basic_auth]\nrealm = \"Staff only\"\nusers = {{ alice = \"{}\" }}\n",
        hash_password("open sesame")
    );
    let (_dir, path) = config_file(&toml);
    let relay = Relay::spawn(
        backend,
        &[
            "--config",
            &path,
            "--admin",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--domain",
            DOMAIN,
        ],
    );
    let admin = relay.admin.unwrap();
    let (web, seen) = counting_http().await;
    let mut args = relay.agent_args(web, "staff");
    args.extend(["--http-host".into(), "staff".into()]);
    let _agent = Agent::spawn(args);
    let http = relay.http.unwrap();
    let host = format!("staff.{DOMAIN}");
    let good = basic("alice", "open sesame");

    // No password, a wrong one, an unknown user: 401 with the challenge; the origin sees none.
    for auth in [
        None,
        Some(basic("alice", "open sesame!")),
        Some(basic("mallory", "open sesame")),
    ] {
        let mut s = connect_from(ip("127.0.0.1"), http).await;
        let (status, head) = request(&mut s, &host, auth.as_deref())
            .await
            .expect("a 401 page");
        assert_eq!(status, 401, "{head}");
        assert!(
            head.contains("WWW-Authenticate: Basic realm=\"Staff only\""),
            "{head}"
        );
    }
    assert_eq!(seen.load(Ordering::SeqCst), 0);

    // The right password: served, and the connection's later requests with it too.
    let mut s = connect_from(ip("127.0.0.1"), http).await;
    for _ in 0..3 {
        assert_eq!(
            request(&mut s, &host, Some(&good)).await.map(|r| r.0),
            Some(200)
        );
    }
    assert_eq!(seen.load(Ordering::SeqCst), 3);
    // A later request without it ends the connection before reaching the origin.
    assert_eq!(
        request(&mut s, &host, None).await,
        None,
        "the connection is ended"
    );
    assert_eq!(seen.load(Ordering::SeqCst), 3);

    // An address that keeps guessing is throttled (429, not checked); others still get in.
    let mut throttled = false;
    for i in 0..40 {
        let mut g = connect_from(ip("127.0.0.2"), http).await;
        let wrong = basic("alice", &format!("guess {i}"));
        let (status, _) = request(&mut g, &host, Some(&wrong))
            .await
            .expect("an answer");
        if status == 429 {
            throttled = true;
            break;
        }
        assert_eq!(status, 401);
    }
    assert!(throttled, "guessing from one address is throttled");
    let mut g = connect_from(ip("127.0.0.2"), http).await;
    let (status, _) = request(&mut g, &host, Some(&good)).await.unwrap();
    assert_eq!(
        status, 200,
        "a password that passed before is not throttled"
    );
    let mut other = connect_from(ip("127.0.0.3"), http).await;
    assert_eq!(
        request(&mut other, &host, Some(&good)).await.map(|r| r.0),
        Some(200)
    );
    assert!(admin_counter(admin, "http_unauthorized").await >= 4);
}

/// A flood of wrong passwords from many addresses at once: every guess is answered (401, or
/// 503 once the checking thread's queue is full, or 429 for an address throttled) and never
/// let through, while credentials that passed before and another service are still served.
async fn a_password_flood_is_answered_and_bounded(backend: Backend) {
    let toml = format!(
        "[[service]]\nname = \"staff\"\n[service.access.basic_auth]\nusers = {{ alice = \"{}\" }}\n",
        hash_password("open sesame")
    );
    let (_dir, path) = config_file(&toml);
    let relay = Relay::spawn(
        backend,
        &[
            "--config",
            &path,
            "--admin",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--domain",
            DOMAIN,
        ],
    );
    let admin = relay.admin.unwrap();
    let (staff_origin, staff_seen) = counting_http().await;
    let (open_origin, _) = counting_http().await;
    let mut staff = relay.agent_args(staff_origin, "staff");
    staff.extend(["--http-host".into(), "staff".into()]);
    let _staff = Agent::spawn(staff);
    let mut open = relay.agent_args(open_origin, "open");
    open.extend(["--http-host".into(), "open".into()]);
    let _open = Agent::spawn(open);
    let http = relay.http.unwrap();
    let (staff_host, open_host) = (format!("staff.{DOMAIN}"), format!("open.{DOMAIN}"));
    let good = basic("alice", "open sesame");
    let mut s = connect_from(ip("127.0.0.1"), http).await;
    assert_eq!(
        request(&mut s, &staff_host, Some(&good)).await.map(|r| r.0),
        Some(200)
    );
    let served_before = staff_seen.load(Ordering::SeqCst);

    // 300 guesses at once, 3 from each of 100 addresses.
    let mut guesses = tokio::task::JoinSet::new();
    for i in 0..300u32 {
        let host = staff_host.clone();
        guesses.spawn(async move {
            let from = IpAddr::from([127, 0, 1, (i % 100) as u8 + 1]);
            let mut g = connect_from(from, http).await;
            let wrong = basic("alice", &format!("guess {i}"));
            request(&mut g, &host, Some(&wrong)).await.map(|r| r.0)
        });
    }
    // Meanwhile: the other service, and the password that passed before.
    let mut o = connect_from(ip("127.0.0.1"), http).await;
    assert_eq!(
        request(&mut o, &open_host, None).await.map(|r| r.0),
        Some(200)
    );
    let mut again = connect_from(ip("127.0.0.1"), http).await;
    assert_eq!(
        request(&mut again, &staff_host, Some(&good))
            .await
            .map(|r| r.0),
        Some(200)
    );

    let mut answers = std::collections::BTreeMap::new();
    while let Some(done) = guesses.join_next().await {
        let status = done.unwrap().expect("every guess is answered");
        *answers.entry(status).or_insert(0) += 1;
    }
    eprintln!("answers to 300 guesses, by status: {answers:?}");
    assert!(
        answers.keys().all(|s| [401, 429, 503].contains(s)),
        "{answers:?}"
    );
    assert_eq!(
        staff_seen.load(Ordering::SeqCst),
        served_before + 1,
        "no guess reached the app"
    );
    assert_eq!(admin_counter(admin, "http_unauthorized").await, 300);
}

/// Basic auth in the relay's config for a service an agent publishes as tcp: refused at
/// registration with a message naming the fix, never published unguarded.
async fn basic_auth_is_refused_for_a_tcp_service(backend: Backend) {
    let toml = format!(
        "[[service]]\nname = \"db\"\n[service.access.basic_auth]\nusers = {{ alice = \"{}\" }}\n",
        hash_password("pw")
    );
    let (_dir, path) = config_file(&toml);
    let relay = Relay::spawn(backend, &["--config", &path]);
    let (echo, _) = counting_echo().await;
    let agent = Proc::spawn(&relay.agent_args(echo, "db"));
    agent.wait_stderr("only http services can ask for");
}

both_backends!(
    address_lists_refuse_before_the_agent_and_reload,
    a_password_flood_is_answered_and_bounded,
    basic_auth_guards_every_request,
    basic_auth_is_refused_for_a_tcp_service,
);
