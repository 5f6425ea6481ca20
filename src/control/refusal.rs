//! Why the registry refuses an agent or one of its services. Every refusal is the agent's to
//! fix (its request, or its secret's share of the relay): the relay never retries one, and
//! the agent decides whether waiting can help (see [`Refusal::code`]).

use crate::config::PortRange;
use crate::protocol::ErrorCode;

/// A refusal, with the wire code the agent sees and a one-line message naming the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A secret already has `max` agents connected (`max_agents`).
    #[error("{whose} already has its maximum of {max} agents connected")]
    AgentsPerSecret {
        /// "the relay's secret" or "service NAME's secret".
        whose: String,
        /// The limit.
        max: usize,
    },
    /// The same service name twice in one `Register`.
    #[error("service {0} is listed twice")]
    ListedTwice(String),
    /// The request is malformed or does not fit this relay (name, hosts, path, port kind).
    #[error("{0}")]
    BadRequest(String),
    /// A host name (with its path prefix) belongs to another service.
    #[error("{what} is already claimed by service {holder}")]
    HostTaken {
        /// The host, with the prefix when it is not `/`.
        what: String,
        /// The service holding it.
        holder: String,
    },
    /// A host name (or a path under it) serves a service authenticated by another secret.
    #[error("{host} belongs to service {holder}, which another secret holds: no other secret may claim it or any path under it")]
    HostOwned {
        /// The host.
        host: String,
        /// The service serving it.
        holder: String,
    },
    /// A host name is reserved in the relay's config for another service.
    #[error("{host} is reserved for service {service} in the relay's config")]
    HostReserved {
        /// The host.
        host: String,
        /// The service it is reserved for.
        service: String,
    },
    /// The port asked for is outside the relay's `port_range`.
    #[error("port {port} is outside the relay's allowed range {range}")]
    PortForbidden {
        /// The port asked for.
        port: u16,
        /// The relay's range.
        range: PortRange,
    },
    /// Another service holds the port asked for.
    #[error("port {port} is already used by service {holder}")]
    PortTaken {
        /// The port asked for.
        port: u16,
        /// The service holding it.
        holder: String,
    },
    /// The port is free in the registry but the kernel refused to bind it (another process).
    #[error("port {port} cannot be bound on the relay: {reason}")]
    PortUnbindable {
        /// The port asked for.
        port: u16,
        /// The bind error.
        reason: String,
    },
    /// No port asked for, and none of the tries in the range was free.
    #[error("no free port found in the relay's range {0}")]
    NoFreePort(PortRange),
    /// The service's group already has its most agents.
    #[error("group {group} of service {service} already has its maximum of {max} agents")]
    GroupFull {
        /// The service.
        service: String,
        /// The group's name.
        group: String,
        /// The limit.
        max: usize,
    },
    /// The fleet's namespace refused the claim (another secret's name), or could not be
    /// asked (the registry unreachable: waiting helps).
    #[error("{0}")]
    Fleet(crate::fleet::claims::ClaimError),
}

impl Refusal {
    /// The code on the wire: what the agent can tell apart without parsing the message.
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::AgentsPerSecret { .. }
            | Refusal::NoFreePort(_)
            | Refusal::GroupFull { .. } => ErrorCode::LimitReached,
            Refusal::ListedTwice(_) | Refusal::BadRequest(_) => ErrorCode::BadRequest,
            Refusal::HostTaken { .. }
            | Refusal::HostOwned { .. }
            | Refusal::HostReserved { .. } => ErrorCode::HostTaken,
            Refusal::PortForbidden { .. } => ErrorCode::PortForbidden,
            Refusal::PortTaken { .. } | Refusal::PortUnbindable { .. } => ErrorCode::PortTaken,
            Refusal::Fleet(e) => {
                use crate::fleet::claims::ClaimError as C;
                match e {
                    C::NameHeld(_) => ErrorCode::BadRequest,
                    C::HostOwned { .. } | C::HostTaken { .. } => ErrorCode::HostTaken,
                    C::PortTaken { .. } => ErrorCode::PortTaken,
                    C::NoFreePort => ErrorCode::LimitReached,
                    C::Registry(_) => ErrorCode::Internal,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages_name_the_problem() {
        let r = Refusal::HostTaken {
            what: "shop.example.test/api".into(),
            holder: "shop-api".into(),
        };
        assert_eq!(r.code(), ErrorCode::HostTaken);
        assert_eq!(
            r.to_string(),
            "shop.example.test/api is already claimed by service shop-api"
        );
        let r = Refusal::PortForbidden {
            port: 80,
            range: PortRange::default(),
        };
        assert_eq!(r.code(), ErrorCode::PortForbidden);
        assert!(r.to_string().contains("outside the relay's allowed range"));
        assert_eq!(
            Refusal::NoFreePort(PortRange::default()).code(),
            ErrorCode::LimitReached
        );
    }
}
