//! One data connection on the agent: open it with a ticket, wait (pooled) for the relay to
//! assign a visitor, then dial the local service and forward both ways.

use std::sync::Arc;

use tokio::net::TcpStream;

use super::{Ctx, CONNECT_TIMEOUT};
use crate::dataplane::forward::forward;
use crate::protocol::auth::Ticket;
use crate::protocol::{AgentMsg, RelayMsg, PROTOCOL_VERSION};
use crate::transport::Framed;

/// Opens a data connection with `ticket` and serves one visitor through it to `local`.
pub async fn serve(ctx: Arc<Ctx>, tls: bool, service: String, local: String, ticket: Ticket) {
    let stream = match ctx.connect(tls).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(service, "data connection failed: {e}");
            return;
        }
    };
    let mut framed = Framed::new(stream);
    let hello = AgentMsg::DataHello {
        version: PROTOCOL_VERSION,
        ticket,
    };
    if let Err(e) = framed.write_msg(&hello, CONNECT_TIMEOUT).await {
        tracing::debug!(service, "data connection failed: {e}");
        return;
    }
    // Pooled: this waits, unbounded, until a visitor arrives or the relay drops us.
    let visitor = match framed.read_msg::<RelayMsg>().await {
        Ok(RelayMsg::Start { visitor }) => visitor,
        Ok(RelayMsg::Error { message, .. }) => {
            tracing::warn!(service, "relay refused a data connection: {message}");
            return;
        }
        Ok(other) => {
            tracing::warn!(service, "unexpected frame on data connection: {other:?}");
            return;
        }
        Err(e) => {
            tracing::debug!(service, "pooled data connection closed: {e}");
            return;
        }
    };
    let (mut tunnel, early) = framed.into_parts();
    let mut origin = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&local)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(service, %visitor, "cannot reach local service {local}: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(service, %visitor, "cannot reach local service {local}: timed out");
            return;
        }
    };
    let _ = origin.set_nodelay(true);
    match forward(&mut tunnel, &mut origin, &early).await {
        Ok(m) => tracing::debug!(service, %visitor, up = m.a_to_b, down = m.b_to_a, "visitor done"),
        Err(e) => tracing::debug!(service, %visitor, "visitor ended: {e}"),
    }
}
