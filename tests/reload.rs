//! Reloading settings while running. The relay (SIGHUP, `POST /api/reload`): limits change
//! for the next visitor, a rotated secret ends the sessions that used the old one, what needs
//! a restart is said so and left alone, and a broken file changes nothing. The agent
//! (SIGHUP): services added register, removed ones close at once, the rest and the visitors
//! in flight are untouched.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Whether a visitor to `public` gets its bytes echoed.
async fn served(public: SocketAddr) -> bool {
    matches!(roundtrip(public, b"ping").await, Ok(b) if b == b"ping")
}

/// A visitor that was let in and stays connected.
async fn holding(public: SocketAddr) -> TcpStream {
    let mut v = TcpStream::connect(public).await.unwrap();
    v.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    tokio::time::timeout(WAIT, v.read_exact(&mut b))
        .await
        .expect("the first visitor is served")
        .unwrap();
    v
}

/// Sends `POST /api/reload` to the admin endpoint; its status and body.
async fn post_reload(admin: SocketAddr) -> (u16, String) {
    http_request(
        admin,
        "POST /api/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await
}

async fn limits_change_live_and_a_broken_file_changes_nothing(backend: Backend) {
    let (_dir, path) = config_file("[limits]\nmax_visitors = 1\n");
    let mut relay = Relay::spawn(backend, &["--config", &path, "--admin", "127.0.0.1:0"]);
    let admin = relay.admin.unwrap();
    let agent = Agent::spawn(relay.agent_args(echo_origin().await, "web"));
    let _first = holding(agent.public).await;
    assert!(
        !served(agent.public).await,
        "a second visitor is over the limit"
    );

    std::fs::write(&path, "[limits]\nmax_visitors = 2\n").unwrap();
    relay.proc.signal("-HUP");
    relay
        .proc
        .wait_stderr("settings reloaded: changed=limits needs_restart=none sessions_ended=0");
    assert!(
        served(agent.public).await,
        "the new limit lets a second one in"
    );

    // Broken: refused with the parse error, over the API as in the log; nothing changes.
    std::fs::write(&path, "[limits]\nmax_visitors = \"many\"\n").unwrap();
    let (status, body) = post_reload(admin).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("reload refused, nothing changed") && body.contains("max_visitors"),
        "{body}"
    );
    relay.proc.wait_stderr("reload refused, nothing changed");
    let _second = holding(agent.public).await;
    assert!(!served(agent.public).await, "still 2 at most");

    // What needs a restart is said so, and the rest applies.
    std::fs::write(&path, "workers = 7\n[limits]\nmax_visitors = 3\n").unwrap();
    let (status, body) = post_reload(admin).await;
    assert_eq!(status, 200, "{body}");
    let done: serde_json::Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(done["changed"], serde_json::json!(["limits"]), "{body}");
    assert_eq!(
        done["needs_restart"],
        serde_json::json!(["workers"]),
        "{body}"
    );
    relay.proc.wait_stderr("workers changed: needs a restart");
    assert!(served(agent.public).await, "the limit is 3 now");
    assert!(relay.proc.is_running());
}

async fn a_rotated_secret_ends_the_sessions_of_the_old_one(backend: Backend) {
    let service = |secret: &str| format!("[[service]]\nname = \"vault\"\nsecret = \"{secret}\"\n");
    let (_dir, path) = config_file(&service("the-old-secret-of-vault-123"));
    let relay = Relay::spawn(backend, &["--config", &path]);
    let origin = echo_origin().await;
    let with_secret = |secret: &str| {
        let mut args = relay.agent_args(origin, "vault");
        let at = args.iter().position(|a| a == "--secret").unwrap() + 1;
        args[at] = secret.into();
        args
    };
    let mut old = Agent::spawn(with_secret("the-old-secret-of-vault-123"));
    assert!(served(old.public).await);

    std::fs::write(&path, service("the-new-secret-of-vault-456")).unwrap();
    relay.proc.signal("-HUP");
    relay
        .proc
        .wait_stderr("changed=service needs_restart=none sessions_ended=1");
    relay
        .proc
        .wait_stderr("agent session ended by the reload: the secret of service vault changed");
    // The old agent is told, tries again with its secret, and is refused for good.
    assert!(!old.proc.wait_exit().success());
    assert!(
        old.proc.stderr().contains("wrong secret"),
        "{}",
        old.proc.stderr()
    );
    // The new secret takes the service back, on the same port.
    let new = Agent::spawn(with_secret("the-new-secret-of-vault-456"));
    assert_eq!(new.public, old.public);
    assert!(served(new.public).await);
}

/// `agent.toml` for the relay `relay`, publishing `services` (name, local address) as tcp.
fn agent_toml(relay: &Relay, services: &[(&str, SocketAddr)]) -> String {
    let mut toml = format!(
        "relay = \"{}\"\nrelay_fingerprint = \"{}\"\nsecret = \"{SECRET}\"\nbackend = \"{}\"\n",
        relay.control,
        relay.fingerprint,
        relay.backend.flag()
    );
    for (name, local) in services {
        toml.push_str(&format!(
            "[[service]]\nname = \"{name}\"\nlocal = \"{local}\"\n"
        ));
    }
    toml
}

/// Waits for `n` `online` lines; the public address of each service by name.
fn online_lines(agent: &mut Proc, n: usize) -> std::collections::HashMap<String, SocketAddr> {
    (0..n)
        .map(|_| {
            let line = agent.wait_line("online ");
            let port: u16 = field(&line, "public")
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            (
                field(&line, "service"),
                SocketAddr::from(([127, 0, 0, 1], port)),
            )
        })
        .collect()
}

async fn an_agent_reload_adds_withdraws_and_leaves_the_rest_alone(backend: Backend) {
    let relay = Relay::spawn(backend, &[]);
    let origin = echo_origin().await;
    let (_dir, path) = config_file(&agent_toml(&relay, &[("keep", origin), ("drop", origin)]));
    let mut agent = Proc::spawn(&["agent".into(), "--config".into(), path.clone()]);
    let before = online_lines(&mut agent, 2);
    // A visitor of the service that stays is in flight across the reload.
    let mut v = holding(before["keep"]).await;

    std::fs::write(
        &path,
        agent_toml(&relay, &[("keep", origin), ("new", origin)]),
    )
    .unwrap();
    agent.signal("-HUP");
    agent.wait_stderr("settings reloaded: added=new removed=drop changed=none needs_restart=none");
    let after = online_lines(&mut agent, 2);
    relay
        .proc
        .wait_stderr("service closed: withdrawn by its agent");
    assert_eq!(
        after["keep"], before["keep"],
        "the unchanged service keeps its port"
    );
    assert!(served(after["new"]).await, "the added service is online");
    assert!(
        !served(before["drop"]).await,
        "the removed one is gone at once"
    );
    // The visitor in flight never noticed.
    v.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(WAIT, v.read_exact(&mut back))
        .await
        .expect("the visitor in flight is still served")
        .unwrap();
    assert_eq!(&back, b"still here");

    // A broken file changes nothing.
    std::fs::write(&path, "[[service]]\nname = 7\n").unwrap();
    agent.signal("-HUP");
    agent.wait_stderr("reload refused, nothing changed");
    assert!(agent.is_running());
    assert!(served(after["keep"]).await);
}

both_backends!(
    limits_change_live_and_a_broken_file_changes_nothing,
    a_rotated_secret_ends_the_sessions_of_the_old_one,
    an_agent_reload_adds_withdraws_and_leaves_the_rest_alone,
);
