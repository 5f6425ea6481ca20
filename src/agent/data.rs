//! One data connection on the agent: open it with a ticket, wait (pooled) for the relay to
//! assign a visitor, then dial the local service and forward both ways.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::Ctx;
use crate::dataplane::tokio::chunked;
use crate::net::CONNECT_TIMEOUT;
use crate::protocol::auth::Ticket;
use crate::protocol::chunk;
use crate::protocol::{AgentMsg, RelayMsg, PROTOCOL_VERSION};
use crate::transport::Framed;

/// Opens a data connection with `ticket` and serves visitors through it to `local`, one at a
/// time, for as long as the relay keeps it.
pub async fn serve(ctx: Arc<Ctx>, tls: bool, service: String, local: String, ticket: Ticket) {
    // Dialing holds timers (cache-line aligned) and a TLS handshake: boxed, so none of it
    // pads the task that lives as long as the connection.
    let stream = match Box::pin(ctx.connect(tls)).await {
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
    if let Err(e) = Box::pin(framed.write_msg(&hello, CONNECT_TIMEOUT)).await {
        tracing::debug!(service, "data connection failed: {e}");
        return;
    }
    // One visitor after another: a connection whose visitor ended cleanly in both directions
    // goes back to waiting for the next `Start`.
    loop {
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
        let connect = Box::pin(tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect(&local),
        ));
        let mut origin = match connect.await {
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
        match chunked::forward(&mut origin, &mut tunnel, &[], &early).await {
            Ok(o) => {
                let (up, down) = (o.moved.b_to_a, o.moved.a_to_b);
                tracing::debug!(service, %visitor, up, down, reusable = o.reusable, "visitor done");
                if !o.reusable {
                    return;
                }
                drop(origin);
                // Done with the local connection, cleanly: tell the relay it may send the
                // next visitor here.
                let ready = async {
                    tunnel.write_all(&chunk::header(chunk::READY)).await?;
                    tunnel.flush().await
                };
                if let Err(e) = ready.await {
                    tracing::debug!(service, "data connection ended: {e}");
                    return;
                }
                framed = Framed::with_buffer(tunnel, o.leftover);
            }
            Err(e) => {
                tracing::debug!(service, %visitor, "visitor ended: {e}");
                return;
            }
        }
    }
}
