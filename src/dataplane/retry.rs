//! A visitor whose data connection never answered `Start` moves to another one. Nothing was
//! answered to it yet and the bytes it sent are held ([`Visitor::early`]), so it loses only
//! the wait. Both backends' relay drivers call this.

use std::future::Future;
use std::os::fd::AsFd;

use super::gate::count_cut;
use super::pool::{Pool, Visitor, MAX_UNANSWERED};
use super::sock;
use super::wait::NoAnswer;
use crate::admin::Metrics;
use crate::protocol::chunk::START_WAIT;

/// Hands `visitor`, whose data connection gave no answer (`why`; the caller closes that
/// connection), to another of `pool`'s connections, waiting for one until `deadline` (which
/// should fire after [`START_WAIT`]). A visitor that already met [`MAX_UNANSWERED`] such
/// connections is reset instead, and counted as cut.
pub async fn hand_on(
    pool: &Pool,
    mut visitor: Visitor,
    why: &NoAnswer,
    service: &str,
    metrics: &Metrics,
    deadline: impl Future<Output = ()>,
) {
    metrics.data_unanswered.inc();
    visitor.unanswered += 1;
    let addr = visitor.addr;
    if visitor.unanswered >= MAX_UNANSWERED {
        tracing::warn!(
            service,
            visitor = %addr,
            "visitor reset: {MAX_UNANSWERED} data connections in a row gave no answer ({why})"
        );
        sock::cut(visitor.stream.as_fd());
        count_cut(metrics, &visitor.admission);
        return;
    }
    tracing::info!(service, visitor = %addr, "data connection closed ({why}): visitor moved to another");
    metrics.visitors_retried.inc();
    visitor.ask_first = false; // the pool says again for the connection it hands over
    if let Err((e, v)) = pool.take(visitor, deadline, START_WAIT).await {
        if let Some(a) = &v.admission {
            a.gate.count_unserved();
        }
        tracing::warn!(service, visitor = %addr, "visitor closed: {e}");
    }
}
