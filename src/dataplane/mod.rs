//! The data plane: everything that touches visitor bytes.
//!
//! - [`pool`]: per-service (and per-worker) pools of authenticated tunnel data connections on
//!   the relay, and the visitors waiting for one.
//! - [`tokio`]: the tokio backend — buffered copies over chunked, reusable data connections.
//! - [`uring`]: the io_uring backend — pinned thread-per-core workers that splice.
//! - [`sock`]: non-blocking socket calls on borrowed descriptors, for both backends.
//! - [`probe`]: whether io_uring and kTLS work here.
//! - [`forwarded`]: what forwarding one visitor ends with (bytes moved, or which end failed).
//! - [`gate`]: per-service admission (limits) and PROXY headers.
//! - [`idle`]: the idle-timeout watcher beside each forwarded visitor.
//! - [`wait`]: runtime-agnostic waits (a deadline race, the relay's waits for `STARTED` and
//!   `READY`).
//! - [`retry`]: a visitor whose data connection never answered moves to another one.
//! - [`rewrite`]: HTTP visitors' bytes with every request head rewritten, as tunnel chunks.
//!
//! [`DataPlane`] is the one interface the control plane uses, whichever backend runs.

pub mod forwarded;
pub mod gate;
pub mod idle;
pub mod pool;
pub mod probe;
pub mod retry;
pub mod rewrite;
pub mod sock;
pub mod tally;
pub mod tokio;
pub mod udp;
pub mod uring;
pub mod wait;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::tokio::task::JoinHandle;

use crate::config::BackendKind;
use gate::Gate;
use pool::Pool;

/// Visitors an agent is serving right now, across its data connections on either backend:
/// a stopping agent waits for them. Cheap to clone (one shared counter).
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

/// One visitor counted in [`InFlight`] until dropped.
#[derive(Debug)]
pub struct Visiting(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    /// Counts a visitor from now until the returned guard is dropped.
    pub fn enter(&self) -> Visiting {
        self.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Visiting(self.0.clone())
    }

    /// Visitors being served now.
    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for Visiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The backend actually running, after `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Multi-threaded tokio runtime, buffered copies.
    Tokio,
    /// Pinned io_uring workers, splice.
    Uring,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Tokio => "tokio",
            Backend::Uring => "uring",
        })
    }
}

/// Why the requested backend cannot run here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// `--backend uring` on a machine without a working io_uring.
    #[error("--backend uring: io_uring is unavailable: {0}")]
    UringUnavailable(probe::Unavailable),
}

/// Resolves the requested backend to one that runs here, with the reason for the log.
/// `data_tls`: whether data connections are TLS. Only plain (or kTLS) sockets can be spliced;
/// without kTLS the uring workers seal and open TLS data connections' records themselves
/// (rustls does the handshake; before records were sealed in place, rustls copied them), which with reused
/// data connections measured faster than tokio on request loads (2 cores: keep-alive
/// 1.12–1.13×, `Connection: close` 1.33–1.36×, 1 MiB files 1.24–1.32×), so `auto` still
/// picks uring for them. An explicit `uring` that cannot run is an error; `auto` falls back
/// to tokio.
pub fn choose_backend(
    requested: BackendKind,
    data_tls: bool,
) -> Result<(Backend, String), BackendError> {
    let uring = probe::io_uring();
    let tls_note = if data_tls {
        match crate::tls::ktls::probe() {
            Ok(()) => "; TLS data connections spliced, encrypted by the kernel (kTLS)".to_string(),
            Err(why) => format!(
                "; TLS data connections sealed in place on the workers, not spliced (no kTLS: {why})"
            ),
        }
    } else {
        String::new()
    };
    match requested {
        BackendKind::Tokio => Ok((Backend::Tokio, "requested with --backend tokio".into())),
        BackendKind::Uring => match uring {
            Err(why) => Err(BackendError::UringUnavailable(why)),
            Ok(()) => Ok((
                Backend::Uring,
                format!("requested with --backend uring{tls_note}"),
            )),
        },
        BackendKind::Auto => match uring {
            Err(why) => Ok((
                Backend::Tokio,
                format!("auto: io_uring is unavailable ({why})"),
            )),
            Ok(()) => Ok((
                Backend::Uring,
                format!("auto: io_uring is available{tls_note}"),
            )),
        },
    }
}

/// The running data plane.
#[derive(Clone)]
pub enum DataPlane {
    /// Everything on the tokio runtime.
    Tokio,
    /// Visitor listeners and forwarding on io_uring workers.
    Uring(Arc<uring::Workers>),
}

/// Keeps a service's public listeners open; dropping it closes them.
pub enum ListenerGuard {
    /// The tokio accept task, and a stop that ends the listening at once (the aborted task
    /// drops its listener only when the runtime next gets to it).
    Tokio(JoinHandle<()>, crate::net::StopListening),
    /// One stop handle per worker listener.
    Uring(Vec<uring::ListenerStop>),
    /// A `udp` service's public socket, flows and channels (on tokio, whatever the backend).
    Udp(Arc<udp::relay::Hub>),
}

impl ListenerGuard {
    /// The listening sockets it keeps open (one per worker on uring).
    pub fn fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        match self {
            ListenerGuard::Tokio(_, stop) => stop.fd().into_iter().collect(),
            ListenerGuard::Uring(stops) => stops.iter().filter_map(|s| s.fd()).collect(),
            ListenerGuard::Udp(_) => Vec::new(),
        }
    }

    /// Dropping it will stop accepting here without ending the listening: the sockets stay
    /// open in the process they were handed to.
    pub fn release(&mut self) {
        match self {
            ListenerGuard::Tokio(_, stop) => stop.release(),
            ListenerGuard::Uring(stops) => stops.iter_mut().for_each(|s| s.release()),
            // Not handed over: closed, so the process taking over can bind the port.
            ListenerGuard::Udp(hub) => hub.stop(),
        }
    }
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        match self {
            ListenerGuard::Tokio(h, _) => h.abort(),
            ListenerGuard::Udp(hub) => hub.stop(),
            ListenerGuard::Uring(_) => {}
        }
        // Uring: dropping the stop handles stops each worker's accept loop and shuts its
        // listener down.
    }
}

impl DataPlane {
    /// Starts the data plane for `backend` with `workers` threads (uring only).
    pub fn start(backend: Backend, workers: Option<usize>) -> io::Result<DataPlane> {
        match backend {
            Backend::Tokio => Ok(DataPlane::Tokio),
            Backend::Uring => Ok(DataPlane::Uring(uring::Workers::start(workers)?)),
        }
    }

    /// Pools per service: one per worker, so a visitor pairs with a connection its own core owns.
    pub fn pools_per_service(&self) -> usize {
        match self {
            DataPlane::Tokio => 1,
            DataPlane::Uring(w) => w.len(),
        }
    }

    /// Binds `addr` for the service behind `gate` and starts accepting visitors into `pools`
    /// (one per worker); a visitor waits up to `wait` for a data connection.
    pub fn listen(
        &self,
        addr: SocketAddr,
        gate: &Arc<Gate>,
        pools: &[Arc<Pool>],
        wait: Duration,
    ) -> io::Result<ListenerGuard> {
        let listeners = match self {
            DataPlane::Tokio => vec![crate::net::bind(addr, false)?.into_std()?],
            DataPlane::Uring(w) => bind_group(addr, w.len())?,
        };
        self.adopt(listeners, gate, pools, wait)
    }

    /// [`Self::listen`] on listeners already bound (handed over by the process this one took
    /// over from): as many as this data plane wants (see [`Self::fit`]).
    pub fn adopt(
        &self,
        listeners: Vec<std::net::TcpListener>,
        gate: &Arc<Gate>,
        pools: &[Arc<Pool>],
        wait: Duration,
    ) -> io::Result<ListenerGuard> {
        let listeners = self.fit(listeners)?;
        match self {
            DataPlane::Tokio => {
                let l = listeners
                    .into_iter()
                    .next()
                    .ok_or(io::ErrorKind::NotFound)?;
                l.set_nonblocking(true)?;
                let l = ::tokio::net::TcpListener::from_std(l)?;
                let stop = crate::net::StopListening::new(std::os::fd::AsFd::as_fd(&l))?;
                let accepting = tokio::relay::spawn(l, gate.clone(), pools[0].clone(), wait);
                Ok(ListenerGuard::Tokio(accepting, stop))
            }
            DataPlane::Uring(w) => {
                let mut stops = Vec::with_capacity(w.len());
                for (i, l) in listeners.into_iter().enumerate() {
                    let (stop_tx, stop) = uring::ListenerStop::new(&l)?;
                    w.send(
                        i,
                        uring::Command::Listen {
                            listener: l,
                            gate: gate.clone(),
                            pools: pools.to_vec(),
                            worker: i,
                            wait,
                            stop,
                        },
                    )?;
                    stops.push(stop_tx);
                }
                Ok(ListenerGuard::Uring(stops))
            }
        }
    }

    /// Handed-over listeners of one port, as many as this data plane accepts on: one for
    /// tokio, one per worker for uring (more join the `SO_REUSEPORT` group they are in; extra
    /// ones are closed, and connections queued on them are lost, so a takeover keeps the
    /// worker count).
    fn fit(
        &self,
        mut listeners: Vec<std::net::TcpListener>,
    ) -> io::Result<Vec<std::net::TcpListener>> {
        let want = self.pools_per_service();
        let first = listeners.first().ok_or(io::ErrorKind::NotFound)?;
        let addr = first.local_addr()?;
        if listeners.len() > want {
            tracing::warn!(%addr, had = listeners.len(), want, "more listeners handed over than workers here: the extra ones close");
            listeners.truncate(want);
        }
        while listeners.len() < want {
            listeners.push(crate::net::bind(addr, true)?.into_std()?);
        }
        Ok(listeners)
    }
}

/// A shared public port (HTTP or TLS), bound for the running backend.
pub enum SharedListener {
    /// One listener for tokio's accept loop.
    Tokio(::tokio::net::TcpListener),
    /// The workers, and one `SO_REUSEPORT` listener for each, in worker order.
    Uring(Arc<uring::Workers>, Vec<std::net::TcpListener>),
}

impl DataPlane {
    /// Binds a shared public port: one listener on tokio, one per worker on uring (as
    /// [`Self::listen`] does for a service's own port). Returns the address bound.
    pub fn bind_shared(&self, addr: SocketAddr) -> io::Result<(SharedListener, SocketAddr)> {
        let listeners = match self {
            DataPlane::Tokio => vec![crate::net::bind(addr, false)?.into_std()?],
            DataPlane::Uring(w) => bind_group(addr, w.len())?,
        };
        self.adopt_shared(listeners)
    }

    /// [`Self::bind_shared`] on listeners already bound (handed over).
    pub fn adopt_shared(
        &self,
        listeners: Vec<std::net::TcpListener>,
    ) -> io::Result<(SharedListener, SocketAddr)> {
        let mut listeners = self.fit(listeners)?;
        let bound = listeners[0].local_addr()?;
        match self {
            DataPlane::Tokio => {
                let l = listeners.remove(0);
                l.set_nonblocking(true)?;
                Ok((
                    SharedListener::Tokio(::tokio::net::TcpListener::from_std(l)?),
                    bound,
                ))
            }
            DataPlane::Uring(w) => Ok((SharedListener::Uring(w.clone(), listeners), bound)),
        }
    }
}

/// `n` listeners on `addr` in one `SO_REUSEPORT` group, one per worker: accepts spread over
/// cores by the kernel's 4-tuple hash, with no shared accept queue. With port 0 the first
/// picks the port and the rest join it.
fn bind_group(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    // SO_REUSEPORT would also join a group another process of this user already listens in,
    // silently splitting visitors between the two; a plain bind first proves the port free.
    drop(std::net::TcpListener::bind(addr)?);
    let first = crate::net::bind(addr, true)?.into_std()?;
    let bound = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..n {
        group.push(crate::net::bind(bound, true)?.into_std()?);
    }
    Ok(group)
}

#[cfg(test)]
mod tests {
    use super::{
        choose_backend, probe, Arc, Backend, BackendKind, DataPlane, Duration, Gate, Pool,
        SharedListener,
    };
    use std::io;

    #[test]
    fn tls_data_connections_run_on_the_workers() {
        if !probe::uring_for_tests() {
            return;
        }
        if crate::tls::ktls::available() {
            println!("skipped: this kernel has kTLS; the test is for one without");
            return;
        }
        for requested in [BackendKind::Auto, BackendKind::Uring] {
            let (backend, why) = choose_backend(requested, true).unwrap();
            assert_eq!(backend, Backend::Uring);
            assert!(why.contains("sealed in place on the workers"), "{why}");
        }
        let (backend, why) = choose_backend(BackendKind::Auto, false).unwrap();
        assert_eq!(backend, Backend::Uring);
        assert!(!why.contains("rustls"), "{why}");
    }

    #[tokio::test]
    async fn uring_listeners_never_share_a_port_with_another_reuseport_group() {
        if !probe::uring_for_tests() {
            return;
        }
        // Someone else (same user) listens with SO_REUSEPORT on a port...
        let foreign = crate::net::bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = foreign.local_addr().unwrap();
        let plane = DataPlane::start(Backend::Uring, Some(1)).unwrap();
        let gate = Gate::new("t", &Default::default(), Default::default());
        let pools = vec![Arc::new(Pool::new())];
        // ...so the relay must refuse the port rather than join their group.
        let err = plane
            .listen(addr, &gate, &pools, Duration::from_secs(1))
            .err()
            .expect("port refused");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // The same holds for a shared (HTTP or TLS) port.
        let err = plane.bind_shared(addr).err().expect("port refused");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn uring_shared_ports_get_one_listener_per_worker_on_one_port() {
        if !probe::uring_for_tests() {
            return;
        }
        let plane = DataPlane::start(Backend::Uring, Some(3)).unwrap();
        let (bound, addr) = plane.bind_shared("127.0.0.1:0".parse().unwrap()).unwrap();
        let SharedListener::Uring(_, group) = bound else {
            panic!("uring binds a group");
        };
        assert_eq!(group.len(), 3);
        for l in &group {
            assert_eq!(l.local_addr().unwrap(), addr);
        }
    }
}
