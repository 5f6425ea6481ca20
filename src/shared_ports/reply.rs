//! What a visitor hears when it cannot be routed: a short HTTP error page on the HTTP port,
//! a TLS alert on the TLS port; then a clean close.

use std::future::Future;
use std::time::Duration;

use super::conn::VisitorConn;
use crate::dataplane::wait::race;

/// Longest time spent writing an answer and draining what the visitor still sends.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Most bytes drained after answering, so the close is a FIN and not a reset that could
/// destroy the answer before the visitor reads it.
const DRAIN_LIMIT: usize = 256 * 1024;

pub use crate::protocol::http::page::Page;

/// A fatal TLS alert (`unrecognized_name`), so a TLS client sees a clear error rather
/// than a bare reset.
pub const TLS_ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

/// A fatal TLS alert (`internal_error`): the relay terminates this name but holds no
/// certificate for it yet.
pub const TLS_ALERT_INTERNAL_ERROR: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 80];

/// Writes `bytes`, closes the writing side, and drains (bounded) what the visitor still
/// sends before the caller drops the socket. `deadline` should fire after [`CLOSE_GRACE`].
pub(crate) async fn answer_and_close(
    conn: &mut impl VisitorConn,
    bytes: &[u8],
    deadline: impl Future<Output = ()>,
) {
    let answer = async {
        conn.write_all(bytes).await?;
        conn.shutdown_write();
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < DRAIN_LIMIT {
            match conn.read_some(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = race(answer, deadline).await;
}
