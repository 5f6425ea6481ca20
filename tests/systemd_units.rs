//! The systemd units in contrib/systemd start a working relay and agent: their `ExecStart`
//! lines are read from the files (not run by systemd), with the binary, the credential and
//! state directories and the config files pointed at a scratch directory, and a visitor goes
//! through. A flag renamed in the code and not in a unit fails here.

mod common;

use std::path::Path;

use common::*;

/// The `ExecStart=` command of `unit`, split into words, after replacing each `(from, to)`.
fn exec_start(unit: &str, replace: &[(&str, String)]) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/systemd")
        .join(unit);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("no ExecStart in {unit}"))
        .to_string();
    for (from, to) in replace {
        line = line.replace(from, to);
    }
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    assert_eq!(words[0], "/usr/local/bin/ringtunnel", "{unit}: {line}");
    words[1..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_units_start_a_relay_and_an_agent_that_work() {
    let dir = TempDir::new("systemd");
    let d = |p: &str| dir.0.join(p).display().to_string();
    for sub in ["etc", "relay-creds", "agent-creds", "state"] {
        std::fs::create_dir(dir.0.join(sub)).unwrap();
    }
    std::fs::write(dir.0.join("relay-creds/secret"), format!("{SECRET}\n")).unwrap();
    std::fs::write(dir.0.join("agent-creds/secret"), format!("{SECRET}\n")).unwrap();
    std::fs::write(
        dir.0.join("etc/relay.toml"),
        "control = \"127.0.0.1:0\"\nbind_addr = \"127.0.0.1\"\nbackend = \"tokio\"\n",
    )
    .unwrap();
    let relay_args = exec_start(
        "ringtunnel-relay.service",
        &[
            ("${CREDENTIALS_DIRECTORY}", d("relay-creds")),
            ("${STATE_DIRECTORY}", d("state")),
            ("/etc/ringtunnel", d("etc")),
        ],
    );
    let mut relay = Proc::spawn(&relay_args);
    let ready = relay.wait_line("ready ");

    let origin = echo_origin().await;
    std::fs::write(
        dir.0.join("etc/agent-home.toml"),
        format!(
            "relay = \"{}\"\nrelay_fingerprint = \"{}\"\nbackend = \"tokio\"\n[[service]]\nname = \"echo\"\nlocal = \"{origin}\"\n",
            field(&ready, "control"),
            field(&ready, "fingerprint")
        ),
    )
    .unwrap();
    let agent_args = exec_start(
        "ringtunnel-agent@.service",
        &[
            ("${CREDENTIALS_DIRECTORY}", d("agent-creds")),
            ("%i", "home".to_string()),
            ("/etc/ringtunnel", d("etc")),
        ],
    );
    let agent = Agent::spawn(agent_args);
    assert_echo(agent.public).await;
}
