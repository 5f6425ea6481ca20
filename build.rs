//! Embeds the commit the binary is built from, for `--version`.

fn main() {
    // A build without the repository (a container build's context leaves `.git` out) passes
    // the commit in RINGTUNNEL_COMMIT instead.
    println!("cargo:rerun-if-env-changed=RINGTUNNEL_COMMIT");
    if let Some(commit) = std::env::var("RINGTUNNEL_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
    {
        println!("cargo:rustc-env=RINGTUNNEL_COMMIT={}", commit.trim());
        return;
    }
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=RINGTUNNEL_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
