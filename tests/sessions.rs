//! Control-session behaviour end to end: heartbeats, per-service secrets, port conflicts,
//! many services per agent, takeover.

mod common;

use common::*;
use tokio::io::AsyncReadExt;

fn write(dir: &TempDir, name: &str, text: &str) -> String {
    let p = dir.0.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

async fn relay_drops_a_silent_agent(backend: Backend) {
    let relay = Relay::spawn(backend, &["--heartbeat", "1", "--heartbeat-timeout", "2"]);
    let (ctl, _port, _tickets) = fake_agent(&relay, "mute").await;
    // Never answer: the relay must give up on us and close the connection.
    let (mut s, _) = ctl.into_parts();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(WAIT, s.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "relay closed the silent session");
    relay.proc.wait_stderr("silent");
}

async fn agent_notices_a_frozen_relay_and_comes_back(backend: Backend) {
    let origin = echo_origin().await;
    let dir = TempDir::new("freeze");
    let relay = Relay::spawn(backend, &[]);
    // Interval from the file, timeout from the flag: the two merge.
    let cfg = write(&dir, "agent.toml", "heartbeat_interval_secs = 1\n");
    let mut args = relay.agent_args(origin, "frozen");
    args.extend(["--config".to_string(), cfg]);
    args.extend(["--heartbeat-timeout".to_string(), "3".to_string()]);
    let mut agent = Agent::spawn(args);
    relay.proc.signal("-STOP");
    agent.proc.wait_stderr("relay silent");
    relay.proc.signal("-CONT");
    let line = agent.proc.wait_line("online ");
    assert_eq!(field(&line, "public"), agent.public.to_string());
    assert_echo(agent.public).await;
}

async fn per_service_secret_is_required_for_that_service(backend: Backend) {
    let origin = echo_origin().await;
    let dir = TempDir::new("svcsecret");
    let cfg = write(
        &dir,
        "relay.toml",
        "[[service]]\nname = \"vault\"\nsecret = \"vault-secret\"\n",
    );
    let relay = Relay::spawn(backend, &["--config", &cfg]);

    // The relay-wide secret does not open a service that has its own.
    let mut denied = Proc::spawn(&relay.agent_args(origin, "vault"));
    assert!(!denied.wait_exit().success());
    assert!(
        denied.stderr().contains("wrong secret"),
        "{}",
        denied.stderr()
    );

    let acfg = write(
        &dir,
        "agent.toml",
        &format!(
            "relay = \"{}\"\nrelay_fingerprint = \"{}\"\n[[service]]\nname = \"vault\"\nlocal = \"{origin}\"\nsecret = \"vault-secret\"\n",
            relay.control, relay.fingerprint
        ),
    );
    let agent = Agent::spawn(vec!["agent".into(), "--config".into(), acfg]);
    assert_echo(agent.public).await;
}

async fn taken_port_is_a_clear_error(backend: Backend) {
    let origin = echo_origin().await;
    let relay = Relay::spawn(backend, &["--port-range", "20000-29999"]);
    let first = Agent::spawn(relay.agent_args(origin, "first"));
    let port = first.public.port().to_string();
    let mut args = relay.agent_args(origin, "second");
    args.extend(["--remote-port".to_string(), port.clone()]);
    let mut second = Proc::spawn(&args);
    assert!(!second.wait_exit().success());
    let err = second.stderr();
    assert!(
        err.contains(&format!("port {port} is already used by service first")),
        "{err}"
    );
    assert_echo(first.public).await;
}

async fn one_refused_service_leaves_the_others_online(backend: Backend) {
    let origin = echo_origin().await;
    let dir = TempDir::new("partial");
    let relay = Relay::spawn(backend, &["--port-range", "20000-29999"]);
    let cfg = write(
        &dir,
        "agent.toml",
        &format!(
            "relay = \"{}\"\nrelay_fingerprint = \"{}\"\nsecret = \"{SECRET}\"\n\
             [[service]]\nname = \"fine\"\nlocal = \"{origin}\"\n\
             [[service]]\nname = \"outside\"\nlocal = \"{origin}\"\nremote_port = 19999\n",
            relay.control, relay.fingerprint
        ),
    );
    let mut agent = Agent::spawn(vec!["agent".into(), "--config".into(), cfg]);
    agent.proc.wait_stderr("relay refused service");
    assert!(
        agent.proc.stderr().contains("outside"),
        "{}",
        agent.proc.stderr()
    );
    assert!(
        agent.proc.is_running(),
        "the other service keeps the agent up"
    );
    assert_echo(agent.public).await;
}

async fn many_services_on_one_agent(backend: Backend) {
    let a = echo_origin().await;
    let b = answer_after_eof_origin(1000).await;
    let dir = TempDir::new("multi");
    let relay = Relay::spawn(backend, &[]);
    let cfg = write(
        &dir,
        "agent.toml",
        &format!(
            "relay = \"{}\"\nsecret = \"{SECRET}\"\nrelay_fingerprint = \"{}\"\n\
             [[service]]\nname = \"echo\"\nlocal = \"{a}\"\n\
             [[service]]\nname = \"answer\"\nlocal = \"{b}\"\npool = 1\n",
            relay.control, relay.fingerprint
        ),
    );
    let mut agent = Proc::spawn(&["agent".into(), "--config".into(), cfg]);
    let mut public = std::collections::HashMap::new();
    for _ in 0..2 {
        let line = agent.wait_line("online ");
        public.insert(
            field(&line, "service"),
            field(&line, "public")
                .parse::<std::net::SocketAddr>()
                .unwrap(),
        );
    }
    assert_echo(public["echo"]).await;
    let got = roundtrip(public["answer"], b"q").await.unwrap();
    assert_eq!(got, reply_for(b"q", 1000));
}

async fn second_agent_takes_over_and_first_is_told(backend: Backend) {
    let old_origin = echo_origin().await;
    let new_origin = answer_after_eof_origin(10).await;
    let relay = Relay::spawn(backend, &[]);
    let mut first = Agent::spawn(relay.agent_args(old_origin, "shared"));
    let second = Agent::spawn(relay.agent_args(new_origin, "shared"));
    assert_eq!(first.public, second.public, "takeover keeps the port");
    assert!(!first.proc.wait_exit().success());
    assert!(
        first.proc.stderr().contains("taken over"),
        "{}",
        first.proc.stderr()
    );
    let got = roundtrip(second.public, b"x").await.unwrap();
    assert_eq!(got, reply_for(b"x", 10), "visitors now reach the new agent");
}

both_backends!(
    one_refused_service_leaves_the_others_online,
    relay_drops_a_silent_agent,
    agent_notices_a_frozen_relay_and_comes_back,
    per_service_secret_is_required_for_that_service,
    taken_port_is_a_clear_error,
    many_services_on_one_agent,
    second_agent_takes_over_and_first_is_told,
);
