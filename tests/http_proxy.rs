//! End-to-end: an agent that can reach the relay only through an HTTP proxy (`--proxy`, or
//! `HTTPS_PROXY`), through a real tinyproxy started on a free loopback port, on both
//! backends and with data connections plain and TLS. The proxy connects out from 127.0.0.5,
//! so the relay's view of the agent shows the proxy was used; a wrong proxy password and an
//! unreachable proxy are clear errors, and `NO_PROXY` exempts the relay. Without tinyproxy
//! on PATH the tests say so and pass, unless `RINGTUNNEL_REQUIRE_TINYPROXY=1` (as in
//! `.ci/run`, which installs it).

mod common;

use std::net::SocketAddr;

use common::*;

/// The proxy's user and password (tinyproxy `BasicAuth`).
const PROXY_USER: &str = "agent";
const PROXY_PASSWORD: &str = "proxy-pass";

/// A running tinyproxy, killed on drop.
struct Tinyproxy {
    proc: Proc,
    addr: SocketAddr,
    log: std::path::PathBuf,
    _dir: TempDir,
}

impl Tinyproxy {
    /// Starts tinyproxy on a free loopback port (requiring `PROXY_USER:PROXY_PASSWORD`,
    /// connecting out from 127.0.0.5), or `None` when it is not installed.
    fn start() -> Option<Tinyproxy> {
        if !installed(
            "tinyproxy",
            "-v",
            "tinyproxy",
            "RINGTUNNEL_REQUIRE_TINYPROXY",
        ) {
            return None;
        }
        let dir = TempDir::new("tinyproxy");
        // tinyproxy cannot take port 0 and say which it got.
        let port = free_port();
        let log = dir.0.join("tinyproxy.log");
        let conf = dir.0.join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nBind 127.0.0.5\nTimeout 600\nMaxClients 100\n\
                 Allow 127.0.0.1\nBasicAuth {PROXY_USER} {PROXY_PASSWORD}\nLogLevel Connect\n\
                 LogFile \"{}\"\nPidFile \"{}\"\n",
                log.display(),
                dir.0.join("tinyproxy.pid").display()
            ),
        )
        .unwrap();
        let args = ["-d".into(), "-c".into(), conf.display().to_string()];
        let mut proc = Proc::spawn_program(std::path::Path::new("tinyproxy"), &args, &[], None);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_listening(&mut proc, addr, "tinyproxy");
        Some(Tinyproxy {
            proc,
            addr,
            log,
            _dir: dir,
        })
    }

    fn url(&self, password: &str) -> String {
        format!("http://{PROXY_USER}:{password}@{}", self.addr)
    }

    /// How many tunnels the proxy opened to `to`.
    fn tunnels_to(&self, to: SocketAddr) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("CONNECT") && l.contains(&to.to_string()))
            .count()
    }
}

/// The addresses the relay saw its agents connect from (`GET /api/agents`).
async fn agent_addresses(admin: SocketAddr) -> Vec<String> {
    let (status, body) = http_request(
        admin,
        "GET /api/agents HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let agents: serde_json::Value = serde_json::from_str(&body).expect(&body);
    agents
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["address"].as_str().unwrap().to_string())
        .collect()
}

async fn through_the_proxy(backend: Backend, data_tls: &str) {
    let Some(proxy) = Tinyproxy::start() else {
        return;
    };
    let relay = Relay::spawn(backend, &["--admin", "127.0.0.1:0", "--data-tls", data_tls]);
    let mut args = relay.agent_args(echo_origin().await, "echo");
    args.extend(["--proxy".into(), proxy.url(PROXY_PASSWORD)]);
    let agent = Agent::spawn(args);
    for _ in 0..5 {
        assert_echo(agent.public).await;
    }
    let seen = agent_addresses(relay.admin.unwrap()).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].starts_with("127.0.0.5:"),
        "the relay sees the proxy, not the agent: {seen:?}"
    );
    // The control connection and at least one data connection went through it.
    assert!(
        proxy.tunnels_to(relay.control) >= 2,
        "{}",
        std::fs::read_to_string(&proxy.log).unwrap_or_default()
    );
    drop(proxy.proc);
}

/// Through the proxy to the relay's shared TLS port (a network where only a proxy and the
/// relay's 443 are reachable).
async fn through_the_proxy_to_the_tls_port(backend: Backend) {
    let Some(proxy) = Tinyproxy::start() else {
        return;
    };
    let relay = Relay::spawn(
        backend,
        &["--tls", "127.0.0.1:0", "--domain", "example.test"],
    );
    let tls_port = relay.tls.unwrap();
    let mut args = relay.agent_args(echo_origin().await, "echo");
    let at = args.iter().position(|a| a == "--relay").unwrap() + 1;
    args[at] = tls_port.to_string();
    args.extend(["--proxy".into(), proxy.url(PROXY_PASSWORD)]);
    let agent = Agent::spawn(args);
    for _ in 0..5 {
        assert_echo(agent.public).await;
    }
    assert!(
        proxy.tunnels_to(tls_port) >= 2,
        "{}",
        std::fs::read_to_string(&proxy.log).unwrap_or_default()
    );
}

async fn through_the_proxy_plain(backend: Backend) {
    through_the_proxy(backend, "off").await;
}

async fn through_the_proxy_tls(backend: Backend) {
    through_the_proxy(backend, "on").await;
}

/// A wrong proxy password: the agent says the proxy refused, with the status and the fix.
async fn a_wrong_proxy_password_is_a_clear_error(backend: Backend) {
    let Some(proxy) = Tinyproxy::start() else {
        return;
    };
    let relay = Relay::spawn(backend, &[]);
    let mut args = relay.agent_args(echo_origin().await, "echo");
    args.extend(["--proxy".into(), proxy.url("wrong")]);
    let agent = Proc::spawn(&args);
    // tinyproxy answers 401 (the standard says 407); the agent names the fix either way.
    agent.wait_stderr("the proxy refused the tunnel to the relay: HTTP/1.0 401");
    assert!(
        agent.stderr().contains("USER:PASSWORD@"),
        "{}",
        agent.stderr()
    );
}

/// `HTTPS_PROXY` is used when `--proxy` is not given, and `NO_PROXY` exempts the relay.
async fn https_proxy_from_the_environment_and_no_proxy(backend: Backend) {
    let relay = Relay::spawn(backend, &[]);
    let origin = echo_origin().await;
    // Nothing listens on port 1: through it the relay is unreachable, and the log says why.
    let dead = "http://127.0.0.1:1";
    let agent = Proc::spawn_env(&relay.agent_args(origin, "echo"), &[("HTTPS_PROXY", dead)]);
    agent.wait_stderr("proxy http://127.0.0.1:1 unreachable");
    drop(agent);
    let exempt = Proc::spawn_env(
        &relay.agent_args(origin, "echo"),
        &[("HTTPS_PROXY", dead), ("NO_PROXY", "localhost,127.0.0.1")],
    );
    let agent = Agent::from_proc(exempt);
    assert_echo(agent.public).await;
}

both_backends!(
    through_the_proxy_to_the_tls_port,
    through_the_proxy_plain,
    through_the_proxy_tls,
    a_wrong_proxy_password_is_a_clear_error,
    https_proxy_from_the_environment_and_no_proxy,
);
