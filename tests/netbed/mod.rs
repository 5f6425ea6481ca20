//! A real link for tests: the far end (the agent) in a network namespace, joined to the
//! test's namespace through a link emulator.
//!
//! ```text
//!  test's namespace          wire namespace                 far namespace
//!  host_if (host IP) ── veth ── w0 ═ rtwire ═ w1 ── veth ── far_if (inner IP)
//! ```
//!
//! The relay's control port and local services listen on the test's end (`host`); programs
//! in the far namespace reach them across the wire. The wire ([`rtwire::Wire`]) delays,
//! rate-limits, drops or cuts frames; a cut drops every frame both ways without a reset, as
//! across a pulled cable or a dropping firewall, and neither side is told (the links stay up).
//!
//! Needs root and `ip` (iproute2); skipped without them unless RINGTUNNEL_REQUIRE_NETNS is set
//! (`.ci/run` sets it). Both namespaces and the host's link are removed when the `Link` drops.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub use rtwire::Shape;

use crate::common::Proc;

/// A far namespace, the wire to it, and the addresses on either end.
pub struct Link {
    far_ns: String,
    wire_ns: String,
    host_if: String,
    wire: Option<rtwire::Wire>,
    /// The test's end (relay control port, local services).
    pub host: Ipv4Addr,
    /// The far namespace's end (the agent).
    pub inner: Ipv4Addr,
}

/// Runs `ip args`; panics with its stderr if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process can make namespaces; panics if it cannot but must.
fn can_make_namespaces() -> bool {
    let can = rustix::process::geteuid().is_root() && Command::new("ip").arg("-V").output().is_ok();
    if !can {
        assert!(
            std::env::var_os("RINGTUNNEL_REQUIRE_NETNS").is_none(),
            "RINGTUNNEL_REQUIRE_NETNS is set, but this needs root and ip (iproute2)"
        );
        eprintln!("SKIP: network namespaces need root and ip (iproute2)");
    }
    can
}

impl Link {
    /// A fresh link with a perfect wire, or `None` (skip) where this process cannot make one.
    pub fn new() -> Option<Link> {
        Link::shaped(Shape::default())
    }

    /// A fresh link whose wire has `shape` both ways, or `None` (skip).
    pub fn shaped(shape: Shape) -> Option<Link> {
        static N: AtomicU32 = AtomicU32::new(0);
        if !can_make_namespaces() {
            return None;
        }
        let n = N.fetch_add(1, Ordering::Relaxed);
        // Interface names have at most 15 bytes; the pid keeps parallel runs apart.
        let id = format!("{}x{n}", std::process::id() % 100_000);
        let (a, b) = ((std::process::id() % 200) as u8, (n * 4) as u8);
        let mut link = Link {
            far_ns: format!("rtfar{id}"),
            wire_ns: format!("rtwire{id}"),
            host_if: format!("rth{id}"),
            wire: None,
            host: Ipv4Addr::new(10, 213 + a % 40, b, 1),
            inner: Ipv4Addr::new(10, 213 + a % 40, b, 2),
        };
        let far_if = format!("rtn{id}");
        let (w0, w1) = (format!("rtw{id}a"), format!("rtw{id}b"));
        ip(&["netns", "add", &link.far_ns]);
        ip(&["netns", "add", &link.wire_ns]);
        let pair = |x: &str, y: &str| ip(&["link", "add", x, "type", "veth", "peer", "name", y]);
        pair(&link.host_if, &w0);
        pair(&far_if, &w1);
        // Frames into the wire must be MTU-sized with whole checksums: set while every end is
        // still here, before the moves.
        for i in [&link.host_if, &far_if, &w0, &w1] {
            rtwire::plain_frames(i).unwrap_or_else(|e| panic!("offloads off on {i}: {e}"));
        }
        for (i, ns) in [
            (&w0, &link.wire_ns),
            (&w1, &link.wire_ns),
            (&far_if, &link.far_ns),
        ] {
            ip(&["link", "set", i, "netns", ns]);
        }
        ip(&["-n", &link.wire_ns, "link", "set", &w0, "up"]);
        ip(&["-n", &link.wire_ns, "link", "set", &w1, "up"]);
        let host = format!("{}/30", link.host);
        ip(&["addr", "add", &host, "dev", &link.host_if]);
        ip(&["link", "set", &link.host_if, "up"]);
        let inner = format!("{}/30", link.inner);
        ip(&["-n", &link.far_ns, "addr", "add", &inner, "dev", &far_if]);
        ip(&["-n", &link.far_ns, "link", "set", &far_if, "up"]);
        ip(&["-n", &link.far_ns, "link", "set", "lo", "up"]);
        let wire = rtwire::Wire::start_in(&link.wire_ns, &w0, &w1, shape)
            .unwrap_or_else(|e| panic!("start the wire: {e}"));
        link.wire = Some(wire);
        Some(link)
    }

    fn wire(&self) -> &rtwire::Wire {
        self.wire
            .as_ref()
            .expect("the wire runs while the link lives")
    }

    /// Drops every frame between the two ends, both ways, without a reset.
    pub fn cut(&self) {
        self.wire().cut();
    }

    /// Carries frames again.
    pub fn mend(&self) {
        self.wire().mend();
    }

    /// Frames the wire dropped at random (the loss setting), both ways together.
    pub fn lost(&self) -> u64 {
        self.wire().stats().iter().map(|s| s.lost).sum()
    }

    /// `ringtunnel args` run inside the far namespace.
    pub fn spawn(&self, args: &[String]) -> Proc {
        let mut all: Vec<String> = [
            "netns",
            "exec",
            &self.far_ns,
            env!("CARGO_BIN_EXE_ringtunnel"),
        ]
        .map(String::from)
        .to_vec();
        all.extend_from_slice(args);
        Proc::spawn_program(Path::new("ip"), &all, &[], None)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.wire = None;
        // Deleting a namespace deletes the ends in it, and with them their pairs.
        for ns in [&self.far_ns, &self.wire_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}
