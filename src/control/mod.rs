//! The relay's agent-facing control plane: every connection an agent opens, control or data,
//! and the state behind them.
//!
//! - [`accept`]: the control port; classifies each agent connection (control or data).
//! - [`session`]: one authenticated agent control session.
//! - [`plane`]: what the control plane reads and keeps ([`plane::ControlPlane`]), tickets'
//!   grants, its deadlines.
//! - [`registry`]: services, their owners and their public ports.
//! - [`fleet_claims`]: a session's services claimed in the fleet's namespace first.
//! - [`peer`]: a visitor handed over by another relay of the fleet.
//! - [`refusal`]: why the registry refuses an agent or a service, with its wire code.
//! - [`service`]: one published service.
//! - [`routes`]: host names (and path prefixes) of the shared ports → services.
//! - [`tickets`]: single-use data-connection tickets.
//!
//! It runs on the relay's tokio runtime; visitor bytes live in [`crate::dataplane`], and the
//! relay's startup in [`crate::relay`].

pub mod accept;
pub mod fleet_claims;
pub mod peer;
pub mod plane;
pub mod refusal;
pub mod registry;
pub mod routes;
pub mod service;
pub mod session;
pub mod tickets;
