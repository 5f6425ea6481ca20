//! What routing decides for a visitor of a shared port, and what it needs to decide it.

use std::net::SocketAddr;
use std::sync::Arc;

use super::reply::Page;
use crate::admin::Metrics;
use crate::config::FrontConfig;
use crate::config::SecretId;
use crate::control::accept::AgentHandoff;
use crate::control::registry::Registry;
use crate::control::service::Service;
use crate::dataplane::gate::Admission;
use crate::dataplane::pool::{TakeError, Visitor};
use crate::fleet::elsewhere::Remote;
use crate::fleet::handoff::Handoff;
use crate::protocol::http::requests::Requests;

/// What a shared port reads to route a visitor: its settings, the routing table (in the
/// registry) and the relay's counters. Nothing else of the relay is reachable from here.
#[derive(Clone)]
pub struct Router {
    /// Head size and time limits, the domain, the agent wait.
    pub cfg: FrontConfig,
    /// Services and the host → service routes.
    pub registry: Arc<Registry>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Agents that came in on the shared TLS port (by ALPN) go to the control plane here.
    pub agents: tokio::sync::mpsc::Sender<AgentHandoff>,
    /// HTTPS termination for `http` services on the shared TLS port (`--https`).
    pub https: Option<Arc<dyn Terminate>>,
    /// In a fleet: hosts other relays serve, and the hand-over of their visitors.
    pub fleet: Option<Arc<Handoff>>,
    /// For a visitor another relay of the fleet handed over: the only secret whose services
    /// it may reach (the one the hand-over proved). `None` on the relay's own ports.
    pub only: Option<SecretId>,
}

/// What the shared ports need of HTTPS termination ([`super::https::Terminator`]): a place to
/// hand the TLS port's visitors it terminates, and the ACME challenges the HTTP port answers.
pub trait Terminate: Send + Sync {
    /// Takes a visitor whose ClientHello (`hello`, already read) names `host`, which the
    /// relay terminates, and serves it on a task of its own.
    fn hand(
        self: Arc<Self>,
        router: Arc<Router>,
        stream: std::net::TcpStream,
        addr: SocketAddr,
        hello: Vec<u8>,
        host: String,
        acme: bool,
    );

    /// Whether a TLS-ALPN-01 challenge for `host` is being validated now.
    fn answers_tls_alpn(&self, host: &str) -> bool;

    /// The answer to an HTTP-01 validation request for `path`, if it is a token being
    /// validated now.
    fn challenge(&self, path: &str) -> Option<String>;
}

impl Router {
    /// Whether this router may hand a visitor to `svc` (see [`Self::only`]).
    pub fn may_serve(&self, svc: &Service) -> bool {
        self.only.as_ref().is_none_or(|id| *id == svc.secret)
    }

    /// The service another relay of the fleet serves for `host` (and `path`, for HTTP), if
    /// this relay is in a fleet and the visitor did not come from another relay already.
    pub fn elsewhere(&self, host: &str, path: Option<&str>) -> Option<Arc<Remote>> {
        let fleet = self.fleet.as_ref().filter(|_| self.only.is_none())?;
        match path {
            Some(path) => fleet.route_http(host, path),
            None => fleet.route_tls(host),
        }
    }

    /// Hands an agent's connection to the control plane; closes it (counted) when the
    /// control plane has too many waiting.
    pub fn hand_to_control(&self, handoff: AgentHandoff) {
        if let Err(e) = self.agents.try_send(handoff) {
            self.metrics.unauthenticated_shed.inc();
            let peer = match &e {
                tokio::sync::mpsc::error::TrySendError::Full(h)
                | tokio::sync::mpsc::error::TrySendError::Closed(h) => h.peer,
            };
            tracing::debug!(%peer, "agent connection on the TLS port closed: the control plane has too many waiting");
        }
    }
}

/// What a shared port does with a visitor once its first bytes are read.
pub enum Decision {
    /// Hand it to a service.
    Dispatch(Routed),
    /// Answer these bytes (an error page, a TLS alert), then close.
    Answer(Vec<u8>),
    /// Close without a word.
    Close,
    /// An agent's connection (ALPN `ringtunnel`) on the shared TLS port: hand it, with these
    /// bytes already read, to the control plane.
    Agent(Vec<u8>),
    /// A visitor for a host another relay of the fleet serves: hand it there, with the
    /// bytes read to route it.
    HandOver {
        /// The service, and the relays to try.
        remote: Arc<Remote>,
        /// The request head or ClientHello read.
        first: Vec<u8>,
    },
    /// A visitor of the shared TLS port for a host the relay terminates HTTPS for: hand it,
    /// with its ClientHello already read, to [`super::https::Terminator`].
    Terminate {
        /// The ClientHello bytes read.
        hello: Vec<u8>,
        /// Its server name.
        host: String,
        /// An ACME CA validating the relay's TLS-ALPN-01 challenge for `host`, not a visitor.
        acme: bool,
    },
}

/// A visitor routed to a service, not yet handed to its pools.
pub struct Routed {
    /// The service.
    pub svc: Arc<Service>,
    /// Bytes to send down the tunnel before the visitor's own (what was read to route it,
    /// with added headers).
    pub prefix: Vec<u8>,
    /// The visitor's counted place in the service.
    pub admission: Admission,
    /// HTTP with forwarding headers: rewrites the visitor's later request heads.
    pub requests: Option<Box<Requests>>,
    /// What the visitor hears if no tunnel connection takes it.
    pub unserved: Unserved,
}

/// How a routed visitor that no tunnel connection took is told.
pub enum Unserved {
    /// An HTTP error page naming the host.
    HttpPage {
        /// The host the visitor asked for.
        host: String,
    },
    /// A plain close (the TLS port: the visitor expects TLS, which only the origin speaks).
    Close,
}

impl Routed {
    /// The visitor, ready for the service's pools.
    pub fn visitor(
        self,
        stream: std::net::TcpStream,
        addr: SocketAddr,
    ) -> (Visitor, Unserved, Arc<Service>) {
        let visitor = Visitor {
            http: matches!(self.unserved, Unserved::HttpPage { .. }),
            stream,
            addr,
            prefix: self.prefix,
            admission: Some(self.admission),
            requests: self.requests,
            early: Vec::new(),
            unanswered: 0,
            ask_first: false,
        };
        (visitor, self.unserved, self.svc)
    }
}

impl Unserved {
    /// Counts and logs a visitor no tunnel connection took; returns what it hears, if anything.
    pub fn answer(
        &self,
        router: &Router,
        svc: &Service,
        addr: SocketAddr,
        e: &TakeError,
    ) -> Option<Vec<u8>> {
        let metrics = &router.metrics;
        svc.gate.count_unserved();
        match self {
            Unserved::Close => {
                tracing::warn!(service = %svc.name, visitor = %addr, "TLS visitor closed: {e}");
                None
            }
            Unserved::HttpPage { host } => Some(match e {
                TakeError::Timeout(_) | TakeError::Closed => {
                    metrics.http_agent_offline.inc();
                    tracing::warn!(service = %svc.name, visitor = %addr, "HTTP visitor answered 502: {e}");
                    Page::AgentOffline.response(&format!("the service for {host} is offline"))
                }
                TakeError::Full => {
                    tracing::warn!(service = %svc.name, visitor = %addr, "HTTP visitor answered 503: {e}");
                    Page::OverLimit.response("too many visitors are waiting for this service")
                }
            }),
        }
    }
}
