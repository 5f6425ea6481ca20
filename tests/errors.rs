//! Start-up errors a person meets: each names the flag or file that was wrong, says the
//! cause once, and says what to do where there is something to do.

mod common;

use common::*;

/// Relay arguments with a fresh state directory (kept alive by the returned guard).
fn relay_args(extra: &[&str]) -> (TempDir, Vec<String>) {
    let state = TempDir::new("errors");
    let mut args = relay_command(&state.0.join("state"), &["--backend", "tokio"]);
    args.extend(extra.iter().map(|s| s.to_string()));
    (state, args)
}

fn fails_with(args: &[String]) -> String {
    let mut p = Proc::spawn(args);
    assert!(!p.wait_exit().success(), "{}", p.stderr());
    p.stderr()
}

#[test]
fn a_port_in_use_names_the_flag_and_the_cause_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for flag in ["--http", "--admin"] {
        let (_state, args) = relay_args(&[flag, &addr]);
        let err = fails_with(&args);
        assert!(
            err.contains(&format!("cannot listen on {flag} {addr}: ")),
            "{err}"
        );
        assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
        assert!(err.contains("ss -ltnp"), "{err}");
    }
}

#[test]
fn a_missing_config_file_is_named_once() {
    let (_state, args) = relay_args(&["--config", "/nonexistent/relay.toml"]);
    let err = fails_with(&args);
    assert!(err.contains("reading /nonexistent/relay.toml: "), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn a_config_file_error_shows_the_line_it_is_on() {
    let (_dir, path) =
        config_file("secret = \"long enough to pass muster\"\n[limits]\nmax_visitors = \"many\"\n");
    let (_state, args) = relay_args(&["--config", &path]);
    let err = fails_with(&args);
    assert!(
        err.contains(&format!(
            "parsing {path}: TOML parse error at line 3, column 16\n"
        )),
        "{err}"
    );
    // The parser's picture of the line stays a picture: the line, then the mark under it.
    assert!(err.contains("\n3 | max_visitors = \"many\"\n"), "{err}");
    assert!(err.contains("^^^^^^"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_come_from_files_and_weak_ones_are_called_out() {
    let dir = TempDir::new("secret-file");
    let file = dir.0.join("secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let file = file.display().to_string();
    let state = dir.0.join("state").display().to_string();
    let mut relay = Proc::spawn(&[
        "relay".into(),
        "--control".into(),
        "127.0.0.1:0".into(),
        "--secret-file".into(),
        file.clone(),
        "--backend".into(),
        "tokio".into(),
        "--bind-addr".into(),
        "127.0.0.1".into(),
        "--state-dir".into(),
        state,
    ]);
    let ready = relay.wait_line("ready ");
    let origin = echo_origin().await;
    let agent = Agent::spawn(vec![
        "agent".into(),
        "--relay".into(),
        field(&ready, "control"),
        "--relay-fingerprint".into(),
        field(&ready, "fingerprint"),
        "--secret-file".into(),
        file,
        "--local".into(),
        origin.to_string(),
        "--backend".into(),
        "tokio".into(),
    ]);
    assert_echo(agent.public).await;
    assert!(!relay.stderr().contains("weak"), "{}", relay.stderr());

    // A short or placeholder secret still runs, with a warning that says why.
    for (secret, why) in [("x", "it is 1 bytes"), ("change-me", "placeholder")] {
        let (_state, mut args) = relay_args(&[]);
        let i = args.iter().position(|a| a == SECRET).unwrap();
        args[i] = secret.into();
        let mut weak = Proc::spawn(&args);
        weak.wait_line("ready ");
        weak.wait_stderr("the relay's secret is weak: ");
        assert!(weak.stderr().contains(why), "{}", weak.stderr());
    }
    // An empty secret file is refused.
    let empty = dir.0.join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let (_state, mut args) = relay_args(&[]);
    let i = args.iter().position(|a| a == "--secret").unwrap();
    args.splice(
        i..i + 2,
        ["--secret-file".into(), empty.display().to_string()],
    );
    let err = fails_with(&args);
    assert!(err.contains("is empty"), "{err}");
}

#[test]
fn help_and_version_teach() {
    let mut v = Proc::spawn(&["--version".into()]);
    let line = v.wait_line("ringtunnel ");
    assert!(
        line.contains("commit ") && line.contains("backends: uring"),
        "{line}"
    );
    // Without a config file, --relay and --local are required, and clap says so.
    let err = fails_with(&["agent".into()]);
    assert!(err.contains("--relay") && err.contains("--local"), "{err}");
    let mut help = Proc::spawn(&["relay".into(), "--help".into()]);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.starts_with("Examples:")) {
        seen.push(help.wait_line(""));
    }
    let text = seen.join("\n");
    assert!(text.contains("[default: 0.0.0.0:7843]"), "{text}");
}

#[test]
fn an_agent_says_at_once_when_its_local_service_does_not_answer() {
    let relay = Relay::spawn(Backend::Tokio, &[]);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    // It still comes online (the service may start after it), and says what is wrong.
    let agent = Agent::spawn(relay.agent_args(addr, "late"));
    agent
        .proc
        .wait_stderr(&format!("local service {addr} is not reachable now"));
}

#[test]
fn fleet_settings_that_cannot_work_are_refused_at_start() {
    for (flags, says) in [
        (
            &["--registry", "http://127.0.0.1:2379"][..],
            "expected etcd://HOST:PORT",
        ),
        (
            &[
                "--registry",
                "etcd://127.0.0.1:2379",
                "--relay-id",
                "no spaces",
            ][..],
            "relay id",
        ),
        (
            &["--registry", "etcd://127.0.0.1:2379", "--registry-ttl", "1"][..],
            "registry TTL must be 2 to 300 seconds",
        ),
        (
            &[
                "--registry",
                "etcd://127.0.0.1:2379",
                "--registry-prefix",
                "fleet",
            ][..],
            "must start and end with /",
        ),
        (
            &[
                "--registry",
                "etcd://127.0.0.1:2379",
                "--registry-ca",
                "/etc/ssl/certs/ca-certificates.crt",
            ][..],
            "are for an etcds:// registry (TLS)",
        ),
        (
            &[
                "--registry",
                "etcds://127.0.0.1:2379",
                "--registry-user",
                "relay",
            ][..],
            "--registry-user needs a password",
        ),
        (
            &[
                "--registry",
                "etcd://127.0.0.1:2379",
                "--registry-user",
                "relay",
                "--registry-password-file",
                "/etc/hostname",
            ][..],
            "an etcd password is sent only over TLS",
        ),
        (
            &[
                "--registry",
                "etcds://127.0.0.1:2379",
                "--registry-ca",
                "/nonexistent/ca.pem",
            ][..],
            "/nonexistent/ca.pem",
        ),
    ] {
        let (_state, args) = relay_args(flags);
        let err = fails_with(&args);
        assert!(err.contains(says), "{flags:?}: {err}");
    }
}

/// A registry address where something other than etcd answers (garbage, or nothing): the
/// relay starts and serves, says once what is wrong, and a new service is refused with the
/// reason while its agent keeps retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_is_not_etcd_is_named_and_new_services_wait() {
    use tokio::io::AsyncWriteExt;
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = garbage.accept().await {
            let _ = s
                .write_all(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff garbage")
                .await;
        }
    });
    let registry = format!("etcd://{at}");
    let relay = Relay::spawn(
        Backend::Tokio,
        &[
            "--registry",
            &registry,
            "--relay-id",
            "lonely",
            "--registry-ttl",
            "3",
        ],
    );
    let local = echo_origin().await;
    let agent = Proc::spawn(&relay.agent_args(local, "web"));
    agent.wait_stderr("the fleet registry is unavailable");
    relay.proc.wait_stderr("fleet registry unreachable (");
    let mut agent = agent;
    assert!(agent.is_running(), "the agent gave up: {}", agent.stderr());
}
