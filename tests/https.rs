//! End-to-end: HTTPS at the relay (`--https`) with certificates from a real ACME CA, Debian's
//! `pebble`, started by the test on free loopback ports with `pebble-challtestsrv` as its DNS
//! (every name is 127.0.0.1), so the CA validates HTTP-01 against the relay's shared HTTP
//! port for real. On both backends: an `http` service's host gets a certificate ahead of its
//! first visitor, kept in the state directory (key 0600) and served again after a restart
//! with no new issuance; its visitors are terminated at the relay and routed by `Host`
//! (`X-Forwarded-Proto: https`); a `tls` service's host on the same port passes through
//! untouched; a name nobody claims gets no certificate; a `Host` other than the SNI name is
//! answered 421. Without pebble on PATH the tests say so and pass, unless
//! `RINGTUNNEL_REQUIRE_PEBBLE=1` (as in `.ci/run`, which installs it).

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use ringtunnel::acme::fetch::Fetcher;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A running pebble and its DNS, killed on drop.
struct Pebble {
    _dns: Proc,
    proc: Proc,
    /// The ACME directory URL.
    directory: String,
    /// The management interface (roots of the certificates it issues).
    management: SocketAddr,
    /// The CA file that pebble's own HTTPS certificate is signed by.
    ca_file: PathBuf,
    _dir: TempDir,
}

impl Pebble {
    /// Starts pebble validating HTTP-01 on `http_port`, or `None` when it is not installed.
    fn start(http_port: u16) -> Option<Pebble> {
        Self::start_with(http_port, free_port())
    }

    /// Starts pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`.
    fn start_with(http_port: u16, tls_port: u16) -> Option<Pebble> {
        if !installed("pebble", "-h", "pebble", "RINGTUNNEL_REQUIRE_PEBBLE") {
            return None;
        }
        let dir = TempDir::new("pebble");
        // pebble's own HTTPS certificate, from a CA of the test's.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let ca_file = dir.0.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(dir.0.join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.0.join("key.pem"), leaf_key.serialize_pem()).unwrap();

        let dns_port = free_port();
        let dns_args: Vec<String> = [
            "-dns01",
            &format!("127.0.0.1:{dns_port}"),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            &format!("127.0.0.1:{}", free_port()),
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let dns = Proc::spawn_program(Path::new("pebble-challtestsrv"), &dns_args, &[], None);

        let (listen, management) = (free_port(), free_port());
        let config = dir.0.join("pebble.json");
        std::fs::write(
            &config,
            serde_json::json!({ "pebble": {
                "listenAddress": format!("127.0.0.1:{listen}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": dir.0.join("cert.pem"),
                "privateKey": dir.0.join("key.pem"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }})
            .to_string(),
        )
        .unwrap();
        let args = [
            "-config".to_string(),
            config.display().to_string(),
            "-dnsserver".into(),
            format!("127.0.0.1:{dns_port}"),
        ];
        let env = [("PEBBLE_VA_NOSLEEP", "1"), ("PEBBLE_WFE_NONCEREJECT", "0")];
        let mut proc = Proc::spawn_program(Path::new("pebble"), &args, &env, None);
        let addr: SocketAddr = ([127, 0, 0, 1], listen).into();
        wait_listening(&mut proc, addr, "pebble");
        wait_listening(
            &mut proc,
            ([127, 0, 0, 1], management).into(),
            "pebble's management port",
        );
        Some(Pebble {
            _dns: dns,
            proc,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            management: ([127, 0, 0, 1], management).into(),
            ca_file,
            _dir: dir,
        })
    }

    /// The root that pebble's issued certificates chain to (it makes a new one each run).
    async fn issuing_root(&self) -> CertificateDer<'static> {
        let fetch = Fetcher::new(Some(&self.ca_file)).unwrap();
        let url = format!("https://{}/roots/0", self.management);
        let r = fetch.request("GET", &url, None).await.unwrap();
        assert_eq!(r.status, 200);
        CertificateDer::from_pem_slice(&r.body).unwrap()
    }
}

/// An origin that answers every request with its own request head as the body, and closes
/// after a request that says `Connection: close`.
async fn head_echo_origin() -> SocketAddr {
    origin(|mut s: TcpStream| async move {
        let mut buf = Vec::new();
        while let Some(head) = next_head(&mut s, &mut buf).await {
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{head}",
                head.len()
            );
            if s.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
            if head
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n")
            {
                return;
            }
        }
    })
    .await
}

/// An agent publishing a [`head_echo_origin`] as the `http` service `name` on host `name`.
async fn http_agent(relay: &Relay, name: &str) -> Agent {
    let mut args = relay.agent_args(head_echo_origin().await, name);
    args.extend(["--http-host".into(), name.into()]);
    Agent::spawn(args)
}

/// One HTTPS request to `port` for `sni` with `Host: host`: the whole response.
async fn https_get_raw(
    tls: &tokio_rustls::TlsConnector,
    port: SocketAddr,
    sni: &str,
    host: &str,
) -> std::io::Result<String> {
    let tcp = TcpStream::connect(port).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut s = tls.connect(name, tcp).await?;
    let req = format!("GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    match read.map_err(|_| std::io::Error::other("no end of the response in time"))? {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => {}
        Err(e) => return Err(e),
    }
    Ok(String::from_utf8_lossy(&out).to_string())
}

/// [`https_get_raw`]: status and body.
async fn https_get(
    tls: &tokio_rustls::TlsConnector,
    port: SocketAddr,
    sni: &str,
    host: &str,
) -> std::io::Result<(u16, String)> {
    let text = https_get_raw(tls, port, sni, host).await?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// [`https_get`] until the first certificate is issued (its first visitors may be closed
/// while pebble validates), for at most a minute.
async fn first_https_get(
    tls: &tokio_rustls::TlsConnector,
    port: SocketAddr,
    host: &str,
) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match https_get(tls, port, host, host).await {
            Ok(r) => return r,
            Err(e) => assert!(
                Instant::now() < deadline,
                "no HTTPS answer for {host} within a minute: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The ACME store of a relay's state directory (one directory per CA).
fn store_of(state: &Path) -> PathBuf {
    let acme = state.join("acme");
    let mut dirs = std::fs::read_dir(&acme)
        .unwrap_or_else(|e| panic!("{}: {e}", acme.display()))
        .map(|e| e.unwrap().path());
    let dir = dirs.next().expect("an ACME store");
    assert!(dirs.next().is_none(), "one CA, one store");
    dir
}

/// A relay terminating HTTPS with certificates from `pebble`, its HTTP port on `http_port`
/// (where pebble validates HTTP-01).
fn pebble_relay(backend: Backend, pebble: &Pebble, http_port: u16) -> Relay {
    let http = format!("127.0.0.1:{http_port}");
    pebble_relay_with(
        backend,
        pebble,
        &["--http", &http, "--https", "127.0.0.1:0"],
    )
}

/// A relay terminating HTTPS with certificates from `pebble`, its shared ports given by
/// `ports`.
fn pebble_relay_with(backend: Backend, pebble: &Pebble, ports: &[&str]) -> Relay {
    let ca = pebble.ca_file.display().to_string();
    let mut flags = ports.to_vec();
    flags.extend([
        "--domain",
        "example.test",
        "--acme-directory",
        pebble.directory.as_str(),
        "--acme-ca-file",
        ca.as_str(),
        "--acme-email",
        "ops@example.test",
        "--admin",
        "127.0.0.1:0",
    ]);
    Relay::spawn(backend, &flags)
}

/// `relay` killed and started again on its state directory, once its fixed HTTP port is free:
/// a uring relay's listeners are let go by the kernel's ring teardown a moment after the
/// process is gone.
fn restart_on(mut relay: Relay, http_port: u16) -> Relay {
    relay.proc.kill();
    let deadline = Instant::now() + WAIT;
    while std::net::TcpListener::bind(("127.0.0.1", http_port)).is_err() {
        assert!(Instant::now() < deadline, "port {http_port} never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    relay.restart()
}

/// Puts a self-signed certificate for `host`, valid from `not_before` to `not_after`, in the
/// store of `relay` for the CA at `directory` (as an earlier run would have left one); returns
/// it.
fn keep_certificate(
    relay: &Relay,
    directory: &str,
    host: &str,
    validity: Option<(std::time::SystemTime, std::time::SystemTime)>,
) -> CertificateDer<'static> {
    let settings =
        ringtunnel::acme::AcmeSettings::new(directory.into(), None, None, &relay.state.0);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![host.into()]).unwrap();
    if let Some((from, to)) = validity {
        (params.not_before, params.not_after) = (from.into(), to.into());
    }
    let cert = params.self_signed(&key).unwrap();
    let key_file = settings.dir.join(format!("{host}.key"));
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(settings.dir.join(format!("{host}.crt")), cert.pem()).unwrap();
    cert.der().clone()
}

async fn https_end_to_end(backend: Backend) {
    let http_port = free_port();
    let Some(pebble) = Pebble::start(http_port) else {
        return;
    };
    let relay = pebble_relay(backend, &pebble, http_port);
    let port = relay.tls.expect("the relay prints its TLS port");
    let _blog = http_agent(&relay, "blog").await;
    let mut args = relay.agent_args(echo_origin().await, "pass");
    args.extend(["--tls-host".into(), "pass".into()]);
    let _pass = Agent::spawn(args);

    let root = pebble.issuing_root().await;
    let tls = tls_client(&root);
    let (status, body) = first_https_get(&tls, port, "blog.example.test").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("GET /hello HTTP/1.1\r\n"), "{body}");
    assert!(body.contains("X-Forwarded-Proto: https\r\n"), "{body}");
    assert!(body.contains("X-Forwarded-For: 127.0.0.1\r\n"), "{body}");
    relay.proc.wait_stderr("certificate issued");
    assert!(relay.proc.stderr().contains("host=blog.example.test"));
    // What an operator sees (shown with --nocapture).
    for line in relay.proc.stderr().lines() {
        if line.contains("certificate") || line.contains("HTTPS") || line.starts_with("ready") {
            eprintln!("relay: {line}");
        }
    }
    eprintln!("visitor: GET https://blog.example.test/hello -> {status}, body:\n{body}");

    // Kept in the state directory, the key private to the relay.
    let store = store_of(&relay.state.0);
    let mode = |f: &str| {
        std::fs::metadata(store.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("blog.example.test.key"), 0o600);
    assert_eq!(mode("account.key"), 0o600);
    assert!(store.join("blog.example.test.crt").exists());

    // Kept-alive requests on one terminated connection.
    for _ in 0..3 {
        let (status, body) = https_get(&tls, port, "blog.example.test", "blog.example.test")
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // A Host other than the TLS server name: 421, never another service's traffic.
    let (status, body) = https_get(&tls, port, "blog.example.test", "pass.example.test")
        .await
        .unwrap();
    assert_eq!(status, 421, "{body}");

    // The tls service's host on the same port passes through untouched (the echo origin
    // sends the ClientHello back as it was sent).
    let hello = client_hello("pass.example.test");
    let mut s = TcpStream::connect(port).await.unwrap();
    s.write_all(&hello).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, hello);

    // A name nobody claims: refused, and no certificate asked for.
    assert!(
        https_get(&tls, port, "nobody.example.test", "nobody.example.test")
            .await
            .is_err()
    );
    let admin = relay.admin.unwrap();
    assert_eq!(admin_counter(admin, "acme_issued").await, 1);
    assert_eq!(admin_counter(admin, "acme_failed").await, 0);
    assert!(admin_counter(admin, "https_terminated").await >= 5);
    assert!(!store.join("nobody.example.test.crt").exists());

    // Restarted on the same state: the kept certificate is served, nothing is issued.
    let relay = restart_on(relay, http_port);
    let _blog = http_agent(&relay, "blog").await;
    let port = relay.tls.unwrap();
    let (status, body) = first_https_get(&tls, port, "blog.example.test").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(admin_counter(relay.admin.unwrap(), "acme_issued").await, 0);
    drop(pebble.proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_acme_certificates_tokio() {
    https_end_to_end(Backend::Tokio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_acme_certificates_uring() {
    let Some(backend) = Backend::uring() else {
        return;
    };
    https_end_to_end(backend).await;
}

/// The CA of the tests without pebble: nothing listens there, so every issuance fails.
const DEAD_CA: &str = "https://127.0.0.1:9/dir";

/// A relay terminating HTTPS with `DEAD_CA`, `extra` settings in its relay.toml, and a
/// certificate for `blog.example.test` already in its store (as a previous run would have
/// left it), plus the TLS client that trusts it and the relay's config directory.
async fn relay_with_a_kept_certificate(
    backend: Backend,
    toml: &str,
) -> (Relay, tokio_rustls::TlsConnector, TempDir) {
    let (cfg_dir, cfg) = config_file(toml);
    let flags = [
        "--http",
        "127.0.0.1:0",
        "--https",
        "127.0.0.1:0",
        "--domain",
        "example.test",
        "--acme-directory",
        DEAD_CA,
        "--admin",
        "127.0.0.1:0",
        "--config",
        cfg.as_str(),
    ];
    let relay = Relay::spawn(backend, &flags);
    let cert = keep_certificate(&relay, DEAD_CA, "blog.example.test", None);
    let relay = relay.restart();
    let tls = tls_client(&cert);
    (relay, tls, cfg_dir)
}

async fn a_dead_ca_costs_a_visitor_a_bounded_wait_and_a_clear_alert(backend: Backend) {
    let (relay, tls, _cfg) = relay_with_a_kept_certificate(backend, "").await;
    let admin = relay.admin.unwrap();
    let port = relay.tls.unwrap();
    let _shop = http_agent(&relay, "shop").await;
    // The issuer tries the new host ahead of any visitor, fails, and backs off.
    relay.proc.wait_stderr("certificate not issued");
    assert!(relay.proc.stderr().contains("next try in 60s"));
    // The README's row quotes what the relay says.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let row = readme
        .lines()
        .find(|l| l.starts_with("| `--https`: the ACME CA unreachable"))
        .expect("a README row for a CA that fails");
    assert!(
        row.contains("certificate not issued") && row.contains("next try in 60s"),
        "{row}"
    );
    let e = https_get(&tls, port, "shop.example.test", "shop.example.test")
        .await
        .expect_err("no certificate, no handshake");
    assert!(e.to_string().contains("InternalError"), "{e}");
    assert!(admin_counter(admin, "https_refused").await >= 1);
    assert!(admin_counter(admin, "acme_failed").await >= 1);
    // The kept certificate serves its host all the while.
    let _blog = http_agent(&relay, "blog").await;
    let (status, body) = first_https_get(&tls, port, "blog.example.test").await;
    assert_eq!(status, 200, "{body}");
}

async fn broken_and_silent_handshakes_are_bounded(backend: Backend) {
    let (relay, tls, _cfg) =
        relay_with_a_kept_certificate(backend, "head_timeout_secs = 1\n").await;
    let admin = relay.admin.unwrap();
    let port = relay.tls.unwrap();
    let _blog = http_agent(&relay, "blog").await;
    let (status, _) = first_https_get(&tls, port, "blog.example.test").await;
    assert_eq!(status, 200);

    // A ClientHello and then garbage: the handshake fails, the connection is closed.
    let mut s = TcpStream::connect(port).await.unwrap();
    s.write_all(&client_hello("blog.example.test"))
        .await
        .unwrap();
    s.write_all(&[0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut sink))
        .await
        .unwrap();
    // A ClientHello and then silence: cut off at the head timeout.
    let mut s = TcpStream::connect(port).await.unwrap();
    s.write_all(&client_hello("blog.example.test"))
        .await
        .unwrap();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut sink))
        .await
        .unwrap();
    wait_metric(admin, "ringtunnel_https_refused_total", 2).await;

    // A finished handshake and no request: 408 over TLS at the head timeout.
    let tcp = TcpStream::connect(port).await.unwrap();
    let name = ServerName::try_from("blog.example.test").unwrap();
    let mut s = tls.connect(name, tcp).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");

    // A visitor that vanishes in the middle of a request: the relay carries on.
    let tcp = TcpStream::connect(port).await.unwrap();
    let name = ServerName::try_from("blog.example.test").unwrap();
    let mut s = tls.connect(name, tcp).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: blog.example.test\r\nContent-Length: 100000\r\n\r\nabc")
        .await
        .unwrap();
    drop(s);
    let (status, _) = https_get(&tls, port, "blog.example.test", "blog.example.test")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_ca_costs_a_visitor_a_bounded_wait_and_a_clear_alert_tokio() {
    a_dead_ca_costs_a_visitor_a_bounded_wait_and_a_clear_alert(Backend::Tokio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_ca_costs_a_visitor_a_bounded_wait_and_a_clear_alert_uring() {
    let Some(backend) = Backend::uring() else {
        return;
    };
    a_dead_ca_costs_a_visitor_a_bounded_wait_and_a_clear_alert(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_silent_handshakes_are_bounded_tokio() {
    broken_and_silent_handshakes_are_bounded(Backend::Tokio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_silent_handshakes_are_bounded_uring() {
    let Some(backend) = Backend::uring() else {
        return;
    };
    broken_and_silent_handshakes_are_bounded(backend).await;
}

async fn https_only_redirects_plain_http_and_sets_hsts(backend: Backend) {
    let toml = "[[service]]\nname = \"blog\"\n[service.access]\nhttps_only = true\n";
    let (relay, tls, _cfg) = relay_with_a_kept_certificate(backend, toml).await;
    let port = relay.tls.unwrap();
    let _blog = http_agent(&relay, "blog").await;
    let (status, _) = first_https_get(&tls, port, "blog.example.test").await;
    assert_eq!(status, 200);
    // Plain HTTP: sent to the same target over HTTPS, before anything reaches the agent.
    let mut s = TcpStream::connect(relay.http.unwrap()).await.unwrap();
    s.write_all(b"GET /a/b?c=1 HTTP/1.1\r\nHost: blog.example.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut head = String::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_string(&mut head))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 308 "), "{head}");
    let want = format!(
        "Location: https://blog.example.test:{}/a/b?c=1\r\n",
        port.port()
    );
    assert!(head.contains(&want), "{head}");
    // HTTPS: the first response carries HSTS, without includeSubDomains.
    let text = https_get_raw(&tls, port, "blog.example.test", "blog.example.test")
        .await
        .unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200 OK\r\nStrict-Transport-Security: max-age=31536000\r\n"),
        "{head}"
    );
    assert!(body.starts_with("GET /hello HTTP/1.1\r\n"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_only_redirects_plain_http_and_sets_hsts_tokio() {
    https_only_redirects_plain_http_and_sets_hsts(Backend::Tokio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_only_redirects_plain_http_and_sets_hsts_uring() {
    let Some(backend) = Backend::uring() else {
        return;
    };
    https_only_redirects_plain_http_and_sets_hsts(backend).await;
}

/// The data plane reads a visitor's idle time from its TCP socket's counters, which a
/// terminated visitor's socket pair does not have: the terminator watches the TLS side. A
/// busy kept-alive connection outlives many checks; a silent one is closed at the timeout.
async fn a_terminated_visitor_is_idle_only_when_silent(backend: Backend) {
    let toml = "[limits]\nidle_timeout_secs = 2\n";
    let (relay, tls, _cfg) = relay_with_a_kept_certificate(backend, toml).await;
    let admin = relay.admin.unwrap();
    let port = relay.tls.unwrap();
    let _blog = http_agent(&relay, "blog").await;
    // Requests read by their length: a read to the end would wait out the idle timeout.
    let tcp = TcpStream::connect(port).await.unwrap();
    let name = ServerName::try_from("blog.example.test").unwrap();
    let mut s = tls.connect(name, tcp).await.unwrap();
    let req = b"GET /busy HTTP/1.1\r\nHost: blog.example.test\r\n\r\n";
    // 4 s of requests, one every 250 ms: the watcher checks every 500 ms.
    for i in 0..16 {
        s.write_all(req).await.unwrap();
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("GET /busy HTTP/1.1\r\n") {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap();
            let n = n.unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert!(n > 0, "request {i}: the relay closed a busy connection");
            got.extend_from_slice(&buf[..n]);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(admin_counter(admin, "visitors_idle_closed").await, 0);
    // Silent now: closed (an error, not a clean end) once the timeout passes.
    let mut rest = Vec::new();
    let end = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(end.is_err(), "a cut, not a clean end: {end:?}");
    wait_metric(admin, "ringtunnel_visitors_idle_closed_total", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_visitor_is_idle_only_when_silent_tokio() {
    a_terminated_visitor_is_idle_only_when_silent(Backend::Tokio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_visitor_is_idle_only_when_silent_uring() {
    let Some(backend) = Backend::uring() else {
        return;
    };
    a_terminated_visitor_is_idle_only_when_silent(backend).await;
}

/// A kept certificate two thirds through its life is renewed from the CA before it expires,
/// while it is still served; visitors then get the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_due_for_renewal_is_renewed() {
    let http_port = free_port();
    let Some(pebble) = Pebble::start(http_port) else {
        return;
    };
    let relay = pebble_relay(Backend::Tokio, &pebble, http_port);
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(86_400);
    let old = keep_certificate(
        &relay,
        &pebble.directory,
        "blog.example.test",
        Some((now - day * 80, now + day * 10)),
    );
    let relay = restart_on(relay, http_port);
    let port = relay.tls.unwrap();
    let _blog = http_agent(&relay, "blog").await;
    relay.proc.wait_stderr("certificate renewed");
    assert!(!relay.proc.stderr().contains("certificate issued"));
    // The new certificate chains to pebble's root; the old self-signed one is gone.
    let (status, body) = first_https_get(
        &tls_client(&pebble.issuing_root().await),
        port,
        "blog.example.test",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(https_get(
        &tls_client(&old),
        port,
        "blog.example.test",
        "blog.example.test"
    )
    .await
    .is_err());
    assert_eq!(admin_counter(relay.admin.unwrap(), "acme_issued").await, 1);
}

/// Without `--http`, the relay answers TLS-ALPN-01 on its TLS port (RFC 8737): a CA's
/// `acme-tls/1` handshake gets the challenge certificate, visitors get the issued one.
async fn tls_alpn_01_on_the_tls_port(backend: Backend) {
    let tls_port = free_port();
    let Some(pebble) = Pebble::start_with(free_port(), tls_port) else {
        return;
    };
    let https = format!("127.0.0.1:{tls_port}");
    let relay = pebble_relay_with(backend, &pebble, &["--https", &https]);
    let _blog = http_agent(&relay, "blog").await;
    relay.proc.wait_stderr("certificate issued");
    assert!(relay.proc.stderr().contains("challenge=tls-alpn-01"));
    let tls = tls_client(&pebble.issuing_root().await);
    let port = relay.tls.unwrap();
    let (status, body) = first_https_get(&tls, port, "blog.example.test").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("X-Forwarded-Proto: https\r\n"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_on_the_tls_port_tokio() {
    tls_alpn_01_on_the_tls_port(Backend::Tokio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_on_the_tls_port_uring() {
    let Some(backend) = Backend::uring() else {
        return;
    };
    tls_alpn_01_on_the_tls_port(backend).await;
}
