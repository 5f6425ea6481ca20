//! End-to-end: the README's first command, `ringtunnel demo --once`, starts a relay, an agent
//! and an origin on loopback, makes one request through the tunnel, and exits cleanly: exit 0,
//! the origin's answer on stdout, and no warning or error on the way out.

mod common;

use common::*;

#[test]
fn demo_once_goes_through_the_tunnel_and_exits_cleanly() {
    let mut demo = Proc::spawn(&["demo".into(), "--once".into()]);
    demo.wait_line("ready control=");
    demo.wait_line("online service=demo");
    demo.wait_line("hello from the ringtunnel demo origin");
    assert!(demo.wait_exit().success(), "{}", demo.stderr());
    let stderr = demo.stderr();
    for bad in ["WARN", "ERROR", "reconnecting"] {
        assert!(!stderr.contains(bad), "{bad} on the way out:\n{stderr}");
    }
}
