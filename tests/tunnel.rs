//! End-to-end: a real relay and agent (the binary), origins and visitors on loopback.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn bulk_each_way(data_tls: &str) {
    let origin = echo_origin().await;
    let relay = Relay::spawn(&["--data-tls", data_tls]);
    let agent = Agent::spawn(relay.agent_args(origin, "bulk"));
    let payload = pseudo_random(0xb01c, 64 << 20);
    let got = roundtrip(agent.public, &payload).await.unwrap();
    assert_eq!(got.len(), payload.len());
    assert_eq!(sha256(&got), sha256(&payload), "64 MiB echoed intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64mib_each_way_tls() {
    bulk_each_way("on").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64mib_each_way_plain() {
    bulk_each_way("off").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_visitors() {
    let origin = echo_origin().await;
    let relay = Relay::spawn(&[]);
    let agent = Agent::spawn(relay.agent_args(origin, "many"));
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let public = agent.public;
        tasks.push(tokio::spawn(async move {
            let payload = pseudo_random(i + 1, 16 * 1024 + i as usize * 97);
            let got = roundtrip(public, &payload).await.unwrap();
            assert_eq!(sha256(&got), sha256(&payload), "visitor {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_visitor_gets_whole_reply() {
    let origin = answer_after_eof_origin(3 << 20).await;
    for tls in ["on", "off"] {
        let relay = Relay::spawn(&["--data-tls", tls]);
        let agent = Agent::spawn(relay.agent_args(origin, "halfclose"));
        let request = b"GET /everything HTTP/1.0\r\n\r\n".to_vec();
        let got = roundtrip(agent.public, &request).await.unwrap();
        assert_eq!(got, reply_for(&request, 3 << 20), "data-tls {tls}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_fatal_and_relay_keeps_serving() {
    let origin = echo_origin().await;
    let relay = Relay::spawn(&[]);
    let good = Agent::spawn(relay.agent_args(origin, "good"));

    let mut args = relay.agent_args(origin, "intruder");
    let i = args.iter().position(|a| a == "--secret").unwrap();
    args[i + 1] = "not the secret".into();
    let mut bad = Proc::spawn(&args);
    let status = bad.wait_exit();
    assert!(!status.success());
    let err = bad.stderr();
    assert!(err.contains("wrong secret"), "agent says why: {err}");
    assert_eq!(err.matches("error:").count(), 1, "one clear line: {err}");
    relay
        .proc
        .wait_stderr("authentication failed for service intruder");

    assert_echo(good.public).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprint_mismatch_is_refused() {
    let origin = echo_origin().await;
    let relay = Relay::spawn(&[]);
    let mut args = relay.agent_args(origin, "pinned");
    let i = args
        .iter()
        .position(|a| a == "--relay-fingerprint")
        .unwrap();
    args[i + 1] = "00".repeat(32);
    let mut agent = Proc::spawn(&args);
    assert!(!agent.wait_exit().success());
    assert!(
        agent.stderr().contains("fingerprint mismatch"),
        "{}",
        agent.stderr()
    );

    // No pin at all: the self-signed certificate is not trusted either.
    let mut args = relay.agent_args(origin, "unpinned");
    let i = args
        .iter()
        .position(|a| a == "--relay-fingerprint")
        .unwrap();
    args.drain(i..i + 2);
    let mut agent = Proc::spawn(&args);
    assert!(!agent.wait_exit().success());
    assert!(
        agent.stderr().contains("--relay-fingerprint"),
        "{}",
        agent.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_control_port_does_not_hurt() {
    let origin = echo_origin().await;
    let mut relay = Relay::spawn(&[]);
    let agent = Agent::spawn(relay.agent_args(origin, "sturdy"));
    let too_long = ((1u32 << 31).to_be_bytes()).to_vec();
    let truncated = vec![0, 0, 0, 40, 0x01, 0x00];
    let mut tls_then_junk = vec![0x16, 0x03, 0x01, 0x00, 0x05];
    tls_then_junk.extend_from_slice(&pseudo_random(7, 600));
    let cases = vec![
        pseudo_random(42, 4096),
        too_long,
        truncated,
        tls_then_junk,
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ];
    for junk in cases {
        let mut s = tokio::net::TcpStream::connect(relay.control).await.unwrap();
        let _ = s.write_all(&junk).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        // The relay must close on us (bounded by its handshake timeout), never hang or crash.
        let r = tokio::time::timeout(WAIT, s.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "relay closed the garbage connection");
        assert!(sink.len() < 1024, "no visitor data, at most an error frame");
    }
    assert!(relay.proc.is_running());
    assert_echo(agent.public).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_keeps_public_port() {
    let origin = echo_origin().await;
    let relay = Relay::spawn(&[]);
    let mut agent = Agent::spawn(relay.agent_args(origin, "phoenix"));
    let port = agent.public;
    assert_echo(port).await;
    agent.proc.kill();
    let agent = Agent::spawn(relay.agent_args(origin, "phoenix"));
    assert_eq!(agent.public, port, "same public port after restart");
    assert_echo(agent.public).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_restart_agent_reconnects_by_itself() {
    let origin = echo_origin().await;
    let relay = Relay::spawn(&[]);
    let mut agent = Agent::spawn(relay.agent_args(origin, "patient"));
    let public = agent.public;
    assert_echo(public).await;
    let relay = relay.restart();
    let line = agent.proc.wait_line("online ");
    assert_eq!(
        field(&line, "public"),
        public.to_string(),
        "same port after relay restart"
    );
    assert_echo(public).await;
    assert!(relay.proc.stderr().contains("service online"));
}
