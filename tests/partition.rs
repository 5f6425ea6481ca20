//! A real link between relay and agent, cut and mended. The agent runs in a network namespace
//! this test creates, joined to the test's own namespace by a veth pair; the relay's control
//! port and the agent's local service listen on the test's end of it. A cut takes that end
//! down (`ip link set ... down`): both sides' packets are dropped without a reset, as across
//! a pulled cable or a firewall that drops, and nothing tells either program.
//!
//! Needs root and `ip` (iproute2); skipped without them unless RINGTUNNEL_REQUIRE_NETNS is set
//! (`.ci/run` sets it). Every namespace and link is removed when its test ends.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A namespace and the veth pair that joins it to the test's namespace.
struct Link {
    ns: String,
    host_if: String,
    /// The test's end (relay control port, local services).
    host: Ipv4Addr,
    /// The namespace's end (the agent).
    inner: Ipv4Addr,
}

/// Runs `ip args`; panics with its stderr if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Link {
    /// A fresh namespace and link, or `None` (skip) where this process cannot make them.
    fn new() -> Option<Link> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let can =
            rustix::process::geteuid().is_root() && Command::new("ip").arg("-V").output().is_ok();
        if !can {
            assert!(
                std::env::var_os("RINGTUNNEL_REQUIRE_NETNS").is_none(),
                "RINGTUNNEL_REQUIRE_NETNS is set, but this needs root and ip (iproute2)"
            );
            eprintln!("SKIP: network namespaces need root and ip (iproute2)");
            return None;
        }
        // Interface names have at most 15 bytes; the pid keeps parallel runs apart.
        let id = format!("{}x{n}", std::process::id() % 100_000);
        let (a, b) = ((std::process::id() % 200) as u8, (n * 4) as u8);
        let link = Link {
            ns: format!("rtpart{id}"),
            host_if: format!("rth{id}"),
            host: Ipv4Addr::new(10, 213 + a % 40, b, 1),
            inner: Ipv4Addr::new(10, 213 + a % 40, b, 2),
        };
        let inner_if = format!("rtn{id}");
        ip(&["netns", "add", &link.ns]);
        ip(&[
            "link",
            "add",
            &link.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &inner_if,
            "netns",
            &link.ns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", link.host),
            "dev",
            &link.host_if,
        ]);
        ip(&["link", "set", &link.host_if, "up"]);
        let inner = format!("{}/30", link.inner);
        ip(&["-n", &link.ns, "addr", "add", &inner, "dev", &inner_if]);
        ip(&["-n", &link.ns, "link", "set", &inner_if, "up"]);
        ip(&["-n", &link.ns, "link", "set", "lo", "up"]);
        Some(link)
    }

    /// Drops every packet between the two ends, in both directions, without a reset.
    fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]);
    }

    /// Carries packets again (addresses and routes come back with the link).
    fn mend(&self) {
        ip(&["link", "set", &self.host_if, "up"]);
    }

    /// `ringtunnel args` run inside the namespace.
    fn spawn(&self, args: &[String]) -> Proc {
        let mut all: Vec<String> = ["netns", "exec", &self.ns, env!("CARGO_BIN_EXE_ringtunnel")]
            .map(String::from)
            .to_vec();
        all.extend_from_slice(args);
        Proc::spawn_program(Path::new("ip"), &all, &[], None)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// A relay whose control port is on the link, its public ports on loopback, and an agent in
/// the namespace publishing `local` (on the link too), with a pool of 2.
/// The relay's state directory is returned to live as long as the relay.
fn tunnel(link: &Link, backend: Backend, local: SocketAddr) -> (Proc, TempDir, SocketAddr, Agent) {
    let state = TempDir::new("partition");
    let state_dir = state.0.display().to_string();
    let control = format!("{}:0", link.host);
    let mut relay = Proc::spawn(
        &[
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
        .map(String::from),
    );
    let ready = relay.wait_line("ready ");
    let admin: SocketAddr = field(&ready, "admin").parse().unwrap();
    let agent = Agent::from_proc(
        link.spawn(
            &[
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
            .map(String::from),
        ),
    );
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
    let (_relay, _state, admin, agent) = tunnel(&link, backend, local);
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
    // need them. Bounded: each try waits at most a few seconds.
    let deadline = Instant::now() + WAIT;
    loop {
        if roundtrip(agent.public, b"back").await.ok().as_deref() == Some(&b"back"[..]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not served after the link came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A download in flight across a 3 s cut finishes intact: neither end gives up on a link
/// that only went quiet.
async fn a_download_in_flight_survives_a_short_cut(backend: Backend) {
    let Some(link) = Link::new() else { return };
    let data = Arc::new(pseudo_random(7, 24 << 20));
    let want = sha256(&data);
    let local = bulk_origin_at(IpAddr::V4(link.host), data.clone()).await;
    let (_relay, _state, _admin, agent) = tunnel(&link, backend, local);

    let mut v = TcpStream::connect(agent.public).await.unwrap();
    v.write_all(b"go").await.unwrap();
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut total = 0;
    read_hashing(&mut v, &mut hash, &mut total, 1 << 20).await;
    link.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    link.mend();
    read_hashing(&mut v, &mut hash, &mut total, data.len()).await;
    assert_eq!(total, data.len(), "the download was cut short");
    assert_eq!(
        hash.finish().as_ref(),
        &want[..],
        "bytes changed on the way"
    );
}

both_backends!(
    a_visitor_during_a_cut_is_told_and_served_after_it,
    a_download_in_flight_survives_a_short_cut
);
