//! No connection snatching: a data connection without a valid, unused ticket never sees a
//! visitor byte. The test plays a real agent (library protocol, real TLS, loopback) so it
//! holds genuine tickets and can try to replay one.

mod common;

use std::time::Duration;

use common::*;
use ringtunnel::protocol::auth::Ticket;
use ringtunnel::protocol::chunk::{self, Deframer};
use ringtunnel::protocol::msg::Message;
use ringtunnel::protocol::{AgentMsg, ErrorCode, RelayMsg, PROTOCOL_VERSION};
use ringtunnel::transport::{BoxStream, Framed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads whatever the relay sends on a data connection until it closes; bounded.
async fn drain(mut s: BoxStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("relay closes the connection");
    got
}

fn assert_rejected(bytes: &[u8], secret: &[u8]) {
    assert!(
        !bytes.windows(secret.len()).any(|w| w == secret),
        "visitor bytes leaked"
    );
    match RelayMsg::decode(bytes) {
        Ok(Some((RelayMsg::Error { code, .. }, used))) => {
            assert_eq!(code, ErrorCode::BadTicket);
            assert_eq!(used, bytes.len(), "nothing after the error frame");
        }
        other => panic!("expected a BadTicket error frame, got {other:?}"),
    }
}

async fn forged_and_replayed_tickets_see_no_visitor_bytes(backend: Backend) {
    for data_tls in ["on", "off"] {
        let relay = Relay::spawn(backend, &["--data-tls", data_tls, "--admin", "127.0.0.1:0"]);
        let (_ctl, port, tickets) = fake_agent(&relay, "victim").await;
        let limit = Duration::from_secs(10);
        // A legitimate data connection redeems the first ticket...
        let mut legit = Framed::new(connect_data(&relay, data_tls == "on").await);
        let hello = AgentMsg::DataHello {
            version: PROTOCOL_VERSION,
            ticket: tickets[0],
        };
        legit.write_msg(&hello, limit).await.unwrap();
        // Wait until the relay has redeemed it and parked the connection: a replay racing
        // ahead would win the ticket, and on uring a visitor that finds every worker's pool
        // empty waits on its own worker's, which this hand-rolled agent never refills.
        wait_metric(relay.admin.unwrap(), &idle_series("victim"), 1).await;

        // ...a replay of that ticket and a forged one are refused.
        let mut replay = Framed::new(connect_data(&relay, data_tls == "on").await);
        replay.write_msg(&hello, limit).await.unwrap();
        let forged_hello = AgentMsg::DataHello {
            version: PROTOCOL_VERSION,
            ticket: Ticket([0xAB; 16]),
        };
        let mut forged = Framed::new(connect_data(&relay, data_tls == "on").await);
        forged.write_msg(&forged_hello, limit).await.unwrap();
        let (replay_s, left) = replay.into_parts();
        assert!(left.is_empty());
        let (forged_s, _) = forged.into_parts();

        // A visitor arrives with a secret; only the legitimate connection may see it.
        let secret = b"visitor-secret-payload-0123456789";
        let mut visitor = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        visitor.write_all(secret).await.unwrap();

        let replay_bytes = drain(replay_s).await;
        let forged_bytes = drain(forged_s).await;
        assert_rejected(&replay_bytes, secret);
        assert_rejected(&forged_bytes, secret);

        // The legitimate connection (or its pool sibling) did get the visitor. Ours is the
        // only one in the pool, so it is ours.
        let start = tokio::time::timeout(WAIT, legit.read_msg::<RelayMsg>())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(start, RelayMsg::Start { .. }));
        // Answered as an agent does; the visitor's bytes follow in chunks.
        let (mut s, mut wire) = legit.into_parts();
        s.write_all(&chunk::header(chunk::STARTED)).await.unwrap();
        s.flush().await.unwrap();
        let mut deframer = Deframer::new();
        let mut got = Vec::new();
        while got.len() < secret.len() {
            match next_chunk(&mut s, &mut wire, &mut deframer).await {
                Chunk::Data(d) => got.extend_from_slice(&d),
                other => panic!("visitor still sending, got {other:?}"),
            }
        }
        assert_eq!(&got[..], &secret[..]);
        relay.proc.wait_stderr("unknown or already used ticket");
    }
}

async fn plain_data_connection_refused_when_tls_required(backend: Backend) {
    let relay = Relay::spawn(backend, &["--data-tls", "on"]);
    let (_ctl, _port, tickets) = fake_agent(&relay, "strict").await;
    let mut plain =
        Framed::new(Box::new(TcpStream::connect(relay.control).await.unwrap()) as BoxStream);
    let hello = AgentMsg::DataHello {
        version: PROTOCOL_VERSION,
        ticket: tickets[0],
    };
    plain
        .write_msg(&hello, Duration::from_secs(5))
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, plain.read_msg::<RelayMsg>())
        .await
        .unwrap()
    {
        Ok(RelayMsg::Error { message, .. }) => assert!(message.contains("TLS"), "{message}"),
        other => panic!("expected refusal, got {other:?}"),
    }
}

both_backends!(
    forged_and_replayed_tickets_see_no_visitor_bytes,
    plain_data_connection_refused_when_tls_required,
);
