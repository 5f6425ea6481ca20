//! A fleet of relays sharing one namespace in etcd (`--registry etcd://...`): a service has
//! the same name, public port and host names on every relay its agent reaches, and no two
//! secrets can be handed the same name, port or host anywhere in the fleet.
//!
//! - [`etcd`]: the etcd v3 calls (JSON gateway), with endpoint failover.
//! - [`claims`]: the keys, and claiming them with transactions.
//! - [`keeper`]: the task that keeps this relay's leases alive and re-claims what expired.
//! - [`handoff`]: visitors of services other relays serve, handed to them.
//! - [`elsewhere`]: what other relays serve, and their host names for the shared ports.
//!
//! A relay without `--registry` keeps its registry in memory only, as before. See
//! docs/FLEET.md for the design and its limits.

pub mod claims;
pub mod elsewhere;
pub mod etcd;
pub mod handoff;
pub mod keeper;

pub use crate::config::FleetConfig as FleetSettings;
pub use claims::{Claim, Claimed, Fleet};

/// Why the fleet registry failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// The settings are wrong.
    #[error("{0}")]
    Config(String),
    /// No etcd endpoint answered.
    #[error("etcd unreachable: {0}")]
    Unreachable(String),
    /// etcd answered with an error, or something unreadable.
    #[error("etcd: {0}")]
    Etcd(String),
    /// etcd refuses this relay: its user or password is wrong, or the user may not touch
    /// the fleet's keys. Waiting does not help; the relay's settings or etcd's roles must
    /// change.
    #[error("etcd refuses this relay: {0}")]
    Denied(String),
}
