//! The README's "What happens when things break" table says what a person will read; these
//! tests make a few of those things break for real and check that the table and the binary
//! say the same: each quoted message is looked up in the README's row and in what the
//! binary printed.

mod common;

use common::*;

/// The README row whose first cell starts with `event`.
fn readme_row(event: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    readme
        .lines()
        .find(|l| l.starts_with(&format!("| {event}")))
        .unwrap_or_else(|| panic!("no README row for {event:?}"))
        .to_string()
}

/// Asserts the README `row` quotes `message` and the binary's `output` contains it.
fn both_say(row: &str, message: &str, output: &str) {
    assert!(
        row.contains(message),
        "the README row lacks {message:?}: {row}"
    );
    assert!(
        output.contains(message),
        "the binary did not print {message:?}: {output}"
    );
}

#[test]
fn a_port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let state = TempDir::new("readme");
    let mut relay = Proc::spawn(&relay_command(&state.0, &["--http", &addr]));
    assert!(!relay.wait_exit().success());
    let row = readme_row("a port the relay needs is taken");
    let err = relay.stderr();
    both_say(&row, "cannot listen on --http ", &err);
    both_say(&row, "ss -ltnp", &err);
    assert!(row.contains("relay exits 1"), "{row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret() {
    let relay = Relay::spawn(Backend::Tokio, &[]);
    let mut args = relay.agent_args(echo_origin().await, "web");
    let i = args.iter().position(|a| a == "--secret").unwrap();
    args[i + 1] = "not the secret at all".into();
    let mut agent = Proc::spawn(&args);
    let status = agent.wait_exit();
    let row = readme_row("wrong secret");
    assert!(row.contains("exits 1"), "{row}");
    assert_eq!(status.code(), Some(1));
    let err = agent.stderr();
    assert!(row.contains("`error: ... wrong secret`"), "{row}");
    both_say(&row, "wrong secret", &err);
    assert!(err.contains("error: "), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_a_broken_file() {
    let (_dir, path) = config_file("[limits]\nmax_visitors = 5\n");
    let mut relay = Relay::spawn(Backend::Tokio, &["--config", &path]);
    std::fs::write(&path, "[limits]\nmax_visitors = \n").unwrap();
    relay.proc.signal("-HUP");
    relay.proc.wait_stderr("reload refused");
    let row = readme_row("SIGHUP to the relay");
    both_say(
        &row,
        "reload refused, nothing changed: ",
        &relay.proc.stderr(),
    );
    assert!(relay.proc.is_running(), "the relay carries on");
}
