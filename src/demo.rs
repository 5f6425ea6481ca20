//! `ringtunnel demo`: a relay, an agent and a tiny HTTP origin in one process, all on
//! loopback with real sockets, so a newcomer sees a working tunnel with one command.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::agent;
use crate::cli::DemoArgs;
use crate::config::{AgentConfig, Heartbeat, PortRange, RelayConfig, Secret, ServiceConfig};
use crate::protocol::auth::random_bytes;
use crate::relay;

/// Body the demo origin answers every request with.
pub const ORIGIN_BODY: &str = "hello from the ringtunnel demo origin, reached through the relay\n";

/// Serves a fixed HTTP response on `listener` forever.
async fn origin(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ORIGIN_BODY}",
                ORIGIN_BODY.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

/// Runs the demo until Ctrl-C (or, with `--once`, until one request went through).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let origin_listener = TcpListener::bind("127.0.0.1:0").await?;
    let origin_addr = origin_listener.local_addr()?;
    tokio::spawn(origin(origin_listener));

    let mut raw = [0u8; 16];
    random_bytes(&mut raw);
    let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let state_dir = std::env::temp_dir().join(format!("ringtunnel-demo-{}", std::process::id()));
    let relay = relay::start(RelayConfig {
        control: "127.0.0.1:0".parse()?,
        secret: Some(Secret::new(secret.clone())),
        service_secrets: Vec::new(),
        bind_addr: "127.0.0.1".parse()?,
        port_range: PortRange::default(),
        data_tls: args.data_tls.enabled(),
        state_dir: state_dir.clone(),
        cert: None,
        backend: Default::default(),
        workers: None,
        heartbeat: Heartbeat::default(),
        front: Default::default(),
        limits: Default::default(),
        access: Default::default(),
        admin: None,
        admin_token: None,
        drain_timeout: crate::config::DEFAULT_DRAIN_TIMEOUT,
        log: None,
        access_log: false,
        https: None,
        fleet: None,
    })
    .await
    .context("starting the demo relay")?;
    crate::say(&format!(
        "ready control={} fingerprint={}",
        relay.control_addr, relay.fingerprint
    ));

    let agent_cfg = AgentConfig {
        relay_host: "127.0.0.1".into(),
        relay_port: relay.control_addr.port(),
        secret: Some(Secret::new(secret)),
        relay_fingerprint: Some(relay.fingerprint),
        ca: None,
        proxy: None,
        services: vec![ServiceConfig::tcp("demo", origin_addr.to_string())],
        backend: Default::default(),
        workers: None,
        heartbeat: Heartbeat::default(),
        drain_timeout: crate::config::DEFAULT_DRAIN_TIMEOUT,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut agent_task = tokio::spawn(agent::run_with_events(
        agent_cfg,
        Some(tx),
        tokio::sync::watch::channel(0).1,
    ));
    let online = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .context("agent did not come online within 20 s")?
        .context("agent stopped before coming online")?;
    let public = SocketAddr::from(([127, 0, 0, 1], online.port));
    crate::say(&format!(
        "demo: origin {origin_addr} is published at http://{public}/"
    ));
    if !args.once {
        crate::say(&format!(
            "demo: try   curl http://{public}/   (Ctrl-C to stop)"
        ));
    }

    let result = if args.once {
        let answer = fetch(public).await?;
        crate::say(answer.trim_end());
        if !answer.ends_with(ORIGIN_BODY) {
            bail!("unexpected answer through the tunnel");
        }
        Ok(())
    } else {
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
            r = &mut agent_task => match r {
                Ok(Err(e)) => Err(anyhow::anyhow!("agent stopped: {e}")),
                _ => Ok(()),
            },
        }
    };
    // The agent goes first: stopping the relay under a live agent would make it log a lost
    // connection and start reconnecting on the way out.
    if !agent_task.is_finished() {
        agent_task.abort();
        let _ = (&mut agent_task).await;
    }
    relay.stop();
    let _ = std::fs::remove_dir_all(&state_dir);
    result
}

/// One HTTP GET through the tunnel; returns the whole response.
async fn fetch(public: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(public).await?;
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: {public}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .context("no answer through the tunnel within 10 s")??;
    Ok(out)
}
