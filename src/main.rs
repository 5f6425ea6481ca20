//! The `ringtunnel` binary: parses the command line and runs a relay, an agent or the demo.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use ringtunnel::cli::{Cli, Command};
use ringtunnel::{agent, demo, relay, say};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter: Targets = cli.log.parse().unwrap_or_else(|_| {
        eprintln!("warning: invalid --log filter {:?}, using info", cli.log);
        Targets::new().with_default(tracing::Level::INFO)
    });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(filter)
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all().thread_name("ringtunnel-tokio");
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.build().context("starting the runtime")
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Relay(args) => {
            let cfg = args.into_config()?;
            let rt = runtime(cfg.workers)?;
            rt.block_on(async {
                let data_tls = if cfg.data_tls { "on" } else { "off" };
                let relay = relay::start(cfg).await?;
                if relay.generated_cert {
                    tracing::info!("generated a self-signed certificate");
                }
                tracing::info!(
                    "agents connect with: ringtunnel agent --relay <this-host>:{} --relay-fingerprint {} --secret-file <file with the secret> --local 127.0.0.1:8000",
                    relay.control_addr.port(),
                    relay.fingerprint
                );
                let mut shared_ports = String::new();
                if let Some(a) = relay.http_addr {
                    shared_ports.push_str(&format!(" http={a}"));
                }
                if let Some(a) = relay.tls_addr {
                    shared_ports.push_str(&format!(" tls={a}"));
                }
                if let Some(a) = relay.admin_addr {
                    shared_ports.push_str(&format!(" admin={a}"));
                }
                say(&format!(
                    "ready control={} fingerprint={} backend={} data_tls={data_tls}{shared_ports}",
                    relay.control_addr, relay.fingerprint, relay.backend
                ));
                let metrics = relay.metrics.clone();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
                    _ = relay.wait() => {}
                }
                let counters: Vec<String> = metrics
                    .snapshot()
                    .iter()
                    .filter(|(_, v)| *v > 0)
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                tracing::info!("relay stopped: {}", counters.join(" "));
                Ok(())
            })
        }
        Command::Agent(args) => {
            let cfg = args.into_config()?;
            let rt = runtime(None)?;
            rt.block_on(async {
                tokio::select! {
                    r = agent::run(cfg) => r.map_err(anyhow::Error::from),
                    _ = tokio::signal::ctrl_c() => Ok(()),
                }
            })
        }
        Command::Demo(args) => runtime(None)?.block_on(demo::run(args)),
    }
}
