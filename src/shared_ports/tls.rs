//! The shared TLS port: read the ClientHello only as far as its server name, find the
//! service claiming that name, and hand the connection on with the ClientHello bytes in
//! front. The relay holds no key for these names and never sees plaintext; the origin
//! behind the agent terminates TLS. No SNI, an unknown one, or bytes that are not TLS: a
//! TLS alert (where it makes sense) and a clean close, counted. A ClientHello offering the
//! agent's ALPN protocol is an agent, not a visitor: it goes to the control plane. With
//! `--https`, a name an `http` service claims is terminated ([`super::https`]).

use std::net::SocketAddr;

use super::conn::Head;
use super::reply::TLS_ALERT_UNRECOGNIZED_NAME;
use super::route::Router;
use super::route::{Decision, Routed, Unserved};
use crate::protocol::sni::{Sni, SniError};

/// What the shared TLS port does with a visitor, given how reading its ClientHello ended.
/// `local`: the visitor's local address, asked only for a PROXY header.
pub fn decide(
    router: &Router,
    read: Result<Head<Sni>, SniError>,
    addr: SocketAddr,
    local: impl FnOnce() -> SocketAddr,
) -> Decision {
    let front = &router.cfg;
    let metrics = &router.metrics;
    let (sni, bytes) = match read {
        Ok(Head::Done(sni, bytes)) => (sni, bytes),
        Ok(Head::Closed) => return Decision::Close,
        Ok(Head::TimedOut) => {
            metrics.tls_unroutable.inc();
            tracing::info!(visitor = %addr, "TLS visitor cut off: no ClientHello within {:?}", front.head_timeout);
            return Decision::Close;
        }
        Err(e) => {
            metrics.tls_unroutable.inc();
            tracing::info!(visitor = %addr, "TLS visitor refused: {e}");
            return Decision::Close;
        }
    };
    let name = match sni {
        Sni::Agent => return Decision::Agent(bytes),
        // The relay's own TLS-ALPN-01 challenge for a host it orders; any other (a `tls`
        // service's origin getting its own certificate) is routed as usual.
        Sni::AcmeChallenge(name)
            if router
                .https
                .as_ref()
                .is_some_and(|h| h.answers_tls_alpn(&name)) =>
        {
            return Decision::Terminate {
                hello: bytes,
                host: name,
                acme: true,
            }
        }
        Sni::Found(name) | Sni::AcmeChallenge(name) => name,
        Sni::Missing | Sni::NeedMore => {
            metrics.tls_unroutable.inc();
            tracing::info!(visitor = %addr, "TLS visitor refused: no server name (SNI) to route by");
            return Decision::Answer(TLS_ALERT_UNRECOGNIZED_NAME.to_vec());
        }
    };
    let routed = router
        .registry
        .route_tls(&name)
        .filter(|svc| router.may_serve(svc));
    let Some(svc) = routed else {
        if router.https.is_some() && router.registry.terminates_https(&name) {
            return Decision::Terminate {
                hello: bytes,
                host: name,
                acme: false,
            };
        }
        if let Some(remote) = router.elsewhere(&name, None) {
            return Decision::HandOver {
                remote,
                first: bytes,
            };
        }
        metrics.tls_unroutable.inc();
        tracing::debug!(visitor = %addr, sni = %name, "TLS visitor for an unknown name");
        return Decision::Answer(TLS_ALERT_UNRECOGNIZED_NAME.to_vec());
    };
    let Ok(admission) = svc.gate.admit(addr) else {
        return Decision::Close; // counted and logged by the gate
    };
    let mut prefix = if svc.gate.wants_proxy_header() {
        svc.gate.proxy_header(addr, local())
    } else {
        Vec::new()
    };
    prefix.extend_from_slice(&bytes);
    Decision::Dispatch(Routed {
        svc,
        prefix,
        admission,
        requests: None,
        unserved: Unserved::Close,
    })
}
