//! The data plane: everything that touches visitor bytes.
//!
//! - [`pool`]: per-service pool of authenticated tunnel data connections on the relay, and
//!   the queue of visitors waiting for one.
//! - [`forward`]: moving bytes both ways between two streams with half-close propagated.
//! - [`listener`]: public per-service listeners that accept visitors.
//!
//! Only the tokio backend exists so far; [`resolve_backend`] is where `--backend auto` decides.

pub mod forward;
pub mod listener;
pub mod pool;

use crate::config::BackendKind;

/// The backend actually running, after `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Multi-threaded tokio runtime, buffered copies.
    Tokio,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Tokio => f.write_str("tokio"),
        }
    }
}

/// Resolves the requested backend to one that runs here, with the reason for the log.
pub fn resolve_backend(requested: BackendKind) -> (Backend, &'static str) {
    match requested {
        BackendKind::Tokio => (Backend::Tokio, "requested with --backend tokio"),
        BackendKind::Auto => (
            Backend::Tokio,
            "auto: this build has no io_uring backend yet",
        ),
    }
}
