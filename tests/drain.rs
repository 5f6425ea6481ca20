//! Stopping a relay or an agent without dropping anyone: SIGTERM (or SIGINT) closes the
//! doors (an agent says goodbye to its relay) and lets the visitors in flight finish, up to
//! `--drain-timeout`; a second signal, or the timeout, ends it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes the slow origin sends: `PIECES` pieces of 512 bytes.
const PIECES: usize = 100;

/// An origin that answers each connection carrying data with `PIECES` pieces of 512 bytes,
/// one every `gap`, then closes. (The agent's start-up check carries none and is skipped.)
async fn slow_origin(gap: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                if !matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                    return;
                }
                for _ in 0..PIECES {
                    if s.write_all(&[b'd'; 512]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(gap).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Waits for `proc` to exit, which must be with 0 and after logging `line`.
fn exits_0_saying(proc: &mut Proc, line: &str) {
    assert!(proc.wait_exit().success(), "a drained process exits 0");
    assert!(proc.stderr().contains(line), "{}", proc.stderr());
}

/// A visitor that asked for the download and has its first bytes.
async fn downloading(public: SocketAddr) -> (TcpStream, usize) {
    let mut v = TcpStream::connect(public).await.unwrap();
    v.write_all(b"go").await.unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(WAIT, v.read(&mut buf))
        .await
        .expect("the download starts")
        .unwrap();
    assert!(n > 0);
    (v, n)
}

/// Reads the rest of a download begun with [`downloading`] (which gave `first` bytes): it
/// must end cleanly (a FIN, not a reset) with every byte; then the visitor leaves (its half
/// ends too: its visit is over).
async fn finishes_cleanly(mut v: TcpStream, first: usize) {
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, v.read_to_end(&mut rest))
        .await
        .expect("the download finished")
        .expect("a clean end, not a reset");
    assert_eq!(first + rest.len(), PIECES * 512);
}

async fn sigterm_lets_visitors_in_flight_finish(backend: Backend) {
    let origin = slow_origin(Duration::from_millis(20)).await;
    let mut relay = Relay::spawn(backend, &[]);
    let agent = Agent::spawn(relay.agent_args(origin, "slow"));
    let (v, first) = downloading(agent.public).await;
    // A SIGHUP neither stops nor drains it: it reloads the settings (none changed).
    relay.proc.signal("-HUP");
    relay
        .proc
        .wait_stderr("settings reloaded: changed=none needs_restart=none");
    assert!(relay.proc.is_running());
    relay.proc.signal("-TERM");
    relay.proc.wait_stderr("draining");
    // The doors are closed (before the line is logged)...
    let refused = TcpStream::connect(agent.public).await;
    assert!(refused.is_err(), "a new visitor is refused while draining");
    // The control port closes too (as soon as its loop sees the drain): nothing of it
    // stays listening with connections queueing unanswered.
    let deadline = std::time::Instant::now() + WAIT;
    while TcpStream::connect(relay.control).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the control port still accepts"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and the visitor in flight gets all of it, with a clean end, then leaves.
    finishes_cleanly(v, first).await;
    exits_0_saying(&mut relay.proc, "relay stopped: drained=1 cut=0");
}

async fn the_drain_timeout_ends_a_drain(backend: Backend) {
    // 100 pieces 200 ms apart: 20 s, far past a 1 s drain.
    let origin = slow_origin(Duration::from_millis(200)).await;
    let mut relay = Relay::spawn(backend, &["--drain-timeout", "1"]);
    let agent = Agent::spawn(relay.agent_args(origin, "slower"));
    let (mut v, _) = downloading(agent.public).await;
    relay.proc.signal("-INT");
    exits_0_saying(&mut relay.proc, "relay stopped: drained=0 cut=1");
    is_reset(&mut v).await;
}

/// A visitor the relay gave up on (the drain ran out, a second signal) reads what it was sent,
/// then a reset: never a clean end of a stream cut short.
async fn is_reset(v: &mut TcpStream) {
    match read_to_end_or_error(v).await {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(_) => panic!("a clean end of a stream the relay cut short"),
    }
}

async fn a_second_signal_ends_a_drain(backend: Backend) {
    let origin = slow_origin(Duration::from_millis(200)).await;
    let mut relay = Relay::spawn(backend, &[]);
    let agent = Agent::spawn(relay.agent_args(origin, "slowest"));
    let (mut v, _) = downloading(agent.public).await;
    relay.proc.signal("-TERM");
    relay.proc.wait_stderr("draining");
    relay.proc.signal("-TERM");
    exits_0_saying(&mut relay.proc, "cut=1");
    is_reset(&mut v).await;
}

async fn a_stopping_agent_says_goodbye_and_finishes_its_visitors(backend: Backend) {
    let origin = slow_origin(Duration::from_millis(20)).await;
    let relay = Relay::spawn(backend, &[]);
    let mut agent = Agent::spawn(relay.agent_args(origin, "leaving"));
    let (v, first) = downloading(agent.public).await;
    agent.proc.signal("-TERM");
    agent.proc.wait_stderr("stopping");
    relay.proc.wait_stderr("said goodbye");
    finishes_cleanly(v, first).await;
    exits_0_saying(&mut agent.proc, "agent stopped: drained=1 cut=0");
}

async fn a_draining_relay_sends_its_agents_to_a_successor(backend: Backend) {
    let origin = slow_origin(Duration::from_millis(20)).await;
    let mut old = Relay::spawn(backend, &[]);
    let mut agent = Agent::spawn(old.agent_args(origin, "moving"));
    let (v, first) = downloading(agent.public).await;
    old.proc.signal("-TERM");
    agent.proc.wait_stderr("the relay is going away");
    old.proc.wait_stderr("relay draining");
    // A new relay takes the control port and the state (its fingerprint) while the old one
    // still serves its visitor; the agent comes online there with the same public port.
    let new = old.successor();
    let online = agent.proc.wait_line("online ");
    assert_eq!(online, agent.online, "same service, same public address");
    let (v2, _) = downloading(agent.public).await;
    drop(v2);
    finishes_cleanly(v, first).await;
    exits_0_saying(&mut old.proc, "relay stopped: drained=1 cut=0");
    assert!(
        !agent.proc.stderr().contains("WARN"),
        "{}",
        agent.proc.stderr()
    );
    drop(new);
}

both_backends!(
    a_draining_relay_sends_its_agents_to_a_successor,
    a_stopping_agent_says_goodbye_and_finishes_its_visitors,
    sigterm_lets_visitors_in_flight_finish,
    the_drain_timeout_ends_a_drain,
    a_second_signal_ends_a_drain,
);
