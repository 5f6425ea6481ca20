//! The shared TLS port: read the ClientHello only as far as its server name, find the
//! service claiming that name, and hand the connection on with the ClientHello bytes in
//! front. The relay holds no key for these names and never sees plaintext; the origin
//! behind the agent terminates TLS. No SNI, an unknown one, or bytes that are not TLS: a
//! TLS alert (where it makes sense) and a clean close, counted.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::reply::{answer_and_close, TLS_ALERT_UNRECOGNIZED_NAME};
use super::{dispatch, read_head, Head};
use crate::control::Shared;
use crate::dataplane::gate::local_addr_of;
use crate::dataplane::pool::Visitor;
use crate::protocol::sni::{HelloScanner, Sni};

/// Serves one visitor of the shared TLS port.
pub async fn serve(shared: Arc<Shared>, mut stream: TcpStream, addr: SocketAddr) {
    let front = &shared.cfg.front;
    let metrics = &shared.metrics;
    let mut scanner = HelloScanner::new();
    let parse = |b: &[u8]| match scanner.feed(b) {
        Ok(Sni::NeedMore) => Ok(None),
        Ok(found) => Ok(Some(found)),
        Err(e) => Err(e),
    };
    let (sni, bytes) = match read_head(&mut stream, front.head_timeout, parse).await {
        Ok(Head::Done(sni, bytes)) => (sni, bytes),
        Ok(Head::Closed) => return,
        Ok(Head::TimedOut) => {
            metrics.tls_unroutable.inc();
            tracing::info!(visitor = %addr, "TLS visitor cut off: no ClientHello within {:?}", front.head_timeout);
            return;
        }
        Err(e) => {
            metrics.tls_unroutable.inc();
            tracing::info!(visitor = %addr, "TLS visitor refused: {e}");
            return;
        }
    };
    let name = match sni {
        Sni::Found(name) => name,
        Sni::Missing | Sni::NeedMore => {
            metrics.tls_unroutable.inc();
            tracing::info!(visitor = %addr, "TLS visitor refused: no server name (SNI) to route by");
            return answer_and_close(stream, &TLS_ALERT_UNRECOGNIZED_NAME).await;
        }
    };
    let Some(svc) = shared.registry.route_tls(&name) else {
        metrics.tls_unroutable.inc();
        tracing::debug!(visitor = %addr, sni = %name, "TLS visitor for an unknown name");
        return answer_and_close(stream, &TLS_ALERT_UNRECOGNIZED_NAME).await;
    };
    let Ok(admission) = svc.gate.admit(addr.ip()) else {
        return; // counted and logged by the gate
    };
    let Ok(std_stream) = stream.into_std() else {
        return;
    };
    let mut prefix = svc.gate.proxy_header(addr, local_addr_of(&std_stream));
    prefix.extend_from_slice(&bytes);
    let visitor = Visitor {
        stream: std_stream,
        addr,
        prefix,
        admission: Some(admission),
    };
    if let Err((e, _)) = dispatch(&shared.dataplane, &svc, visitor, front.agent_wait).await {
        metrics.visitors_unserved.inc();
        tracing::warn!(service = %svc.name, visitor = %addr, "TLS visitor closed: {e}");
    }
}
