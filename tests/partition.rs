//! A real link between relay and agent: cut and mended, lossy, and an agent killed across it.
//! The agent runs in a network namespace this test creates, behind a link emulator
//! (`tests/netbed`, `tools/rtwire`); the relay's control port and the agent's local service
//! listen on the test's end of it. A cut drops every frame both ways without a reset, as
//! across a pulled cable or a firewall that drops, and nothing tells either program.
//!
//! Needs root and `ip` (iproute2); skipped without them unless RINGTUNNEL_REQUIRE_NETNS is set
//! (`.ci/run` sets it). Every namespace and link is removed when its test ends.

mod common;
mod netbed;

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use netbed::{Link, Shape};

/// A relay whose control port is on the link, its public ports on loopback, and an agent in
/// the namespace publishing `local` (on the link too), with a pool of 2.
/// `extra` goes to both. The relay's state directory is returned to live as long as the relay.
fn tunnel(
    link: &Link,
    backend: Backend,
    local: SocketAddr,
    extra: &[&str],
) -> (Proc, TempDir, SocketAddr, Agent) {
    let state = TempDir::new("partition");
    let state_dir = state.0.display().to_string();
    let control = format!("{}:0", link.host);
    let mut relay_args: Vec<String> = [
        "relay",
        "--control",
        &control,
        "--bind-addr",
        "127.0.0.1",
        "--secret",
        SECRET,
        "--state-dir",
        &state_dir,
        "--backend",
        backend.flag(),
        "--admin",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    relay_args.extend(extra.iter().map(|a| a.to_string()));
    let mut relay = Proc::spawn(&relay_args);
    let ready = relay.wait_line("ready ");
    let admin: SocketAddr = field(&ready, "admin").parse().unwrap();
    let mut agent_args: Vec<String> = [
        "agent",
        "--relay",
        &field(&ready, "control"),
        "--relay-fingerprint",
        &field(&ready, "fingerprint"),
        "--secret",
        SECRET,
        "--local",
        &local.to_string(),
        "--name",
        "far",
        "--pool",
        "2",
        "--backend",
        backend.flag(),
    ]
    .map(String::from)
    .to_vec();
    agent_args.extend(extra.iter().map(|a| a.to_string()));
    let agent = Agent::from_proc(link.spawn(&agent_args));
    (relay, state, admin, agent)
}

/// Longest a visitor may go unanswered while the link is cut: twice the relay's wait for an
/// answer to `Start` (5 s each for two data connections), with room to spare. Without that
/// wait, a visitor handed a pooled connection across the cut waited for the connection's
/// `TCP_USER_TIMEOUT` (30 s) instead.
const UNANSWERED_AT_MOST: Duration = Duration::from_secs(20);

/// New visitors while the link is cut are told (reset) instead of being left on a pooled
/// connection that cannot reach the agent; once the link is back, visitors are served again.
async fn a_visitor_during_a_cut_is_told_and_served_after_it(backend: Backend) {
    let Some(link) = Link::new() else { return };
    let local = origin_at(IpAddr::V4(link.host), serve_echo).await;
    let (_relay, _state, admin, agent) = tunnel(&link, backend, local, &[]);
    assert_echo(agent.public).await;
    wait_metric(admin, &idle_series("far"), 1).await;
    // Parked long enough that the relay asks before it forwards (`ANSWER_IF_PARKED`).
    tokio::time::sleep(ringtunnel::protocol::chunk::ANSWER_IF_PARKED * 2).await;

    link.cut();
    let mut v = TcpStream::connect(agent.public).await.unwrap();
    v.write_all(b"anyone there?").await.unwrap();
    let mut buf = [0u8; 64];
    let told = tokio::time::timeout(UNANSWERED_AT_MOST, v.read(&mut buf)).await;
    match told {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("bytes from across a cut link: {:?}", &buf[..n]),
        Err(_) => panic!("a visitor during a cut waited {UNANSWERED_AT_MOST:?} unanswered"),
    }
    assert!(admin_counter(admin, "data_unanswered").await >= 1);

    link.mend();
    // The control session outlived the short cut; new data connections come as visitors
    // need them.
    served_again(agent.public).await;
}

/// Waits (at most [`WAIT`], each try bounded too) until an echo through `public` comes back.
async fn served_again(public: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    loop {
        if roundtrip(public, b"back").await.ok().as_deref() == Some(&b"back"[..]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not served after the link came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A visitor downloading from a bulk origin, hashing what it reads.
struct Download {
    v: TcpStream,
    hash: ring::digest::Context,
    total: usize,
}

impl Download {
    async fn start(public: SocketAddr) -> Download {
        let mut v = TcpStream::connect(public).await.unwrap();
        v.write_all(b"go").await.unwrap();
        let hash = ring::digest::Context::new(&ring::digest::SHA256);
        Download { v, hash, total: 0 }
    }

    /// Reads until `until` bytes in all, or the end (each read bounded; a reset panics).
    async fn read_to(&mut self, until: usize) {
        read_hashing(&mut self.v, &mut self.hash, &mut self.total, until).await;
    }

    /// Asserts that exactly `len` bytes hashing to `want` arrived.
    fn assert_whole(self, len: usize, want: &[u8]) {
        assert_eq!(self.total, len, "the download was cut short");
        assert_eq!(
            self.hash.finish().as_ref(),
            want,
            "bytes changed on the way"
        );
    }
}

/// A download in flight across a 3 s cut finishes intact: neither end gives up on a link
/// that only went quiet.
async fn a_download_in_flight_survives_a_short_cut(backend: Backend) {
    let Some(link) = Link::new() else { return };
    let data = Arc::new(pseudo_random(7, 24 << 20));
    let want = sha256(&data);
    let local = bulk_origin_at(IpAddr::V4(link.host), data.clone()).await;
    let (_relay, _state, _admin, agent) = tunnel(&link, backend, local, &[]);

    let mut d = Download::start(agent.public).await;
    d.read_to(1 << 20).await;
    link.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    link.mend();
    d.read_to(data.len()).await;
    d.assert_whole(data.len(), &want);
}

/// A cut longer than the heartbeat timeout ends the session on both sides, each saying why;
/// once the link is back the agent reconnects by itself and has its public port again.
async fn a_long_cut_ends_the_session_and_the_agent_comes_back(backend: Backend) {
    let Some(link) = Link::new() else { return };
    let local = origin_at(IpAddr::V4(link.host), serve_echo).await;
    // Short heartbeats keep the test short; the defaults (10 s, 30 s) behave the same, slower.
    let beat = ["--heartbeat", "1", "--heartbeat-timeout", "3"];
    let (relay, _state, _admin, mut agent) = tunnel(&link, backend, local, &beat);
    assert_echo(agent.public).await;

    link.cut();
    agent.proc.wait_stderr("relay silent for 3s");
    relay.wait_stderr("agent silent for 3s");
    link.mend();
    let line = agent.proc.wait_line("online ");
    assert_eq!(field(&line, "public"), field(&agent.online, "public"));
    served_again(agent.public).await;
}

/// Bulk both ways across a wire that drops 1 % of frames (and adds 2 ms each way) arrives
/// intact: the data connections' TCP recovers every loss, and nothing in the tunnel mistakes a
/// stall for an end.
async fn transfers_across_a_lossy_link_arrive_intact(backend: Backend) {
    let shape = Shape {
        delay: Duration::from_millis(2),
        loss: 0.01,
        ..Shape::default()
    };
    let Some(link) = Link::shaped(shape) else {
        return;
    };
    let data = Arc::new(pseudo_random(11, 6 << 20));
    let want = sha256(&data);
    let bulk = bulk_origin_at(IpAddr::V4(link.host), data.clone()).await;
    let (_relay, _state, _admin, agent) = tunnel(&link, backend, bulk, &[]);
    let mut d = Download::start(agent.public).await;
    d.read_to(data.len()).await;
    d.assert_whole(data.len(), &want);
    assert!(
        link.lost() > 0,
        "the wire dropped nothing: the test tested nothing"
    );

    // Upload and echo back at once: both directions in flight on one lossy connection.
    let echo = origin_at(IpAddr::V4(link.host), serve_echo).await;
    let (_relay2, _state2, _admin2, agent2) = tunnel(&link, backend, echo, &[]);
    let up = pseudo_random(12, 2 << 20);
    let v = TcpStream::connect(agent2.public).await.unwrap();
    let (mut r, mut w) = v.into_split();
    let sent = up.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(up.len());
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .expect("the echo moves")
        .expect("no reset");
    writer.await.unwrap();
    assert_eq!(back.len(), up.len(), "the echo was cut short");
    assert!(back == up, "bytes changed on the way");
}

/// The agent or the relay killed (SIGKILL) in the middle of a download across a delayed
/// link: the visitor gets a reset, never a clean end, and every byte it got before it was the
/// right one.
async fn killed_mid_download(backend: Backend, kill_relay: bool) {
    let shape = Shape {
        delay: Duration::from_millis(5),
        ..Shape::default()
    };
    let Some(link) = Link::shaped(shape) else {
        return;
    };
    // Large enough to be in flight when the process dies.
    let data = Arc::new(pseudo_random(13, 256 << 20));
    let bulk = bulk_origin_at(IpAddr::V4(link.host), data.clone()).await;
    let (mut relay, _state, admin, mut agent) = tunnel(&link, backend, bulk, &[]);
    let mut v = TcpStream::connect(agent.public).await.unwrap();
    v.write_all(b"go").await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    while got.len() < 1 << 20 {
        let n = tokio::time::timeout(WAIT, v.read(&mut buf))
            .await
            .expect("the download moves")
            .expect("no reset before the kill");
        assert!(n > 0, "closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    if kill_relay {
        relay.kill();
    } else {
        agent.proc.kill();
    }
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match v.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the visitor is told within the wait");
    match ended {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(()) => panic!(
            "a clean end after {} of {} bytes: the truncation is invisible",
            got.len(),
            data.len()
        ),
    }
    assert!(got.len() < data.len());
    assert!(
        got[..] == data[..got.len()],
        "bytes before the reset changed on the way"
    );
    if !kill_relay {
        wait_metric(admin, "ringtunnel_visitors_cut_total", 1).await;
    }
}

async fn an_agent_killed_across_the_link_is_an_error_not_an_end(backend: Backend) {
    killed_mid_download(backend, false).await
}

async fn a_relay_killed_mid_download_is_an_error_not_an_end(backend: Backend) {
    killed_mid_download(backend, true).await
}

both_backends!(
    a_visitor_during_a_cut_is_told_and_served_after_it,
    a_download_in_flight_survives_a_short_cut,
    a_long_cut_ends_the_session_and_the_agent_comes_back,
    transfers_across_a_lossy_link_arrive_intact,
    an_agent_killed_across_the_link_is_an_error_not_an_end,
    a_relay_killed_mid_download_is_an_error_not_an_end
);
