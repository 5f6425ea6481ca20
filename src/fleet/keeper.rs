//! The task that keeps a relay in its fleet: renews the relay's presence and the lease of
//! every service it holds, three times per TTL (so one lost renewal never lets a lease
//! lapse), and re-claims a service whose lease lapsed anyway (etcd down or this relay cut off
//! from it for longer than the TTL). A service whose place another secret took meanwhile is
//! given up here, so two relays never serve two owners on one port or host for longer than
//! one renewal round after the registry is reachable again.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::claims::{ClaimError, Fleet};
use super::etcd::Op;
use super::FleetError;
use crate::config::PortRange;

/// What the keeper needs from the relay.
pub trait Members: Send + Sync {
    /// The names of the services this relay has now (online or lingering).
    fn present(&self) -> Vec<String>;
    /// Gives up service `name` here: its claim now belongs to another secret.
    fn lost(&self, name: &str, why: &str);
    /// The range new ports are picked from.
    fn port_range(&self) -> PortRange;
    /// The names of the services an agent session has here now (not lingering).
    fn online(&self) -> Vec<String>;
    /// Closes service `name` if it is lingering here (another relay serves it); whether it
    /// did.
    fn drop_lingering(&self, name: &str) -> bool;
}

/// Keeps the relay in the fleet until the task is dropped.
pub async fn run(fleet: Arc<Fleet>, members: Arc<dyn Members>) {
    let every = fleet.settings.ttl / 3;
    let mut presence: Option<i64> = None;
    let mut marked = Vec::new();
    loop {
        let before = presence;
        let mut round = renew(&fleet, &members, &mut presence).await;
        if presence != before {
            marked.clear(); // a new presence lease: its holder marks are gone
        }
        if let (Ok(()), Some(lease), Some(h)) = (&round, presence, fleet.handoff.get()) {
            round = hand_over(&fleet, &members, h, lease, &mut marked).await;
        }
        fleet.note(&round);
        if let Err(e) = round {
            tracing::debug!("fleet renewal round: {e}");
        }
        tokio::time::sleep(every.max(Duration::from_millis(500))).await;
    }
}

/// One round: presence, then every held service.
async fn renew(
    fleet: &Fleet,
    members: &Arc<dyn Members>,
    presence: &mut Option<i64>,
) -> Result<(), FleetError> {
    let alive = match *presence {
        Some(l) => fleet.etcd.keep_alive(l).await?.is_some(),
        None => false,
    };
    if !alive {
        let lease = fleet.etcd.grant(fleet.ttl_secs()).await?;
        let value = json!({
            "advertise": fleet.settings.advertise,
            "version": env!("CARGO_PKG_VERSION"),
        });
        fleet
            .etcd
            .txn(
                &[],
                &[Op::Put {
                    key: fleet.relay_key(),
                    value: value.to_string().into_bytes(),
                    lease,
                }],
                &[],
            )
            .await?;
        if presence.is_some() {
            tracing::warn!(
                relay_id = %fleet.settings.relay_id,
                "this relay's presence in the fleet had lapsed: registered again"
            );
        }
        *presence = Some(lease);
    }
    fleet.keep_only(&members.present());
    let mut renewed: Vec<(i64, bool)> = Vec::new();
    for hold in fleet.holds() {
        let live = match renewed.iter().find(|(l, _)| *l == hold.lease) {
            Some((_, live)) => *live,
            None => {
                let live = fleet.etcd.keep_alive(hold.lease).await?.is_some();
                renewed.push((hold.lease, live));
                live
            }
        };
        if live {
            continue;
        }
        // The same port again, or nothing: visitors know the service by it.
        let mut again = hold.claim.clone();
        if again.kind.own_port() {
            again.port = hold.port;
        }
        match fleet.claim(&again, members.port_range()).await {
            Ok(_) => tracing::info!(
                service = %hold.claim.name,
                "its fleet claim had lapsed: claimed again"
            ),
            Err(ClaimError::Registry(e)) => return Err(e),
            Err(e) => members.lost(&hold.claim.name, &e.to_string()),
        }
    }
    Ok(())
}

/// The hand-over's share of a round: record which services this relay has agents of, learn
/// which ones only others have, let go of lingering ones others serve, open and close the
/// hand-over ports to match.
async fn hand_over(
    fleet: &Fleet,
    members: &Arc<dyn Members>,
    handoff: &super::handoff::Handoff,
    presence: i64,
    marked: &mut Vec<String>,
) -> Result<(), FleetError> {
    let online = members.online();
    fleet.mark_holders(presence, &online, marked).await?;
    let elsewhere = fleet.elsewhere().await?;
    let mut local = members.present();
    local.retain(|name| {
        let lingering = !online.iter().any(|o| o.eq_ignore_ascii_case(name));
        let dropped = lingering
            && elsewhere.contains_key(&name.to_ascii_lowercase())
            && members.drop_lingering(name);
        if dropped {
            handoff.unwant(name);
            tracing::info!(service = %name, "its agent left this relay but not the fleet: its visitors go to the relays it is on");
        }
        !dropped
    });
    local.iter_mut().for_each(|n| n.make_ascii_lowercase());
    handoff.reconcile(&elsewhere, &local).await;
    Ok(())
}
