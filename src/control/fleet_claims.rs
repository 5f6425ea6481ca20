//! A session's services claimed in the fleet's namespace before the registry publishes them
//! here: every relay then gives a service the same port and hosts, and no relay gives them to
//! another secret. With the registry unreachable, a service this relay already has (its agent
//! reconnecting) is served as before; a new one is refused with a reason that says to wait.

use std::sync::Arc;

use super::refusal::Refusal;
use super::registry::Registry;
use crate::config::{RelayConfig, SecretId};
use crate::fleet::claims::ClaimError;
use crate::fleet::{Claim, Fleet};
use crate::protocol::{ServiceOutcome, ServiceRequest, ServiceResult};

/// The requests to publish here (ports filled in from the fleet), the ones the fleet refused,
/// and the names this relay just claimed for the first time (to release if publishing here
/// fails after all).
pub struct Claimed {
    /// To publish.
    pub requests: Vec<ServiceRequest>,
    /// Refused by the fleet.
    pub refused: Vec<ServiceResult>,
    /// Claims created by this call.
    pub created: Vec<String>,
}

/// The label a secret is known by in the fleet's namespace. Relays of one fleet share their
/// settings, so the same label means the same secret on each.
pub fn owner_label(id: &SecretId) -> String {
    match id {
        SecretId::Default => "default".into(),
        SecretId::Service(n) => format!("service:{}", n.to_ascii_lowercase()),
    }
}

/// Claims each of `requests` in the fleet (one at a time: a session publishes a handful).
pub async fn claim_all(
    fleet: &Fleet,
    registry: &Arc<Registry>,
    cfg: &RelayConfig,
    requests: &[ServiceRequest],
) -> Claimed {
    let mut out = Claimed {
        requests: Vec::with_capacity(requests.len()),
        refused: Vec::new(),
        created: Vec::new(),
    };
    for req in requests {
        // What the fleet cannot judge (a bad name, no secret, a bad host) the registry
        // refuses with its own reason.
        let owner = cfg.secret_for(&req.name).map(|(_, id)| owner_label(&id));
        let places = registry.claims(req);
        let (Some(owner), Ok((hosts, path)), Ok(())) =
            (owner, places, crate::config::validate_name(&req.name))
        else {
            out.requests.push(req.clone());
            continue;
        };
        let claim = Claim {
            name: req.name.clone(),
            kind: req.kind,
            port: req.remote_port,
            hosts,
            path,
            owner,
        };
        // The port may be open for handing visitors to other relays: this relay serves
        // them itself from now on.
        if let Some(h) = fleet.handoff.get() {
            h.release(&req.name).await;
        }
        // The request as published here: on the fleet's port.
        let on_port = |port: u16| {
            let mut req = req.clone();
            if req.kind.own_port() {
                req.remote_port = port;
            }
            req
        };
        match fleet.claim(&claim, cfg.port_range).await {
            Ok(c) => {
                if c.created {
                    out.created.push(req.name.clone());
                }
                out.requests.push(on_port(c.port));
            }
            Err(e) => match (e, registry.held_port(&req.name, req.kind)) {
                (ClaimError::Registry(e), Some(port)) => {
                    tracing::warn!(service = %req.name, "fleet registry unavailable ({e}): serving the service this relay already has");
                    out.requests.push(on_port(port));
                }
                (e, _) => {
                    let refusal = Refusal::Fleet(e);
                    out.refused.push(ServiceResult {
                        name: req.name.clone(),
                        outcome: ServiceOutcome::Rejected {
                            code: refusal.code(),
                            message: refusal.to_string(),
                        },
                    });
                }
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_labels_tell_secrets_apart_without_case() {
        assert_eq!(owner_label(&SecretId::Default), "default");
        assert_eq!(
            owner_label(&SecretId::Service("Web".into())),
            owner_label(&SecretId::Service("web".into()))
        );
        assert_ne!(
            owner_label(&SecretId::Service("default".into())),
            owner_label(&SecretId::Default)
        );
    }
}
