//! The shared HTTP port: read the first request head (bounded in size and time), find the
//! service by host and longest path prefix, write the visitor's address into it, and hand the
//! connection on with a [`Requests`] reader that does the same to every later request head on
//! its way up the tunnel. Bodies, and a WebSocket after its upgrade, pass through untouched.

use std::net::SocketAddr;

use super::conn::Head;
use super::reply::Page;
use super::route::Router;
use super::route::{Decision, Routed, Unserved};
use crate::protocol::http::requests::Requests;
use crate::protocol::http::{self, HeadError, Trust};

/// What the shared HTTP port does with a visitor, given how reading its head ended.
pub fn decide(
    router: &Router,
    read: Result<Head<http::Head>, HeadError>,
    addr: SocketAddr,
) -> Decision {
    let front = &router.cfg;
    let metrics = &router.metrics;
    let (head, bytes) = match read {
        Ok(Head::Done(h, bytes)) => (h, bytes),
        Ok(Head::Closed) => return Decision::Close,
        Ok(Head::TimedOut) => {
            metrics.http_bad_requests.inc();
            tracing::info!(visitor = %addr, "HTTP visitor cut off: no complete request head within {:?}", front.head_timeout);
            return Decision::Answer(
                Page::Timeout.response("the request head did not arrive in time"),
            );
        }
        Err(e) => {
            metrics.http_bad_requests.inc();
            tracing::info!(visitor = %addr, "HTTP visitor refused: {e}");
            return Decision::Answer(match e {
                HeadError::TooLarge(n) => {
                    Page::TooLarge.response(&format!("the request head is larger than {n} bytes"))
                }
                HeadError::Malformed(why) => Page::BadRequest.response(why),
            });
        }
    };
    let Some(svc) = router.registry.route_http(&head.host, &head.path) else {
        metrics.http_unknown_host.inc();
        tracing::debug!(visitor = %addr, host = %head.host, "HTTP visitor for an unknown host");
        return Decision::Answer(
            Page::UnknownHost.response(&format!("no service is published for {}", head.host)),
        );
    };
    let admission = match svc.gate.admit(addr) {
        Ok(a) => a,
        Err(refusal) => return Decision::Answer(Page::OverLimit.response(&refusal.to_string())),
    };
    // Every request head on the connection is rewritten, this first one here; the reader
    // goes with the visitor for the rest.
    let (prefix, requests) = if svc.gate.forwarded_headers() {
        let trust = match front.trusts(addr.ip()) {
            true => Trust::Proxy,
            false => Trust::None,
        };
        let mut requests = Box::new(Requests::new(addr, trust, front.max_head));
        let mut p = Vec::with_capacity(bytes.len() + 192);
        if let Err(e) = requests.feed(&bytes, &mut p) {
            metrics.http_bad_requests.inc();
            tracing::info!(visitor = %addr, "HTTP visitor refused: {e}");
            return Decision::Answer(Page::BadRequest.response(&e.to_string()));
        }
        (p, Some(requests))
    } else {
        (bytes, None)
    };
    Decision::Dispatch(Routed {
        svc,
        prefix,
        admission,
        requests,
        unserved: Unserved::HttpPage { host: head.host },
    })
}
