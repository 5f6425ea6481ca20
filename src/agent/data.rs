//! One data connection on the agent, on tokio: open it with a ticket, wait (pooled) for the
//! relay to assign a visitor, then dial the local service and forward both ways. The
//! protocol decisions are [`AgentDataConn`]'s; this is its tokio driver.

use std::os::fd::AsFd;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Ctx;
use crate::dataplane::sock;
use crate::dataplane::tally::Tally;
use crate::dataplane::tokio::chunked;
use crate::net::CONNECT_TIMEOUT;
use crate::protocol::auth::Ticket;
use crate::protocol::lifecycle::{AgentDataConn, AgentEvent};

/// Opens a data connection with `ticket` for `udp` service `service` and carries its flows
/// to `local` through it, for as long as the relay keeps it.
pub async fn serve_udp(ctx: Arc<Ctx>, tls: bool, service: String, local: String, ticket: Ticket) {
    let mut tunnel = match Box::pin(ctx.connect_data(tls)).await {
        Ok(s) => s,
        Err(e) => return tracing::debug!(service, "udp channel failed: {e}"),
    };
    let (_, hello) = AgentDataConn::open(ticket);
    let sent = tokio::time::timeout(CONNECT_TIMEOUT, async {
        tunnel.write_all(&hello).await?;
        tunnel.flush().await
    });
    if let Err(e) = sent
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        return tracing::debug!(service, "udp channel failed: {e}");
    }
    let flows = ctx.udp_service(&service, &local);
    match flows.serve_channel(tunnel).await {
        Ok(()) => tracing::debug!(service, "udp channel closed by the relay"),
        Err(e) => tracing::debug!(service, "udp channel ended: {e}"),
    }
}

/// Opens a data connection with `ticket` and serves visitors through it to `local`, one at a
/// time, for as long as the relay keeps it.
pub async fn serve(ctx: Arc<Ctx>, tls: bool, service: String, local: String, ticket: Ticket) {
    // Dialing holds timers (cache-line aligned) and a TLS handshake: boxed, so none of it
    // pads the task that lives as long as the connection.
    let mut tunnel = match Box::pin(ctx.connect_data(tls)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(service, "data connection failed: {e}");
            return;
        }
    };
    let (mut conn, hello) = AgentDataConn::open(ticket);
    let sent = Box::pin(tokio::time::timeout(CONNECT_TIMEOUT, async {
        tunnel.write_all(&hello).await?;
        tunnel.flush().await
    }));
    match sent.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return tracing::debug!(service, "data connection failed: {e}"),
        Err(_) => return tracing::debug!(service, "data connection failed: hello timed out"),
    }
    // On the heap: held across the pooled wait, inline it would grow every idle task.
    let mut buf = vec![0u8; 512];
    // One visitor after another: a connection whose visitor ended cleanly in both directions
    // goes back to waiting for the next `Start`.
    loop {
        // Pooled: this waits, unbounded, until a visitor arrives or the relay drops us.
        let mut event = conn.pending();
        let (visitor, early) = loop {
            match event {
                AgentEvent::NeedMore => {
                    let n = match tunnel.read(&mut buf).await {
                        Ok(n) => n,
                        Err(e) => {
                            return tracing::debug!(service, "pooled data connection closed: {e}")
                        }
                    };
                    event = conn.on_pooled_input(&buf[..n]);
                }
                AgentEvent::Start { visitor, early } => break (visitor, early),
                AgentEvent::Refused { message, routine } => {
                    return match routine {
                        true => {
                            tracing::debug!(service, "relay refused a data connection: {message}")
                        }
                        false => {
                            tracing::warn!(service, "relay refused a data connection: {message}")
                        }
                    };
                }
                AgentEvent::Ended => {
                    return tracing::debug!(service, "pooled data connection closed by the relay")
                }
                AgentEvent::Invalid(why) => {
                    return tracing::warn!(service, "data connection closed: {why}")
                }
            }
        };
        let answered = Box::pin(tokio::time::timeout(CONNECT_TIMEOUT, async {
            tunnel.write_all(&conn.started()).await?;
            tunnel.flush().await
        }));
        match answered.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return tracing::debug!(service, %visitor, "data connection failed: {e}"),
            Err(_) => {
                return tracing::debug!(service, %visitor, "data connection failed: answer to Start timed out")
            }
        }
        let _visiting = ctx.in_flight.enter();
        let connect = Box::pin(tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect(&local),
        ));
        let why = match connect.await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_string()),
        };
        let mut origin = match why {
            Ok(s) => s,
            Err(why) => {
                tracing::warn!(service, %visitor, "cannot reach local service {local}: {why}");
                // Tell the relay, so the visitor hears why (a 502 for HTTP), then close.
                let unreachable = conn.on_dial_failed();
                let told = async {
                    tunnel.write_all(&unreachable).await?;
                    tunnel.shutdown().await
                };
                let _ = tokio::time::timeout(CONNECT_TIMEOUT, told).await;
                return;
            }
        };
        let _ = origin.set_nodelay(true);
        // Until its stream ends whole: an agent that dies meanwhile resets the local service.
        sock::arm_reset(origin.as_fd());
        match chunked::forward(&mut origin, &mut tunnel, &[], &early, None, Tally::none()).await {
            Ok(o) => {
                let (up, down) = (o.down, o.up); // as the visitor sees them
                tracing::debug!(service, %visitor, up, down, reusable = o.reusable, "visitor done");
                sock::disarm_reset(origin.as_fd());
                drop(origin);
                let Some(ready) = conn.on_visitor_done(o.reusable, o.leftover) else {
                    return;
                };
                // Done with the local connection, cleanly: the relay may send the next
                // visitor here.
                let sent = async {
                    tunnel.write_all(&ready).await?;
                    tunnel.flush().await
                };
                if let Err(e) = sent.await {
                    tracing::debug!(service, "data connection ended: {e}");
                    return;
                }
            }
            Err(e) => {
                if e.tunnel_lost() {
                    // The relay (or the link) went mid-stream: the local service must see an
                    // error, not a clean end of what it was sent.
                    sock::cut(origin.as_fd());
                }
                tracing::debug!(service, %visitor, "visitor ended: {e}");
                return;
            }
        }
    }
}
