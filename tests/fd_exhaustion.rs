//! Out of file descriptors: a relay at its descriptor limit under a flood of visitors logs a
//! summary rather than a line per failed accept, resets the visitors it cannot take instead
//! of leaving them in the backlog, and serves again once the flood is gone.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The relay's descriptor limit: room to start and serve a few, far less than the flood.
const NOFILE: u64 = 256;
/// Visitors opened at once.
const FLOOD: usize = 400;

async fn a_relay_out_of_descriptors_sheds_summarises_and_recovers(backend: Backend) {
    let relay = Relay::spawn_limited(backend, &[], &[], Some(NOFILE));
    let agent = Agent::spawn(relay.agent_args(echo_origin().await, "web"));
    assert_echo(agent.public).await;

    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        match TcpStream::connect(agent.public).await {
            Ok(s) => flood.push(s),
            Err(_) => break, // the backlog is full: refused, which is an answer too
        }
    }
    relay.proc.wait_stderr("Too many open files");
    // Every visitor gets an answer: served, closed or reset, none left waiting for ever.
    let mut served = 0;
    for mut v in flood {
        let outcome = tokio::time::timeout(WAIT, async {
            v.write_all(b"x").await?;
            let mut b = [0u8; 1];
            v.read(&mut b).await
        })
        .await
        .expect("a visitor of the flood got no answer");
        if matches!(outcome, Ok(1)) {
            served += 1;
        }
    }
    assert!(served < FLOOD, "the limit was reached");
    let stderr = relay.proc.stderr();
    let lines = stderr
        .lines()
        .filter(|l| l.contains("Too many open files"))
        .count();
    eprintln!("{backend:?}: {served} of {FLOOD} served, {lines} log lines about it");
    // One summary line per accept loop per 10 s, not one per failure.
    assert!(lines <= 12, "{lines} lines:\n{stderr}");

    // The flood is gone: visitors are served again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let deadline = std::time::Instant::now() + WAIT;
    while roundtrip(agent.public, b"again").await.ok().as_deref() != Some(b"again") {
        assert!(
            std::time::Instant::now() < deadline,
            "never recovered:\n{}",
            relay.proc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

both_backends!(a_relay_out_of_descriptors_sheds_summarises_and_recovers);
