//! Start-up errors a person meets: each names the flag or file that was wrong, says the
//! cause once, and says what to do where there is something to do.

mod common;

use common::*;

/// Relay arguments with a fresh state directory (kept alive by the returned guard).
fn relay_args(extra: &[&str]) -> (TempDir, Vec<String>) {
    let state = TempDir::new("errors");
    let mut args: Vec<String> = [
        "relay",
        "--control",
        "127.0.0.1:0",
        "--secret",
        SECRET,
        "--backend",
        "tokio",
        "--state-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(state.0.join("state").display().to_string());
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
