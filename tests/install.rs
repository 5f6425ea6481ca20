//! From a checkout to a working tunnel the ways the project documents, without systemd or a
//! container engine: the Dockerfile's build command installs ringtunnel into a scratch root
//! (`cargo install`, as the README's "Install" does), then that installed binary runs
//!
//! - the systemd units' `ExecStart` lines (read from contrib/systemd, with the credential,
//!   state and config directories pointed at a scratch directory), after `systemd-analyze
//!   verify` accepts the units;
//! - compose.yaml's relay and agent commands, with the Dockerfile's environment, and the
//!   Dockerfile's `HEALTHCHECK` command against that relay;
//!
//! and a visitor goes through each. A flag renamed in the code and not in a unit, the compose
//! file or the Dockerfile fails here.
//!
//! The build runs with `--debug` and the test build's target directory, so it reuses what
//! `cargo test` compiled; `RINGTUNNEL_INSTALL_RELEASE=1` runs the command exactly as written
//! (a release build from scratch, minutes on two cores).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

/// The checkout's file `rel`.
fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read("Dockerfile").lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && cur.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => cur.push_str(part),
            None => {
                cur.push_str(line);
                out.push(std::mem::take(&mut cur));
            }
        }
    }
    out
}

/// The words of the Dockerfile's instruction that starts with `keyword` and contains `needle`.
fn instruction(keyword: &str, needle: &str) -> Vec<String> {
    dockerfile()
        .into_iter()
        .find(|i| i.starts_with(&format!("{keyword} ")) && i.contains(needle))
        .unwrap_or_else(|| panic!("no {keyword} ... {needle} in the Dockerfile"))
        .split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect()
}

/// The JSON array (exec form) at the end of the Dockerfile instruction `keyword`.
fn exec_form(keyword: &str) -> Vec<String> {
    let words = instruction(keyword, "[");
    let text = words.join(" ");
    let json = &text[text.find('[').unwrap()..];
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{keyword} {json}: {e}"))
}

/// Where the installed binary is: built once per test run from the Dockerfile's `cargo
/// install` line, with its `/out` root replaced by a scratch root.
fn installed() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let run = instruction("RUN", "cargo install");
        let cargo = run.iter().position(|w| w == "cargo").unwrap();
        let mut args: Vec<String> = run[cargo + 1..].to_vec();
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("install-root");
        let _ = std::fs::remove_dir_all(&root);
        let at = args.iter().position(|w| w == "--root").unwrap();
        let image_root = std::mem::replace(&mut args[at + 1], root.display().to_string());
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
        cmd.args(&args).arg("--offline");
        // What `cargo test` set for this test (CARGO_MANIFEST_DIR, OUT_DIR, the build
        // script's RINGTUNNEL_COMMIT, ...) would reach the build scripts and make the two
        // builds rebuild each other's crates.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if (k.starts_with("CARGO_") && k != "CARGO_HOME")
                || k == "OUT_DIR"
                || k == "RINGTUNNEL_COMMIT"
            {
                cmd.env_remove(&*k);
            }
        }
        if std::env::var_os("RINGTUNNEL_INSTALL_RELEASE").is_none() {
            let target = std::env::var("CARGO_TARGET_DIR").map_or_else(
                |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
                PathBuf::from,
            );
            cmd.arg("--debug").env("CARGO_TARGET_DIR", target);
        }
        let out = cmd
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo install");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The bench tools stay out of an install.
        let bins: Vec<String> = std::fs::read_dir(root.join("bin"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(bins, ["ringtunnel"]);
        // The runtime stage copies what the build stage installed.
        let copy = instruction("COPY", "--from=build");
        assert_eq!(
            copy[1..],
            [
                format!("{image_root}/bin/ringtunnel"),
                "/usr/local/bin/ringtunnel".into()
            ]
        );
        root.join("bin/ringtunnel")
    })
}

/// The `ExecStart=` command of `unit`, split into words, after replacing each `(from, to)`.
fn exec_start(unit: &str, replace: &[(&str, String)]) -> Vec<String> {
    let text = read(&format!("contrib/systemd/{unit}"));
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

/// The `command:` of compose.yaml's service `name`, with each word equal to a `from` replaced
/// by its `to`.
fn compose_command(name: &str, replace: &[(&str, String)]) -> Vec<String> {
    let text = read("compose.yaml");
    let json = text
        .lines()
        .skip_while(|l| *l != format!("  {name}:"))
        .find_map(|l| l.trim().strip_prefix("command: "))
        .unwrap_or_else(|| panic!("no command for {name} in compose.yaml"));
    let words: Vec<String> = serde_json::from_str(json).unwrap();
    words
        .into_iter()
        .map(|w| match replace.iter().find(|(from, _)| *from == w) {
            Some((_, to)) => to.clone(),
            None => w,
        })
        .collect()
}

#[test]
fn the_installed_binary_is_the_one_tool_and_knows_its_build() {
    let out = Command::new(installed()).arg("--version").output().unwrap();
    let version = String::from_utf8(out.stdout).unwrap();
    assert!(version.starts_with("ringtunnel "), "{version}");
    assert!(version.contains("commit "), "{version}");
    assert!(version.contains("backends: "), "{version}");
}

#[test]
fn systemd_accepts_the_units() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        assert!(
            std::env::var_os("RINGTUNNEL_REQUIRE_SYSTEMD").is_none(),
            "RINGTUNNEL_REQUIRE_SYSTEMD is set and there is no systemd-analyze"
        );
        eprintln!("SKIP: no systemd-analyze here (apt-get install systemd)");
        return;
    };
    assert!(out.status.success());
    let dir = TempDir::new("units");
    let bin = installed().display().to_string();
    let mut files = Vec::new();
    for (unit, as_name) in [
        ("ringtunnel-relay.service", "ringtunnel-relay.service"),
        ("ringtunnel-agent@.service", "ringtunnel-agent@home.service"),
    ] {
        let text =
            read(&format!("contrib/systemd/{unit}")).replace("/usr/local/bin/ringtunnel", &bin);
        let path = dir.0.join(as_name);
        std::fs::write(&path, text).unwrap();
        files.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&files)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Unknown keys and bad values are warnings that still exit 0.
    let about_ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("ringtunnel"))
        .collect();
    assert!(about_ours.is_empty(), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_units_start_a_relay_and_an_agent_that_work() {
    let bin = installed();
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
    let mut relay = Proc::spawn_program(bin, &relay_args, &[], None);
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
    let agent = Agent::from_proc(Proc::spawn_program(bin, &agent_args, &[], None));
    assert_echo(agent.public).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_services_work_and_the_image_health_check_follows_the_relay() {
    let bin = installed();
    assert_eq!(exec_form("ENTRYPOINT"), ["ringtunnel"]);
    let image_cmd = exec_form("CMD");
    let state = TempDir::new("compose");
    // The image's environment, its state directory moved to a scratch one.
    let env_line = instruction("ENV", "RINGTUNNEL_STATE_DIR=");
    assert_eq!(env_line, ["RINGTUNNEL_STATE_DIR=/var/lib/ringtunnel"]);
    let state_dir = state.0.display().to_string();
    let compose = read("compose.yaml");
    for var in ["RINGTUNNEL_SECRET:", "RINGTUNNEL_RELAY_FINGERPRINT:"] {
        assert!(compose.contains(var), "compose.yaml sets no {var}");
    }

    // The compose relay is the image's command with a port range.
    assert!(compose_command("relay", &[]).starts_with(&image_cmd));
    let port = free_port().to_string();
    let mut relay_args = compose_command(
        "relay",
        &[
            ("127.0.0.1:7844", "127.0.0.1:0".into()),
            ("20000-20009", format!("{port}-{port}")),
        ],
    );
    relay_args.extend(["--control", "127.0.0.1:0", "--bind-addr", "127.0.0.1"].map(String::from));
    let env = [
        ("RINGTUNNEL_SECRET", SECRET),
        ("RINGTUNNEL_STATE_DIR", state_dir.as_str()),
    ];
    let mut relay = Proc::spawn_program(bin, &relay_args, &env, None);
    let ready = relay.wait_line("ready ");
    let admin = field(&ready, "admin");

    // HEALTHCHECK's command, at the admin endpoint this relay got.
    let health = exec_form("HEALTHCHECK");
    assert_eq!(health[0], "ringtunnel");
    let check = || {
        Command::new(bin)
            .args(&health[1..])
            .args(["--admin", &admin])
            .output()
            .unwrap()
    };
    let out = check();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");

    let origin = echo_origin().await;
    let agent_args = compose_command(
        "agent",
        &[
            ("relay", field(&ready, "control")),
            ("web:80", origin.to_string()),
            ("20000", port.clone()),
        ],
    );
    let fingerprint = field(&ready, "fingerprint");
    let agent_env = [
        ("RINGTUNNEL_SECRET", SECRET),
        ("RINGTUNNEL_RELAY_FINGERPRINT", fingerprint.as_str()),
    ];
    let agent = Agent::from_proc(Proc::spawn_program(bin, &agent_args, &agent_env, None));
    assert_eq!(agent.public.port().to_string(), port);
    assert_echo(agent.public).await;

    // A relay that is gone fails the check, saying where it looked.
    relay.kill();
    let out = check();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("admin endpoint {admin}")), "{err}");
}
