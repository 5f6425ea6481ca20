//! The io_uring backend: `--workers N` threads, each pinned to a core and running its own
//! monoio runtime on its own ring.
//!
//! The control plane talks to a worker only through [`Command`]s on a bounded channel; a
//! worker owns everything it is handed (listeners, data connections, pipes) and never shares
//! it with another thread. The channel is tokio's bounded mpsc rather than crossbeam: it is
//! runtime-agnostic and awaitable from monoio (with monoio's `sync` feature waking the worker
//! from another thread), where crossbeam would need an extra eventfd to wait on.
//!
//! - [`pipe`]: kernel pipes, pooled per worker, and splicing a direction through them.
//! - [`sockio`]: non-blocking socket I/O that waits on the ring; the worker's scratch buffer.
//! - [`chunked`]: forwarding one visitor over a reusable data connection (chunks, then splice
//!   for bulk).
//! - [`relay`]: relay-side worker tasks — visitor accept, pooled data connections.
//! - [`agent`]: agent-side worker tasks — data connections to the relay, dialing the service.
//! - [`sealed`]: TLS records sealed and opened in place on a worker, for TLS data connections
//!   where kTLS is missing.
//! - [`tls`]: rustls driven on a worker: handshakes, and TLS 1.2 data connections.
//! - [`tunnel`]: a data connection, plain (spliced) or TLS (copied), behind one type.
//! - [`load`]: how many visitors each worker encrypts itself, to spread them.

pub mod agent;
pub mod chunked;
pub mod load;
pub mod pipe;
pub mod relay;
pub mod sealed;
pub mod sockio;
pub mod tls;
pub mod tunnel;

use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::gate::Gate;
use super::pool::Pool;
use crate::protocol::auth::Ticket;
use pipe::PipePool;

/// Stops one worker's accept loop on a listener, and makes sure the port stops listening at
/// once, whatever the worker is doing. Dropping it signals the loop and shuts the listening
/// socket down through a duplicate descriptor held here: a monoio listener dropped with an
/// accept in flight (or a worker runtime ending before its loop saw the signal) keeps its
/// descriptor until the ring completes the op, so without the shutdown the kernel could go on
/// queueing connections on a port nobody accepts on any more.
pub struct ListenerStop {
    /// Dropping it signals the accept loop.
    _stop: oneshot::Sender<()>,
    /// Dropped after `_stop` (fields drop in order): the listening ends at once.
    socket: crate::net::StopListening,
}

impl ListenerStop {
    /// A stop handle for `listener` (about to be handed to a worker) and the receiver its
    /// accept loop waits on.
    pub fn new(listener: &std::net::TcpListener) -> io::Result<(Self, oneshot::Receiver<()>)> {
        let (tx, rx) = oneshot::channel();
        let socket = crate::net::StopListening::new(std::os::fd::AsFd::as_fd(listener))?;
        Ok((ListenerStop { _stop: tx, socket }, rx))
    }

    /// The listening socket (see [`crate::net::StopListening::fd`]).
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.socket.fd()
    }

    /// Dropping this stop will end the worker's accept loop but not the listening: the
    /// socket stays open for another process it was handed to.
    pub fn release(&mut self) {
        self.socket.release();
    }
}

/// Commands queued per worker before senders have to wait.
const COMMAND_QUEUE: usize = 4096;
/// io_uring submission queue entries per worker.
const RING_ENTRIES: u32 = 1024;

/// Work handed to a worker.
pub enum Command {
    /// Runs a job on the worker's thread, inside its runtime: it may `monoio::spawn` tasks
    /// built there (the relay's shared-port accept loops, which live with the control plane).
    Run(Box<dyn FnOnce(usize) + Send>),
    /// Relay: accept visitors on this (SO_REUSEPORT) listener into `pool` until `stop` fires
    /// or its sender is dropped.
    Listen {
        /// This worker's own listener for the port.
        listener: std::net::TcpListener,
        /// The service's admission rules (and name, and counters).
        gate: Arc<Gate>,
        /// The service's pools, one per worker.
        pools: Vec<Arc<Pool>>,
        /// Which of them is this worker's.
        worker: usize,
        /// How long a visitor waits for a data connection.
        wait: std::time::Duration,
        /// Closes the listener.
        stop: oneshot::Receiver<()>,
    },
    /// Relay: an authenticated data connection to park in `pool` until a visitor comes.
    RelayData {
        /// The data connection's socket.
        stream: std::net::TcpStream,
        /// Its encryption: none, the kernel's, or rustls' (handshake done).
        tls: tunnel::DataTls,
        /// Service name, for logs.
        service: String,
        /// This worker's pool for the service.
        pool: Arc<Pool>,
        /// The pool's generation when the ticket was settled (see [`Pool::offer`]).
        generation: u64,
        /// The agent answers `Start` with `STARTED` (protocol 4).
        answers: bool,
        /// The relay's counters (reuse is counted).
        metrics: Arc<crate::admin::Metrics>,
    },
    /// Agent: open a data connection with `ticket`, wait for a visitor, dial `local`, forward.
    AgentData {
        /// TLS to the relay, when the relay asks for it on data connections.
        tls: Option<agent::AgentTls>,
        /// How to reach the relay's control port (its address resolved, or the proxy's).
        relay: agent::RelayDial,
        /// The ticket to present.
        ticket: Ticket,
        /// Service name, for logs.
        service: String,
        /// Local service addresses, resolved; tried in order.
        local: Arc<[std::net::SocketAddr]>,
        /// The agent's count of visitors being served.
        in_flight: super::InFlight,
    },
    /// Agent: a TLS data connection another worker moved here as its visitor started, to
    /// spread the copying (see [`load`]); serve the visitor, then go on as usual.
    AgentResume(Box<agent::Resume>),
}

thread_local! {
    /// On a worker: every worker's command channel, weakly (see [`Workers::start`]).
    static PEERS: std::cell::RefCell<Option<Arc<[mpsc::WeakSender<Command>]>>> =
        const { std::cell::RefCell::new(None) };
}

/// Queues a data connection moved off this worker for worker `i`, without waiting; gives it
/// back when that worker cannot take it (its queue full, the workers stopping, or not called
/// on a worker).
pub fn resume_on(i: usize, moved: Box<agent::Resume>) -> Result<(), Box<agent::Resume>> {
    let Some(tx) = PEERS.with(|p| p.borrow().as_ref().and_then(|p| p.get(i)?.upgrade())) else {
        return Err(moved);
    };
    tx.try_send(Command::AgentResume(moved))
        .map_err(|e| match e.into_inner() {
            Command::AgentResume(moved) => moved,
            _ => unreachable!("try_send gives back the command it was given"),
        })
}

/// Whether workers pin themselves to cores: yes unless `RINGTUNNEL_PIN=off`. Pinning is
/// right for a relay that has its machine to itself; when relay and agent (or other busy
/// processes) share a small machine, two pinned workers can land on one core while another
/// idles (measured on 2 cores, TLS data connections, both on one box: 6.3 against 9.4 Gbit/s).
fn pinning() -> bool {
    std::env::var("RINGTUNNEL_PIN").map_or(true, |v| v != "off")
}

/// Handles to the worker threads.
pub struct Workers {
    senders: Vec<mpsc::Sender<Command>>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `n` workers (default: one per core), each pinned to a core. Fails if any ring
    /// cannot be created.
    pub fn start(n: Option<usize>) -> io::Result<Arc<Workers>> {
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let n = n
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1)
            .max(1);
        let mut mode = RingMode::Plain;
        let loads = load::Loads::new(n);
        // Every channel first: each worker gets a weak handle to every other's, to move a
        // connection there (weak, so dropping `Workers` still closes them all).
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..n).map(|_| mpsc::channel(COMMAND_QUEUE)).unzip();
        let peers: Arc<[mpsc::WeakSender<Command>]> =
            senders.iter().map(mpsc::Sender::downgrade).collect();
        for (i, rx) in receivers.into_iter().enumerate() {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
            let (loads, peers) = (loads.clone(), peers.clone());
            std::thread::Builder::new()
                .name(format!("ringtunnel-worker-{i}"))
                .spawn(move || {
                    load::enter(i, loads);
                    PEERS.with(|p| *p.borrow_mut() = Some(peers));
                    if let Some(core) = core.filter(|_| pinning()) {
                        core_affinity::set_for_current(core);
                    }
                    match build_runtime() {
                        Ok((mut rt, mode)) => {
                            let _ = ready_tx.send(Ok(mode));
                            rt.block_on(run(i, rx));
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })?;
            mode = ready_rx
                .recv()
                .map_err(|_| io::Error::other("worker thread died while starting"))??;
        }
        tracing::info!(
            workers = n,
            ring = mode.as_str(),
            pinned = pinning(),
            "io_uring workers started, one per core"
        );
        Ok(Arc::new(Workers {
            senders,
            next: AtomicUsize::new(0),
        }))
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// Never true: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// A worker index, round-robin.
    pub fn next_worker(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len()
    }

    /// Queues `cmd` for worker `i` without waiting; fails if its queue is full or it is gone.
    pub fn send(&self, i: usize, cmd: Command) -> io::Result<()> {
        self.senders[i % self.senders.len()]
            .try_send(cmd)
            .map_err(|e| io::Error::other(format!("worker {i} cannot take more work: {e}")))
    }
}

/// How a worker's ring runs completion work (task work) in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RingMode {
    /// `SINGLE_ISSUER | DEFER_TASKRUN` (Linux 6.1+): completion work runs only when the
    /// worker enters the ring to wait, never by interrupting it.
    Deferred,
    /// `COOP_TASKRUN | TASKRUN_FLAG` (Linux 5.19+): no interrupt to run completion work; it
    /// runs at the worker's next system call.
    Cooperative,
    /// Kernel defaults: completion work interrupts the worker.
    Plain,
}

impl RingMode {
    fn as_str(self) -> &'static str {
        match self {
            RingMode::Deferred => "defer-taskrun",
            RingMode::Cooperative => "coop-taskrun",
            RingMode::Plain => "plain",
        }
    }

    /// Modes to try, best first; `RINGTUNNEL_URING_MODE=defer|coop|plain` pins one (for
    /// measuring them against each other).
    fn candidates() -> Vec<RingMode> {
        match std::env::var("RINGTUNNEL_URING_MODE").as_deref() {
            Ok("defer") => vec![RingMode::Deferred],
            Ok("coop") => vec![RingMode::Cooperative],
            Ok("plain") => vec![RingMode::Plain],
            _ => vec![RingMode::Deferred, RingMode::Cooperative, RingMode::Plain],
        }
    }

    /// A worker runtime (ring plus timers) on a ring set up in this mode.
    fn runtime(self) -> io::Result<WorkerRuntime> {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(RING_ENTRIES)
            .uring_builder(self.builder())
            .enable_timer()
            .build()
    }

    fn builder(self) -> io_uring::Builder {
        let mut b = io_uring::IoUring::builder();
        match self {
            RingMode::Deferred => {
                b.setup_single_issuer().setup_defer_taskrun();
            }
            RingMode::Cooperative => {
                b.setup_coop_taskrun().setup_taskrun_flag();
            }
            RingMode::Plain => {}
        }
        b
    }
}

type WorkerRuntime = monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>;

/// This thread's runtime, on the best ring mode the kernel accepts (older kernels refuse the
/// newer setup flags with `EINVAL`).
fn build_runtime() -> io::Result<(WorkerRuntime, RingMode)> {
    let mut last = None;
    for mode in RingMode::candidates() {
        match mode.runtime() {
            Ok(rt) => return Ok((rt, mode)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no io_uring mode to try")))
}

async fn run(id: usize, mut rx: mpsc::Receiver<Command>) {
    let pipes = Rc::new(PipePool::default());
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Command::Run(job) => job(id),
            Command::Listen {
                listener,
                gate,
                pools,
                worker,
                wait,
                stop,
            } => {
                let accept = relay::serve_listener(listener, gate, pools, worker, wait, stop);
                monoio::spawn(accept);
            }
            Command::RelayData {
                stream,
                tls,
                service,
                pool,
                generation,
                answers,
                metrics,
            } => {
                // Split here: an enum of three would grow every connection's task by a word.
                let (tls, kernel) = match tls {
                    tunnel::DataTls::Plain => (None, false),
                    tunnel::DataTls::Kernel => (None, true),
                    tunnel::DataTls::User(conn) => (Some(conn), false),
                };
                monoio::spawn(relay::serve_data(
                    stream,
                    tls,
                    service,
                    pool,
                    (generation, answers, kernel),
                    metrics,
                    pipes.clone(),
                ));
            }
            Command::AgentData {
                tls,
                relay,
                ticket,
                service,
                local,
                in_flight,
            } => {
                monoio::spawn(agent::serve_data(
                    tls,
                    relay,
                    ticket,
                    service,
                    local,
                    in_flight,
                    pipes.clone(),
                ));
            }
            Command::AgentResume(resume) => {
                monoio::spawn(agent::resume(resume, pipes.clone()));
            }
        }
    }
    tracing::debug!(worker = id, "worker stopping: command channel closed");
}

/// Test support: a connected loopback pair of std sockets.
#[cfg(test)]
pub(crate) fn socket_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// Test support: a std socket adopted by the ring (call inside the runtime), non-blocking.
#[cfg(test)]
pub(crate) fn on_ring(s: std::net::TcpStream) -> monoio::net::TcpStream {
    s.set_nonblocking(true).unwrap();
    monoio::net::TcpStream::from_std(s).unwrap()
}

/// Test support: a worker task future's footprint. One such task lives per data connection
/// (so per idle visitor); a timer or rustls state held inline once made them 128-byte aligned
/// and padded.
#[cfg(test)]
pub(crate) fn assert_task_small<F: std::future::Future>(build: impl FnOnce() -> F) {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .unwrap();
    rt.block_on(async {
        let task = build();
        let (size, align) = (std::mem::size_of_val(&task), std::mem::align_of_val(&task));
        assert!(align <= 16, "task future aligned to {align}");
        // Measured: relay 2152, agent 2008 (the byte counting added about 100 to each); the
        // kTLS variant of `Tunnel` added 8 to each (relay 2184, agent 2080); the agent's
        // moving a TLS connection to a less busy worker, 56 more (agent 2136).
        // Boxing the forwarding state instead shrank the parked task to 936 but grew the
        // memory per idle visitor by ~1.3 KiB in the load test, so it stays inline.
        assert!(size <= 2184, "task future is {size} bytes");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_listener_refuses_even_while_its_descriptor_lingers() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, _rx) = ListenerStop::new(&listener).unwrap();
        drop(std::net::TcpStream::connect(addr).unwrap());
        // `listener` stays open here, as a worker's would when its runtime ended with an
        // accept in flight; dropping the stop handle must end the listening anyway.
        drop(stop);
        let refused = std::net::TcpStream::connect(addr).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        drop(listener);
    }

    #[test]
    fn every_ring_mode_the_kernel_accepts_runs_timers() {
        if !crate::dataplane::probe::uring_for_tests() {
            return;
        }
        for mode in [RingMode::Deferred, RingMode::Cooperative, RingMode::Plain] {
            match mode.runtime() {
                Ok(mut rt) => rt.block_on(async {
                    monoio::time::sleep(std::time::Duration::from_millis(5)).await;
                }),
                // Older kernels refuse the newer setup flags; the plain ring must work.
                Err(e) => assert_ne!(mode, RingMode::Plain, "plain ring failed: {e}"),
            }
        }
    }
}
