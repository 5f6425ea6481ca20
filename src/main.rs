//! The `ringtunnel` binary: parses the command line and runs a relay, an agent or the demo.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use ringtunnel::cli::{Cli, Command};
use ringtunnel::net::handover::Channel;
use ringtunnel::net::sdnotify;
use ringtunnel::{agent, demo, logging, relay, say};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(
        cli.log.as_deref().filter(|f| !f.is_empty()),
        cli.log_format,
        std::io::stderr().is_terminal(),
    );
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
            // Where this program is now, for an upgrade (the file may be replaced later).
            let exe = std::env::current_exe().context("finding this program's path")?;
            let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            // Started by a relay handing its sockets over (an upgrade)?
            let handed = Channel::from_env()
                .transpose()
                .context("the handover socket from the relay being upgraded")?;
            let cfg = match args.clone().into_config() {
                Ok(cfg) => cfg,
                Err(e) => {
                    // Read what was sent first: closing a unix socket with unread data
                    // resets it, and the answer would be lost with it.
                    if let Some(ch) = &handed {
                        let _ = ch.receive();
                    }
                    tell(&handed, Err(e.to_string()));
                    return Err(e.into());
                }
            };
            logging::configure(cfg.log.as_deref(), cfg.access_log)
                .context("the log filter in the config file")?;
            let rt = runtime(cfg.workers)?;
            rt.block_on(async {
                let data_tls = if cfg.data_tls { "on" } else { "off" };
                let mut signals = Signals::new()?;
                let load: relay::Loader = Box::new(move || args.clone().into_config());
                let started = match &handed {
                    None => relay::start_reloadable(cfg, load, relay::Inherited::default())
                        .await
                        .map_err(anyhow::Error::from),
                    Some(ch) => match relay::Inherited::receive(ch) {
                        Ok(inherited) => relay::start_reloadable(cfg, load, inherited)
                            .await
                            .map_err(anyhow::Error::from),
                        Err(e) => Err(e.into()),
                    },
                };
                tell(&handed, started.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")));
                let mut relay = started?;
                if handed.is_some() {
                    tracing::info!("took over every port from the relay being upgraded");
                }
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
                // systemd (Type=notify): serving now; after an upgrade, this is the main process.
                let ready = match handed {
                    Some(_) => format!("MAINPID={}\nREADY=1", std::process::id()),
                    None => "READY=1".to_string(),
                };
                if let Err(e) = sdnotify::notify(&ready) {
                    tracing::warn!("could not tell systemd the relay is ready: {e}");
                }
                let metrics = relay.metrics.clone();
                let signal = loop {
                    tokio::select! {
                        got = signals.next() => match got {
                            Signal::Stop(name) => break name,
                            // Logged by the reload itself, done or refused.
                            Signal::Reload => { let _ = relay.reload(); }
                            Signal::Upgrade => match relay.upgrade(exe.clone(), argv.clone()).await {
                                Ok(pid) => {
                                    relay.let_go();
                                    tracing::info!(pid, "upgrade: the new process took over every port");
                                    break "SIGUSR2";
                                }
                                Err(e) => tracing::error!("upgrade failed, this relay carries on: {e}"),
                            },
                        },
                        _ = relay.wait() => break "none",
                    }
                };
                let drain_timeout = relay.settings().drain_timeout;
                if signal != "SIGUSR2" {
                    // Not after an upgrade: the new process is the service now.
                    let _ = sdnotify::notify("STOPPING=1");
                }
                relay.close_doors();
                let in_flight = relay.visitors_active();
                tracing::info!(
                    signal,
                    visitors = in_flight,
                    timeout_secs = drain_timeout.as_secs(),
                    "draining: no new visitors or agents, those in flight may finish (a second signal stops at once)"
                );
                let drained = tokio::select! {
                    d = relay.drain(drain_timeout) => d,
                    _ = signals.next_stop() => {
                        let cut = relay.visitors_active();
                        relay::Drained { finished: in_flight.saturating_sub(cut), cut }
                    }
                };
                relay.stop();
                let mut counters: Vec<String> = vec![
                    format!("drained={}", drained.finished),
                    format!("cut={}", drained.cut),
                ];
                counters.extend(metrics
                    .snapshot()
                    .iter()
                    .filter(|(_, _, v)| *v > 0)
                    .map(|(k, _, v)| format!("{k}={v}")));
                tracing::info!("relay stopped: {}", counters.join(" "));
                Ok(())
            })
        }
        Command::Agent(args) => {
            let cfg = args.clone().into_config()?;
            let rt = runtime(None)?;
            rt.block_on(async {
                let mut signals = Signals::new()?;
                let (stop, stopping) = tokio::sync::watch::channel(0u32);
                let (reload, reloads) = tokio::sync::watch::channel(0u32);
                let mut runs = Vec::new();
                for i in 0..args.relay_count()? {
                    let cfg = match i {
                        0 => cfg.clone(),
                        _ => args.clone().into_config_for(i)?,
                    };
                    let args = args.clone();
                    let load: agent::reload::AgentLoader =
                        Box::new(move || args.clone().into_config_for(i));
                    let reload_with = agent::reload::Reload {
                        signal: reloads.clone(),
                        load,
                    };
                    runs.push((cfg, reload_with));
                }
                let run = agent::run_relays(runs, stopping);
                tokio::pin!(run);
                let drained = loop {
                    tokio::select! {
                        r = &mut run => break r?,
                        signal = signals.next() => match signal {
                            Signal::Stop(name) => {
                                tracing::debug!(signal = name, "stop signal");
                                stop.send_modify(|n| *n += 1);
                            }
                            Signal::Reload => reload.send_modify(|n| *n += 1),
                            Signal::Upgrade => tracing::warn!("SIGUSR2 ignored: upgrading is for the relay"),
                        },
                    }
                };
                tracing::info!(
                    "agent stopped: drained={} cut={}",
                    drained.finished,
                    drained.cut
                );
                Ok(())
            })
        }
        Command::Demo(args) => runtime(None)?.block_on(demo::run(args)),
        Command::Completions(args) => {
            let mut text = Vec::new();
            ringtunnel::cli::completions(args.shell, &mut text);
            print_all(&text)
        }
        Command::Man(args) => {
            let mut text = Vec::new();
            ringtunnel::cli::man_pages(args.dir.as_deref(), &mut text).with_context(
                || match &args.dir {
                    Some(d) => format!("writing the man pages into {}", d.display()),
                    None => "writing the man page".to_string(),
                },
            )?;
            print_all(&text)
        }
        Command::HashPassword => {
            let password = read_password().context("reading the password")?;
            if password.is_empty() {
                anyhow::bail!("no password given: type it and press Enter, or pipe it in");
            }
            let hash = ringtunnel::access::login::hash_password(password.as_bytes())?;
            println!("{hash}");
            Ok(())
        }
        Command::Status(args) => {
            use ringtunnel::admin::status;
            let token = args.admin_token.as_ref();
            let out = runtime(Some(1))?.block_on(async {
                if args.health {
                    return status::health(args.admin, token).await;
                }
                let mut out = String::new();
                if let Some(name) = &args.drain {
                    out += &status::drain(args.admin, token, name, true).await?;
                }
                if let Some(name) = &args.resume {
                    out += &status::drain(args.admin, token, name, false).await?;
                }
                out += &status::render(args.admin, token).await?;
                Ok::<_, status::StatusError>(out)
            })?;
            print!("{out}");
            Ok(())
        }
    }
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an error.
fn print_all(text: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().write_all(text) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

/// A signal the process acts on.
enum Signal {
    /// SIGTERM or SIGINT (named): drain, or end a drain.
    Stop(&'static str),
    /// SIGHUP: re-read the settings.
    Reload,
    /// SIGUSR2: hand every port to a new process started from the binary on disk.
    Upgrade,
}

/// Tells the relay being upgraded (if this process is its successor) whether it took over.
fn tell(handed: &Option<Channel>, status: Result<(), String>) {
    if let Some(ch) = handed {
        if let Err(e) = ch.send_status(status) {
            tracing::warn!("could not answer the relay being upgraded: {e}");
        }
    }
}

/// The signals a relay or an agent acts on: SIGTERM (systemd, docker, kill) and SIGINT
/// (Ctrl-C) stop it (the first starts a drain, the second ends it); SIGHUP, which would
/// otherwise kill the process, reloads the settings; SIGUSR2 upgrades a relay.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("handling SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("handling SIGINT")?,
            hup: signal(SignalKind::hangup()).context("handling SIGHUP")?,
            usr2: signal(SignalKind::user_defined2()).context("handling SIGUSR2")?,
        })
    }

    /// The next signal to arrive.
    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop("SIGTERM"),
            _ = self.int.recv() => Signal::Stop("SIGINT"),
            _ = self.hup.recv() => Signal::Reload,
            _ = self.usr2.recv() => Signal::Upgrade,
        }
    }

    /// The next stop signal to arrive, by name; SIGHUP meanwhile is logged and ignored.
    async fn next_stop(&mut self) -> &'static str {
        loop {
            match self.next().await {
                Signal::Stop(name) => return name,
                Signal::Reload => tracing::warn!(
                    "SIGHUP ignored: settings are not reloaded now; restart to apply changes (SIGTERM drains first)"
                ),
                Signal::Upgrade => tracing::warn!("SIGUSR2 ignored: already stopping"),
            }
        }
    }
}

/// The password for `hash-password`: the first line of stdin. At a terminal it is asked for
/// twice, without echo, and the two must match.
fn read_password() -> anyhow::Result<String> {
    use std::io::Write as _;
    let line = || -> std::io::Result<String> {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        let trimmed = line.strip_suffix('\n').unwrap_or(&line);
        Ok(trimmed.strip_suffix('\r').unwrap_or(trimmed).to_string())
    };
    if !std::io::stdin().is_terminal() {
        return Ok(line()?);
    }
    let _quiet = NoEcho::on_stdin()?;
    let ask = |prompt: &str| -> std::io::Result<String> {
        eprint!("{prompt}");
        std::io::stderr().flush()?;
        let answer = line();
        eprintln!();
        answer
    };
    let first = ask("Password: ")?;
    if ask("Again: ")? != first {
        anyhow::bail!("the two passwords differ");
    }
    Ok(first)
}

/// The terminal on stdin with its echo off, until dropped.
struct NoEcho(libc::termios);

impl NoEcho {
    fn on_stdin() -> std::io::Result<NoEcho> {
        // SAFETY: termios is plain data, filled by tcgetattr before use.
        let mut old: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 and a valid termios pointer.
        if unsafe { libc::tcgetattr(0, &mut old) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut quiet = old;
        quiet.c_lflag &= !libc::ECHO;
        // SAFETY: as above.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &quiet) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(NoEcho(old))
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `on_stdin`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}
