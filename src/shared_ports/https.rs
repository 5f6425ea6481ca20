//! HTTPS at the relay: on the shared TLS port, a ClientHello whose server name an `http`
//! service claims (exactly, or reserved for it) is terminated here with a certificate from
//! the ACME CA, instead of being passed through. The decrypted connection then goes the way
//! of a visitor of the shared HTTP port: routed by `Host` (which must be the SNI name: 421
//! otherwise), access rules, forwarding headers (`X-Forwarded-Proto: https`), the service's
//! pools.
//!
//! The data plane forwards stream sockets, so a terminated visitor reaches it as one end of
//! a Unix socket pair; this task copies between the TLS connection and the other end. That
//! costs a copy through user space each way, the price of decrypting. Runs on the relay's
//! tokio runtime for either backend (a worker hands the connection over after reading the
//! ClientHello).
//!
//! Bounds: the ClientHello was read under the port's limits; the certificate wait
//! ([`CERT_WAIT`]), the handshake and the request head run under deadlines; at most
//! [`crate::shared_ports::port::MAX_ROUTING`] connections (64 per address) are between
//! hand-over and routing, and [`MAX_TERMINATED`] (1024 per address) are being forwarded.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::conn::VisitorConn;
use super::http::{self, Scheme};
use super::port::routing_cap;
use super::reply::TLS_ALERT_INTERNAL_ERROR;
use super::route::{Decision, Router, Terminate};
use super::tokio::{answer, dispatch};
use crate::acme::client::AlpnResolver;
use crate::acme::store::Resolver;
use crate::acme::Acme;
use crate::dataplane::gate::local_addr_of;
use crate::dataplane::sock::{self, shutdown, Half};
use crate::net::cap::ConnCap;
use crate::protocol::sni::ACME_TLS_ALPN;

/// Longest a visitor waits for its host's first certificate before it is closed (later
/// visitors find it issued).
pub const CERT_WAIT: Duration = Duration::from_secs(10);
/// Most terminated visitors being forwarded at once (each holds a TLS session, a socket
/// pair and a task), and [`MAX_TERMINATED_PER_ADDRESS`] from one address (an IPv6 /64).
pub const MAX_TERMINATED: usize = 16_384;
/// See [`MAX_TERMINATED`].
pub const MAX_TERMINATED_PER_ADDRESS: usize = 1024;

/// Terminates HTTPS for `http` services on the shared TLS port.
pub struct Terminator {
    acme: Acme,
    tls: TlsAcceptor,
    /// For CAs validating TLS-ALPN-01: ALPN `acme-tls/1`, the challenge certificates.
    validation: TlsAcceptor,
    runtime: tokio::runtime::Handle,
    routing: Arc<ConnCap>,
    forwarding: Arc<ConnCap>,
}

impl Terminator {
    /// A terminator serving `acme`'s certificates, running its tasks on `runtime`.
    pub fn new(acme: Acme, runtime: tokio::runtime::Handle) -> Result<Self, rustls::Error> {
        // The relay reads HTTP/1.1 request heads; a client offering h2 falls back to it.
        let tls = acceptor(Resolver(acme.certs.clone()), b"http/1.1")?;
        let validation = acceptor(AlpnResolver(acme.challenges.clone()), ACME_TLS_ALPN)?;
        let by_fds = usize::try_from(crate::net::fds::fd_limit() / 8).unwrap_or(usize::MAX);
        Ok(Terminator {
            acme,
            tls,
            validation,
            runtime,
            routing: routing_cap(),
            forwarding: ConnCap::new(
                MAX_TERMINATED.min(by_fds).max(1),
                MAX_TERMINATED_PER_ADDRESS,
            ),
        })
    }

    /// A CA validating TLS-ALPN-01 for `host`: the handshake is the whole answer (RFC 8737:
    /// the CA checks the certificate and closes).
    async fn validate(
        &self,
        router: &Router,
        tcp: TcpStream,
        addr: SocketAddr,
        hello: Vec<u8>,
        host: String,
    ) {
        let io = Prefixed {
            prefix: hello,
            at: 0,
            inner: tcp,
        };
        let accept = self.validation.accept(io);
        match tokio::time::timeout(router.cfg.head_timeout, accept).await {
            Ok(Ok(mut tls)) => {
                tracing::debug!(%host, peer = %addr, "TLS-ALPN-01 challenge shown to the CA");
                let _ = tls.shutdown().await;
            }
            Ok(Err(e)) => tracing::debug!(%host, peer = %addr, "TLS-ALPN-01 handshake: {e}"),
            Err(_) => tracing::debug!(%host, peer = %addr, "TLS-ALPN-01 handshake timed out"),
        }
    }

    async fn serve(
        &self,
        router: &Arc<Router>,
        mut tcp: TcpStream,
        addr: SocketAddr,
        hello: Vec<u8>,
        host: String,
        place: crate::net::cap::CapPlace,
    ) {
        let metrics = &router.metrics;
        if self.acme.certs.wait_for(&host, CERT_WAIT).await.is_none() {
            metrics.https_refused.inc();
            tracing::info!(visitor = %addr, %host, "HTTPS visitor closed: no certificate for the host yet");
            answer(&mut tcp, &TLS_ALERT_INTERNAL_ERROR).await;
            return;
        }
        let io = Prefixed {
            prefix: hello,
            at: 0,
            inner: tcp,
        };
        let handshake = tokio::time::timeout(router.cfg.head_timeout, self.tls.accept(io)).await;
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                metrics.https_refused.inc();
                tracing::info!(visitor = %addr, %host, "HTTPS visitor refused: TLS handshake: {e}");
                return;
            }
            Err(_) => {
                metrics.https_refused.inc();
                tracing::info!(visitor = %addr, %host, "HTTPS visitor cut off: no handshake within {:?}", router.cfg.head_timeout);
                return;
            }
        };
        metrics.https_terminated.inc();
        let mut conn = Tls(tls);
        let deadline = tokio::time::sleep(router.cfg.head_timeout);
        let scheme = Scheme::Https { sni: &host };
        let decision = http::read_and_decide(router, &mut conn, addr, deadline, scheme).await;
        drop(place);
        let routed = match decision {
            Decision::Dispatch(r) => r,
            Decision::Answer(bytes) => return answer(&mut conn, &bytes).await,
            // A decrypted request is never handed to another relay (only plain HTTP ones are).
            Decision::Close
            | Decision::Agent(_)
            | Decision::Terminate { .. }
            | Decision::HandOver { .. } => return,
        };
        let Ok(forwarding) = self.forwarding.enter(addr.ip()) else {
            metrics.https_refused.inc();
            let page = super::reply::Page::OverLimit;
            let bytes = page.response("too many HTTPS visitors are connected");
            return answer(&mut conn, &bytes).await;
        };
        let (ours, theirs) = match sock::visitor_pair() {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(visitor = %addr, "HTTPS visitor closed: socket pair: {e}");
                return;
            }
        };
        let hsts = routed.svc.gate.access().https_only();
        let (visitor, unserved, svc) = routed.visitor(theirs, addr);
        let idle = visitor.idle_timeout();
        if let Err((e, visitor)) = dispatch(&svc, visitor, router.cfg.agent_wait).await {
            drop(visitor);
            if let Some(bytes) = unserved.answer(router, &svc, addr, &e) {
                answer(&mut conn, &bytes).await;
            }
            return;
        }
        let Ok(mut ours) = tokio::net::UnixStream::from_std(ours) else {
            return;
        };
        // The data plane cannot read a socket pair's byte counters, so the visitor's idle
        // timeout is watched here, on its TCP socket.
        let tcp = conn.0.get_ref().0.inner.as_raw_fd();
        // SAFETY: `tcp` is the visitor's socket, owned by the TLS stream that `pump` holds;
        // the watcher is polled only beside `pump`, and both are dropped together.
        let tcp = unsafe { BorrowedFd::borrow_raw(tcp) };
        let idle = async {
            crate::dataplane::idle::tokio_idle(tcp, idle).await;
            sock::arm_reset(tcp); // still open: `pump` is dropped after this
        };
        tokio::select! {
            pumped = pump(conn.0, &mut ours, hsts) => {
                if let Err(e) = pumped {
                    tracing::debug!(visitor = %addr, "HTTPS visitor reset: its stream was cut: {e}");
                }
            }
            () = idle => {
                metrics.visitors_idle_closed.inc();
                svc.gate.stats().idle_closed.inc();
                tracing::info!(service = %svc.name, visitor = %addr, "visitor closed: idle timeout");
            }
        }
        drop(forwarding);
    }
}

impl Terminate for Terminator {
    /// Takes a visitor of the shared TLS port whose ClientHello (`hello`, already read) names
    /// `host`, which the relay terminates: serves it on the runtime's task.
    fn hand(
        self: Arc<Self>,
        router: Arc<Router>,
        stream: std::net::TcpStream,
        addr: SocketAddr,
        hello: Vec<u8>,
        host: String,
        acme: bool,
    ) {
        let Ok(place) = self.routing.enter(addr.ip()) else {
            router.metrics.visitors_shed.inc();
            return; // dropping the stream closes it
        };
        let runtime = self.runtime.clone();
        runtime.spawn(async move {
            let Ok(()) = stream.set_nonblocking(true) else {
                return;
            };
            let Ok(tcp) = TcpStream::from_std(stream) else {
                return;
            };
            match acme {
                true => self.validate(&router, tcp, addr, hello, host).await,
                false => self.serve(&router, tcp, addr, hello, host, place).await,
            }
        });
    }

    fn challenge(&self, path: &str) -> Option<String> {
        self.acme.challenges.answer(path)
    }

    fn answers_tls_alpn(&self, host: &str) -> bool {
        self.acme.challenges.tls_alpn(host).is_some()
    }
}

/// The header an `https_only` service's first response on each connection gets.
const HSTS: &[u8] = b"Strict-Transport-Security: max-age=31536000\r\n";
/// Most response bytes held while looking for the first response head's end (to add
/// [`HSTS`]); a longer head passes as it is.
const MAX_HSTS_HEAD: usize = 16 * 1024;

/// Copies between the visitor's TLS stream and the data plane's socket until both ways are
/// done, closing each write side (TLS `close_notify`) after its way ended. `hsts`: the
/// first response head gets [`HSTS`]. On an error either way (the tunnel side reset: agent
/// lost, idle timeout; or the visitor gone), the visitor's TCP connection is reset, so it
/// does not take a cut stream for a whole one.
async fn pump(
    tls: TlsStream<Prefixed>,
    ours: &mut tokio::net::UnixStream,
    hsts: bool,
) -> io::Result<()> {
    let (mut tls_read, mut tls_write) = tokio::io::split(tls);
    let (mut our_read, mut our_write) = ours.split();
    let up = async {
        tokio::io::copy(&mut tls_read, &mut our_write).await?;
        our_write.shutdown().await
    };
    let down = async {
        if hsts {
            first_head_with_hsts(&mut our_read, &mut tls_write).await?;
        }
        tokio::io::copy(&mut our_read, &mut tls_write).await?;
        tls_write.shutdown().await
    };
    let (up, down) = tokio::join!(up, down);
    if up.is_err() || down.is_err() {
        let tls = tls_read.unsplit(tls_write);
        sock::arm_reset(tls.get_ref().0.inner.as_fd());
    }
    up.map_err(|e| io::Error::new(e.kind(), format!("visitor to service: {e}")))?;
    down.map_err(|e| io::Error::new(e.kind(), format!("service to visitor: {e}")))
}

/// Reads the first response head from `from` (up to [`MAX_HSTS_HEAD`]) and writes it to
/// `to` with [`HSTS`] after its status line; what is not a head (or too long) passes as is.
async fn first_head_with_hsts(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
) -> io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    while buf.len() < MAX_HSTS_HEAD && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = from.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let status_end = buf.windows(2).position(|w| w == b"\r\n");
    match (head_end, status_end) {
        (Some(_), Some(line)) if buf.starts_with(b"HTTP/1.") => {
            let mut out = Vec::with_capacity(buf.len() + HSTS.len());
            out.extend_from_slice(&buf[..line + 2]);
            out.extend_from_slice(HSTS);
            out.extend_from_slice(&buf[line + 2..]);
            to.write_all(&out).await
        }
        _ => to.write_all(&buf).await,
    }
}

/// A TLS server taking its certificates from `certs` and speaking only `alpn`.
fn acceptor(
    certs: impl rustls::server::ResolvesServerCert + 'static,
    alpn: &[u8],
) -> Result<TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certs));
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A terminated visitor's TLS stream, as the shared ports read and answer it.
struct Tls(TlsStream<Prefixed>);

impl AsyncRead for Tls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl VisitorConn for Tls {
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf).await?;
        self.0.flush().await
    }

    fn shutdown_write(&mut self) {
        shutdown(self.0.get_ref().0.inner.as_fd(), Half::Write);
    }

    fn local_addr(&self) -> SocketAddr {
        local_addr_of(self.0.get_ref().0.inner.as_fd())
    }
}

/// The visitor's TCP stream with the ClientHello bytes the port already read in front.
struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn with_hsts(response: &[u8]) -> Vec<u8> {
        let mut from = response;
        let mut to = Vec::new();
        first_head_with_hsts(&mut from, &mut to).await.unwrap();
        tokio::io::copy(&mut from, &mut to).await.unwrap(); // as `pump` goes on
        to
    }

    #[tokio::test]
    async fn hsts_goes_after_the_status_line_of_a_response_head_only() {
        let out = with_hsts(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi").await;
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nStrict-Transport-Security: max-age=31536000\r\nContent-Length: 2\r\n\r\nhi"
        );
        // Not an HTTP response, a head cut off, or one too long: passed as it is.
        for other in [
            &b"SSH-2.0-x\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nX: y",
            &[b"HTTP/1.1 200 OK\r\nX: ".as_slice(), &[b'y'; MAX_HSTS_HEAD]].concat(),
        ] {
            assert!(
                with_hsts(other).await == other,
                "changed: {:?}",
                &other[..20]
            );
        }
    }
}
