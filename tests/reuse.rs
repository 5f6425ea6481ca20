//! End-to-end with a hand-rolled agent on a real relay: a data connection carries a second
//! visitor only after the agent said `READY`, and a data connection that breaks the chunk
//! protocol costs only its own visitor.

mod common;

use std::time::Duration;

use common::*;
use ringtunnel::protocol::auth::Ticket;
use ringtunnel::protocol::chunk::{self, Deframer};
use ringtunnel::protocol::{AgentMsg, RelayMsg, PROTOCOL_VERSION};
use ringtunnel::transport::{BoxStream, Framed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(10);

/// One worker on uring (a waiting visitor waits on its own worker's pool), plain data
/// connections, and the admin endpoint the tests watch the pool through.
const RELAY_ARGS: [&str; 6] = [
    "--workers",
    "1",
    "--data-tls",
    "off",
    "--admin",
    "127.0.0.1:0",
];

/// Opens a plain data connection with `ticket` for `service` and waits until the relay has
/// parked it (its idle gauge reaches `parked`).
async fn open(relay: &Relay, service: &str, parked: u64, ticket: Ticket) -> Framed<BoxStream> {
    open_as(relay, service, parked, ticket, PROTOCOL_VERSION).await
}

/// [`open`], saying the agent speaks protocol `version`.
async fn open_as(
    relay: &Relay,
    service: &str,
    parked: u64,
    ticket: Ticket,
    version: u16,
) -> Framed<BoxStream> {
    let mut conn = Framed::new(connect_data(relay, false).await);
    let hello = AgentMsg::DataHello { version, ticket };
    conn.write_msg(&hello, LIMIT).await.unwrap();
    // Redeeming and parking happen on the relay's side (on uring, on a worker): the visitor
    // that follows must find the connection in the pool.
    let admin = relay.admin.expect("relay started with --admin");
    wait_metric(admin, &idle_series(service), parked).await;
    conn
}

/// Waits for `Start`, answers it as an agent of this protocol does, then reads the visitor's
/// chunks up to `END`.
async fn take_visitor(conn: Framed<BoxStream>) -> (BoxStream, Vec<u8>) {
    take_visitor_as(conn, true).await
}

/// [`take_visitor`]; `answer`: send `STARTED` (an agent of protocol 3 does not).
async fn take_visitor_as(conn: Framed<BoxStream>, answer: bool) -> (BoxStream, Vec<u8>) {
    let mut conn = conn;
    let start = tokio::time::timeout(WAIT, conn.read_msg::<RelayMsg>())
        .await
        .expect("a visitor arrives")
        .unwrap();
    assert!(matches!(start, RelayMsg::Start { .. }), "{start:?}");
    let (mut s, mut wire) = conn.into_parts();
    if answer {
        s.write_all(&chunk::header(chunk::STARTED)).await.unwrap();
        s.flush().await.unwrap();
    }
    let mut deframer = Deframer::new();
    let mut got = Vec::new();
    loop {
        match next_chunk(&mut s, &mut wire, &mut deframer).await {
            Chunk::Data(d) => got.extend_from_slice(&d),
            Chunk::End { after } => {
                assert_eq!(after, 0, "nothing after END");
                return (s, got);
            }
            Chunk::Raw => panic!("a small visitor went raw"),
        }
    }
}

/// A visitor that sends `msg`, half-closes, and reads until EOF.
async fn visitor(port: u16, msg: &'static [u8]) -> tokio::task::JoinHandle<Vec<u8>> {
    let mut v = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(async move {
        v.write_all(msg).await.unwrap();
        v.shutdown().await.unwrap();
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(WAIT, v.read_to_end(&mut reply)).await;
        reply
    })
}

async fn reply(s: &mut BoxStream, data: &[u8]) {
    let mut out = chunk::header(data.len() as u32).to_vec();
    out.extend_from_slice(data);
    out.extend_from_slice(&chunk::header(chunk::END));
    s.write_all(&out).await.unwrap();
    s.flush().await.unwrap();
}

async fn second_visitor_waits_for_ready(backend: Backend) {
    let relay = Relay::spawn(backend, &RELAY_ARGS);
    let (_ctl, port, tickets) = fake_agent(&relay, "ready").await;
    let conn = open(&relay, "ready", 1, tickets[0]).await;

    let first = visitor(port, b"one").await;
    let (mut s, got) = take_visitor(conn).await;
    assert_eq!(got, b"one");
    reply(&mut s, b"first reply").await;
    assert_eq!(first.await.unwrap(), b"first reply");

    // Both directions ended, but the agent has not said READY: the relay must not hand it
    // the next visitor yet (the agent might be closing it).
    let second = visitor(port, b"two").await;
    let mut probe = [0u8; 16];
    let early = tokio::time::timeout(Duration::from_millis(500), s.read(&mut probe)).await;
    assert!(early.is_err(), "relay sent {early:?} before READY");

    s.write_all(&chunk::header(chunk::READY)).await.unwrap();
    s.flush().await.unwrap();
    let (mut s, got) = take_visitor(Framed::new(s)).await;
    assert_eq!(got, b"two");
    reply(&mut s, b"second reply").await;
    assert_eq!(second.await.unwrap(), b"second reply");
}

async fn a_bad_chunk_costs_only_its_visitor(backend: Backend) {
    let relay = Relay::spawn(backend, &RELAY_ARGS);
    let (_ctl, port, tickets) = fake_agent(&relay, "badchunk").await;
    let conn = open(&relay, "badchunk", 1, tickets[0]).await;

    let first = visitor(port, b"one").await;
    let (mut s, _) = take_visitor(conn).await;
    // A header announcing more than MAX_CHUNK bytes.
    s.write_all(&[0x7f, 0, 0, 0, b'x']).await.unwrap();
    s.flush().await.unwrap();
    assert!(
        first.await.unwrap().is_empty(),
        "the visitor sees a close, no bytes"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the relay closes the broken data connection"
    );

    // The relay keeps serving through a fresh connection.
    let conn = open(&relay, "badchunk", 1, tickets[1]).await;
    let second = visitor(port, b"two").await;
    let (mut s, got) = take_visitor(conn).await;
    assert_eq!(got, b"two");
    reply(&mut s, b"fine").await;
    assert_eq!(second.await.unwrap(), b"fine");
}

/// A data connection that takes `Start` and stays silent (a link cut without a reset: the
/// relay's writes still succeed) costs its visitor the wait for `STARTED`, not the visit:
/// the relay closes it and hands the visitor, with the bytes it sent, to another connection.
async fn a_silent_data_connection_hands_its_visitor_to_another(backend: Backend) {
    let relay = Relay::spawn(backend, &RELAY_ARGS);
    let admin = relay.admin.unwrap();
    let (_ctl, port, tickets) = fake_agent(&relay, "silent").await;
    let a = open(&relay, "silent", 1, tickets[0]).await;
    let b = open(&relay, "silent", 2, tickets[1]).await;
    // The relay waits for `STARTED` only on connections parked a while: one that carried a
    // visitor moments ago is taken as alive.
    tokio::time::sleep(chunk::ANSWER_IF_PARKED + Duration::from_millis(300)).await;

    let visit = visitor(port, b"hello").await;
    // Whichever connection gets `Start` first stays silent.
    let (mut a, mut b) = (a, b);
    let a_first = tokio::select! {
        m = a.read_msg::<RelayMsg>() => { assert!(matches!(m, Ok(RelayMsg::Start { .. })), "{m:?}"); true }
        m = b.read_msg::<RelayMsg>() => { assert!(matches!(m, Ok(RelayMsg::Start { .. })), "{m:?}"); false }
    };
    let (silent, other) = if a_first { (a, b) } else { (b, a) };
    let (mut s, got) = take_visitor(other).await;
    assert_eq!(
        got, b"hello",
        "the visitor's bytes reached the second connection"
    );
    reply(&mut s, b"served").await;
    assert_eq!(visit.await.unwrap(), b"served");
    // The silent one was closed, not parked again.
    let (mut silent, _) = silent.into_parts();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the relay closes the silent connection");
    assert_eq!(admin_counter(admin, "data_unanswered").await, 1);
    assert_eq!(admin_counter(admin, "visitors_retried").await, 1);
    assert_eq!(admin_counter(admin, "visitors_cut").await, 0);
}

/// An agent of protocol 3 does not answer `Start`; the relay serves it without waiting.
async fn an_agent_of_protocol_3_is_still_served(backend: Backend) {
    let relay = Relay::spawn(backend, &RELAY_ARGS);
    let admin = relay.admin.unwrap();
    let (_ctl, port, tickets) = fake_agent(&relay, "old").await;
    let conn = open_as(&relay, "old", 1, tickets[0], 3).await;
    let visit = visitor(port, b"old agent").await;
    let (mut s, got) = take_visitor_as(conn, false).await;
    assert_eq!(got, b"old agent");
    reply(&mut s, b"still served").await;
    assert_eq!(visit.await.unwrap(), b"still served");
    assert_eq!(admin_counter(admin, "data_unanswered").await, 0);
}

both_backends!(
    second_visitor_waits_for_ready,
    a_bad_chunk_costs_only_its_visitor,
    a_silent_data_connection_hands_its_visitor_to_another,
    an_agent_of_protocol_3_is_still_served
);
