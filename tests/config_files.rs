//! Every example config parses and validates; every broken one is rejected with a message
//! that names the problem.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::Parser;
use ringtunnel::cli::{Cli, Command};

fn parse(args: &[&str]) -> Command {
    let mut full = vec!["ringtunnel"];
    full.extend_from_slice(args);
    Cli::try_parse_from(full).unwrap().command
}

/// Writes `toml` to a fresh file and returns its path.
fn write_config(toml: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ringtunnel-cfg-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn relay_with(toml: &str) -> Result<ringtunnel::config::RelayConfig, String> {
    let path = write_config(toml);
    let Command::Relay(args) = parse(&["relay", "--config", path.to_str().unwrap()]) else {
        unreachable!()
    };
    args.into_config().map_err(|e| e.to_string())
}

fn agent_with(toml: &str, extra: &[&str]) -> Result<ringtunnel::config::AgentConfig, String> {
    let path = write_config(toml);
    let mut args = vec!["agent", "--config", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let Command::Agent(a) = parse(&args) else {
        unreachable!()
    };
    a.into_config().map_err(|e| e.to_string())
}

#[test]
fn example_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let relay = relay_with(&std::fs::read_to_string(root.join("relay.toml")).unwrap()).unwrap();
    assert_eq!(
        relay.secret_for("billing").unwrap().0.expose(),
        b"billing-only-secret"
    );
    assert_eq!(relay.secret_for("web").unwrap().0.expose(), b"change-me");
    let agent = agent_with(
        &std::fs::read_to_string(root.join("agent.toml")).unwrap(),
        &[],
    )
    .unwrap();
    assert_eq!(agent.services.len(), 7);
    assert_eq!(
        agent.services[6].kind,
        ringtunnel::protocol::ServiceKind::Udp
    );
    assert_eq!(agent.relay_port, 7843);
    assert_eq!(agent.services[1].pool, 2);
    assert_eq!(agent.services[4].path.as_deref(), Some("/api"));
    assert_eq!(relay.front.domain.as_deref(), Some("example.com"));
    assert_eq!(relay.limits_for("billing").max_visitors, Some(200));
    assert_eq!(relay.limits_for("billing").conn_rate_per_ip, Some(200));
    assert_eq!(relay.limits_for("web").max_visitors, Some(10000));
    // Names ignore case; reservations are qualified with the domain.
    assert_eq!(
        relay.secret_for("BILLING").unwrap().0.expose(),
        b"billing-only-secret"
    );
    assert_eq!(
        relay.reservations().unwrap(),
        vec![
            ("billing.example.com".to_string(), "billing".to_string()),
            ("staff.example.com".to_string(), "staff".to_string())
        ]
    );
    // The relay-wide deny list holds for every service; staff adds its allow list and users.
    let staff = relay.access_for("staff");
    assert_eq!((staff.allow.len(), staff.deny.len()), (2, 2));
    assert!(staff.basic_auth.unwrap().users.contains_key("alice"));
    assert_eq!(relay.access_for("web").deny.len(), 2);
}

#[test]
fn a_relay_without_limits_gets_the_public_defaults() {
    let cfg = relay_with("secret = \"s\"\n").unwrap();
    assert_eq!(cfg.limits, ringtunnel::config::Limits::public_defaults());
    let cfg =
        relay_with("secret = \"s\"\n[limits]\nmax_visitors = 0\nidle_timeout_secs = 0\n").unwrap();
    let limits = cfg.limits_for("x");
    assert_eq!(limits.visitor_cap(), None, "0 means no limit");
    assert_eq!(limits.idle_timeout(), None);
    assert_eq!(limits.rate_cap(), Some(200), "unset keeps the default");
}

#[test]
fn http_and_tls_flags_make_routed_services() {
    let cfg = agent_with(
        "relay = \"r\"\nsecret = \"s\"\n",
        &[
            "--local",
            "127.0.0.1:80",
            "--name",
            "blog",
            "--http-host",
            "blog",
            "--http-host",
            "www.blog.example",
            "--path",
            "/api/",
        ],
    )
    .unwrap();
    let s = &cfg.services[0];
    assert_eq!(s.kind, ringtunnel::protocol::ServiceKind::Http);
    assert_eq!(s.hosts, ["blog", "www.blog.example"]);
    assert!(s.forwarded_headers);
    for bad in [
        &["--http-host", "a", "--remote-port", "20000"][..],
        &["--http-host", "a", "--tls-host", "b"][..],
        &["--path", "/x"][..],
    ] {
        let mut full = vec!["ringtunnel", "agent", "--relay", "r", "--local", "h:1"];
        full.extend_from_slice(bad);
        assert!(
            ringtunnel::cli::Cli::try_parse_from(full).is_err(),
            "{bad:?}"
        );
    }
}

#[test]
fn flags_override_file() {
    let cfg = agent_with(
        "relay = \"a.example\"\nsecret = \"s\"\n",
        &[
            "--relay",
            "b.example:1234",
            "--local",
            "127.0.0.1:80",
            "--name",
            "x",
        ],
    )
    .unwrap();
    assert_eq!(
        (cfg.relay_host.as_str(), cfg.relay_port),
        ("b.example", 1234)
    );
    assert_eq!(cfg.services[0].name, "x");
}

#[test]
fn broken_configs_are_rejected_with_reasons() {
    let relay_cases = [
        ("secret = 1", "secret"),
        ("port_range = \"9-1\"", "port range"),
        ("colour = \"blue\"\nsecret=\"s\"", "colour"),
        ("", "no secret"),
        ("secret = \"\"", "empty"),
        ("secret = \"s\"\nworkers = 0", "workers"),
        (
            "secret = \"s\"\nheartbeat_interval_secs = 30\nheartbeat_timeout_secs = 10",
            "heartbeat",
        ),
        (
            "[[service]]\nname = \"a b\"\nsecret = \"x\"",
            "invalid service name",
        ),
        ("secret = \"s\"\ndomain = \"bad domain\"", "--domain"),
        ("secret = \"s\"\nhead_timeout_secs = 0", "head_timeout_secs"),
        ("secret = \"s\"\nagent_wait_secs = -1", "agent_wait_secs"),
        ("secret = \"s\"\nmax_head_bytes = 10", "max_head_bytes"),
        ("secret = \"s\"\n[limits]\nmax_visitors = -1", "max_visitors"),
        (
            "secret = \"s\"\n[[service]]\nname = \"a\"\nhosts = [\"*.x.test\"]",
            "not wildcards",
        ),
        (
            "secret = \"s\"\ndomain = \"x.test\"\n[[service]]\nname = \"a\"\nhosts = [\"b\"]\n[[service]]\nname = \"c\"\nhosts = [\"B.x.test\"]",
            "reserved for both",
        ),
        (
            "secret = \"s\"\n[[service]]\nname = \"a\"\n[[service]]\nname = \"A\"",
            "appears twice",
        ),
        (
            "secret = \"s\"\ntrusted_proxies = [\"10.0.0.0/40\"]",
            "address block",
        ),
        (
            "secret = \"s\"\nport_range = \"19000-19999\"\nhttp = \"0.0.0.0:19080\"",
            "contains the --http port 19080",
        ),
        (
            "secret = \"s\"\n[limits]\nidle_timeout_secs = nan",
            "idle_timeout_secs",
        ),
        ("secret = \"s\"\n[limits]\nmax_vistors = 3", "max_vistors"),
        (
            "secret = \"s\"\n[[service]]\nname = \"a\"\n[service.limits]\nmax_agents = 0",
            "max_agents",
        ),
    ];
    for (toml, needle) in relay_cases {
        let err = relay_with(toml).unwrap_err();
        assert!(err.contains(needle), "{toml:?} -> {err}");
    }
    let agent_cases = [
        ("secret = \"s\"\n[[service]]\nname=\"a\"\nlocal=\"127.0.0.1:1\"", "no relay"),
        ("relay = \"r\"\n[[service]]\nname=\"a\"\nlocal=\"127.0.0.1:1\"", "no secret"),
        ("relay = \"r\"\nsecret=\"s\"", "no service"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"nowhere\"", "local address"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"\n[[service]]\nname=\"a\"\nlocal=\"h:2\"", "twice"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"\npool=0", "pool"),
        ("relay = \"r\"\nsecret=\"s\"\nrelay_fingerprint=\"abc\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"", "fingerprint"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"\nkind=\"http\"", "at least one host"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"\nkind=\"http\"\nhosts=[\"a b\"]", "invalid host"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"\nkind=\"http\"\nhosts=[\"*\"]", "invalid host"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"\nkind=\"tls\"\nhosts=[\"a.*.example\"]", "invalid host"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"\nkind=\"http\"\nhosts=[\"a\"]\npath=\"api\"", "path prefix"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"\nhosts=[\"a\"]", "hosts and path are for http"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"\nkind=\"http\"\nhosts=[\"a\"]\nproxy_protocol=\"v1\"", "proxy_protocol is for tcp"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"\nkind=\"tls\"\nhosts=[\"a\"]\nremote_port=5", "remote_port is for tcp"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"\nkind=\"quic\"", "kind"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"\nkind=\"udp\"\nhosts=[\"a\"]", "hosts and path are for http"),
        ("relay = \"r\"\nsecret=\"s\"\n[[service]]\nname=\"a\"\nlocal=\"h:1\"\nkind=\"udp\"\nproxy_protocol=\"v2\"", "proxy_protocol is for tcp and tls"),
    ];
    for (toml, needle) in agent_cases {
        let err = agent_with(toml, &[]).unwrap_err();
        assert!(err.contains(needle), "{toml:?} -> {err}");
    }
}
