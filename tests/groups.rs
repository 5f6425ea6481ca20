//! Several agents serving one service on one relay (`--group`): visitors spread over them by
//! the visitors each carries, one leaving moves new visitors to the rest, and an agent outside
//! the group still takes the service over.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An origin that answers each connection's first byte with `id`, then holds the connection
/// open until the visitor closes it.
async fn named_origin(id: u8) -> SocketAddr {
    origin(move |mut s: TcpStream| async move {
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).await.is_ok() && s.write_all(&[id]).await.is_ok() {
            let _ = s.read(&mut b).await;
        }
    })
    .await
}

/// A visitor that stays connected: which origin answered it, and its open connection.
async fn visit(public: SocketAddr) -> (u8, TcpStream) {
    let mut s = TcpStream::connect(public).await.unwrap();
    s.write_all(b"?").await.unwrap();
    let mut b = [0u8; 1];
    tokio::time::timeout(WAIT, s.read_exact(&mut b))
        .await
        .expect("the visitor is answered")
        .unwrap();
    (b[0], s)
}

fn group_args(relay: &Relay, local: SocketAddr, group: &str) -> Vec<String> {
    let mut args = relay.agent_args(local, "web");
    args.extend(["--pool", "1", "--group", group].map(String::from));
    args
}

async fn a_group_shares_its_visitors_and_outlives_one_agent(backend: Backend) {
    let relay = Relay::spawn(backend, &["--admin", "127.0.0.1:0"]);
    let admin = relay.admin.unwrap();
    // One pool per uring worker, and the relay runs a worker per core.
    let pools = match backend {
        Backend::Tokio => 1,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
    };
    let mut a = Agent::spawn(group_args(&relay, named_origin(b'a').await, "blue"));
    let b = Agent::spawn(group_args(&relay, named_origin(b'b').await, "blue"));
    assert_eq!(a.public, b.public, "the group serves one port");
    relay.proc.wait_stderr("agent joined the service's group");
    assert!(a.proc.is_running(), "a member of the group is not replaced");

    // Each visitor waits until both agents have their one connection parked in every pool
    // again, so the only thing that decides where it goes is what each agent carries: they
    // alternate.
    let full = 2 * pools;
    let mut held = Vec::new();
    let mut served = [0usize; 2];
    for _ in 0..8 {
        wait_metric(admin, &idle_series("web"), full).await;
        let (id, s) = visit(a.public).await;
        served[usize::from(id - b'a')] += 1;
        held.push(s);
    }
    assert_eq!(served, [4, 4], "visitors spread evenly over the group");

    // Agent a vanishes: its visitors are cut, new ones all reach b on the same port.
    a.proc.kill();
    relay.proc.wait_stderr("agent session ended");
    for _ in 0..4 {
        let (id, s) = visit(b.public).await;
        assert_eq!(id, b'b', "a visitor after a left reached b");
        held.push(s);
    }
    drop(held);

    // An agent of the group asking for other settings is refused; b carries on.
    let mut wrong = relay.agent_args(named_origin(b'x').await, "web");
    let other_port = (b.public.port() + 1).to_string();
    wrong.extend(["--group", "blue", "--remote-port", &other_port].map(String::from));
    let mut wrong = Proc::spawn(&wrong);
    assert!(!wrong.wait_exit().success());
    assert!(
        wrong
            .stderr()
            .contains("served by group blue with other settings"),
        "{}",
        wrong.stderr()
    );

    // An agent of another group takes the service over, as a lone agent would.
    let mut b = b;
    let green = Agent::spawn(group_args(&relay, named_origin(b'g').await, "green"));
    assert_eq!(green.public, b.public, "a takeover keeps the port");
    assert!(!b.proc.wait_exit().success());
    assert!(
        b.proc.stderr().contains("taken over"),
        "{}",
        b.proc.stderr()
    );
    let (id, _s) = visit(green.public).await;
    assert_eq!(id, b'g');
}

async fn a_bad_group_name_is_refused_before_dialling(backend: Backend) {
    let relay = Relay::spawn(backend, &[]);
    let mut args = relay.agent_args(named_origin(b'a').await, "web");
    args.extend(["--group", "no spaces"].map(String::from));
    let mut agent = Proc::spawn(&args);
    assert!(!agent.wait_exit().success());
    assert!(
        agent.stderr().contains("invalid group name"),
        "{}",
        agent.stderr()
    );
}

both_backends!(
    a_group_shares_its_visitors_and_outlives_one_agent,
    a_bad_group_name_is_refused_before_dialling,
);
