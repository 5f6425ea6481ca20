//! Embeds the commit the binary is built from, for `--version`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    // A build without the repository (a container build's context leaves `.git` out) passes
    // the commit in RINGTUNNEL_COMMIT instead.
    println!("cargo:rerun-if-env-changed=RINGTUNNEL_COMMIT");
    // Without this, a build with no repository (or with the paths below missing) would run
    // this script, and rebuild the crate, on every build.
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(commit) = std::env::var("RINGTUNNEL_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
    {
        println!("cargo:rustc-env=RINGTUNNEL_COMMIT={}", commit.trim());
        return;
    }
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=RINGTUNNEL_COMMIT={commit}");
    // HEAD lives in the work tree's git directory (`.git`, or `.git/worktrees/NAME` for a
    // linked work tree), the branches in the common one. Only paths that exist are watched:
    // a missing one would count as changed every time.
    let mut watched: Vec<PathBuf> = Vec::new();
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        watched.push(PathBuf::from(dir).join("HEAD"));
    }
    if let Some(common) = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]) {
        let common = PathBuf::from(common);
        watched.push(common.join("refs").join("heads"));
        watched.push(common.join("packed-refs"));
    }
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// The trimmed output of `git args`, if git runs and says something.
fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}
