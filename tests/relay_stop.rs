//! In process: `RelayHandle::stop` ends every task the relay started, on both backends. After
//! it, the control port, the shared HTTP port, the admin endpoint and a published service's
//! own port all refuse connections (none is kept open by a task that outlived the relay).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use ringtunnel::config::{
    AgentConfig, BackendKind, FrontConfig, Heartbeat, PortRange, RelayConfig, Secret, ServiceConfig,
};
use tokio::sync::mpsc;

fn relay_config(backend: Backend, state: &TempDir) -> RelayConfig {
    let front = FrontConfig {
        http: Some("127.0.0.1:0".parse().unwrap()),
        domain: Some("stop.test".into()),
        ..Default::default()
    };
    RelayConfig {
        control: "127.0.0.1:0".parse().unwrap(),
        secret: Some(Secret::new(SECRET)),
        service_secrets: Vec::new(),
        bind_addr: "127.0.0.1".parse().unwrap(),
        port_range: PortRange::default(),
        data_tls: backend == Backend::Tokio,
        state_dir: state.0.clone(),
        cert: None,
        backend: match backend {
            Backend::Tokio => BackendKind::Tokio,
            Backend::Uring => BackendKind::Uring,
        },
        workers: Some(2),
        heartbeat: Heartbeat::default(),
        front,
        limits: Default::default(),
        access: Default::default(),
        admin: Some("127.0.0.1:0".parse().unwrap()),
        admin_token: None,
        drain_timeout: ringtunnel::config::DEFAULT_DRAIN_TIMEOUT,
        log: None,
        access_log: false,
        https: None,
        fleet: None,
    }
}

/// Waits (bounded) until nothing accepts on `addr`. A connect that times out (a full accept
/// queue nobody drains) counts as still listening.
async fn until_refused(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + WAIT;
    let attempt = Duration::from_secs(1);
    while !matches!(
        tokio::time::timeout(attempt, tokio::net::TcpStream::connect(addr)).await,
        Ok(Err(_))
    ) {
        assert!(
            Instant::now() < deadline,
            "{what} {addr} still accepts after stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stop_closes_every_port(backend: Backend) {
    let state = TempDir::new("stop");
    let relay = ringtunnel::relay::start(relay_config(backend, &state))
        .await
        .unwrap();
    let origin = echo_origin().await;
    let agent_cfg = AgentConfig {
        relay_host: "127.0.0.1".into(),
        relay_port: relay.control_addr.port(),
        secret: Some(Secret::new(SECRET)),
        relay_fingerprint: Some(relay.fingerprint),
        ca: None,
        proxy: None,
        services: vec![ServiceConfig::tcp("stopper", origin.to_string())],
        backend: BackendKind::Tokio,
        workers: None,
        heartbeat: Heartbeat::default(),
        drain_timeout: ringtunnel::config::DEFAULT_DRAIN_TIMEOUT,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let agent = tokio::spawn(ringtunnel::agent::run_with_events(
        agent_cfg,
        Some(tx),
        tokio::sync::watch::channel(0).1,
    ));
    let online = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    let public = SocketAddr::from(([127, 0, 0, 1], online.port));
    assert_echo(public).await;

    let ports = [
        (relay.control_addr, "control port"),
        (relay.http_addr.unwrap(), "shared HTTP port"),
        (relay.admin_addr.unwrap(), "admin endpoint"),
        (public, "service port"),
    ];
    relay.stop();
    for (addr, what) in ports {
        until_refused(addr, what).await;
    }
    agent.abort();
}

both_backends!(stop_closes_every_port);
