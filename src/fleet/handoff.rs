//! The sending end of a fleet's visitor hand-over. A relay opens the public port of every
//! `tcp` service of the fleet that some other relay has an agent session for and it has not
//! (the agent cannot reach it, or never tried), and hands each visitor that arrives there to
//! one of those relays over the control port: TLS pinned to the fleet's one certificate, a
//! MAC with the service's secret over the receiving relay's nonce and the visitor's address,
//! then the visitor's bytes both ways, in chunks with an end marker. The receiving relay
//! serves the visitor as its own (see `control::peer`). A connection whose visitor ended
//! cleanly is kept, challenged afresh, for the next visitor to that relay, as an agent's data
//! connections are. When an agent of the service publishes it here, the port is let go
//! first, so the registry binds it. Visitors of `http` and `tls` hosts served elsewhere come
//! from the shared ports instead ([`Handoff::hand`]), with the bytes read to route them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use super::elsewhere::{Elsewhere, Remote, RemoteHosts};
use crate::dataplane::tally::Tally;
use crate::net::cap::ConnCap;
use crate::protocol::auth::{peer_mac, Nonce};
use crate::protocol::{AgentMsg, RelayMsg, ServiceKind, PROTOCOL_VERSION};
use crate::transport::Framed;

/// Longest a hand-over may take, connect to `Start`.
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(5);
/// Relays tried for one visitor before it is given up.
const OFFER_ATTEMPTS: usize = 3;
/// How long a service being published here keeps its port out of the hand-over's hands.
const WANTED_HERE: Duration = Duration::from_secs(15);
/// What every hand-over uses: how to reach and trust the other relays, how to prove a
/// service, the bound on visitors being handed, and the connections kept between them.
struct Sender {
    tls: TlsConnector,
    secrets: Secrets,
    cap: Arc<ConnCap>,
    warm: Warm,
}

/// Idle relay-to-relay connections kept per receiving relay.
const MAX_WARM: usize = 8;
/// How long an idle relay-to-relay connection is kept (the receiving relay waits up to
/// `control::peer::PEER_IDLE` for its next visitor).
const WARM_FOR: Duration = Duration::from_secs(45);
/// Visitors being handed over at once, in all and per address.
const MAX_HANDING: usize = 16384;
const MAX_HANDING_PER_ADDRESS: usize = 1024;

struct Listening {
    port: u16,
    relays: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

/// Looks up a service's secret (the relay's settings can be reloaded).
pub type Secrets = Arc<dyn Fn(&str) -> Option<Vec<u8>> + Send + Sync>;

/// The ports this relay serves for other relays of its fleet.
pub struct Handoff {
    bind: IpAddr,
    sender: Arc<Sender>,
    listening: Mutex<HashMap<String, Listening>>,
    wanted_here: Mutex<HashMap<String, Instant>>,
    /// Host names of `http`/`tls` services served elsewhere, for the shared ports.
    hosts: std::sync::RwLock<Arc<RemoteHosts>>,
    /// Where hand-overs run: the shared ports may ask from an io_uring worker thread.
    runtime: tokio::runtime::Handle,
}

/// Idle relay-to-relay connections, by the relay they reach: each has its next challenge;
/// and the visitors being carried to each relay now.
#[derive(Default)]
struct Warm(
    Mutex<HashMap<String, Vec<Idle>>>,
    Mutex<HashMap<String, usize>>,
);

/// A visitor counted as carried to a relay until dropped.
struct Carrying<'a>(&'a Warm, String);

impl Drop for Carrying<'_> {
    fn drop(&mut self) {
        let mut g = self.0 .1.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get_mut(&self.1) {
            *n = n.saturating_sub(1);
        }
    }
}

struct Idle {
    framed: Framed<PeerStream>,
    nonce: Nonce,
    since: Instant,
}

impl Warm {
    /// `targets` ordered by the visitors this relay carries to each now, fewest first (ties
    /// in a random order): least connections, as this relay sees them.
    fn least_loaded(&self, mut targets: Vec<String>) -> Vec<String> {
        let mut b = [0u8; 1];
        crate::protocol::auth::random_bytes(&mut b);
        if !targets.is_empty() {
            let n = targets.len();
            targets.rotate_left(usize::from(b[0]) % n);
        }
        let g = self.1.lock().unwrap_or_else(|p| p.into_inner());
        targets.sort_by_key(|t| g.get(t).copied().unwrap_or(0));
        targets
    }

    fn carry(&self, target: &str) -> Carrying<'_> {
        let mut g = self.1.lock().unwrap_or_else(|p| p.into_inner());
        *g.entry(target.to_string()).or_insert(0) += 1;
        Carrying(self, target.to_string())
    }

    fn take(&self, target: &str) -> Option<Idle> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let list = g.get_mut(target)?;
        while let Some(idle) = list.pop() {
            if idle.since.elapsed() < WARM_FOR {
                return Some(idle);
            }
        }
        None
    }

    fn put(&self, target: &str, idle: Idle) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let list = g.entry(target.to_string()).or_default();
        list.retain(|i| i.since.elapsed() < WARM_FOR);
        if list.len() < MAX_WARM {
            list.push(idle);
        }
    }
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("bind", &self.bind)
            .field("serving", &self.serving())
            .finish_non_exhaustive()
    }
}

impl Handoff {
    /// Hands visitors over from ports on `bind`, trusting relays that present the
    /// certificate `tls` pins, proving each service's secret as `secrets` gives it. Runs its
    /// tasks on the tokio runtime it is made in.
    pub fn new(bind: IpAddr, tls: TlsConnector, secrets: Secrets) -> Handoff {
        Handoff {
            hosts: Default::default(),
            runtime: tokio::runtime::Handle::current(),
            bind,
            sender: Arc::new(Sender {
                tls,
                secrets,
                cap: ConnCap::new(MAX_HANDING, MAX_HANDING_PER_ADDRESS),
                warm: Warm::default(),
            }),
            listening: Mutex::new(HashMap::new()),
            wanted_here: Mutex::new(HashMap::new()),
        }
    }

    /// The names whose ports are open for hand-over now.
    pub fn serving(&self) -> Vec<String> {
        let g = self.listening.lock().unwrap_or_else(|p| p.into_inner());
        g.keys().cloned().collect()
    }

    /// Lets go of `name`'s port (closed when this returns), and keeps it out of hand-over for
    /// a while: an agent of it is publishing it here.
    pub async fn release(&self, name: &str) {
        let key = name.to_ascii_lowercase();
        {
            let mut w = self.wanted_here.lock().unwrap_or_else(|p| p.into_inner());
            w.insert(key.clone(), Instant::now() + WANTED_HERE);
        }
        self.close(&key).await;
    }

    /// Closes the hand-over port of `name` if open (closed when this returns); its port.
    async fn close(&self, name: &str) -> Option<u16> {
        let gone = {
            let mut g = self.listening.lock().unwrap_or_else(|p| p.into_inner());
            g.remove(name)
        }?;
        gone.task.abort();
        // Resolves once the task, and the listener it owns, is dropped.
        let _ = gone.task.await;
        Some(gone.port)
    }

    /// Lets service `name` be handed over again at once (it left this relay).
    pub fn unwant(&self, name: &str) {
        let mut w = self.wanted_here.lock().unwrap_or_else(|p| p.into_inner());
        w.remove(&name.to_ascii_lowercase());
    }

    /// Opens the ports of `elsewhere` (services other relays serve; `local`: the ones this
    /// relay has) and closes the ones no longer there.
    pub async fn reconcile(&self, elsewhere: &HashMap<String, Elsewhere>, local: &[String]) {
        let now = Instant::now();
        let wanted: Vec<String> = {
            let mut w = self.wanted_here.lock().unwrap_or_else(|p| p.into_inner());
            w.retain(|_, until| *until > now);
            w.keys().cloned().collect()
        };
        // Served here, or about to be: never handed over.
        let here = |name: &str| {
            local.iter().any(|l| l.eq_ignore_ascii_case(name)) || wanted.iter().any(|w| w == name)
        };
        let keep = |name: &String| {
            elsewhere
                .get(name)
                .is_some_and(|e| e.kind == ServiceKind::Tcp)
                && !here(name)
        };
        let by_host = elsewhere
            .iter()
            .filter(|(name, e)| e.kind != ServiceKind::Tcp && !here(name));
        let hosts = Arc::new(RemoteHosts::new(by_host));
        let was = std::mem::replace(
            &mut *self.hosts.write().unwrap_or_else(|p| p.into_inner()),
            hosts.clone(),
        );
        let names = hosts.services();
        if was.services() != names {
            tracing::info!(services = %names.join(","), "fleet: handing visitors of these services' hosts to the relays their agents are on");
        }
        let stale: Vec<String> = {
            let g = self.listening.lock().unwrap_or_else(|p| p.into_inner());
            g.iter()
                .filter(|(name, l)| !keep(name) || elsewhere[*name].port != l.port)
                .map(|(name, _)| name.clone())
                .collect()
        };
        for name in stale {
            if let Some(port) = self.close(&name).await {
                tracing::info!(service = %name, port, "fleet: no longer handing this service's visitors over");
            }
        }
        for (name, e) in elsewhere {
            if !keep(name) {
                continue;
            }
            let mut g = self.listening.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = g.get(name) {
                *l.relays.lock().unwrap_or_else(|p| p.into_inner()) = e.relays.clone();
                continue;
            }
            let addr = SocketAddr::new(self.bind, e.port);
            let listener = match crate::net::bind(addr, false) {
                Ok(l) => l,
                Err(err) => {
                    tracing::debug!(service = %name, %addr, "fleet: cannot open the port for hand-over: {err}");
                    continue;
                }
            };
            let relays = Arc::new(Mutex::new(e.relays.clone()));
            let task = tokio::spawn(accept_loop(
                listener,
                name.clone(),
                relays.clone(),
                self.sender.clone(),
            ));
            tracing::info!(service = %name, port = e.port, relays = %e.relays.join(","), "fleet: handing this service's visitors to the relays its agent is on");
            g.insert(
                name.clone(),
                Listening {
                    port: e.port,
                    relays,
                    task,
                },
            );
        }
    }
}

impl Handoff {
    fn hosts(&self) -> Arc<RemoteHosts> {
        self.hosts.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The service another relay serves for a plain HTTP request to `host` with `path`, if
    /// no service here claims it.
    pub fn route_http(&self, host: &str, path: &str) -> Option<Arc<Remote>> {
        self.hosts().http(host, path)
    }

    /// The service another relay serves for a TLS visitor naming `host`.
    pub fn route_tls(&self, host: &str) -> Option<Arc<Remote>> {
        self.hosts().tls(host)
    }

    /// Hands a visitor of a shared port to a relay with an agent of `remote`, with `first`
    /// (what the shared port read to route it) sent ahead of the rest of its bytes. The
    /// receiving relay routes and admits it again, as if it had come to its own port.
    pub fn hand(
        &self,
        remote: Arc<Remote>,
        stream: std::net::TcpStream,
        addr: SocketAddr,
        first: Vec<u8>,
    ) {
        let Ok(place) = self.sender.cap.enter(addr.ip()) else {
            return; // dropping the stream closes it
        };
        let sender = self.sender.clone();
        self.runtime.spawn(async move {
            let Ok(stream) = stream
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(stream))
            else {
                return;
            };
            let mut ahead = Vec::with_capacity(first.len() + 16);
            crate::protocol::chunk::push_chunks(&mut ahead, &first);
            let name = &remote.service;
            let relays = remote.relays.clone();
            sender.hand_over(stream, addr, name, relays, &ahead).await;
            drop(place);
        });
    }
}

async fn accept_loop(
    listener: TcpListener,
    name: String,
    relays: Arc<Mutex<Vec<String>>>,
    sender: Arc<Sender>,
) {
    let mut errors = crate::net::AcceptErrors::new("fleet hand-over");
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let Some(stream) = errors.admit(stream, Instant::now()) else {
                    continue;
                };
                let Ok(place) = sender.cap.enter(addr.ip()) else {
                    continue; // dropping the stream closes it
                };
                let targets = relays.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let (name, sender) = (name.clone(), sender.clone());
                tokio::spawn(async move {
                    sender.hand_over(stream, addr, &name, targets, &[]).await;
                    drop(place);
                });
            }
            Err(e) => errors.back_off(&e).await,
        }
    }
}

impl Sender {
    /// Hands one visitor to the first of `targets` that takes it, trying the one this relay
    /// carries the fewest visitors to first; `ahead` (chunked) goes before its bytes.
    async fn hand_over(
        &self,
        mut visitor: TcpStream,
        addr: SocketAddr,
        name: &str,
        targets: Vec<String>,
        ahead: &[u8],
    ) {
        let Sender {
            tls, secrets, warm, ..
        } = self;
        let Some(secret) = secrets(name) else {
            tracing::warn!(service = name, visitor = %addr, "fleet: visitor closed: no secret for the service here");
            return;
        };
        let targets = warm.least_loaded(targets);
        let mut last = String::from("no relay of the fleet has its agent");
        for target in targets.iter().take(OFFER_ATTEMPTS) {
            // A kept connection first; if the other relay let it go meanwhile, a fresh one.
            let mut offered = None;
            if let Some(idle) = warm.take(target) {
                offered = offer(idle, name, addr, &secret).await.ok();
            }
            if offered.is_none() {
                let fresh = async {
                    let idle = dial(target, tls).await?;
                    offer(idle, name, addr, &secret).await
                };
                match tokio::time::timeout(OFFER_TIMEOUT, fresh).await {
                    Ok(Ok(o)) => offered = Some(o),
                    Ok(Err(why)) => last = format!("{target}: {why}"),
                    Err(_) => last = format!("{target}: no answer within {OFFER_TIMEOUT:?}"),
                }
            }
            let Some((mut stream, early)) = offered else {
                continue;
            };
            let carrying = warm.carry(target);
            tracing::debug!(service = name, visitor = %addr, relay = %target, "fleet: visitor handed over");
            let moved = crate::dataplane::tokio::chunked::forward(
                &mut visitor,
                &mut stream,
                ahead,
                &early,
                None,
                Tally::none(),
            )
            .await;
            drop(carrying);
            if let Err(e) = &moved {
                // The other relay (or its agent) went mid-stream: the visitor hears an error,
                // never a clean end of a cut stream.
                tracing::debug!(service = name, visitor = %addr, relay = %target, "fleet: handed-over visitor reset: {e}");
                crate::net::reset_on_close(std::os::fd::AsFd::as_fd(&visitor));
            }
            if let Some(o) = moved.ok().filter(|o| o.reusable) {
                // The other relay challenges afresh for the next visitor.
                let mut framed = Framed::with_buffer(stream, o.leftover);
                let next = tokio::time::timeout(OFFER_TIMEOUT, framed.read_msg::<RelayMsg>()).await;
                if let Ok(Ok(RelayMsg::Challenge { nonce, .. })) = next {
                    warm.put(
                        target,
                        Idle {
                            framed,
                            nonce,
                            since: Instant::now(),
                        },
                    );
                }
            }
            return;
        }
        tracing::warn!(service = name, visitor = %addr, "fleet: visitor closed: no relay took it ({last})");
    }
}

type PeerStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A new relay-to-relay connection to `target`, challenged.
async fn dial(target: &str, tls: &TlsConnector) -> Result<Idle, String> {
    let (host, _) = crate::config::parse_host_port(target, None).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let server = ServerName::try_from(host).map_err(|e| format!("server name: {e}"))?;
    let stream = tls
        .connect(server, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let mut framed = Framed::new(stream);
    let hello = AgentMsg::PeerHello {
        version: PROTOCOL_VERSION,
    };
    framed
        .write_msg(&hello, OFFER_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    match framed.read_msg::<RelayMsg>().await {
        Ok(RelayMsg::Challenge { nonce, .. }) => Ok(Idle {
            framed,
            nonce,
            since: Instant::now(),
        }),
        Ok(RelayMsg::Error { message, .. }) => Err(message),
        Ok(other) => Err(format!("{other:?} where a challenge was expected")),
        Err(e) => Err(e.to_string()),
    }
}

/// Offers the visitor on a challenged connection: its stream once the other relay said
/// `Start`, with any bytes read past that frame.
async fn offer(
    idle: Idle,
    name: &str,
    visitor: SocketAddr,
    secret: &[u8],
) -> Result<(PeerStream, Vec<u8>), String> {
    let Idle {
        mut framed, nonce, ..
    } = idle;
    let visit = AgentMsg::PeerVisit {
        service: name.to_string(),
        visitor,
        mac: peer_mac(secret, &nonce, name, &visitor),
    };
    framed
        .write_msg(&visit, OFFER_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(OFFER_TIMEOUT, framed.read_msg::<RelayMsg>()).await;
    match answer {
        Ok(Ok(RelayMsg::Start { .. })) => Ok(framed.into_parts()),
        Ok(Ok(RelayMsg::Error { message, .. })) => Err(message),
        Ok(Ok(other)) => Err(format!("{other:?} where Start was expected")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no Start within {OFFER_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_carrying_fewest_visitors_comes_first() {
        let warm = Warm::default();
        let all = || vec!["a:1".to_string(), "b:1".to_string(), "c:1".to_string()];
        let a = warm.carry("a:1");
        let _a2 = warm.carry("a:1");
        let _c = warm.carry("c:1");
        assert_eq!(warm.least_loaded(all())[0], "b:1");
        assert_eq!(warm.least_loaded(all())[2], "a:1");
        drop(a);
        let _b = warm.carry("b:1");
        let _b2 = warm.carry("b:1");
        assert_eq!(warm.least_loaded(all())[2], "b:1");
    }
}
