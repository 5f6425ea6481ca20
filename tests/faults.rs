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

/// Reads `s` to its end (bounded by [`WAIT`]): `Ok(bytes)` at a clean FIN, or the error.
async fn read_to_end_or_error(s: &mut TcpStream) -> std::io::Result<usize> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the visitor's connection ended")
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
    let end = tokio::time::timeout(WAIT, ending)
        .await
        .expect("the origin's connection ended")
        .unwrap();
    match end {
        // A write may meet the reset as a broken pipe.
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

both_backends!(
    killed_agent_resets_the_visitor_tls,
    killed_agent_resets_the_visitor_plain,
    killed_relay_resets_the_local_service_tls,
    killed_relay_resets_the_local_service_plain,
);
