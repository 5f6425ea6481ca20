//! End-to-end: agents that reach the relay on its shared TLS port (what a VPS exposing only
//! 80 and 443 offers), told apart from visitors by their ALPN protocol, on both backends.
//! Their control session and data connections run there (data connections TLS even when the
//! relay lets others be plain), while visitors of `tls` services on the same port are still
//! passed through to their origins; an agent's hello that is not a valid one is refused and
//! counted like one on the control port, and a flood of silent ones is held to the same
//! per-address share.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DOMAIN: &str = "example.test";

/// Agent flags that dial the relay's TLS port instead of its control port.
fn via_tls_port(relay: &Relay, local: SocketAddr, name: &str) -> Vec<String> {
    let mut args = relay.agent_args(local, name);
    let at = args.iter().position(|a| a == "--relay").unwrap() + 1;
    args[at] = relay.tls.unwrap().to_string();
    args
}

/// A TLS client config that offers `alpn` and trusts anything (a visitor that only needs
/// its bytes to arrive, or a fake agent).
fn client(alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AnyCert;
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert))
    .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(cfg)
}

async fn agents_on_the_tls_port(backend: Backend) {
    // Plain data connections for agents on the control port (the uring default in tests);
    // those on the TLS port get TLS ones all the same.
    let relay = Relay::spawn(
        backend,
        &[
            "--tls",
            "127.0.0.1:0",
            "--domain",
            DOMAIN,
            "--data-tls",
            "off",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let admin = relay.admin.unwrap();
    // A tcp service and a tls service, both published through the TLS port.
    let echo = Agent::spawn(via_tls_port(&relay, echo_origin().await, "echo"));
    for _ in 0..5 {
        assert_echo(echo.public).await;
    }
    if backend == Backend::Uring {
        assert!(
            echo.proc.stderr().contains("TLS data connections"),
            "TLS data connections for an agent on the TLS port: {}",
            echo.proc.stderr()
        );
    }
    let mut vault_args = via_tls_port(&relay, echo_origin().await, "vault");
    vault_args.extend(["--tls-host".into(), "vault".into()]);
    let _vault = Agent::spawn(vault_args);

    // A visitor of the tls service on the same port: passed through to the echo origin,
    // which sends its ClientHello back byte for byte.
    let name = rustls_pki_types::ServerName::try_from(format!("vault.{DOMAIN}")).unwrap();
    let mut conn = rustls::ClientConnection::new(client(b"h2"), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let mut v = TcpStream::connect(relay.tls.unwrap()).await.unwrap();
    v.write_all(&hello).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    tokio::time::timeout(WAIT, v.read_exact(&mut back))
        .await
        .expect("the visitor's bytes come back")
        .unwrap();
    assert_eq!(
        back, hello,
        "a visitor is passed through, not taken for an agent"
    );

    // Something offering the agent's ALPN that is no agent: refused and counted.
    let bad_before = admin_counter(admin, "bad_connections").await;
    let connector = tokio_rustls::TlsConnector::from(client(ringtunnel::protocol::AGENT_ALPN));
    let tcp = TcpStream::connect(relay.tls.unwrap()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("relay").unwrap();
    let mut fake = connector.connect(name, tcp).await.expect("the relay's TLS");
    fake.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, fake.read_to_end(&mut rest)).await;
    wait_metric(admin, "ringtunnel_bad_connections_total", bad_before + 1).await;
    assert_echo(echo.public).await;
}

/// 300 connections from one address that offer the agent's ALPN on the TLS port and then
/// say nothing: the relay holds at most its per-address share of unauthenticated
/// connections (the rest are closed and counted), and a real agent from another address
/// still gets in through the same port.
async fn an_idle_agent_flood_on_the_tls_port_leaves_room(backend: Backend) {
    let relay = Relay::spawn(
        backend,
        &[
            "--tls",
            "127.0.0.1:0",
            "--domain",
            DOMAIN,
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let admin = relay.admin.unwrap();
    let tls_port = relay.tls.unwrap();
    let name = rustls_pki_types::ServerName::try_from("relay").unwrap();
    let mut hello = Vec::new();
    rustls::ClientConnection::new(client(ringtunnel::protocol::AGENT_ALPN), name)
        .unwrap()
        .write_tls(&mut hello)
        .unwrap();
    let mut flood = Vec::new();
    for _ in 0..300 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut c = s.connect(tls_port).await.unwrap();
        let _ = c.write_all(&hello).await;
        flood.push(c);
    }
    // Shed at the TLS port (64 being routed per address) or at the control plane (256
    // unauthenticated per address): 44 at least, however the two split them.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let shed = metric(admin, "ringtunnel_unauthenticated_shed_total")
            .await
            .unwrap_or(0)
            + metric(admin, "ringtunnel_visitors_shed_total")
                .await
                .unwrap_or(0);
        if shed >= 300 - 256 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "only {shed} shed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let agent = Agent::spawn(via_tls_port(&relay, echo_origin().await, "echo"));
    assert_echo(agent.public).await;
    drop(flood);
}

both_backends!(
    agents_on_the_tls_port,
    an_idle_agent_flood_on_the_tls_port_leaves_room
);
