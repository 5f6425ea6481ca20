//! End-to-end: the shared HTTP port (Host and path routing, error pages, forwarded headers,
//! WebSocket), the shared TLS port (SNI passthrough to origins with their own certificates),
//! PROXY headers, and per-service limits — on both backends, all on loopback.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ringtunnel::protocol::proxy;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DOMAIN: &str = "example.test";

/// Relay flags for a shared HTTP and TLS port plus a config file (kept alive by the caller).
fn shared_relay(backend: Backend, toml: &str) -> (Relay, TempDir) {
    let (dir, path) = config_file(toml);
    let relay = Relay::spawn(
        backend,
        &[
            "--http",
            "127.0.0.1:0",
            "--tls",
            "127.0.0.1:0",
            "--domain",
            DOMAIN,
            "--config",
            &path,
            "--admin",
            "127.0.0.1:0",
        ],
    );
    (relay, dir)
}

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

// ------------------------------------------------------------------ origins and visitors

/// An HTTP/1.1 origin that answers every request on a connection (keep-alive) with
/// `NAME PATH xff=… proto=… fwd=…`, so a test sees who answered and what it was told.
async fn http_origin(name: &'static str) -> SocketAddr {
    origin(move |mut s| async move {
        let mut buf = Vec::new();
        while let Some(head) = next_head(&mut s, &mut buf).await {
            let path = head.split(' ').nth(1).unwrap_or("?").to_string();
            let header = |n: &str| {
                head.lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case(n).then(|| v.trim().to_string())
                    })
                    .unwrap_or_else(|| "-".into())
            };
            let body = format!(
                "{name} {path} xff={} proto={} fwd={}",
                header("x-forwarded-for"),
                header("x-forwarded-proto"),
                header("forwarded")
            );
            let close = header("connection").eq_ignore_ascii_case("close");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).await.is_err() || close {
                let _ = s.shutdown().await;
                return;
            }
        }
    })
    .await
}

/// Sends raw request bytes, half-closes never, reads until the server closes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("server closed within the wait")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET path` with `Host: host` and `Connection: close`: (status, body).
async fn get(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let resp = exchange(addr, req.as_bytes()).await;
    parse_response(&resp)
}

fn parse_response(resp: &str) -> (u16, String) {
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

// --------------------------------------------------------- TLS data connections

/// Request heads are rewritten on the way up when the data connection is TLS as well (on the
/// uring workers, whose records are then sealed in place): both requests of a kept-alive
/// visitor reach the origin, each told the visitor's address.
async fn request_heads_are_rewritten_over_tls_data_connections(backend: Backend) {
    let (_dir, path) = config_file("agent_wait_secs = 2\n");
    let relay = Relay::spawn(
        backend,
        &[
            "--http",
            "127.0.0.1:0",
            "--domain",
            DOMAIN,
            "--config",
            &path,
            "--data-tls",
            "on",
        ],
    );
    let blog = http_origin("blog").await;
    let _a = Agent::spawn(with(
        relay.agent_args(blog, "blog"),
        &["--http-host", "blog"],
    ));
    let two = b"GET /1 HTTP/1.1\r\nHost: blog.example.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: blog.example.test\r\nConnection: close\r\n\r\n";
    let resp = exchange(relay.http.unwrap(), two).await;
    for path in ["/1", "/2"] {
        let told = format!("blog {path} xff=127.0.0.1 proto=http");
        assert!(resp.contains(&told), "{told} in {resp}");
    }
}

// ------------------------------------------------------------------------- dead origins

/// An agent whose local service is down: an HTTP visitor gets a 502 that says so (not an
/// empty reply), a tcp visitor a reset, and the relay counts both.
async fn a_dead_origin_is_a_502_for_http_and_a_reset_for_tcp(backend: Backend) {
    let (relay, _cfg) = shared_relay(backend, "");
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let _web = Agent::spawn(with(
        relay.agent_args(dead, "deadweb"),
        &["--http-host", "deadweb"],
    ));
    let (status, body) = get(relay.http.unwrap(), &format!("deadweb.{DOMAIN}"), "/").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("unreachable"), "{body}");

    let tcp = Agent::spawn(relay.agent_args(dead, "deadtcp"));
    let mut s = TcpStream::connect(tcp.public).await.unwrap();
    // The reset may come before the write: a socket reports it once, to whichever call meets
    // it first (a read after that sees only the end).
    match s.write_all(b"hello").await {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(()) => {
            let mut sink = Vec::new();
            let end = tokio::time::timeout(WAIT, s.read_to_end(&mut sink))
                .await
                .expect("the tcp visitor's connection ended");
            assert_eq!(end.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
        }
    }
    wait_metric(
        relay.admin.unwrap(),
        "ringtunnel_origin_unreachable_total",
        2,
    )
    .await;
}

// ------------------------------------------------------------------------- HTTP routing

async fn hosts_and_paths_route_to_the_right_agent(backend: Backend) {
    let (relay, _cfg) = shared_relay(backend, "agent_wait_secs = 2\n");
    let http = relay.http.unwrap();
    let (blog, shop, api) = (
        http_origin("blog").await,
        http_origin("shop").await,
        http_origin("api").await,
    );
    let _a = Agent::spawn(with(
        relay.agent_args(blog, "blog"),
        &["--http-host", "blog", "--http-host", "www.blog.test"],
    ));
    let shop_args = with(relay.agent_args(shop, "shop"), &["--http-host", "shop"]);
    let mut b = Agent::spawn(shop_args.clone());
    let c = Agent::spawn(with(
        relay.agent_args(api, "shop-api"),
        &["--http-host", "shop", "--path", "/api/"],
    ));
    // The online line shows the prefix as the relay claims it.
    let public = field(&c.online, "public");
    assert!(
        public.starts_with("http://shop.example.test:") && public.ends_with("/api"),
        "{}",
        c.online
    );

    let (st, body) = get(http, "blog.example.test", "/post/1").await;
    assert_eq!(
        (st, body.split(' ').take(2).collect::<Vec<_>>()),
        (200, vec!["blog", "/post/1"])
    );
    let (st, body) = get(http, "WWW.Blog.Test:80", "/").await;
    assert_eq!(st, 200);
    assert!(body.starts_with("blog / "), "{body}");
    let (_, body) = get(http, "shop.example.test", "/cart").await;
    assert!(body.starts_with("shop /cart "), "{body}");
    let (_, body) = get(http, "shop.example.test", "/api/items?x=1").await;
    assert!(
        body.starts_with("api /api/items?x=1 "),
        "longest prefix wins: {body}"
    );
    let (_, body) = get(http, "shop.example.test", "/apix").await;
    assert!(
        body.starts_with("shop /apix "),
        "prefixes end at a segment: {body}"
    );
    // The origin learns the visitor's address.
    assert!(
        body.contains(
            "xff=127.0.0.1 proto=http fwd=for=127.0.0.1;host=shop.example.test;proto=http"
        ),
        "{body}"
    );

    let (st, body) = get(http, "nobody.example.test", "/").await;
    assert_eq!(st, 404, "{body}");
    assert!(body.contains("nobody.example.test"), "{body}");

    // Keep-alive: a second request on the same connection reaches the same origin untouched.
    let two = b"GET /1 HTTP/1.1\r\nHost: blog.example.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: blog.example.test\r\nConnection: close\r\n\r\n";
    let resp = exchange(http, two).await;
    assert_eq!(resp.matches("HTTP/1.1 200 OK").count(), 2, "{resp}");
    assert!(
        resp.contains("blog /2 xff=127.0.0.1 "),
        "every head is rewritten: {resp}"
    );

    // A host held by one agent cannot be claimed by another service.
    let mut thief = Proc::spawn(&with(
        relay.agent_args(shop, "thief"),
        &["--http-host", "blog"],
    ));
    assert!(!thief.wait_exit().success());
    assert!(
        thief.stderr().contains("already claimed by service blog"),
        "{}",
        thief.stderr()
    );

    // The shop agent goes away: its visitors get 502 after the bounded wait, and the route
    // works again once the agent is back.
    b.proc.kill();
    // The relay must have ended the agent's session (dropping its pooled connections)
    // before the visit, or the visitor could meet a dead pooled connection.
    relay
        .proc
        .wait_stderr("agent session ended: agent connection");
    let (st, body) = get(http, "shop.example.test", "/cart").await;
    assert_eq!(st, 502, "{body}");
    let (_, body) = get(http, "shop.example.test", "/api/still-up").await;
    assert!(
        body.starts_with("api "),
        "the other agent's prefix is unaffected: {body}"
    );
    b = Agent::spawn(shop_args);
    let (st, body) = get(http, "shop.example.test", "/cart").await;
    assert_eq!((st, body.starts_with("shop /cart")), (200, true), "{body}");
    drop(b);
}

async fn bad_heads_get_clear_errors_and_others_are_not_disturbed(backend: Backend) {
    let (relay, _cfg) = shared_relay(backend, "head_timeout_secs = 2\n");
    let http = relay.http.unwrap();
    let origin = http_origin("app").await;
    let _a = Agent::spawn(with(
        relay.agent_args(origin, "app"),
        &["--http-host", "app"],
    ));

    // A visitor sending its head one byte per second is cut off at the head timeout.
    let slow = tokio::spawn(async move {
        let mut s = TcpStream::connect(http).await.unwrap();
        let head = b"GET / HTTP/1.1\r\nHost: app.example.test\r\nX-Slow: yes\r\n\r\n";
        // Bounded by the head's length: at most one byte per second for ~55 s.
        for b in head.iter() {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut probe = [0u8; 512];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await
            {
                return String::from_utf8_lossy(&probe[..n]).into_owned();
            }
        }
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest).await;
        rest
    });

    // Meanwhile a 64 KiB head gets 431, garbage gets 400, and a normal request works.
    let mut big = String::from("GET / HTTP/1.1\r\nHost: app.example.test\r\n");
    while big.len() < 64 * 1024 {
        big.push_str("X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    big.push_str("\r\n");
    let (st, _) = parse_response(&exchange(http, big.as_bytes()).await);
    assert_eq!(st, 431);
    let (st, body) = parse_response(&exchange(http, b"\x16\x03\x01garbage\r\n\r\n").await);
    assert_eq!(st, 400, "{body}");
    let (st, _) =
        parse_response(&exchange(http, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await);
    assert_eq!(st, 400);
    let (st, body) = get(http, "app.example.test", "/fine").await;
    assert_eq!((st, body.starts_with("app /fine")), (200, true));

    let slow = tokio::time::timeout(WAIT, slow).await.unwrap().unwrap();
    assert!(slow.starts_with("HTTP/1.1 408 "), "slow visitor: {slow:?}");

    // A head arriving in several reads still gets the forwarded headers.
    let mut s = TcpStream::connect(http).await.unwrap();
    for part in [
        "GET /split HT",
        "TP/1.1\r\nHo",
        "st: app.example.test\r\nConnection: close\r",
        "\n\r\n",
    ] {
        s.write_all(part.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.contains("app /split xff=127.0.0.1 "), "{out}");
}

async fn wildcard_hosts_cover_one_label_and_exact_claims_win(backend: Backend) {
    let (relay, _cfg) = shared_relay(backend, "");
    let http = relay.http.unwrap();
    let (apps, special) = (http_origin("apps").await, http_origin("special").await);
    let _a = Agent::spawn(with(
        relay.agent_args(apps, "apps"),
        &["--http-host", "*.apps"],
    ));
    let _s = Agent::spawn(with(
        relay.agent_args(special, "special"),
        &["--http-host", "special.apps.example.test"],
    ));
    for host in ["x.apps.example.test", "tenant-42.apps.example.test"] {
        let (st, body) = get(http, host, "/").await;
        assert_eq!(
            (st, body.starts_with("apps /")),
            (200, true),
            "{host}: {body}"
        );
    }
    let (_, body) = get(http, "special.apps.example.test", "/").await;
    assert!(body.starts_with("special /"), "an exact claim wins: {body}");
    for host in [
        "apps.example.test",
        "a.b.apps.example.test",
        "*.apps.example.test",
    ] {
        let (st, _) = get(http, host, "/").await;
        assert!(st == 404 || st == 400, "{host} → {st}");
    }
}

async fn agent_blip_is_invisible_to_visitors(backend: Backend) {
    let (relay, _cfg) = shared_relay(backend, "agent_wait_secs = 20\n");
    let http = relay.http.unwrap();
    let origin = http_origin("app").await;
    let args = with(relay.agent_args(origin, "app"), &["--http-host", "app"]);
    let mut agent = Agent::spawn(args.clone());
    assert_eq!(get(http, "app.example.test", "/").await.0, 200);
    agent.proc.kill();
    relay
        .proc
        .wait_stderr("agent session ended: agent connection");
    // A visitor arriving while the agent is away waits for it instead of failing.
    let during = tokio::spawn(async move { get(http, "app.example.test", "/during").await });
    // It has been routed and admitted (now waiting for a data connection) before the agent
    // comes back.
    let visitors = "ringtunnel_service_visitors{service=\"app\",kind=\"http\"}";
    wait_metric(relay.admin.unwrap(), visitors, 1).await;
    let _back = Agent::spawn(args);
    let (st, body) = tokio::time::timeout(WAIT, during).await.unwrap().unwrap();
    assert_eq!((st, body.starts_with("app /during")), (200, true), "{body}");
}

/// An origin that honours `Expect: 100-continue`, reads a chunked body, and answers with the
/// body's length and SHA-256 prefix.
async fn chunked_origin() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        // The agent's start-up check connects and closes without a byte: skip such
        // connections, serve the first real one.
        let (mut s, buf) = loop {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut probe = false;
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut chunk).await.unwrap();
                if n == 0 && buf.is_empty() {
                    probe = true;
                    break;
                }
                assert!(n > 0);
                buf.extend_from_slice(&chunk[..n]);
            }
            if !probe {
                break (s, buf);
            }
        };
        let mut chunk = [0u8; 4096];
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        if head.contains("expect: 100-continue") {
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
        }
        let mut raw = buf[end..].to_vec();
        while !raw.ends_with(b"0\r\n\r\n") {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            raw.extend_from_slice(&chunk[..n]);
        }
        // Decode the chunked body.
        let mut body = Vec::new();
        let mut rest = &raw[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        let digest = sha256(&body);
        let answer = format!("{} {:02x}{:02x}", body.len(), digest[0], digest[1]);
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
            answer.len()
        );
        s.write_all(resp.as_bytes()).await.unwrap();
        let _ = s.shutdown().await;
    });
    addr
}

async fn expect_continue_and_chunked_bodies_pass_through(backend: Backend) {
    let (relay, _cfg) = shared_relay(backend, "");
    let origin = chunked_origin().await;
    let _a = Agent::spawn(with(
        relay.agent_args(origin, "upload"),
        &["--http-host", "upload"],
    ));
    let mut s = TcpStream::connect(relay.http.unwrap()).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: upload.example.test\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(WAIT, s.read_exact(&mut interim))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    let body = pseudo_random(7, 300_000);
    for part in body.chunks(70_000) {
        s.write_all(format!("{:x}\r\n", part.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(part).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let digest = sha256(&body);
    assert!(
        out.ends_with(&format!("300000 {:02x}{:02x}", digest[0], digest[1])),
        "{out}"
    );
}

/// Minimal WebSocket origin: completes the handshake, then echoes each client frame back as
/// an unmasked frame with the same opcode.
async fn websocket_origin() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        // The agent's start-up check connects and closes without a byte: skip such
        // connections, serve the first real one.
        let (mut s, head) = 'accept: loop {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if s.read(&mut b).await.unwrap_or(0) == 0 {
                    continue 'accept;
                }
                head.push(b[0]);
            }
            break (s, head);
        };
        let head = String::from_utf8_lossy(&head).into_owned();
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap()
            .trim()
            .to_string();
        let accept = ws_accept(&key);
        let resp = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
        s.write_all(resp.as_bytes()).await.unwrap();
        loop {
            let mut h = [0u8; 2];
            if s.read_exact(&mut h).await.is_err() {
                return;
            }
            let len = usize::from(h[1] & 0x7f);
            assert!(len < 126, "test frames are short");
            let mut mask = [0u8; 4];
            s.read_exact(&mut mask).await.unwrap();
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.unwrap();
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
            let mut frame = vec![h[0], len as u8];
            frame.extend_from_slice(&payload);
            s.write_all(&frame).await.unwrap();
            if h[0] & 0x0f == 0x8 {
                return; // close frame echoed
            }
        }
    });
    addr
}

fn ws_accept(key: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    );
    base64(digest.as_ref())
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn websocket_echo_through_http_service(backend: Backend) {
    let (relay, _cfg) = shared_relay(backend, "");
    let origin = websocket_origin().await;
    let _a = Agent::spawn(with(relay.agent_args(origin, "ws"), &["--http-host", "ws"]));
    let mut s = TcpStream::connect(relay.http.unwrap()).await.unwrap();
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let req = format!("GET /chat HTTP/1.1\r\nHost: ws.example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains(&format!("Sec-WebSocket-Accept: {}", ws_accept(key))));
    for msg in ["hello", "through the relay", "bye"] {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![0x81, 0x80 | msg.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(msg.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        s.write_all(&frame).await.unwrap();
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(h, [0x81, msg.len() as u8]);
        let mut payload = vec![0u8; msg.len()];
        s.read_exact(&mut payload).await.unwrap();
        assert_eq!(payload, msg.as_bytes());
    }
}

// ------------------------------------------------------------------------- TLS passthrough

/// A TLS origin with its own self-signed certificate for `name`; answers `hello from TAG`.
async fn tls_origin(name: &str, tag: &'static str) -> (SocketAddr, CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der());
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], key.into())
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let addr = origin(move |tcp| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut line = [0u8; 5];
            if tls.read_exact(&mut line).await.is_ok() {
                let _ = tls.write_all(format!("hello from {tag}").as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        }
    })
    .await;
    (addr, cert)
}

/// Connects through the TLS port with SNI `name`, trusting only `cert`.
async fn tls_visit(
    port: SocketAddr,
    name: &str,
    cert: &CertificateDer<'static>,
) -> std::io::Result<String> {
    let connector = tls_client(cert);
    let tcp = TcpStream::connect(port).await?;
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    let mut tls = tokio::time::timeout(WAIT, connector.connect(server_name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))??;
    tls.write_all(b"hello").await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

async fn tls_passthrough_by_sni_keeps_end_to_end_encryption(backend: Backend) {
    let (relay, _cfg) = shared_relay(backend, "");
    let port = relay.tls.unwrap();
    let (a_addr, a_cert) = tls_origin("a.tls.test", "A").await;
    let (b_addr, b_cert) = tls_origin("b.example.test", "B").await;
    let _a = Agent::spawn(with(
        relay.agent_args(a_addr, "tls-a"),
        &["--tls-host", "a.tls.test"],
    ));
    let _b = Agent::spawn(with(
        relay.agent_args(b_addr, "tls-b"),
        &["--tls-host", "b"],
    ));
    // Each visitor verifies its origin's own certificate: the relay did not terminate TLS.
    assert_eq!(
        tls_visit(port, "a.tls.test", &a_cert).await.unwrap(),
        "hello from A"
    );
    assert_eq!(
        tls_visit(port, "b.example.test", &b_cert).await.unwrap(),
        "hello from B"
    );
    // The wrong certificate for a name fails verification at the visitor.
    assert!(tls_visit(port, "a.tls.test", &b_cert).await.is_err());
    // An unknown name is refused cleanly; the port keeps serving.
    assert!(tls_visit(port, "c.tls.test", &a_cert).await.is_err());
    // A wildcard claim serves every name one label below, each verified against the origin's
    // own wildcard certificate.
    let (w_addr, w_cert) = tls_origin("*.w.example.test", "W").await;
    let _w = Agent::spawn(with(
        relay.agent_args(w_addr, "tls-w"),
        &["--tls-host", "*.w"],
    ));
    for name in ["t1.w.example.test", "t2.w.example.test"] {
        assert_eq!(
            tls_visit(port, name, &w_cert).await.unwrap(),
            "hello from W"
        );
    }
    let resp = exchange(port, b"GET / HTTP/1.1\r\nHost: a.tls.test\r\n\r\n").await;
    assert!(
        resp.is_empty(),
        "plain HTTP on the TLS port is closed: {resp:?}"
    );
    assert_eq!(
        tls_visit(port, "a.tls.test", &a_cert).await.unwrap(),
        "hello from A"
    );
}

// ------------------------------------------------------------------------- PROXY protocol

/// An origin that reads a PROXY header and answers with the source address it names, then
/// echoes whatever follows.
async fn proxy_origin() -> SocketAddr {
    origin(move |mut s| async move {
        let mut buf = Vec::new();
        let header = loop {
            let mut chunk = [0u8; 512];
            let n = s.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            match proxy::parse(&buf) {
                Ok(Some(h)) => break h,
                Ok(None) => continue,
                Err(e) => {
                    let _ = s.write_all(format!("error {e}\n").as_bytes()).await;
                    return;
                }
            }
        };
        let (src, _dst) = header.addrs.unwrap();
        let v = if buf.starts_with(b"PROXY") { 1 } else { 2 };
        let _ = s.write_all(format!("v{v} {src}\n").as_bytes()).await;
        let _ = s.write_all(&buf[header.len..]).await;
        let (mut r, mut w) = s.into_split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

async fn proxy_protocol_tells_the_origin_who_connected(backend: Backend) {
    let (relay, _cfg) = shared_relay(backend, "");
    let origin = proxy_origin().await;
    for v in ["v1", "v2"] {
        let agent = Agent::spawn(with(
            relay.agent_args(origin, &format!("proxied-{v}")),
            &["--proxy-protocol", v],
        ));
        let mut s = TcpStream::connect(agent.public).await.unwrap();
        let me = s.local_addr().unwrap();
        s.write_all(b"payload").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(WAIT, s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out, format!("{v} {me}\npayload"));
    }
    // tls service with PROXY v2: the header comes first, the ClientHello right after it.
    let _t = Agent::spawn(with(
        relay.agent_args(origin, "proxied-tls"),
        &["--tls-host", "p.tls.test", "--proxy-protocol", "v2"],
    ));
    let mut s = TcpStream::connect(relay.tls.unwrap()).await.unwrap();
    let me = s.local_addr().unwrap();
    let hello = client_hello("p.tls.test");
    s.write_all(&hello).await.unwrap();
    let mut line = Vec::new();
    while !line.ends_with(b"\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(WAIT, s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        line.push(b[0]);
    }
    assert_eq!(String::from_utf8(line).unwrap(), format!("v2 {me}\n"));
    let mut echoed = vec![0u8; hello.len()];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(
        echoed, hello,
        "the ClientHello follows the header untouched"
    );
}

// ------------------------------------------------------------------------- limits

const LIMITS: &str = r#"
[[service]]
name = "capped"
[service.limits]
max_visitors = 2

[[service]]
name = "rated"
[service.limits]
conn_rate_per_ip = 5

[[service]]
name = "sleepy"
[service.limits]
idle_timeout_secs = 1

[[service]]
name = "solo"
secret = "solo-secret"
[service.limits]
max_agents = 1
"#;

/// Whether a visitor through `public` gets its bytes echoed (admitted) or is closed at once.
async fn admitted(public: SocketAddr) -> bool {
    matches!(roundtrip(public, b"hi").await, Ok(v) if v == b"hi")
}

async fn limits_hold_and_are_released(backend: Backend) {
    let (relay, _cfg) = shared_relay(backend, LIMITS);
    let origin = echo_origin().await;

    // At most two visitors at once; a third is refused until one leaves.
    let capped = Agent::spawn(relay.agent_args(origin, "capped"));
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(capped.public).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    assert!(!admitted(capped.public).await, "third visitor refused");
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    while !admitted(capped.public).await {
        assert!(Instant::now() < deadline, "a place was never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // At most five new connections per second from one address (HTTP: 503).
    let origin_http = http_origin("rated").await;
    let _rated = Agent::spawn(with(
        relay.agent_args(origin_http, "rated"),
        &["--http-host", "rated"],
    ));
    let http = relay.http.unwrap();
    let started = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(get(http, "rated.example.test", "/").await.0);
    }
    let elapsed = started.elapsed().as_secs();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    // 20 requests spread over `elapsed` seconds touch at most elapsed + 1 one-second windows.
    assert!(
        ok as u64 <= 5 * (elapsed + 1),
        "{ok} admitted in {elapsed} s: {statuses:?}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        get(http, "rated.example.test", "/").await.0,
        200,
        "released after a second"
    );

    // A visitor silent past the idle timeout is cut: a reset, not a clean end.
    let sleepy = Agent::spawn(relay.agent_args(origin, "sleepy"));
    let mut s = TcpStream::connect(sleepy.public).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("idle visitor closed by the relay");
    assert_eq!(
        closed.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset
    );
    relay.proc.wait_stderr("visitor closed: idle timeout");
    relay.proc.wait_stderr("timeout_secs=");

    // One agent per secret for "solo": a second waits (retrying) until the first leaves.
    let solo_args = |name: &str| {
        let mut a = relay.agent_args(origin, name);
        let i = a.iter().position(|x| x == "--secret").unwrap();
        a[i + 1] = "solo-secret".into();
        a
    };
    let mut first = Agent::spawn(solo_args("solo"));
    let mut second = Proc::spawn(&solo_args("solo"));
    relay.proc.wait_stderr("maximum of 1 agents");
    assert!(second.is_running(), "refused agent keeps retrying");
    first.proc.kill();
    second.wait_line("online ");
}

both_backends!(
    a_dead_origin_is_a_502_for_http_and_a_reset_for_tcp,
    request_heads_are_rewritten_over_tls_data_connections,
    hosts_and_paths_route_to_the_right_agent,
    bad_heads_get_clear_errors_and_others_are_not_disturbed,
    agent_blip_is_invisible_to_visitors,
    wildcard_hosts_cover_one_label_and_exact_claims_win,
    expect_continue_and_chunked_bodies_pass_through,
    websocket_echo_through_http_service,
    tls_passthrough_by_sni_keeps_end_to_end_encryption,
    proxy_protocol_tells_the_origin_who_connected,
    limits_hold_and_are_released,
);
