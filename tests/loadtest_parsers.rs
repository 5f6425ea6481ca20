//! The load-test harness parses iperf3 and wrk output correctly (recorded output in
//! `scripts/loadtest/testdata/`). Runs the harness's own Python unit tests.

use std::process::Command;

#[test]
fn loadtest_parsers_read_recorded_output() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/loadtest");
    let out = match Command::new("python3")
        .args(["-m", "unittest", "discover", "-s", dir, "-p", "test_*.py"])
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            println!("skipped: python3 not available ({e})");
            return;
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "harness parser tests failed:\n{stderr}"
    );
    assert!(stderr.contains("OK"), "{stderr}");
}
