//! Faults on real links: when a tunnel is lost in the middle of a stream, neither the visitor
//! nor the local service may take the truncated stream for a whole one. Each end that can
//! tell (no `END`, no TLS close_notify) resets the connection it still holds.

mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// How the origin's first data-carrying connection ended, as its reader saw it.
type Ending = oneshot::Receiver<std::io::Result<usize>>;

/// An origin that answers its first connection carrying data with a trickle (512 bytes every
/// 2 ms, at most 20 000 pieces), so every read on the way is small and the tunnel stays
/// chunked; it reports how that connection's reading side ended (`Ok(0)`: a clean FIN).
/// Connections that close without a byte (the agent's start-up check) are skipped.
async fn trickle_origin() -> (SocketAddr, Ending) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let s = loop {
            let (mut s, _) = l.accept().await.unwrap();
            if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                break s;
            }
        };
        // One task both writes and reads: a reset is reported once, to whichever call meets
        // it first, and a read after that finds only an end of stream.
        let mut s = s;
        let mut pieces = 0;
        let ended = loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) => break Ok(0),
                    Ok(_) => continue,
                    Err(e) => break Err(e),
                },
                _ = tokio::time::sleep(Duration::from_millis(2)), if pieces < 20_000 => {
                    pieces += 1;
                    if let Err(e) = s.write_all(&[b'x'; 512]).await {
                        break Err(e);
                    }
                }
            }
        };
        let _ = tx.send(ended);
    });
    (addr, rx)
}

/// Connects a visitor to `public` and reads until `at_least` bytes of the trickle arrived.
async fn visitor_in_the_middle(public: SocketAddr, at_least: usize) -> TcpStream {
    let mut v = TcpStream::connect(public).await.unwrap();
    v.write_all(b"go").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = 0;
    while got < at_least {
        let n = tokio::time::timeout(WAIT, v.read(&mut buf))
            .await
            .expect("the trickle flows")
            .unwrap();
        assert!(n > 0, "closed after {got} bytes");
        got += n;
    }
    v
}

async fn killed_agent_resets_the_visitor(backend: Backend, data_tls: &str) {
    let (origin, _) = trickle_origin().await;
    let relay = Relay::spawn(backend, &["--data-tls", data_tls, "--admin", "127.0.0.1:0"]);
    let mut agent = Agent::spawn(relay.agent_args(origin, "trickle"));
    let mut v = visitor_in_the_middle(agent.public, 8 * 1024).await;
    agent.proc.kill(); // SIGKILL: no goodbye, no END
    let end = read_to_end_or_error(&mut v).await;
    match end {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("a clean end after {n} more bytes: the truncation is invisible"),
    }
    wait_metric(relay.admin.unwrap(), "ringtunnel_visitors_cut_total", 1).await;
}

async fn killed_agent_resets_the_visitor_tls(backend: Backend) {
    killed_agent_resets_the_visitor(backend, "on").await
}

async fn killed_agent_resets_the_visitor_plain(backend: Backend) {
    killed_agent_resets_the_visitor(backend, "off").await
}

async fn killed_relay_resets_the_local_service(backend: Backend, data_tls: &str) {
    let (origin, ending) = trickle_origin().await;
    let mut relay = Relay::spawn(backend, &["--data-tls", data_tls]);
    let agent = Agent::spawn(relay.agent_args(origin, "trickle"));
    let _v = visitor_in_the_middle(agent.public, 8 * 1024).await;
    relay.proc.kill();
    origin_saw_reset(ending).await;
}

/// The trickle origin's connection ended in an error (a write may meet the reset as a broken
/// pipe), not a clean end.
async fn origin_saw_reset(ending: Ending) {
    let end = tokio::time::timeout(WAIT, ending)
        .await
        .expect("the origin's connection ended")
        .unwrap();
    match end {
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
            "{e}"
        ),
        Ok(_) => panic!("the local service saw a clean end of a cut stream"),
    }
}

async fn killed_relay_resets_the_local_service_tls(backend: Backend) {
    killed_relay_resets_the_local_service(backend, "on").await
}

async fn killed_relay_resets_the_local_service_plain(backend: Backend) {
    killed_relay_resets_the_local_service(backend, "off").await
}

/// The relay killed mid-stream: the visitor's connection is reset by the relay's kernel (the
/// relay armed it for that while forwarding), not closed as if the stream had ended.
async fn killed_relay_resets_the_visitor(backend: Backend) {
    let (origin, _) = trickle_origin().await;
    let mut relay = Relay::spawn(backend, &[]);
    let agent = Agent::spawn(relay.agent_args(origin, "trickle"));
    let mut v = visitor_in_the_middle(agent.public, 8 * 1024).await;
    relay.proc.kill();
    match read_to_end_or_error(&mut v).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("a clean end after {n} more bytes: the truncation is invisible"),
    }
}

/// The agent killed mid-stream: its connection to the local service is reset by the agent's
/// kernel, so the local service does not take what it was sent for a whole request.
async fn killed_agent_resets_the_local_service(backend: Backend) {
    let (origin, ending) = trickle_origin().await;
    let relay = Relay::spawn(backend, &[]);
    let mut agent = Agent::spawn(relay.agent_args(origin, "trickle"));
    let _v = visitor_in_the_middle(agent.public, 8 * 1024).await;
    agent.proc.kill();
    origin_saw_reset(ending).await;
}

/// Size of the transfer that must survive its control connection.
const BULK: usize = 256 << 20;

/// A forwarder in front of the relay's control port that can reset the first connection
/// through it (the agent's control connection: it dials that before any data connection),
/// as `ss -K` or a NAT dropping its state would, while every other connection flows on.
struct ControlCut {
    addr: SocketAddr,
    first: oneshot::Receiver<tokio::task::JoinHandle<()>>,
}

impl ControlCut {
    async fn start(relay: SocketAddr) -> ControlCut {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, first) = oneshot::channel();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Ok((mut a, _)) = l.accept().await {
                let Ok(mut b) = TcpStream::connect(relay).await else {
                    continue;
                };
                if tx.is_some() {
                    // Dropped with linger 0: both ends see a reset, not a goodbye.
                    #[allow(deprecated)]
                    {
                        a.set_linger(Some(Duration::ZERO)).unwrap();
                        b.set_linger(Some(Duration::ZERO)).unwrap();
                    }
                }
                let pump = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                });
                if let Some(tx) = tx.take() {
                    let _ = tx.send(pump);
                }
            }
        });
        ControlCut { addr, first }
    }

    /// Resets the first connection (both of its halves).
    async fn cut_first(self) {
        let pump = tokio::time::timeout(WAIT, self.first)
            .await
            .expect("the agent connected")
            .unwrap();
        pump.abort();
        let _ = pump.await;
    }
}

async fn streams_outlive_their_control_connection(backend: Backend) {
    let data = std::sync::Arc::new(pseudo_random(11, BULK));
    let want = sha256(&data);
    let origin = bulk_origin(data).await;
    let relay = Relay::spawn(backend, &[]);
    let cut = ControlCut::start(relay.control).await;
    let mut args = relay.agent_args(origin, "bulk");
    let at = args.iter().position(|a| a == "--relay").unwrap() + 1;
    args[at] = cut.addr.to_string();
    let mut agent = Agent::spawn(args);

    let mut v = TcpStream::connect(agent.public).await.unwrap();
    v.write_all(b"go").await.unwrap();
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0;
    // The first MiB, then the visitor pauses: the rest is held up inside the tunnel.
    read_hashing(&mut v, &mut hash, &mut got, 1 << 20).await;
    cut.cut_first().await;
    relay.proc.wait_stderr("agent session ended");
    let online = agent.proc.wait_line("online ");
    assert_eq!(
        online, agent.online,
        "the same public address after the new session"
    );

    // A new visitor is served (by the new session's connections: the old session's parked
    // ones left the pool with it).
    let mut v2 = TcpStream::connect(agent.public).await.unwrap();
    v2.write_all(b"go").await.unwrap();
    let (mut h2, mut got2) = (ring::digest::Context::new(&ring::digest::SHA256), 0);
    read_hashing(&mut v2, &mut h2, &mut got2, 1).await;
    assert!(got2 > 0, "the new visitor got its first bytes");
    drop(v2);

    read_hashing(&mut v, &mut hash, &mut got, usize::MAX).await;
    assert_eq!(got, BULK, "every byte of the transfer in flight arrived");
    assert_eq!(
        hash.finish().as_ref(),
        want.as_slice(),
        "and every one is right"
    );
}

both_backends!(
    streams_outlive_their_control_connection,
    killed_agent_resets_the_visitor_tls,
    killed_agent_resets_the_visitor_plain,
    killed_relay_resets_the_local_service_tls,
    killed_relay_resets_the_local_service_plain,
    killed_relay_resets_the_visitor,
    killed_agent_resets_the_local_service,
);
