//! The log as an operator configures it: JSON lines, one access line per visitor, and a
//! filter in relay.toml that a reload changes (a broken one is refused).

mod common;

use common::*;

/// The relay's stderr lines that parse as JSON objects.
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.is_object())
        .collect()
}

async fn json_lines_and_one_access_line_per_visitor(backend: Backend) {
    let relay = Relay::spawn(backend, &["--log-format", "json", "--access-log"]);
    let agent = Agent::spawn(relay.agent_args(echo_origin().await, "web"));
    let payload = pseudo_random(9, 10_000);
    assert_eq!(roundtrip(agent.public, &payload).await.unwrap(), payload);
    relay.proc.wait_stderr("\"target\":\"access\"");

    let stderr = relay.proc.stderr();
    let lines = json_lines(&stderr);
    assert!(
        !lines.is_empty()
            && stderr
                .lines()
                .all(|l| l.trim().is_empty() || l.starts_with('{')),
        "every line is JSON: {stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["message"].as_str().is_some()),
        "{stderr}"
    );
    let access: Vec<_> = lines.iter().filter(|l| l["target"] == "access").collect();
    assert_eq!(access.len(), 1, "one line per visitor: {stderr}");
    let line = access[0];
    assert_eq!(line["service"], "web", "{line}");
    assert_eq!(line["up"], 10_000, "{line}");
    assert_eq!(line["down"], 10_000, "{line}");
    assert_eq!(line["end"], "done", "{line}");
    assert!(
        line["visitor"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
    assert!(line["ms"].is_u64(), "{line}");

    // Without --access-log there are none.
    let quiet = Relay::spawn(backend, &[]);
    let agent = Agent::spawn(quiet.agent_args(echo_origin().await, "web"));
    assert_echo(agent.public).await;
    drop(agent);
    assert!(
        !quiet.proc.stderr().contains("end=done"),
        "{}",
        quiet.proc.stderr()
    );
}

async fn the_config_files_log_filter_reloads(backend: Backend) {
    let (_dir, path) = config_file("log = \"warn\"\n");
    let state = TempDir::new("relay");
    let args = relay_command(&state.0, &["--backend", backend.flag(), "--config", &path]);
    // No RINGTUNNEL_LOG: the file's filter is the one in force.
    let mut relay = Proc::spawn_env(&args, &[("RINGTUNNEL_LOG", "")]);
    relay.wait_line("ready ");
    assert!(
        !relay.stderr().contains("agents connect with"),
        "info lines are filtered out: {}",
        relay.stderr()
    );

    std::fs::write(&path, "log = \"info\"\naccess_log = true\n").unwrap();
    relay.signal("-HUP");
    relay.wait_stderr("settings reloaded: changed=log,access_log needs_restart=none");

    std::fs::write(&path, "log = \"info,ringtunnel=loud\"\n").unwrap();
    relay.signal("-HUP");
    relay.wait_stderr("reload refused, nothing changed: log: invalid log filter");
}

both_backends!(
    json_lines_and_one_access_line_per_visitor,
    the_config_files_log_filter_reloads,
);
