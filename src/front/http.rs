//! The shared HTTP port: read the first request head (bounded in size and time), find the
//! service by host and longest path prefix, add the visitor's address, and hand the
//! connection on. Everything after the head — bodies, later requests on a keep-alive
//! connection, a WebSocket after its upgrade — passes through untouched.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::reply::{answer_and_close, Page};
use super::{dispatch, read_head, reclaim, Head};
use crate::control::Shared;
use crate::dataplane::pool::{TakeError, Visitor};
use crate::protocol::http::{add_forwarded, HeadError, HeadScanner};

/// Serves one visitor of the shared HTTP port.
pub async fn serve(shared: Arc<Shared>, mut stream: TcpStream, addr: SocketAddr) {
    let front = &shared.cfg.front;
    let metrics = &shared.metrics;
    let mut scanner = HeadScanner::new(front.max_head);
    let (head, bytes) = match read_head(&mut stream, front.head_timeout, |b| scanner.feed(b)).await
    {
        Ok(Head::Done(h, bytes)) => (h, bytes),
        Ok(Head::Closed) => return,
        Ok(Head::TimedOut) => {
            metrics.http_bad_requests.inc();
            tracing::info!(visitor = %addr, "HTTP visitor cut off: no complete request head within {:?}", front.head_timeout);
            let page = Page::Timeout.response("the request head did not arrive in time");
            return answer_and_close(stream, &page).await;
        }
        Err(e) => {
            metrics.http_bad_requests.inc();
            tracing::info!(visitor = %addr, "HTTP visitor refused: {e}");
            let page = match e {
                HeadError::TooLarge(n) => {
                    Page::TooLarge.response(&format!("the request head is larger than {n} bytes"))
                }
                HeadError::Malformed(why) => Page::BadRequest.response(why),
            };
            return answer_and_close(stream, &page).await;
        }
    };
    let Some(svc) = shared.registry.route_http(&head.host, &head.path) else {
        metrics.http_unknown_host.inc();
        tracing::debug!(visitor = %addr, host = %head.host, "HTTP visitor for an unknown host");
        let page =
            Page::UnknownHost.response(&format!("no service is published for {}", head.host));
        return answer_and_close(stream, &page).await;
    };
    let admission = match svc.gate.admit(addr.ip()) {
        Ok(a) => a,
        Err(refusal) => {
            let page = Page::OverLimit.response(&refusal.to_string());
            return answer_and_close(stream, &page).await;
        }
    };
    let prefix = if svc.gate.forwarded_headers() {
        let mut p = add_forwarded(&bytes[..head.len], addr, "http");
        p.extend_from_slice(&bytes[head.len..]);
        p
    } else {
        bytes
    };
    let Ok(std_stream) = stream.into_std() else {
        return;
    };
    let visitor = Visitor {
        stream: std_stream,
        addr,
        prefix,
        admission: Some(admission),
    };
    if let Err((e, visitor)) = dispatch(&shared.dataplane, &svc, visitor, front.agent_wait).await {
        metrics.visitors_unserved.inc();
        let page = match e {
            TakeError::Timeout(_) => {
                metrics.http_agent_offline.inc();
                tracing::warn!(service = %svc.name, visitor = %addr, "HTTP visitor answered 502: {e}");
                Page::AgentOffline.response(&format!("the service for {} is offline", head.host))
            }
            TakeError::Full => {
                tracing::warn!(service = %svc.name, visitor = %addr, "HTTP visitor answered 503: {e}");
                Page::OverLimit.response("too many visitors are waiting for this service")
            }
        };
        if let Ok(stream) = reclaim(visitor) {
            answer_and_close(stream, &page).await;
        }
    }
}
