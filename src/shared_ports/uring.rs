//! The shared ports on the uring backend: every worker accepts on its own `SO_REUSEPORT`
//! listener, reads the visitor's head, routes it and hands it to its own pool of the service,
//! as it does for a service's own port. No visitor crosses threads on the way in; only an
//! unroutable one is answered, also on the worker.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;

use monoio::net::TcpStream;
use tokio::sync::oneshot;

use super::conn::VisitorConn;
use super::port::{routing_cap, Port};
use super::reply::{answer_and_close, CLOSE_GRACE};
use super::route::{Decision, Router};
use crate::control::accept::AgentHandoff;
use crate::dataplane::gate::local_addr_of;
use crate::dataplane::pool::Pool;
use crate::dataplane::sock::{set_nonblocking, shutdown, Half};
use crate::dataplane::uring::relay::accept_until;
use crate::dataplane::uring::sockio::{self, fd};
use crate::dataplane::uring::{Command, ListenerStop, Workers};
use crate::dataplane::wait::ReadSome;
use crate::net::cap::ConnCap;

/// Starts `port`'s accept loop on every worker, listener `i` on worker `i`. The loops stop,
/// and the port stops listening, when the returned handles are dropped.
pub fn start(
    workers: &Workers,
    router: &Arc<Router>,
    port: Port,
    listeners: Vec<std::net::TcpListener>,
) -> io::Result<Vec<ListenerStop>> {
    let pending = routing_cap();
    let mut stops = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let (stop_tx, stop) = ListenerStop::new(&listener)?;
        let (router, pending) = (router.clone(), pending.clone());
        let job = move |worker| {
            monoio::spawn(accept_loop(router, listener, port, pending, worker, stop));
        };
        workers.send(i, Command::Run(Box::new(job)))?;
        stops.push(stop_tx);
    }
    Ok(stops)
}

async fn accept_loop(
    router: Arc<Router>,
    listener: std::net::TcpListener,
    port: Port,
    pending: Arc<ConnCap>,
    worker: usize,
    stop: oneshot::Receiver<()>,
) {
    accept_until(
        listener,
        &router.metrics,
        port.name(),
        stop,
        |stream, addr| {
            let place = match pending.enter(addr.ip()) {
                Ok(place) => place,
                Err(full) => {
                    router.metrics.visitors_shed.inc();
                    tracing::debug!(port = port.name(), visitor = %addr, "visitor closed: {full}");
                    return;
                }
            };
            let router = router.clone();
            monoio::spawn(async move {
                serve(&router, port, stream, addr, worker).await;
                drop(place);
            });
        },
    )
    .await;
}

/// A worker's visitor socket, non-blocking, waiting on the ring.
struct Conn(TcpStream);

impl ReadSome for Conn {
    async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sockio::read_some(&self.0, buf).await
    }
}

impl VisitorConn for Conn {
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        sockio::write_all(&self.0, buf).await
    }

    fn shutdown_write(&mut self) {
        shutdown(fd(&self.0), Half::Write);
    }

    fn local_addr(&self) -> SocketAddr {
        local_addr_of(fd(&self.0))
    }
}

/// Routes one visitor and hands it to this worker's pool of its service (or another
/// worker's idle connection), or answers it.
async fn serve(
    router: &Arc<Router>,
    port: Port,
    stream: TcpStream,
    addr: SocketAddr,
    worker: usize,
) {
    if set_nonblocking(fd(&stream)).is_err() {
        return;
    }
    let mut conn = Conn(stream);
    let deadline = monoio::time::sleep(router.cfg.head_timeout);
    let decision = port
        .read_and_decide(router, &mut conn, addr, deadline)
        .await;
    let routed = match decision {
        Decision::Dispatch(r) => r,
        Decision::Answer(bytes) => return answer(&mut conn, &bytes).await,
        Decision::Close => return,
        Decision::Agent(hello) => {
            // SAFETY: the fd comes straight from the stream we own and give up here.
            let stream = unsafe { std::net::TcpStream::from_raw_fd(conn.0.into_raw_fd()) };
            router.hand_to_control(AgentHandoff {
                stream,
                peer: addr,
                hello,
            });
            return;
        }
        Decision::HandOver { remote, first } => {
            if let Some(fleet) = &router.fleet {
                // SAFETY: the fd comes straight from the stream we own and give up here.
                let stream = unsafe { std::net::TcpStream::from_raw_fd(conn.0.into_raw_fd()) };
                fleet.hand(remote, stream, addr, first);
            }
            return;
        }
        Decision::Terminate { hello, host, acme } => {
            if let Some(https) = &router.https {
                // SAFETY: the fd comes straight from the stream we own and give up here.
                let stream = unsafe { std::net::TcpStream::from_raw_fd(conn.0.into_raw_fd()) };
                https
                    .clone()
                    .hand(router.clone(), stream, addr, hello, host, acme);
            }
            return;
        }
    };
    // SAFETY: the fd comes straight from the stream we own and give up here.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(conn.0.into_raw_fd()) };
    let (visitor, unserved, svc) = routed.visitor(stream, addr);
    let Err(visitor) = Pool::try_take_any(&svc.pools, worker, visitor) else {
        return;
    };
    let wait = router.cfg.agent_wait;
    let pool = &svc.pools[worker % svc.pools.len()];
    let Err((e, visitor)) = pool.take(visitor, monoio::time::sleep(wait), wait).await else {
        return;
    };
    if let Some(bytes) = unserved.answer(router, &svc, addr, &e) {
        if let Ok(stream) = TcpStream::from_std(visitor.stream) {
            answer(&mut Conn(stream), &bytes).await;
        }
    }
}

async fn answer(conn: &mut Conn, bytes: &[u8]) {
    answer_and_close(conn, bytes, monoio::time::sleep(CLOSE_GRACE)).await;
}
