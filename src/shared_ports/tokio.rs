//! The shared ports on the tokio backend: one accept loop per port, one task per visitor.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::conn::VisitorConn;
use super::port::{routing_cap, Port};
use super::reply::{answer_and_close, CLOSE_GRACE};
use super::route::{Decision, Router};
use crate::config::SecretId;
use crate::control::accept::AgentHandoff;
use crate::control::service::Service;
use crate::dataplane::pool::{Pool, TakeError, Visitor};
use crate::net::AcceptErrors;

/// Tokio: accepts visitors on a shared port forever, one task each.
pub async fn accept_loop(router: Arc<Router>, listener: TcpListener, port: Port) {
    let pending = routing_cap();
    let mut errors = AcceptErrors::new(port.name());
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                router.metrics.visitors_accepted.inc();
                let Some(stream) = errors.admit(stream, std::time::Instant::now()) else {
                    continue;
                };
                let place = match pending.enter(addr.ip()) {
                    Ok(place) => place,
                    Err(full) => {
                        router.metrics.visitors_shed.inc();
                        tracing::debug!(port = port.name(), visitor = %addr, "visitor closed: {full}");
                        continue; // dropping the stream closes it
                    }
                };
                let router = router.clone();
                tokio::spawn(async move {
                    serve(&router, port, stream, addr).await;
                    drop(place);
                });
            }
            Err(e) => errors.back_off(&e).await,
        }
    }
}

/// Tokio: routes one visitor of a shared port and hands it on (or answers it).
async fn serve(router: &Arc<Router>, port: Port, mut stream: TcpStream, addr: SocketAddr) {
    let deadline = tokio::time::sleep(router.cfg.head_timeout);
    let routed = match port
        .read_and_decide(router, &mut stream, addr, deadline)
        .await
    {
        Decision::Dispatch(r) => r,
        Decision::Answer(bytes) => return answer(&mut stream, &bytes).await,
        Decision::Close => return,
        Decision::Agent(hello) => {
            if let Ok(stream) = stream.into_std() {
                router.hand_to_control(AgentHandoff {
                    stream,
                    peer: addr,
                    hello,
                });
            }
            return;
        }
        Decision::HandOver { remote, first } => {
            if let (Some(fleet), Ok(stream)) = (&router.fleet, stream.into_std()) {
                fleet.hand(remote, stream, addr, first);
            }
            return;
        }
        Decision::Terminate { hello, host, acme } => {
            if let (Some(https), Ok(stream)) = (&router.https, stream.into_std()) {
                https
                    .clone()
                    .hand(router.clone(), stream, addr, hello, host, acme);
            }
            return;
        }
    };
    let Ok(std_stream) = stream.into_std() else {
        return;
    };
    let (visitor, unserved, svc) = routed.visitor(std_stream, addr);
    let wait = router.cfg.agent_wait;
    if let Err((e, visitor)) = dispatch(&svc, visitor, wait).await {
        if let Some(bytes) = unserved.answer(router, &svc, addr, &e) {
            if let Ok(mut stream) = reclaim(visitor) {
                answer(&mut stream, &bytes).await;
            }
        }
    }
}

/// The relay's shared ports as the control plane sees them: where a visitor another relay
/// of the fleet handed over for an `http` or `tls` service is routed and admitted, as if
/// it had come to this relay's own port.
pub struct Handed(pub Arc<Router>);

impl crate::control::plane::HostVisitors for Handed {
    fn serve(&self, stream: std::net::TcpStream, addr: SocketAddr, only: SecretId) {
        let router = Arc::new(Router {
            only: Some(only),
            ..(*self.0).clone()
        });
        tokio::spawn(async move {
            let Ok(stream) = stream
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(stream))
            else {
                return;
            };
            // Which port the visitor came to on the other relay: a TLS record, or HTTP.
            let mut first = [0u8; 1];
            let peek = tokio::time::timeout(router.cfg.head_timeout, stream.peek(&mut first));
            let port = match peek.await {
                Ok(Ok(1)) if first[0] == 0x16 => Port::Tls,
                Ok(Ok(1)) => Port::Http,
                _ => return,
            };
            serve(&router, port, stream, addr).await;
        });
    }
}

/// Tokio: answers a visitor and closes (see [`reply::answer_and_close`]).
pub(crate) async fn answer(conn: &mut impl VisitorConn, bytes: &[u8]) {
    answer_and_close(conn, bytes, tokio::time::sleep(CLOSE_GRACE)).await;
}

/// Tokio: hands a routed visitor to `svc`'s pools (an idle connection of any worker's pool,
/// else waiting on the first), waiting up to `wait` for a tunnel connection (an agent
/// reconnecting). On failure the visitor comes back with the reason.
pub(crate) async fn dispatch(
    svc: &Service,
    visitor: Visitor,
    wait: Duration,
) -> Result<(), (TakeError, Visitor)> {
    Pool::hand(&svc.pools, visitor, wait).await
}

/// The visitor's socket back on tokio, to answer it after a failed dispatch.
fn reclaim(visitor: Visitor) -> io::Result<TcpStream> {
    visitor.stream.set_nonblocking(true)?;
    TcpStream::from_std(visitor.stream)
}
