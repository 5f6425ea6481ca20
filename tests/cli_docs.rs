//! Shell completions and man pages come from the same definitions as the command line, so a
//! flag added to the code shows up in them: checked by generating them from the real binary.

mod common;

use std::process::Command;

use common::TempDir;

fn ringtunnel(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ringtunnel"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_know_every_subcommand_and_flag() {
    let bash = ringtunnel(&["completions", "bash"]);
    assert!(bash.contains("_ringtunnel()"), "{bash}");
    for word in [
        "relay",
        "agent",
        "status",
        "--drain-timeout",
        "--access-log",
        "--http-host",
    ] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    let zsh = ringtunnel(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef ringtunnel"), "{zsh}");
    let fish = ringtunnel(&["completions", "fish"]);
    assert!(fish.contains("complete -c ringtunnel"), "{fish}");
    let out = Command::new(env!("CARGO_BIN_EXE_ringtunnel"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("possible values"),
        "an unknown shell is named with the choices"
    );
}

#[test]
fn man_pages_cover_every_command() {
    let page = ringtunnel(&["man"]);
    assert!(page.contains(".TH ringtunnel 1"), "{page}");
    assert!(page.contains("relay") && page.contains("agent"), "{page}");
    let dir = TempDir::new("man");
    ringtunnel(&["man", "--dir", &dir.0.display().to_string()]);
    for name in [
        "ringtunnel",
        "ringtunnel-relay",
        "ringtunnel-agent",
        "ringtunnel-status",
    ] {
        let text = std::fs::read_to_string(dir.0.join(format!("{name}.1")))
            .unwrap_or_else(|e| panic!("{name}.1: {e}"));
        assert!(text.contains(".TH"), "{name}.1");
    }
    let relay = std::fs::read_to_string(dir.0.join("ringtunnel-relay.1")).unwrap();
    assert!(
        relay.contains("drain\\-timeout"),
        "the relay's flags: {relay}"
    );
}
