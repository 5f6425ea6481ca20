//! A fleet of relays sharing one namespace in a real etcd (Debian's `etcd-server`), started by
//! each test on free loopback ports in its own directory; relays on 127.0.0.1, 127.0.0.2 and
//! 127.0.0.3, each with the same public ports. Without etcd on PATH the tests say so and pass,
//! unless RINGTUNNEL_REQUIRE_ETCD=1 (`.ci/run` sets it).
//!
//! The timings these tests print (how long a lapsed claim took to go, how long a restarted
//! relay took to serve again) are for the record; nothing asserts on them.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ringtunnel::config::PortRange;
use ringtunnel::fleet::claims::ClaimError;
use ringtunnel::fleet::etcd::Etcd;
use ringtunnel::fleet::{Claim, Fleet, FleetSettings};
use ringtunnel::protocol::ServiceKind;

/// Lease time the test relays run with: short, so lapses happen within a test.
const TTL: &str = "3";
/// The fleet's public port range: below the ephemeral range, away from other tests' relays
/// and from `free_port`'s 16000-18999 (etcd's own ports come from there).
const RANGE: &str = "12000-15999";
/// A second secret, for a service configured with its own.
const OTHER_SECRET: &str = "a different and long secret for intruder";

/// A real etcd on free loopback ports, killed on drop.
struct EtcdServer {
    proc: Option<Proc>,
    dir: TempDir,
    client: u16,
    peer: u16,
    /// Served over TLS, asking clients for a certificate of this CA.
    tls: Option<EtcdTls>,
    /// The user its own calls use, once its authentication is on.
    user: Option<(String, String)>,
}

/// The PEM files of an etcd served over TLS: a CA, etcd's certificate, and a client's.
struct EtcdTls {
    ca: String,
    server: (String, String),
    client: (String, String),
}

impl EtcdTls {
    /// A fresh CA in `dir`, with a certificate for etcd on 127.0.0.1 and one for a client.
    fn make(dir: &Path) -> EtcdTls {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path.display().to_string()
        };
        let leaf = |name: &str, purposes: Vec<ExtendedKeyUsagePurpose>| {
            let mut p =
                CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
            p.extended_key_usages = purposes;
            // etcd's JSON gateway refuses a client certificate with a CommonName (it cannot
            // pass it on as the user); the server's own needs none either.
            p.distinguished_name = rcgen::DistinguishedName::new();
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
            (
                write(&format!("{name}.pem"), cert.pem()),
                write(&format!("{name}-key.pem"), key.serialize_pem()),
            )
        };
        // etcd's JSON gateway dials etcd itself with the server's certificate, as a client.
        let both = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server = leaf("etcd", both);
        let client = leaf("client", vec![ExtendedKeyUsagePurpose::ClientAuth]);
        EtcdTls {
            ca: write("ca.pem", ca.pem()),
            server,
            client,
        }
    }
}

impl EtcdServer {
    /// A running etcd, or `None` (the test is skipped) when it is not installed.
    fn start() -> Option<EtcdServer> {
        let here = installed(
            "etcd",
            "--version",
            "etcd-server",
            "RINGTUNNEL_REQUIRE_ETCD",
        );
        here.then(|| Self::launched(false, &[]))
    }

    /// A running etcd served over TLS to clients with a certificate of its CA, started with
    /// `extra` flags; `None` as for [`Self::start`] (and without `etcdctl`, which sets it up).
    fn start_tls(extra: &[&str]) -> Option<EtcdServer> {
        let here = installed(
            "etcd",
            "--version",
            "etcd-server",
            "RINGTUNNEL_REQUIRE_ETCD",
        ) && installed(
            "etcdctl",
            "version",
            "etcd-client",
            "RINGTUNNEL_REQUIRE_ETCD",
        );
        here.then(|| Self::launched(true, extra))
    }

    fn launched(tls: bool, extra: &[&str]) -> EtcdServer {
        let dir = TempDir::new("etcd");
        let tls = tls.then(|| EtcdTls::make(&dir.0));
        let mut e = EtcdServer {
            proc: None,
            dir,
            client: free_port(),
            peer: free_port(),
            tls,
            user: None,
        };
        e.launch(extra);
        e
    }

    /// Starts etcd (again, on the same ports and data) and waits until it answers.
    fn launch(&mut self, extra: &[&str]) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let mut args: Vec<String> = [
            "--name",
            "test",
            "--data-dir",
            &self.dir.0.join("data").display().to_string(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("test={peer}"),
            "--log-level",
            "error",
        ]
        .map(String::from)
        .to_vec();
        if let Some(t) = &self.tls {
            let (cert, key) = &t.server;
            args.extend(
                [
                    "--cert-file",
                    cert,
                    "--key-file",
                    key,
                    "--client-cert-auth",
                    "--trusted-ca-file",
                    &t.ca,
                ]
                .map(String::from),
            );
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        self.proc = Some(Proc::spawn_program(Path::new("etcd"), &args, &[], None));
        let deadline = Instant::now() + WAIT;
        let etcd = self.client();
        // On a thread of its own: the test's runtime may be the caller.
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                while let Err(e) = rt.block_on(etcd.range_prefix("/")) {
                    assert!(Instant::now() < deadline, "etcd never answered: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        });
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://127.0.0.1:{}", self.client)
    }

    fn client(&self) -> Etcd {
        let Some(t) = &self.tls else {
            return Etcd::parse(&self.url()).unwrap();
        };
        let (user, password) = self.user.clone().unzip();
        let settings = FleetSettings {
            registry: self.url(),
            relay_id: "test".into(),
            advertise: "127.0.0.1:1".into(),
            prefix: "/ringtunnel/".into(),
            ttl: Duration::from_secs(10),
            access: ringtunnel::config::fleet::RegistryAccess {
                ca: Some(t.ca.clone().into()),
                cert: Some(t.client.0.clone().into()),
                key: Some(t.client.1.clone().into()),
                user,
                password: password.map(ringtunnel::config::Secret::new),
            },
        };
        Etcd::from_settings(&settings).unwrap()
    }

    /// Runs `etcdctl` against this (TLS) etcd with `args`, as its user if one is set;
    /// panics unless it succeeds.
    fn ctl(&self, args: &[&str]) {
        let t = self.tls.as_ref().expect("etcdctl here speaks TLS");
        let endpoint = format!("https://127.0.0.1:{}", self.client);
        let mut cmd = std::process::Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3").args([
            "--endpoints",
            &endpoint,
            "--cacert",
            &t.ca,
            "--cert",
            &t.client.0,
            "--key",
            &t.client.1,
        ]);
        if let Some((u, p)) = &self.user {
            cmd.args(["--user", &format!("{u}:{p}")]);
        }
        let out = cmd.args(args).output().expect("etcdctl runs");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every key under the fleet prefix, with its value as text.
    async fn keys(&self) -> Vec<(String, String)> {
        let (kvs, _) = self.client().range_prefix("/ringtunnel/").await.unwrap();
        kvs.into_iter()
            .map(|kv| (kv.key, String::from_utf8_lossy(&kv.value).into_owned()))
            .collect()
    }

    /// Waits (at most `WAIT`) until `key` is there (`present`) or gone; how long it took.
    async fn wait_key(&self, key: &str, present: bool) -> Duration {
        let start = Instant::now();
        loop {
            let there = self.keys().await.iter().any(|(k, _)| k == key);
            if there == present {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < WAIT,
                "{key} still {} after {WAIT:?}",
                if present { "absent" } else { "present" }
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Relay number `n` (on 127.0.0.n) of the fleet registered at `registry`, sharing the
/// certificate of `first` (a fleet presents one identity), with `extra` flags.
fn member(n: u8, registry: &str, first: Option<&Relay>, extra: &[&str]) -> Relay {
    member_on(n, registry, first, &["--backend", "tokio"], extra)
}

/// [`member`] with the data-plane flags `backend` (`--backend uring --data-tls off`, say).
fn member_on(
    n: u8,
    registry: &str,
    first: Option<&Relay>,
    backend: &[&str],
    extra: &[&str],
) -> Relay {
    let id = format!("r{n}");
    let admin = format!("127.0.0.{n}:0");
    let mut args = vec![
        "--registry",
        registry,
        "--relay-id",
        &id,
        "--registry-ttl",
        TTL,
        "--port-range",
        RANGE,
        "--admin",
        &admin,
    ];
    args.extend_from_slice(backend);
    let (cert, key);
    if let Some(first) = first {
        cert = first.state.0.join("relay-cert.pem").display().to_string();
        key = first.state.0.join("relay-key.pem").display().to_string();
        args.extend(["--cert", &cert, "--key", &key]);
    }
    args.extend_from_slice(extra);
    Relay::spawn_on([127, 0, 0, n], Arc::new(TempDir::new("fleet")), &args)
}

/// Agent flags publishing `local` as `name` through every relay of `relays`.
fn agent_args(relays: &[&Relay], local: SocketAddr, name: &str, extra: &[&str]) -> Vec<String> {
    let list: Vec<String> = relays.iter().map(|r| r.control.to_string()).collect();
    let mut args: Vec<String> = [
        "agent",
        "--relay",
        &list.join(","),
        "--relay-fingerprint",
        &relays[0].fingerprint,
        "--secret",
        SECRET,
        "--local",
        &local.to_string(),
        "--name",
        name,
        "--backend",
        "tokio",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Waits for `n` `online` lines of `agent` (one per relay); their public addresses.
fn online(agent: &mut Proc, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| field(&agent.wait_line("online "), "public"))
        .collect()
}

/// The port of a `HOST:PORT` public address.
fn port_of(public: &str) -> u16 {
    public.rsplit(':').next().unwrap().parse().unwrap()
}

/// Echoes once through `addr`: whether it worked.
async fn echo_ok(addr: SocketAddr) -> bool {
    let payload = b"fleet visitor";
    matches!(
        tokio::time::timeout(Duration::from_secs(5), roundtrip(addr, payload)).await,
        Ok(Ok(back)) if back == payload
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_share_one_namespace() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let (_cfg_dir, config) = config_file(&format!(
        "domain = \"fleet.test\"\n[[service]]\nname = \"intruder\"\nsecret = \"{OTHER_SECRET}\"\n"
    ));
    let url = etcd.url();
    let http = |n: u8| format!("127.0.0.{n}:0");
    let (h1, h2, h3) = (http(1), http(2), http(3));
    let r1 = member(1, &url, None, &["--config", &config, "--http", &h1]);
    let r2 = member(2, &url, Some(&r1), &["--config", &config, "--http", &h2]);
    let r3 = member(3, &url, Some(&r1), &["--config", &config, "--http", &h3]);
    let local = echo_origin().await;

    // One agent on all three: the same port everywhere, and visitors served by each relay.
    let mut web = Proc::spawn(&agent_args(&[&r1, &r2, &r3], local, "web", &[]));
    let publics = online(&mut web, 3);
    let port = port_of(&publics[0]);
    assert!(
        publics.iter().all(|p| port_of(p) == port),
        "ports differ: {publics:?}"
    );
    for n in 1..=3 {
        assert_echo(SocketAddr::from(([127, 0, 0, n], port))).await;
    }

    // Another service cannot have that port on any relay, even one the first agent is not on.
    let port_s = port.to_string();
    let mut squat = Proc::spawn(&agent_args(
        &[&r3],
        local,
        "squat",
        &["--remote-port", &port_s],
    ));
    assert!(!squat.wait_exit().success());
    let why = squat.stderr();
    assert!(
        why.contains(&format!("port {port} is held by service web in the fleet")),
        "{why}"
    );

    // A host belongs to one secret fleet-wide: claimed through r1, refused to another secret
    // through r3.
    let mut app = Proc::spawn(&agent_args(&[&r1], local, "app", &["--http-host", "app"]));
    online(&mut app, 1);
    let r3_control = r3.control.to_string();
    let intruder_args: Vec<String> = [
        "agent",
        "--relay",
        &r3_control,
        "--relay-fingerprint",
        &r1.fingerprint,
        "--secret",
        OTHER_SECRET,
        "--local",
        &local.to_string(),
        "--name",
        "intruder",
        "--http-host",
        "app",
    ]
    .map(String::from)
    .to_vec();
    let mut intruder = Proc::spawn(&intruder_args);
    assert!(!intruder.wait_exit().success());
    let why = intruder.stderr();
    assert!(
        why.contains(
            "app.fleet.test belongs to service app in the fleet, which another secret holds"
        ),
        "{why}"
    );

    // What etcd holds: each relay once, each claim once.
    let keys = etcd.keys().await;
    let names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
    for want in [
        "/ringtunnel/relays/r1".to_string(),
        "/ringtunnel/relays/r2".into(),
        "/ringtunnel/relays/r3".into(),
        "/ringtunnel/services/web".into(),
        "/ringtunnel/services/app".into(),
        format!("/ringtunnel/ports/tcp/{port}"),
        "/ringtunnel/hosts/app.fleet.test/app".into(),
    ] {
        assert!(
            names.contains(&want.as_str()),
            "{want} missing in {names:?}"
        );
    }
    assert!(
        !names
            .iter()
            .any(|k| k.contains("squat") || k.contains("intruder")),
        "a refused claim left keys: {names:?}"
    );
    assert_eq!(names.len(), 7, "{names:?}");
}

/// Claims racing for one port and one host from many relays at once: exactly one wins each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_claims_have_one_winner() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let range = PortRange {
        start: 12000,
        end: 15999,
    };
    let mut tasks = Vec::new();
    for i in 0..12 {
        let fleet = Fleet::new(FleetSettings {
            registry: etcd.url(),
            relay_id: format!("r{i}"),
            advertise: "127.0.0.1:1".into(),
            prefix: "/ringtunnel/".into(),
            ttl: Duration::from_secs(10),
            access: Default::default(),
        })
        .unwrap();
        tasks.push(tokio::spawn(async move {
            let port = fleet
                .claim(
                    &Claim {
                        name: format!("svc{i}"),
                        kind: ServiceKind::Tcp,
                        port: 13000,
                        hosts: vec![],
                        path: String::new(),
                        owner: format!("service:svc{i}"),
                    },
                    range,
                )
                .await;
            let host = fleet
                .claim(
                    &Claim {
                        name: format!("site{i}"),
                        kind: ServiceKind::Http,
                        port: 0,
                        hosts: vec!["shop.fleet.test".into()],
                        path: "/".into(),
                        owner: format!("service:site{i}"),
                    },
                    range,
                )
                .await;
            (port, host)
        }));
    }
    let mut port_wins = 0;
    let mut host_wins = 0;
    for t in tasks {
        let (port, host) = t.await.unwrap();
        match port {
            Ok(c) => {
                assert_eq!(c.port, 13000);
                port_wins += 1;
            }
            Err(ClaimError::PortTaken { port: 13000, .. }) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
        match host {
            Ok(_) => host_wins += 1,
            Err(ClaimError::HostOwned { .. }) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!((port_wins, host_wins), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_leaves_the_others_serving_and_rejoins() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let url = etcd.url();
    let mut r1 = member(1, &url, None, &[]);
    let r2 = member(2, &url, Some(&r1), &[]);
    let local = echo_origin().await;
    let mut agent = Proc::spawn(&agent_args(&[&r1, &r2], local, "web", &[]));
    let port = port_of(&online(&mut agent, 2)[0]);
    let addrs = [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from(([127, 0, 0, 2], port)),
    ];

    // Visitors alternate between the relays, each retried once through the other (as a
    // client behind DNS round-robin does).
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut served, mut first_failed, mut lost) = (0u32, 0u32, 0u32);
            // Paced under the relays' per-address connection rate.
            for i in 0..2_000usize {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                let first = addrs[i % 2];
                if echo_ok(first).await {
                    served += 1;
                    continue;
                }
                first_failed += 1;
                match echo_ok(addrs[(i + 1) % 2]).await {
                    true => served += 1,
                    false => lost += 1,
                }
            }
            (served, first_failed, lost)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    r1.proc.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (served, first_failed, lost) = load.await.unwrap();
    assert_eq!(
        lost, 0,
        "visitors lost after their retry ({served} served, {first_failed} retried)"
    );
    assert!(served > 0);
    eprintln!("relay killed under load: {served} visitors served, {first_failed} needed their retry, 0 lost");

    // The agent keeps its port on r2; r1's presence lapses after the TTL.
    assert_echo(addrs[1]).await;
    etcd.wait_key("/ringtunnel/relays/r1", false).await;
    eprintln!(
        "r1's presence left etcd {:.1} s after the kill (TTL {TTL} s)",
        killed.elapsed().as_secs_f64()
    );
    let keys = etcd.keys().await;
    assert!(
        keys.iter().any(|(k, _)| k == "/ringtunnel/services/web"),
        "the service's claim went with the relay: {keys:?}\n{}",
        r2.proc.stderr()
    );

    // Restarted on the same address, r1 rejoins and serves the same port again.
    let restarted = Instant::now();
    let r1 = r1.restart();
    online(&mut agent, 1);
    eprintln!(
        "r1 restarted: serving the agent's port again {:.1} s later",
        restarted.elapsed().as_secs_f64()
    );
    assert_echo(addrs[0]).await;
    etcd.wait_key("/ringtunnel/relays/r1", true).await;
    drop(r1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_existing_services_serve_and_new_ones_wait() {
    let Some(mut etcd) = EtcdServer::start() else {
        return;
    };
    let url = etcd.url();
    let r1 = member(1, &url, None, &[]);
    let r2 = member(2, &url, Some(&r1), &[]);
    let local = echo_origin().await;
    let mut web = Proc::spawn(&agent_args(&[&r1, &r2], local, "web", &[]));
    let port = port_of(&online(&mut web, 2)[0]);

    etcd.kill();
    let down = Instant::now();
    r1.proc.wait_stderr("fleet registry unreachable (");
    eprintln!(
        "relay noticed etcd was down after {:.1} s",
        down.elapsed().as_secs_f64()
    );
    for n in 1..=2 {
        assert_echo(SocketAddr::from(([127, 0, 0, n], port))).await;
    }
    // A new service waits (the agent retries) with the reason.
    let mut late = Proc::spawn(&agent_args(&[&r1], local, "late", &[]));
    late.wait_stderr("the fleet registry is unavailable");
    assert!(late.is_running(), "the agent gave up instead of retrying");

    // Past a TTL with etcd down, the services still serve.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for n in 1..=2 {
        assert_echo(SocketAddr::from(([127, 0, 0, n], port))).await;
    }

    etcd.launch(&[]);
    let back = Instant::now();
    let late_public = online(&mut late, 1).remove(0);
    eprintln!(
        "etcd back: the waiting service came online {:.1} s later",
        back.elapsed().as_secs_f64()
    );
    r1.proc.wait_stderr("fleet registry reachable again");
    // Reconciled, nothing twice: one key per service and port, each port its service's.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let keys = etcd.keys().await;
    let services: Vec<&String> = keys
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.contains("/services/"))
        .collect();
    let ports: Vec<&(String, String)> =
        keys.iter().filter(|(k, _)| k.contains("/ports/")).collect();
    assert_eq!(services.len(), 2, "{keys:?}");
    assert_eq!(ports.len(), 2, "{keys:?}");
    assert!(keys
        .iter()
        .any(|(k, v)| *k == format!("/ringtunnel/ports/tcp/{port}") && v.contains("\"web\"")));
    let late_port = port_of(&late_public);
    assert_ne!(late_port, port);
    assert_echo(SocketAddr::from(([127, 0, 0, 1], late_port))).await;
    drop((r1, r2));
}

/// A TCP forwarder to etcd that the test can cut (then it swallows connections silently, as
/// a dropping firewall does) and mend: one relay's way to the registry.
struct Cuttable {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl Cuttable {
    async fn to(upstream: u16) -> Cuttable {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let c = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let cut = c.clone();
                tokio::spawn(async move {
                    if cut.load(Ordering::Relaxed) {
                        // Held open, never answered, until the caller gives up.
                        let mut sink = [0u8; 4096];
                        while let Ok(Ok(n)) = tokio::time::timeout(
                            Duration::from_secs(30),
                            tokio::io::AsyncReadExt::read(&mut s, &mut sink),
                        )
                        .await
                        {
                            if n == 0 {
                                break;
                            }
                        }
                        return;
                    }
                    if let Ok(mut up) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                    }
                });
            }
        });
        Cuttable { addr, cut }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_off_from_etcd_takes_no_new_claims_and_yields_on_return() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let way = Cuttable::to(etcd.client).await;
    let r1 = member(1, &etcd.url(), None, &[]);
    let r3 = member(3, &format!("etcd://{}", way.addr), Some(&r1), &[]);
    let local = echo_origin().await;
    let mut solo = Proc::spawn(&agent_args(&[&r3], local, "solo", &[]));
    let port = port_of(&online(&mut solo, 1)[0]);

    way.cut.store(true, Ordering::Relaxed);
    let cut = Instant::now();
    // No new claim through the cut-off relay...
    let fresh = Proc::spawn(&agent_args(&[&r3], local, "fresh", &[]));
    fresh.wait_stderr("the fleet registry is unavailable");
    drop(fresh);
    // ...while what it has keeps serving.
    assert_echo(SocketAddr::from(([127, 0, 0, 3], port))).await;

    // Nobody renews solo's claim now: it lapses one TTL later, and the port is free to the
    // rest of the fleet.
    let lapsed = etcd.wait_key("/ringtunnel/services/solo", false).await;
    eprintln!(
        "cut-off relay's claim lapsed {:.1} s after the cut (TTL {TTL} s; {:.1} s of waiting here)",
        cut.elapsed().as_secs_f64(),
        lapsed.as_secs_f64()
    );
    let port_s = port.to_string();
    let mut other = Proc::spawn(&agent_args(
        &[&r1],
        local,
        "other",
        &["--remote-port", &port_s],
    ));
    online(&mut other, 1);

    // Mended: the cut-off relay finds its claim gone to another service, and gives the
    // service up rather than serve a second owner on that port.
    way.cut.store(false, Ordering::Relaxed);
    let mended = Instant::now();
    r3.proc.wait_stderr("service closed:");
    eprintln!(
        "mended: the relay gave up its stale service {:.1} s later",
        mended.elapsed().as_secs_f64()
    );
    assert!(!solo.wait_exit().success());
    let why = solo.stderr();
    assert!(why.contains("held by service other in the fleet"), "{why}");
    // The whole fleet now agrees: the port is other's, on r3 too (handed over to r1).
    r3.proc.wait_stderr(
        "fleet: handing this service's visitors to the relays its agent is on service=other",
    );
    assert_echo(SocketAddr::from(([127, 0, 0, 3], port))).await;
    assert_echo(SocketAddr::from(([127, 0, 0, 1], port))).await;
}

/// A round trip from source address `from` to `to`: the bytes back, or the error.
async fn roundtrip_from(from: [u8; 4], to: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    let mut s = socket.connect(to).await?;
    s.write_all(payload).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await?;
    Ok(back)
}

/// A visitor that reaches a relay its service's agent is not connected to is handed to a
/// relay that has the agent: served with its own address (the receiving relay's address
/// lists judge it), bytes intact both ways; once the agent joins the first relay too, that
/// relay serves the visitor itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_of_a_relay_without_the_agent_is_handed_to_one_with_it() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let (_cfg_dir, config) =
        config_file("[[service]]\nname = \"web\"\n[service.access]\ndeny = [\"127.0.0.10\"]\n");
    let url = etcd.url();
    let uring = ["--backend", "uring", "--data-tls", "off"];
    let tokio = ["--backend", "tokio"];
    let holder = if Backend::uring().is_some() {
        &uring[..]
    } else {
        &tokio[..]
    };
    let r1 = member_on(
        1,
        &url,
        None,
        holder,
        &["--config", &config, "--access-log"],
    );
    let r2 = member(2, &url, Some(&r1), &["--config", &config]);
    let local = echo_origin().await;
    let mut agent = Proc::spawn(&agent_args(&[&r1], local, "web", &[]));
    let port = port_of(&online(&mut agent, 1)[0]);
    let via_r2 = SocketAddr::from(([127, 0, 0, 2], port));

    // r2 learns within a renewal round that only r1 has the agent, and opens the port.
    r2.proc
        .wait_stderr("fleet: handing this service's visitors to the relays its agent is on");
    let payload = pseudo_random(7, 1 << 20);
    let back = match roundtrip_from([127, 0, 0, 9], via_r2, &payload).await {
        Ok(b) => b,
        Err(e) => panic!("{e}\nr1:\n{}\nr2:\n{}", r1.proc.stderr(), r2.proc.stderr()),
    };
    assert_eq!(sha256(&back), sha256(&payload), "bytes changed on the way");
    // r1 served it, and saw the visitor's own address.
    r1.proc.wait_stderr("127.0.0.9");
    // One visitor after another: the relay-to-relay connection is reused, as an agent's
    // data connections are (sequential visitors need just one).
    for i in 0..20u8 {
        let back = roundtrip_from([127, 0, 0, 9], via_r2, &[i; 100])
            .await
            .unwrap();
        assert_eq!(back, vec![i; 100]);
    }
    let admin = r1.admin.unwrap();
    let received = metric(admin, "ringtunnel_handovers_received_total").await;
    let opened = metric(admin, "ringtunnel_peer_connections_total").await;
    assert!(received >= Some(21), "{received:?}");
    assert!(opened <= Some(3), "a connection per visitor: {opened:?}");
    eprintln!(
        "21 visitors handed over on {} relay-to-relay connection(s)",
        opened.unwrap_or(0)
    );
    // r1's address list applies to the visitor's real address, not r2's.
    let denied = roundtrip_from([127, 0, 0, 10], via_r2, b"let me in").await;
    assert!(
        denied.map(|b| b.is_empty()).unwrap_or(true),
        "a denied visitor was served through the other relay"
    );

    // The agent on r2 too: r2 lets go of the hand-over port and serves it itself.
    let mut second = Proc::spawn(&agent_args(&[&r2], local, "web", &[]));
    online(&mut second, 1);
    assert_echo(via_r2).await;
    let r2_log = r2.proc.stderr();
    assert!(r2_log.contains("service online"), "{r2_log}");
    drop(second);
}

/// The relay a visitor was handed to dies mid-stream: the visitor, on the relay that handed
/// it over, sees its connection reset, not a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_over_visitor_whose_relay_dies_is_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let url = etcd.url();
    let mut r1 = member(1, &url, None, &[]);
    let r2 = member(2, &url, Some(&r1), &[]);
    let local = echo_origin().await;
    let mut agent = Proc::spawn(&agent_args(&[&r1], local, "web", &[]));
    let port = port_of(&online(&mut agent, 1)[0]);
    r2.proc
        .wait_stderr("fleet: handing this service's visitors to the relays its agent is on");
    let mut visitor = tokio::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 2], port)))
        .await
        .unwrap();
    visitor.write_all(b"still here?").await.unwrap();
    let mut back = [0u8; 11];
    visitor.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here?");
    r1.proc.kill();
    let ended = read_to_end_or_error(&mut visitor).await;
    assert!(ended.is_err(), "a cut stream ended cleanly: {ended:?}");
}

/// A relay-to-relay connection to `relay`, said hello on, and the challenge it got.
async fn challenged(
    relay: &Relay,
) -> (
    ringtunnel::transport::Framed<ringtunnel::transport::BoxStream>,
    ringtunnel::protocol::auth::Nonce,
) {
    use ringtunnel::protocol::{AgentMsg, RelayMsg, PROTOCOL_VERSION};
    let limit = Duration::from_secs(10);
    let mut peer = ringtunnel::transport::Framed::new(tls_connect(relay).await);
    let hello = AgentMsg::PeerHello {
        version: PROTOCOL_VERSION,
    };
    peer.write_msg(&hello, limit).await.unwrap();
    let RelayMsg::Challenge { nonce, .. } = peer.read_msg_within(limit).await.unwrap() else {
        panic!("expected a challenge")
    };
    (peer, nonce)
}

/// The control port's hand-over door, attacked: a visitor offered without the service's
/// secret, for a service with no agent here, garbage after the hello, and a relay in no
/// fleet. None gets a visitor served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handovers_without_the_secret_or_an_agent_are_refused() {
    use ringtunnel::protocol::auth::peer_mac;
    use ringtunnel::protocol::{AgentMsg, ErrorCode, RelayMsg};
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let r1 = member(1, &etcd.url(), None, &[]);
    let local = echo_origin().await;
    let mut agent = Proc::spawn(&agent_args(&[&r1], local, "web", &[]));
    let port = port_of(&online(&mut agent, 1)[0]);
    let lone = Relay::spawn(Backend::Tokio, &[]);
    let limit = Duration::from_secs(10);
    let visitor: SocketAddr = "127.0.0.9:4000".parse().unwrap();
    // (relay, service, secret, the code expected)
    let cases = [
        (
            &r1,
            "web",
            "not the secret at all, no",
            ErrorCode::AuthFailed,
        ),
        (&r1, "nobody", SECRET, ErrorCode::Internal),
        (&lone, "web", SECRET, ErrorCode::AuthFailed),
    ];
    for (relay, service, secret, code) in cases {
        let (mut peer, nonce) = challenged(relay).await;
        let visit = AgentMsg::PeerVisit {
            service: service.into(),
            visitor,
            mac: peer_mac(secret.as_bytes(), &nonce, service, &visitor),
        };
        peer.write_msg(&visit, limit).await.unwrap();
        match peer.read_msg_within::<RelayMsg>(limit).await.unwrap() {
            RelayMsg::Error { code: got, message } => {
                assert_eq!(got, code, "{service} at {}: {message}", relay.control)
            }
            other => panic!("{service}: expected a refusal, got {other:?}"),
        }
    }
    // Garbage where the visitor frame belongs: closed, nothing served.
    let (mut peer, _) = challenged(&r1).await;
    use tokio::io::AsyncWriteExt;
    peer.get_mut().write_all(&[0xff; 64]).await.unwrap();
    match peer.read_msg_within::<RelayMsg>(limit).await {
        Ok(RelayMsg::Error { code, .. }) => assert_eq!(code, ErrorCode::BadRequest),
        Ok(other) => panic!("garbage answered with {other:?}"),
        Err(_) => {}
    }
    assert!(
        peer.read_msg_within::<RelayMsg>(limit).await.is_err(),
        "the connection stayed open"
    );
    // The relay carries on: its agent's visitors are served.
    assert_echo(SocketAddr::from(([127, 0, 0, 1], port))).await;
}

/// An origin that answers every visitor with `tag` and closes.
async fn tagged(tag: &'static [u8]) -> SocketAddr {
    origin(move |mut s: tokio::net::TcpStream| async move {
        use tokio::io::AsyncWriteExt;
        let _ = s.write_all(tag).await;
        let _ = s.shutdown().await;
    })
    .await
}

/// What one visitor through `addr` hears (empty if refused).
async fn heard(addr: SocketAddr) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

/// Two agents of one service, each on its own relay: a third relay spreads its visitors over
/// both; when one agent goes, its relay's visitors go to the other agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_of_one_service_on_different_relays_share_its_visitors() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let url = etcd.url();
    let r1 = member(1, &url, None, &[]);
    let r2 = member(2, &url, Some(&r1), &[]);
    let r3 = member(3, &url, Some(&r1), &[]);
    let (a, b) = (tagged(b"A").await, tagged(b"B").await);
    let mut agent_a = Proc::spawn(&agent_args(&[&r1], a, "web", &[]));
    let port = port_of(&online(&mut agent_a, 1)[0]);
    let mut agent_b = Proc::spawn(&agent_args(&[&r2], b, "web", &[]));
    assert_eq!(
        port_of(&online(&mut agent_b, 1)[0]),
        port,
        "one port fleet-wide"
    );

    // r3 has neither agent: it hands its visitors to both relays.
    r3.proc
        .wait_stderr("fleet: handing this service's visitors to the relays its agent is on");
    let via = |n: u8| SocketAddr::from(([127, 0, 0, n], port));
    let deadline = Instant::now() + WAIT;
    let (mut saw_a, mut saw_b) = (0, 0);
    while (saw_a == 0 || saw_b == 0) && Instant::now() < deadline {
        match &heard(via(3)).await[..] {
            b"A" => saw_a += 1,
            b"B" => saw_b += 1,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(
        saw_a > 0 && saw_b > 0,
        "r3 gave its visitors to one agent only (A {saw_a}, B {saw_b})"
    );

    // Agent A goes: r1 stops waiting for it and hands its visitors to r2's agent.
    let gone = Instant::now();
    drop(agent_a);
    r1.proc
        .wait_stderr("its agent left this relay but not the fleet");
    let mut answer = heard(via(1)).await;
    while answer != b"B" && gone.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(100)).await;
        answer = heard(via(1)).await;
    }
    assert_eq!(answer, b"B");
    eprintln!(
        "agent A gone: r1's visitors reached agent B {:.1} s later",
        gone.elapsed().as_secs_f64()
    );
    for _ in 0..10 {
        assert_eq!(
            heard(via(3)).await,
            b"B",
            "r3 still hands visitors to the agent that left"
        );
    }
}

/// An HTTP origin that answers each request with the request head it received.
async fn head_echo() -> SocketAddr {
    origin(|mut s: tokio::net::TcpStream| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut head = Vec::new();
        let mut b = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&b[..n]),
            }
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            head.len()
        );
        let _ = s.write_all(answer.as_bytes()).await;
        let _ = s.write_all(&head).await;
    })
    .await
}

/// `http` and `tls` hosts whose agent is on another relay: a visitor of the shared ports
/// here is handed there, routed and admitted by that relay as its own (its forwarding
/// headers name the visitor). A hand-over proven with one secret reaches no host of another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visitors_of_hosts_served_elsewhere_are_handed_over() {
    use ringtunnel::protocol::auth::peer_mac;
    use ringtunnel::protocol::{AgentMsg, RelayMsg};
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let url = etcd.url();
    let (_cfg_dir, config) = config_file(&format!(
        "[[service]]\nname = \"other\"\nsecret = \"{OTHER_SECRET}\"\n"
    ));
    let ports = |n: u8| {
        let (http, tls) = (format!("127.0.0.{n}:0"), format!("127.0.0.{n}:0"));
        [
            "--http".to_string(),
            http,
            "--tls".into(),
            tls,
            "--domain".into(),
            "example.test".into(),
            "--config".into(),
            config.clone(),
        ]
    };
    let (p1, p2) = (ports(1), ports(2));
    let p1: Vec<&str> = p1.iter().map(String::as_str).collect();
    let p2: Vec<&str> = p2.iter().map(String::as_str).collect();
    let r1 = member(1, &url, None, &p1);
    // The relay handing over serves its shared ports on the io_uring workers where it can.
    let uring = ["--backend", "uring", "--data-tls", "off"];
    let tokio = ["--backend", "tokio"];
    let sender = if Backend::uring().is_some() {
        &uring[..]
    } else {
        &tokio[..]
    };
    let r2 = member_on(2, &url, Some(&r1), sender, &p2);
    let mut blog = Proc::spawn(&agent_args(
        &[&r1],
        head_echo().await,
        "blog",
        &["--http-host", "blog"],
    ));
    online(&mut blog, 1);
    let mut vault = Proc::spawn(&agent_args(
        &[&r1],
        tagged(b"vault answered").await,
        "vault",
        &["--tls-host", "vault"],
    ));
    online(&mut vault, 1);
    let mut other_args = agent_args(
        &[&r1],
        tagged(b"other answered").await,
        "other",
        &["--http-host", "other"],
    );
    let secret_at = other_args.iter().position(|a| a == "--secret").unwrap();
    other_args[secret_at + 1] = OTHER_SECRET.into();
    let mut other = Proc::spawn(&other_args);
    online(&mut other, 1);
    r2.proc
        .wait_stderr("fleet: handing visitors of these services' hosts");
    let deadline = std::time::Instant::now() + WAIT;
    while !r2.proc.stderr().contains("blog,other,vault") {
        assert!(std::time::Instant::now() < deadline, "{}", r2.proc.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // HTTP through r2's port: served by r1's agent, the visitor named in the headers.
    let request = b"GET /post/1 HTTP/1.1\r\nHost: blog.example.test\r\nConnection: close\r\n\r\n";
    let answer = roundtrip_from([127, 0, 0, 9], r2.http.unwrap(), request)
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("GET /post/1"), "{answer}");
    assert!(
        answer.contains("X-Forwarded-For: 127.0.0.9"),
        "the visitor's own address: {answer}"
    );
    // TLS through r2's port, routed by SNI.
    let hello = client_hello("vault.example.test");
    let heard = roundtrip_from([127, 0, 0, 9], r2.tls.unwrap(), &hello)
        .await
        .unwrap();
    assert_eq!(heard, b"vault answered");
    // An unknown host is still r2's own 404.
    let unknown = b"GET / HTTP/1.1\r\nHost: nobody.example.test\r\n\r\n";
    let answer = roundtrip_from([127, 0, 0, 9], r2.http.unwrap(), unknown)
        .await
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 404"));

    // A hand-over proven with blog's secret, for other's host: r1 routes it to no service.
    let (mut peer, nonce) = challenged(&r1).await;
    let visitor: SocketAddr = "127.0.0.9:4000".parse().unwrap();
    let visit = AgentMsg::PeerVisit {
        service: "blog".into(),
        visitor,
        mac: peer_mac(SECRET.as_bytes(), &nonce, "blog", &visitor),
    };
    let limit = Duration::from_secs(10);
    peer.write_msg(&visit, limit).await.unwrap();
    let started = peer.read_msg_within::<RelayMsg>(limit).await.unwrap();
    assert!(matches!(started, RelayMsg::Start { .. }), "{started:?}");
    let mut chunks = Vec::new();
    let wrong_host = b"GET / HTTP/1.1\r\nHost: other.example.test\r\nConnection: close\r\n\r\n";
    ringtunnel::protocol::chunk::push_chunks(&mut chunks, wrong_host);
    let (mut stream, _) = peer.into_parts();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(&chunks).await.unwrap();
    let mut back = vec![0u8; 4096];
    let n = tokio::time::timeout(limit, stream.read(&mut back))
        .await
        .unwrap()
        .unwrap();
    let back = String::from_utf8_lossy(&back[..n]);
    assert!(back.contains("404"), "{back}");
    assert!(!back.contains("other answered"), "{back}");
    drop((blog, vault, other));
}

/// A fleet on an etcd that speaks only TLS, wants a client certificate and has its
/// authentication on, with tokens that expire every second: relays with the CA, the client
/// certificate and a user limited to the fleet's prefix claim and serve (re-authenticating
/// as tokens expire); one with a wrong password, without the client certificate, or without
/// the CA gets nothing and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_etcd_over_tls_with_a_user() {
    let Some(mut etcd) =
        EtcdServer::start_tls(&["--auth-token", "simple", "--auth-token-ttl", "1"])
    else {
        return;
    };
    etcd.ctl(&[
        "user",
        "add",
        "root",
        "--new-user-password",
        "root-password",
    ]);
    etcd.ctl(&["role", "add", "fleet"]);
    etcd.ctl(&[
        "role",
        "grant-permission",
        "fleet",
        "--prefix=true",
        "readwrite",
        "/ringtunnel/",
    ]);
    etcd.ctl(&[
        "user",
        "add",
        "relay",
        "--new-user-password",
        "relay-password",
    ]);
    etcd.ctl(&["user", "grant-role", "relay", "fleet"]);
    etcd.ctl(&["auth", "enable"]);
    etcd.user = Some(("root".into(), "root-password".into()));
    let t = etcd.tls.as_ref().unwrap();
    let dir = TempDir::new("registry-secrets");
    let (good, bad) = (dir.0.join("good"), dir.0.join("bad"));
    std::fs::write(&good, "relay-password\n").unwrap();
    std::fs::write(&bad, "not-the-password\n").unwrap();
    let (good, bad) = (good.display().to_string(), bad.display().to_string());
    let url = etcd.url();
    let with = |ca: bool, cert: bool, password: &str| {
        let mut a: Vec<String> = vec!["--registry-user".into(), "relay".into()];
        a.extend(["--registry-password-file".into(), password.to_string()]);
        if ca {
            a.extend(["--registry-ca".into(), t.ca.clone()]);
        }
        if cert {
            a.extend(["--registry-cert".into(), t.client.0.clone()]);
            a.extend(["--registry-key".into(), t.client.1.clone()]);
        }
        a
    };
    let flags = with(true, true, &good);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let r1 = member(1, &url, None, &flags);
    let local = echo_origin().await;
    let mut agent = Proc::spawn(&agent_args(&[&r1], local, "web", &[]));
    let port = port_of(&online(&mut agent, 1)[0]);
    assert_echo(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let keys = etcd.keys().await;
    assert!(
        keys.iter().any(|(k, _)| k == "/ringtunnel/services/web"),
        "{keys:?}"
    );

    // Past several token lifetimes: the leases were renewed (re-authenticating), and a new
    // claim still passes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut later = Proc::spawn(&agent_args(&[&r1], local, "later", &[]));
    online(&mut later, 1);
    let keys = etcd.keys().await;
    for key in ["/ringtunnel/services/web", "/ringtunnel/services/later"] {
        assert!(keys.iter().any(|(k, _)| k == key), "{key} in {keys:?}");
    }

    // Each missing piece: the relay starts, claims nothing, and names the problem once.
    let cases = [
        (
            with(true, true, &bad),
            "fleet registry refuses this relay (authenticating as relay",
        ),
        (with(true, false, &good), "BadCertificate"),
        (with(false, true, &good), "invalid peer certificate"),
    ];
    for (n, (flags, why)) in (2u8..).zip(cases) {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let relay = member(n, &url, Some(&r1), &flags);
        let mut refused = Proc::spawn(&agent_args(&[&relay], local, "web", &[]));
        refused.wait_stderr("the fleet registry is unavailable");
        relay.proc.wait_stderr(why);
        refused.kill();
    }
    let keys = etcd.keys().await;
    assert!(
        !keys.iter().any(|(k, _)| k.contains("relays/r2")
            || k.contains("relays/r3")
            || k.contains("relays/r4")),
        "{keys:?}"
    );
    drop((agent, later));
}
