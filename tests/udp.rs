//! End-to-end `udp` services: the real relay and agent, UDP origins and visitors on loopback.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use ringtunnel::protocol::msg::Message;
use ringtunnel::protocol::{ServiceKind, ServiceOutcome, ServiceRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

/// How long a visitor waits for one answer before sending again (a datagram may be lost,
/// as UDP allows; the tests check what arrives, never how fast).
const ANSWER: Duration = Duration::from_secs(2);
/// Sends of one datagram before a test gives up on it.
const TRIES: usize = 5;

/// A UDP origin that answers each datagram with `answer(datagram, sender)`.
async fn udp_origin<F>(answer: F) -> SocketAddr
where
    F: Fn(&[u8], SocketAddr) -> Vec<u8> + Send + 'static,
{
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = s.recv_from(&mut buf).await else {
                return;
            };
            let _ = s.send_to(&answer(&buf[..n], from), from).await;
        }
    });
    addr
}

async fn echo_udp_origin() -> SocketAddr {
    udp_origin(|d, _| d.to_vec()).await
}

/// Sends `payload` from `s` to `to` until an answer comes (at most [`TRIES`] times).
async fn ask(s: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 65_536];
    for _ in 0..TRIES {
        s.send_to(payload, to).await.unwrap();
        if let Ok(r) = tokio::time::timeout(ANSWER, s.recv_from(&mut buf)).await {
            let (n, from) = r.unwrap();
            assert_eq!(from, to, "the answer comes from the public port");
            return buf[..n].to_vec();
        }
    }
    panic!("no answer to a {}-byte datagram", payload.len());
}

fn udp_agent_args(relay: &Relay, local: SocketAddr, name: &str) -> Vec<String> {
    let mut args = relay.agent_args(local, name);
    args.push("--udp".into());
    args
}

async fn visitor() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

async fn datagrams_of_every_size_are_echoed_intact(backend: Backend) {
    let origin = echo_udp_origin().await;
    for tls in ["on", "off"] {
        let relay = Relay::spawn(backend, &["--data-tls", tls]);
        let agent = Agent::spawn(udp_agent_args(&relay, origin, "dgram"));
        assert!(
            agent.online.contains("public=udp://"),
            "the online line names UDP: {}",
            agent.online
        );
        let s = visitor().await;
        let mut sizes: Vec<usize> = vec![0, 1, 1472, 1473, 9000, 65_507];
        sizes.extend((0..994u64).map(|i| {
            (pseudo_random(i, 4)
                .iter()
                .fold(0u64, |a, b| a << 8 | u64::from(*b))
                % 65_508) as usize
        }));
        for (i, n) in sizes.iter().enumerate() {
            let payload = pseudo_random(i as u64 + 1, *n);
            let got = ask(&s, agent.public, &payload).await;
            assert_eq!(got.len(), *n, "data-tls {tls}: datagram {i} length");
            assert_eq!(
                sha256(&got),
                sha256(&payload),
                "data-tls {tls}: datagram {i}"
            );
        }
    }
}

/// A burst of equal-sized datagrams (which the agent sends to its local service in segmented
/// batches) comes back intact, each once. 64 of them: what a socket's default receive buffer
/// holds on loopback.
async fn a_burst_of_equal_datagrams_is_echoed_intact(backend: Backend) {
    let origin = echo_udp_origin().await;
    let relay = Relay::spawn(backend, &[]);
    let agent = Agent::spawn(udp_agent_args(&relay, origin, "burst"));
    let v = visitor().await;
    // The flow is open and a channel carries it before the burst.
    assert_eq!(ask(&v, agent.public, b"warm").await, b"warm");
    let sent: Vec<Vec<u8>> = (0..64u64)
        .map(|i| pseudo_random(2 * i + 101, 1400))
        .collect();
    for d in &sent {
        v.send_to(d, agent.public).await.unwrap();
    }
    let mut got = std::collections::HashSet::new();
    let mut buf = vec![0u8; 65_536];
    while got.len() < sent.len() {
        let Ok(r) = tokio::time::timeout(ANSWER, v.recv_from(&mut buf)).await else {
            break; // the rest were dropped on the way, as UDP may
        };
        let (n, _) = r.unwrap();
        let d = buf[..n].to_vec();
        assert!(
            sent.contains(&d),
            "every datagram that comes back is one that was sent, intact"
        );
        assert!(got.insert(d), "and comes back once");
    }
    assert!(
        got.len() >= sent.len() / 2,
        "most of a 64-datagram burst comes back on loopback: {}",
        got.len()
    );
}

async fn flows_from_many_visitor_ports_are_kept_apart(backend: Backend) {
    // The origin answers with the address it saw and what it was sent.
    let origin =
        udp_origin(|d, from| format!("{from} {}", String::from_utf8_lossy(d)).into_bytes()).await;
    let relay = Relay::spawn(backend, &[]);
    let agent = Agent::spawn(udp_agent_args(&relay, origin, "flows"));
    let mut visitors = Vec::new();
    for _ in 0..20 {
        visitors.push(visitor().await);
    }
    let mut seen = std::collections::HashMap::new();
    for round in 0..3 {
        for (i, v) in visitors.iter().enumerate() {
            let got =
                String::from_utf8(ask(v, agent.public, format!("v{i}").as_bytes()).await).unwrap();
            let (origin_saw, said) = got.split_once(' ').unwrap();
            assert_eq!(said, format!("v{i}"), "visitor {i} gets its own answer");
            let first = seen.entry(i).or_insert_with(|| origin_saw.to_string());
            assert_eq!(
                *first, origin_saw,
                "round {round}: visitor {i} stays on its flow"
            );
        }
    }
    let mut sources: Vec<&String> = seen.values().collect();
    sources.sort();
    sources.dedup();
    assert_eq!(
        sources.len(),
        20,
        "the origin sees one peer per visitor: {seen:?}"
    );
}

async fn idle_flows_expire_on_both_sides(backend: Backend) {
    let origin = udp_origin(|_, from| from.to_string().into_bytes()).await;
    let (_dir, config) = config_file("[limits]\nudp_flow_idle_secs = 1\n");
    let relay = Relay::spawn(backend, &["--config", &config, "--admin", "127.0.0.1:0"]);
    let admin = relay.admin.unwrap();
    let agent = Agent::spawn(udp_agent_args(&relay, origin, "idle"));
    let v = visitor().await;
    let first = ask(&v, agent.public, b"hello").await;
    let open = "ringtunnel_service_visitors{service=\"idle\",kind=\"udp\"}";
    assert_eq!(metric(admin, open).await, Some(1), "one flow open");
    // `ringtunnel status` shows it with its port, as a tcp service.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringtunnel"))
        .args(["status", "--admin", &admin.to_string()])
        .env_remove("RINGTUNNEL_ADMIN_TOKEN")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("idle "))
        .unwrap_or_default();
    assert!(
        row.contains(" udp ") && row.contains(&format!(":{}", agent.public.port())),
        "{table}"
    );
    // Silent past the idle time: the relay ends the flow and tells the agent.
    wait_metric_value(admin, open, 0).await;
    let second = ask(&v, agent.public, b"hello again").await;
    assert_ne!(
        first, second,
        "after expiry the same visitor is a new flow with a new socket at the agent"
    );
}

async fn a_reload_shortens_the_flow_idle_time_of_a_running_service(backend: Backend) {
    let origin = echo_udp_origin().await;
    let (dir, config) = config_file("[limits]\nudp_flow_idle_secs = 600\n");
    let relay = Relay::spawn(backend, &["--config", &config, "--admin", "127.0.0.1:0"]);
    let admin = relay.admin.unwrap();
    let agent = Agent::spawn(udp_agent_args(&relay, origin, "reloaded"));
    assert_eq!(ask(&visitor().await, agent.public, b"hi").await, b"hi");
    let open = "ringtunnel_service_visitors{service=\"reloaded\",kind=\"udp\"}";
    assert_eq!(metric(admin, open).await, Some(1));
    std::fs::write(&config, "[limits]\nudp_flow_idle_secs = 1\n").unwrap();
    relay.proc.signal("-HUP");
    relay.proc.wait_stderr("settings reloaded: changed=limits");
    // The flow, silent since, ends under the new setting rather than in ten minutes.
    wait_metric_value(admin, open, 0).await;
    drop(dir);
}

async fn wait_metric_value(admin: SocketAddr, series: &str, want: u64) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if metric(admin, series).await == Some(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} never reached {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn a_tcp_and_a_udp_service_share_one_port_number(backend: Backend) {
    let tcp_origin = echo_origin().await;
    let udp = echo_udp_origin().await;
    let relay = Relay::spawn(backend, &[]);
    let tcp_agent = Agent::spawn(relay.agent_args(tcp_origin, "both-tcp"));
    let port = tcp_agent.public.port().to_string();
    let mut args = udp_agent_args(&relay, udp, "both-udp");
    args.extend(["--remote-port".into(), port]);
    let udp_agent = Agent::spawn(args);
    assert_eq!(udp_agent.public, tcp_agent.public);
    assert_echo(tcp_agent.public).await;
    assert_eq!(
        ask(&visitor().await, udp_agent.public, b"dgram").await,
        b"dgram"
    );
}

async fn denied_addresses_get_no_flow(backend: Backend) {
    let origin = echo_udp_origin().await;
    let (_dir, config) = config_file("[access]\ndeny = [\"127.0.0.0/8\"]\n");
    let relay = Relay::spawn(backend, &["--config", &config, "--admin", "127.0.0.1:0"]);
    let admin = relay.admin.unwrap();
    let agent = Agent::spawn(udp_agent_args(&relay, origin, "closed"));
    let v = visitor().await;
    let mut buf = [0u8; 64];
    let denied = "ringtunnel_service_refused_denied_total{service=\"closed\",kind=\"udp\"}";
    // Until the relay has the agent's channels, datagrams are dropped for want of one;
    // then for the address.
    for _ in 0..40 {
        v.send_to(b"let me in", agent.public).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_millis(250), v.recv_from(&mut buf)).await;
        assert!(answer.is_err(), "a denied address gets no answer");
        if metric(admin, denied).await.unwrap_or(0) >= 3 {
            break;
        }
    }
    assert!(
        metric(admin, denied).await.unwrap_or(0) >= 3,
        "refusals are counted"
    );
    assert!(metric(admin, "ringtunnel_udp_dropped_total").await.unwrap() >= 3);
}

/// A data connection of a `udp` service that sends a malformed item is closed; the relay
/// and the service's other channels go on.
async fn a_malformed_channel_item_closes_only_that_channel(backend: Backend) {
    let origin = echo_udp_origin().await;
    let relay = Relay::spawn(backend, &["--data-tls", "off"]);
    let agent = Agent::spawn(udp_agent_args(&relay, origin, "real"));
    let req = ServiceRequest {
        name: "forged".into(),
        kind: ServiceKind::Udp,
        pool: 1,
        ..Default::default()
    };
    let (mut ctl, results) = fake_session(&relay, SECRET, vec![req]).await;
    assert!(
        matches!(results[0].outcome, ServiceOutcome::Online { .. }),
        "{results:?}"
    );
    let ringtunnel::protocol::RelayMsg::Tickets { tickets, .. } =
        ctl.read_msg_within(Duration::from_secs(10)).await.unwrap()
    else {
        panic!("expected tickets")
    };
    let mut data = connect_data(&relay, false).await;
    let hello = ringtunnel::protocol::AgentMsg::DataHello {
        version: ringtunnel::protocol::PROTOCOL_VERSION,
        ticket: tickets[0],
    };
    data.write_all(&hello.to_frame()).await.unwrap();
    let mut open = [0u8; 4];
    data.read_exact(&mut open).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(open),
        ringtunnel::protocol::datagram::CHANNEL_OPEN
    );
    // A length no datagram can have.
    let mut bad = 7u32.to_be_bytes().to_vec();
    bad.extend_from_slice(&70_000u32.to_be_bytes());
    data.write_all(&bad).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, data.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the relay closes a channel that sent garbage"
    );
    assert_eq!(
        ask(&visitor().await, agent.public, b"still").await,
        b"still"
    );
}

async fn a_dead_local_service_costs_no_channel_churn(backend: Backend) {
    // Nothing listens there: the agent's flow sockets get ICMP refusals.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let relay = Relay::spawn(backend, &["--admin", "127.0.0.1:0"]);
    let admin = relay.admin.unwrap();
    let agent = Agent::spawn(udp_agent_args(&relay, dead, "dead"));
    let v = visitor().await;
    let mut buf = [0u8; 64];
    for i in 0..20u8 {
        v.send_to(&[i; 32], agent.public).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_millis(100), v.recv_from(&mut buf)).await;
        assert!(answer.is_err(), "nothing answers");
    }
    let live = agent.online.clone();
    let accepted = admin_counter(admin, "data_accepted").await;
    assert!(
        accepted <= 4,
        "the channels stay up ({accepted} data connections): {live}"
    );
    // And the relay still serves a working service beside it.
    let origin = echo_udp_origin().await;
    let ok = Agent::spawn(udp_agent_args(&relay, origin, "alive"));
    assert_eq!(ask(&visitor().await, ok.public, b"ping").await, b"ping");
}

/// A datagram sent the moment the agent is online (before its channels have reached the
/// relay) waits for one instead of being dropped.
async fn the_first_datagram_after_online_is_answered_without_a_resend(backend: Backend) {
    let origin = echo_udp_origin().await;
    let relay = Relay::spawn(backend, &[]);
    let agent = Agent::spawn(udp_agent_args(&relay, origin, "first"));
    let v = visitor().await;
    v.send_to(b"at once", agent.public).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(WAIT, v.recv_from(&mut buf))
        .await
        .expect("answered, sent once")
        .unwrap();
    assert_eq!(&buf[..n], b"at once");
}

/// A live upgrade does not hand a udp service over: the old process closes its socket, and
/// the agent publishes it again, on the same port, with the new one, which serves it.
async fn a_udp_service_comes_back_on_its_port_after_an_upgrade(backend: Backend) {
    let origin = echo_udp_origin().await;
    let mut relay = Relay::spawn(backend, &[]);
    let mut agent = Agent::spawn(udp_agent_args(&relay, origin, "up"));
    let v = visitor().await;
    assert_eq!(ask(&v, agent.public, b"before").await, b"before");
    relay.proc.signal("-USR2");
    let _successor = KillOnDrop(relay.successor_pid());
    assert_eq!(
        agent.proc.wait_line("online "),
        agent.online,
        "the same port"
    );
    assert!(relay.proc.wait_exit().success(), "{}", relay.proc.stderr());
    // Only the new process is left to answer.
    assert_eq!(ask(&v, agent.public, b"after").await, b"after");
}

/// A running dnsmasq answering `*.tunnel.test` with 10.9.8.7, killed on drop.
struct Dnsmasq {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dnsmasq {
    /// Starts dnsmasq on a free loopback port, or says why not (`None`: skipped, unless
    /// `RINGTUNNEL_REQUIRE_DNSMASQ=1`, as in `.ci/run`).
    fn start() -> Option<Dnsmasq> {
        use std::process::{Command, Stdio};
        if !installed(
            "dnsmasq",
            "--version",
            "dnsmasq-base",
            "RINGTUNNEL_REQUIRE_DNSMASQ",
        ) {
            return None;
        }
        // A free port, bound and let go (dnsmasq cannot take port 0 and say which it got).
        // dnsmasq listens on it over UDP and TCP, and another test may take the number
        // meanwhile: a start that fails is retried on another port.
        for _ in 0..5 {
            let port = loop {
                let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let port = udp.local_addr().unwrap().port();
                if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                    break port;
                }
            };
            let mut cmd = Command::new("dnsmasq");
            cmd.args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--pid-file=",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                &format!("--port={port}"),
                "--address=/tunnel.test/10.9.8.7",
            ]);
            // As root it would switch to the user `nobody`, which may not exist in a container.
            if rustix::process::geteuid().is_root() {
                cmd.arg("--user=root");
            }
            let mut child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("starting dnsmasq");
            // Up once it takes TCP connections on the port (it binds UDP first).
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                if std::net::TcpStream::connect(addr).is_ok() {
                    return Some(Dnsmasq { child, addr });
                }
                if child.try_wait().ok().flatten().is_some() || std::time::Instant::now() > deadline
                {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("dnsmasq did not start on any of 5 free ports");
    }
}

/// A DNS query for `name`, type A, class IN, with id `id` and recursion desired.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

async fn a_dns_query_is_answered_through_the_tunnel(backend: Backend) {
    let Some(dns) = Dnsmasq::start() else {
        return;
    };
    let relay = Relay::spawn(backend, &[]);
    let agent = Agent::spawn(udp_agent_args(&relay, dns.addr, "dns"));
    let v = visitor().await;
    for (i, name) in ["www.tunnel.test", "a.b.tunnel.test"].iter().enumerate() {
        let id = 0x4a00 + i as u16;
        let answer = ask(&v, agent.public, &dns_query(id, name)).await;
        assert_eq!(&answer[..2], &id.to_be_bytes(), "the answer to this query");
        assert_eq!(answer[3] & 0x0f, 0, "no error: {answer:?}");
        assert_eq!(
            u16::from_be_bytes([answer[6], answer[7]]),
            1,
            "one answer record"
        );
        assert!(
            answer.ends_with(&[10, 9, 8, 7]),
            "{name} is 10.9.8.7: {answer:?}"
        );
    }
}

both_backends!(
    a_reload_shortens_the_flow_idle_time_of_a_running_service,
    the_first_datagram_after_online_is_answered_without_a_resend,
    a_udp_service_comes_back_on_its_port_after_an_upgrade,
    a_burst_of_equal_datagrams_is_echoed_intact,
    a_dns_query_is_answered_through_the_tunnel,
    a_dead_local_service_costs_no_channel_churn,
    datagrams_of_every_size_are_echoed_intact,
    flows_from_many_visitor_ports_are_kept_apart,
    idle_flows_expire_on_both_sides,
    a_tcp_and_a_udp_service_share_one_port_number,
    denied_addresses_get_no_flow,
    a_malformed_channel_item_closes_only_that_channel,
);
