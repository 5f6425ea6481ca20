//! The messages, one enum per direction. Every connection opens with an agent frame that names
//! the protocol version ([`AgentMsg::ControlHello`] or [`AgentMsg::DataHello`]); their type
//! bytes and leading version field are fixed for all versions to come.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::auth::{Mac, Nonce, Ticket, MAC_LEN, NONCE_LEN, TICKET_LEN};
use super::frame::{self, Decoded};
use super::proxy::ProxyVersion;
use super::wire::{put_string, Reader};
use super::ProtocolError;

/// Most tickets one [`RelayMsg::Tickets`] frame carries; bounds the frame well under
/// [`super::MAX_FRAME_LEN`] whatever the service name.
pub const MAX_TICKETS_PER_FRAME: usize = 256;

/// Most services one agent may register on one control connection.
pub const MAX_SERVICES_PER_AGENT: usize = 64;

/// Most host names one `http` or `tls` service may claim.
pub const MAX_HOSTS_PER_SERVICE: usize = 8;
/// Longest host name (DNS limit) or path prefix, in bytes.
pub const MAX_HOST_LEN: usize = 253;

/// How visitors reach a service on the relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// A public TCP port of its own.
    #[default]
    Tcp = 0,
    /// The shared HTTP port, routed by `Host` (and path prefix).
    Http = 1,
    /// The shared TLS port, routed by SNI without decrypting.
    Tls = 2,
    /// A public UDP port of its own; datagrams travel in flows over channels
    /// (see [`super::datagram`]).
    Udp = 3,
}

impl ServiceKind {
    /// Whether the service has a public port of its own (`tcp`, `udp`) rather than host
    /// names on a shared one.
    pub fn own_port(self) -> bool {
        matches!(self, ServiceKind::Tcp | ServiceKind::Udp)
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => ServiceKind::Tcp,
            1 => ServiceKind::Http,
            2 => ServiceKind::Tls,
            3 => ServiceKind::Udp,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServiceKind::Tcp => "tcp",
            ServiceKind::Http => "http",
            ServiceKind::Tls => "tls",
            ServiceKind::Udp => "udp",
        })
    }
}

/// One service an agent asks the relay to publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRequest {
    /// Service name, unique per relay; also selects the relay-side secret.
    pub name: String,
    /// How visitors reach it.
    pub kind: ServiceKind,
    /// `tcp`/`udp`: public port wanted, or 0 for "any port from the relay's range". Otherwise 0.
    pub remote_port: u16,
    /// `http`/`tls`: host names claimed, at most [`MAX_HOSTS_PER_SERVICE`]. A name without a
    /// dot is a subdomain of the relay's `--domain`.
    pub hosts: Vec<String>,
    /// `http`: path prefix routed to this service (`/` for everything).
    pub path: String,
    /// `tcp`/`tls`: PROXY protocol header the relay writes before the visitor's bytes.
    pub proxy: ProxyVersion,
    /// `http`: whether the relay adds `X-Forwarded-For`, `X-Forwarded-Proto` and `Forwarded`.
    pub forwarded_headers: bool,
    /// How many idle, authenticated data connections the agent wants to keep open.
    pub pool: u8,
    /// HMAC proving the agent knows this service's secret (see [`super::auth::register_mac`]).
    pub mac: Mac,
    /// Version 5: the group the agent serves the service in (`--group`), empty for none.
    /// Agents naming the same group share the service's visitors; any other agent of the
    /// service takes it over from them.
    pub group: String,
}

/// Why the relay refused something. Stable numbers: they are on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The peer speaks a protocol version this relay does not.
    UnsupportedVersion = 1,
    /// The HMAC did not verify: wrong secret.
    AuthFailed = 2,
    /// The requested public port is held by another service or process.
    PortTaken = 3,
    /// The requested public port is outside the relay's allowed range.
    PortForbidden = 4,
    /// The request made no sense (bad name, no services, duplicate name...).
    BadRequest = 5,
    /// A data connection's ticket was unknown, expired or already used.
    BadTicket = 6,
    /// Another agent session took over one of this session's services.
    Replaced = 7,
    /// A limit was reached (services, pending connections).
    LimitReached = 8,
    /// The relay failed internally; retrying may help.
    Internal = 9,
    /// A host name (and path) is already claimed by another service.
    HostTaken = 10,
    /// The relay's settings changed (a reload: a secret, a reservation) in a way that
    /// concerns this session: reconnect and authenticate again.
    SettingsChanged = 11,
}

impl ErrorCode {
    fn from_u8(v: u8) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            1 => UnsupportedVersion,
            2 => AuthFailed,
            3 => PortTaken,
            4 => PortForbidden,
            5 => BadRequest,
            6 => BadTicket,
            7 => Replaced,
            8 => LimitReached,
            9 => Internal,
            10 => HostTaken,
            11 => SettingsChanged,
            _ => return None,
        })
    }
}

/// What became of one requested service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceOutcome {
    /// Published: visitors can reach it.
    Online {
        /// `tcp`: the public port. `http`/`tls`: the shared port visitors use.
        port: u16,
        /// `http`/`tls`: the full host names routed to the service.
        hosts: Vec<String>,
    },
    /// Refused, with the reason.
    Rejected {
        /// Machine-readable reason.
        code: ErrorCode,
        /// One human-readable line.
        message: String,
    },
}

/// The relay's answer for one [`ServiceRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceResult {
    /// Name of the service, as requested.
    pub name: String,
    /// Whether it is online, and where.
    pub outcome: ServiceOutcome,
}

/// Frames the agent sends to the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMsg {
    /// First frame of a control connection.
    ControlHello {
        /// Protocol version the agent speaks.
        version: u16,
    },
    /// Answer to [`RelayMsg::Challenge`]: the services to publish, each with its own MAC.
    Register {
        /// Requested services, at most [`MAX_SERVICES_PER_AGENT`].
        services: Vec<ServiceRequest>,
    },
    /// Liveness signal on the control connection.
    Heartbeat,
    /// First and only frame the agent sends on a data connection before forwarding starts.
    DataHello {
        /// Protocol version the agent speaks.
        version: u16,
        /// Single-use ticket from a [`RelayMsg::Tickets`] frame.
        ticket: Ticket,
    },
    /// The agent is stopping on purpose: route it no new visitors; the ones it is serving
    /// finish on their data connections. The last frame of a control connection.
    Goodbye,
    /// The agent no longer publishes these services (its settings were reloaded): close
    /// them now, rather than let them linger for a successor. Names it does not own are
    /// ignored.
    Withdraw {
        /// At most [`MAX_SERVICES_PER_AGENT`] service names.
        names: Vec<String>,
    },
    /// First frame of a relay-to-relay connection of a fleet: another relay hands over a
    /// visitor of a service whose agent it has no session with. Answered with a
    /// [`RelayMsg::Challenge`].
    PeerHello {
        /// Protocol version the relay speaks.
        version: u16,
    },
    /// The visitor handed over: the service, the visitor's address, and a MAC proving the
    /// sending relay knows the service's secret (see [`super::auth::peer_mac`]). Answered
    /// with [`RelayMsg::Start`] (every later byte is the visitor's stream) or an error.
    PeerVisit {
        /// The service.
        service: String,
        /// The visitor's address as the sending relay saw it.
        visitor: SocketAddr,
        /// HMAC over the challenge, the service and the visitor.
        mac: Mac,
    },
}

/// Frames the relay sends to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayMsg {
    /// Answer to [`AgentMsg::ControlHello`]: a fresh nonce to authenticate against.
    Challenge {
        /// Protocol version the relay speaks.
        version: u16,
        /// Fresh random nonce; MACs are computed over it.
        nonce: Nonce,
        /// Whether data connections must use TLS (`false`: plain TCP).
        data_tls: bool,
    },
    /// Answer to [`AgentMsg::Register`], one result per requested service, in order.
    Registered {
        /// Per-service outcome.
        results: Vec<ServiceResult>,
    },
    /// Tickets for opening data connections for one service; each opens exactly one.
    Tickets {
        /// Service the tickets belong to.
        service: String,
        /// At most [`MAX_TICKETS_PER_FRAME`] tickets.
        tickets: Vec<Ticket>,
    },
    /// Liveness signal on the control connection.
    Heartbeat,
    /// The relay is going away (draining before it stops or hands over to a new process):
    /// it routes no new visitors through this session and closes it after this frame. The
    /// agent reconnects at once to whoever takes the control port next; its visitors in
    /// flight carry on over their data connections.
    GoingAway,
    /// Fatal for the connection it is sent on; the relay closes it after this frame.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// One human-readable line.
        message: String,
    },
    /// On a pooled data connection: a visitor arrived. Every byte after this frame belongs to
    /// the visitor's stream.
    Start {
        /// The visitor's address as the relay saw it.
        visitor: SocketAddr,
    },
}

mod kind {
    pub const CONTROL_HELLO: u8 = 0x01;
    pub const REGISTER: u8 = 0x02;
    pub const AGENT_HEARTBEAT: u8 = 0x03;
    pub const DATA_HELLO: u8 = 0x04;
    pub const GOODBYE: u8 = 0x05;
    pub const WITHDRAW: u8 = 0x06;
    pub const PEER_HELLO: u8 = 0x07;
    pub const PEER_VISIT: u8 = 0x08;
    pub const CHALLENGE: u8 = 0x81;
    pub const REGISTERED: u8 = 0x82;
    pub const TICKETS: u8 = 0x83;
    pub const RELAY_HEARTBEAT: u8 = 0x84;
    pub const ERROR: u8 = 0x85;
    pub const START: u8 = 0x86;
    pub const GOING_AWAY: u8 = 0x87;
}

/// A message that travels in one frame.
pub trait Message: Sized {
    /// Appends this message as one frame to `out`.
    fn encode(&self, out: &mut Vec<u8>);
    /// Parses one frame body of the given type.
    fn decode_body(kind: u8, payload: &[u8]) -> Result<Self, ProtocolError>;

    /// Looks for one whole message at the start of `buf`. `Ok(None)` means "need more bytes";
    /// `Ok(Some((msg, used)))` says how many bytes of `buf` the frame took.
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtocolError> {
        match frame::decode(buf)? {
            Decoded::NeedMore(_) => Ok(None),
            Decoded::Frame {
                kind,
                payload,
                consumed,
            } => Ok(Some((Self::decode_body(kind, payload)?, consumed))),
        }
    }

    /// This message as one frame in a fresh buffer.
    fn to_frame(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

impl Message for AgentMsg {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut p = Vec::new();
        let kind = match self {
            AgentMsg::ControlHello { version } => {
                p.extend_from_slice(&version.to_be_bytes());
                kind::CONTROL_HELLO
            }
            AgentMsg::Register { services } => {
                p.push(services.len().min(MAX_SERVICES_PER_AGENT) as u8);
                for s in services.iter().take(MAX_SERVICES_PER_AGENT) {
                    put_string(&mut p, truncate(&s.name, MAX_NAME_LEN));
                    p.push(s.kind as u8);
                    p.extend_from_slice(&s.remote_port.to_be_bytes());
                    put_hosts(&mut p, &s.hosts);
                    put_string(&mut p, truncate(&s.path, MAX_HOST_LEN));
                    p.push(s.proxy.to_u8());
                    p.push(u8::from(s.forwarded_headers));
                    p.push(s.pool);
                    p.extend_from_slice(&s.mac);
                }
                // Version 5: one group per service after them, only when one has a group,
                // so a request without any is the same bytes as version 4's.
                let listed = services.iter().take(MAX_SERVICES_PER_AGENT);
                if listed.clone().any(|s| !s.group.is_empty()) {
                    for s in listed {
                        put_string(&mut p, truncate(&s.group, MAX_NAME_LEN));
                    }
                }
                kind::REGISTER
            }
            AgentMsg::Heartbeat => kind::AGENT_HEARTBEAT,
            AgentMsg::Goodbye => kind::GOODBYE,
            AgentMsg::Withdraw { names } => {
                p.push(names.len().min(MAX_SERVICES_PER_AGENT) as u8);
                for n in names.iter().take(MAX_SERVICES_PER_AGENT) {
                    put_string(&mut p, truncate(n, MAX_NAME_LEN));
                }
                kind::WITHDRAW
            }
            AgentMsg::DataHello { version, ticket } => {
                p.extend_from_slice(&version.to_be_bytes());
                p.extend_from_slice(&ticket.0);
                kind::DATA_HELLO
            }
            AgentMsg::PeerHello { version } => {
                p.extend_from_slice(&version.to_be_bytes());
                kind::PEER_HELLO
            }
            AgentMsg::PeerVisit {
                service,
                visitor,
                mac,
            } => {
                put_string(&mut p, truncate(service, MAX_NAME_LEN));
                put_addr(&mut p, visitor);
                p.extend_from_slice(mac);
                kind::PEER_VISIT
            }
        };
        frame::encode(kind, &p, out);
    }

    fn decode_body(k: u8, payload: &[u8]) -> Result<Self, ProtocolError> {
        let msg = match k {
            kind::CONTROL_HELLO => {
                let mut r = Reader::new(payload, "ControlHello");
                let version = r.u16()?;
                // Later versions may append fields; the version is what we judge by.
                AgentMsg::ControlHello { version }
            }
            kind::REGISTER => {
                let mut r = Reader::new(payload, "Register");
                let count = r.u8()? as usize;
                if count > MAX_SERVICES_PER_AGENT {
                    return Err(r.invalid("service count"));
                }
                let mut services = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = r.string("name")?;
                    if name.len() > MAX_NAME_LEN {
                        return Err(r.invalid("name"));
                    }
                    let kind = ServiceKind::from_u8(r.u8()?).ok_or_else(|| r.invalid("kind"))?;
                    let remote_port = r.u16()?;
                    let hosts = get_hosts(&mut r)?;
                    let path = r.string("path")?;
                    if path.len() > MAX_HOST_LEN {
                        return Err(r.invalid("path"));
                    }
                    let proxy = ProxyVersion::from_u8(r.u8()?).ok_or_else(|| r.invalid("proxy"))?;
                    let forwarded_headers = match r.u8()? {
                        0 => false,
                        1 => true,
                        _ => return Err(r.invalid("forwarded_headers")),
                    };
                    services.push(ServiceRequest {
                        name,
                        kind,
                        remote_port,
                        hosts,
                        path,
                        proxy,
                        forwarded_headers,
                        pool: r.u8()?,
                        mac: r.array::<MAC_LEN>()?,
                        group: String::new(),
                    });
                }
                if r.remaining() > 0 {
                    for s in &mut services {
                        s.group = r.string("group")?;
                        if s.group.len() > MAX_NAME_LEN {
                            return Err(r.invalid("group"));
                        }
                    }
                }
                r.finish()?;
                AgentMsg::Register { services }
            }
            kind::AGENT_HEARTBEAT => {
                Reader::new(payload, "Heartbeat").finish()?;
                AgentMsg::Heartbeat
            }
            kind::GOODBYE => {
                Reader::new(payload, "Goodbye").finish()?;
                AgentMsg::Goodbye
            }
            kind::WITHDRAW => {
                let mut r = Reader::new(payload, "Withdraw");
                let count = r.u8()? as usize;
                if count > MAX_SERVICES_PER_AGENT {
                    return Err(r.invalid("service count"));
                }
                let mut names = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = r.string("name")?;
                    if name.len() > MAX_NAME_LEN {
                        return Err(r.invalid("name"));
                    }
                    names.push(name);
                }
                r.finish()?;
                AgentMsg::Withdraw { names }
            }
            kind::DATA_HELLO => {
                let mut r = Reader::new(payload, "DataHello");
                let version = r.u16()?;
                let ticket = Ticket(r.array::<TICKET_LEN>()?);
                AgentMsg::DataHello { version, ticket }
            }
            kind::PEER_HELLO => {
                let mut r = Reader::new(payload, "PeerHello");
                AgentMsg::PeerHello { version: r.u16()? }
            }
            kind::PEER_VISIT => {
                let mut r = Reader::new(payload, "PeerVisit");
                let service = r.string("service")?;
                if service.len() > MAX_NAME_LEN {
                    return Err(r.invalid("service"));
                }
                let visitor = get_addr(&mut r)?;
                let mac = r.array::<MAC_LEN>()?;
                r.finish()?;
                AgentMsg::PeerVisit {
                    service,
                    visitor,
                    mac,
                }
            }
            other => return Err(ProtocolError::UnknownType(other)),
        };
        Ok(msg)
    }
}

/// Longest service name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

fn put_hosts(p: &mut Vec<u8>, hosts: &[String]) {
    let n = hosts.len().min(MAX_HOSTS_PER_SERVICE);
    p.push(n as u8);
    for h in &hosts[..n] {
        put_string(p, truncate(h, MAX_HOST_LEN));
    }
}

fn get_hosts(r: &mut Reader<'_>) -> Result<Vec<String>, ProtocolError> {
    let n = r.u8()? as usize;
    if n > MAX_HOSTS_PER_SERVICE {
        return Err(r.invalid("host count"));
    }
    let mut hosts = Vec::with_capacity(n);
    for _ in 0..n {
        let h = r.string("host")?;
        if h.len() > MAX_HOST_LEN {
            return Err(r.invalid("host"));
        }
        hosts.push(h);
    }
    Ok(hosts)
}

fn put_addr(p: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            p.push(4);
            p.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            p.push(6);
            p.extend_from_slice(&ip.octets());
        }
    }
    p.extend_from_slice(&addr.port().to_be_bytes());
}

fn get_addr(r: &mut Reader<'_>) -> Result<SocketAddr, ProtocolError> {
    let ip = match r.u8()? {
        4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
        6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
        _ => return Err(r.invalid("address family")),
    };
    Ok(SocketAddr::new(ip, r.u16()?))
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Longest human-readable message carried in a frame, in bytes.
const MAX_MESSAGE_LEN: usize = 512;

impl Message for RelayMsg {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut p = Vec::new();
        let kind = match self {
            RelayMsg::Challenge {
                version,
                nonce,
                data_tls,
            } => {
                p.extend_from_slice(&version.to_be_bytes());
                p.extend_from_slice(nonce);
                p.push(u8::from(*data_tls));
                kind::CHALLENGE
            }
            RelayMsg::Registered { results } => {
                p.push(results.len().min(MAX_SERVICES_PER_AGENT) as u8);
                for res in results.iter().take(MAX_SERVICES_PER_AGENT) {
                    put_string(&mut p, truncate(&res.name, MAX_NAME_LEN));
                    match &res.outcome {
                        ServiceOutcome::Online { port, hosts } => {
                            p.push(0);
                            p.extend_from_slice(&port.to_be_bytes());
                            put_hosts(&mut p, hosts);
                        }
                        ServiceOutcome::Rejected { code, message } => {
                            p.push(*code as u8);
                            put_string(&mut p, truncate(message, MAX_MESSAGE_LEN));
                        }
                    }
                }
                kind::REGISTERED
            }
            RelayMsg::Tickets { service, tickets } => {
                put_string(&mut p, truncate(service, MAX_NAME_LEN));
                let n = tickets.len().min(MAX_TICKETS_PER_FRAME);
                p.extend_from_slice(&(n as u16).to_be_bytes());
                for t in &tickets[..n] {
                    p.extend_from_slice(&t.0);
                }
                kind::TICKETS
            }
            RelayMsg::Heartbeat => kind::RELAY_HEARTBEAT,
            RelayMsg::GoingAway => kind::GOING_AWAY,
            RelayMsg::Error { code, message } => {
                p.push(*code as u8);
                put_string(&mut p, truncate(message, MAX_MESSAGE_LEN));
                kind::ERROR
            }
            RelayMsg::Start { visitor } => {
                put_addr(&mut p, visitor);
                kind::START
            }
        };
        frame::encode(kind, &p, out);
    }

    fn decode_body(k: u8, payload: &[u8]) -> Result<Self, ProtocolError> {
        let msg = match k {
            kind::CHALLENGE => {
                let mut r = Reader::new(payload, "Challenge");
                let version = r.u16()?;
                let nonce = r.array::<NONCE_LEN>()?;
                let data_tls = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(r.invalid("data_tls")),
                };
                RelayMsg::Challenge {
                    version,
                    nonce,
                    data_tls,
                }
            }
            kind::REGISTERED => {
                let mut r = Reader::new(payload, "Registered");
                let count = r.u8()? as usize;
                if count > MAX_SERVICES_PER_AGENT {
                    return Err(r.invalid("service count"));
                }
                let mut results = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = r.string("name")?;
                    let outcome = match r.u8()? {
                        0 => ServiceOutcome::Online {
                            port: r.u16()?,
                            hosts: get_hosts(&mut r)?,
                        },
                        code => ServiceOutcome::Rejected {
                            code: ErrorCode::from_u8(code).ok_or_else(|| r.invalid("code"))?,
                            message: r.string("message")?,
                        },
                    };
                    results.push(ServiceResult { name, outcome });
                }
                r.finish()?;
                RelayMsg::Registered { results }
            }
            kind::TICKETS => {
                let mut r = Reader::new(payload, "Tickets");
                let service = r.string("service")?;
                let n = r.u16()? as usize;
                if n > MAX_TICKETS_PER_FRAME || n * TICKET_LEN != r.remaining() {
                    return Err(r.invalid("ticket count"));
                }
                let mut tickets = Vec::with_capacity(n);
                for _ in 0..n {
                    tickets.push(Ticket(r.array::<TICKET_LEN>()?));
                }
                RelayMsg::Tickets { service, tickets }
            }
            kind::RELAY_HEARTBEAT => {
                Reader::new(payload, "Heartbeat").finish()?;
                RelayMsg::Heartbeat
            }
            kind::GOING_AWAY => {
                Reader::new(payload, "GoingAway").finish()?;
                RelayMsg::GoingAway
            }
            kind::ERROR => {
                let mut r = Reader::new(payload, "Error");
                let code = ErrorCode::from_u8(r.u8()?).ok_or_else(|| r.invalid("code"))?;
                let message = r.string("message")?;
                r.finish()?;
                RelayMsg::Error { code, message }
            }
            kind::START => {
                let mut r = Reader::new(payload, "Start");
                let visitor = get_addr(&mut r)?;
                r.finish()?;
                RelayMsg::Start { visitor }
            }
            other => return Err(ProtocolError::UnknownType(other)),
        };
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MAX_FRAME_LEN;
    use proptest::prelude::*;

    #[test]
    fn groups_are_a_trailer_only_a_version_5_agent_with_a_group_sends() {
        let one = |group: &str| AgentMsg::Register {
            services: vec![ServiceRequest {
                name: "web".into(),
                mac: [7; MAC_LEN],
                group: group.into(),
                ..Default::default()
            }],
        };
        let (plain, grouped) = (one("").to_frame(), one("blue").to_frame());
        // Without a group the frame is version 4's: the trailer is the only difference.
        assert_eq!(grouped.len(), plain.len() + 2 + 4);
        assert_eq!(&grouped[4..plain.len()], &plain[4..]);
        assert_eq!(&grouped[plain.len()..], b"\x00\x04blue");
        // A trailer cut short, or a group longer than a name may be, is refused.
        let mut cut = grouped.clone();
        cut.pop();
        let body = (cut.len() - 4) as u32;
        cut[..4].copy_from_slice(&body.to_be_bytes());
        assert!(AgentMsg::decode(&cut).is_err());
        let long = one(&"g".repeat(MAX_NAME_LEN + 1)).to_frame();
        let decoded = AgentMsg::decode(&long).unwrap().unwrap().0;
        let AgentMsg::Register { services } = decoded else {
            panic!("a Register");
        };
        assert_eq!(
            services[0].group.len(),
            MAX_NAME_LEN,
            "the sender truncates"
        );
    }

    fn samples() -> (Vec<AgentMsg>, Vec<RelayMsg>) {
        let agent = vec![
            AgentMsg::ControlHello { version: 1 },
            AgentMsg::Register {
                services: vec![
                    ServiceRequest {
                        name: "web".into(),
                        remote_port: 20000,
                        pool: 4,
                        mac: [9; MAC_LEN],
                        ..Default::default()
                    },
                    ServiceRequest {
                        name: "blog".into(),
                        kind: ServiceKind::Http,
                        hosts: vec!["blog".into(), "www.example.org".into()],
                        path: "/api".into(),
                        forwarded_headers: true,
                        pool: 2,
                        mac: [1; MAC_LEN],
                        ..Default::default()
                    },
                    ServiceRequest {
                        name: "secure".into(),
                        kind: ServiceKind::Tls,
                        hosts: vec!["s.example".into()],
                        proxy: ProxyVersion::V2,
                        pool: 2,
                        mac: [2; MAC_LEN],
                        ..Default::default()
                    },
                ],
            },
            AgentMsg::Register {
                services: vec![
                    ServiceRequest {
                        name: "web".into(),
                        mac: [7; MAC_LEN],
                        group: "blue".into(),
                        ..Default::default()
                    },
                    ServiceRequest {
                        name: "solo".into(),
                        mac: [8; MAC_LEN],
                        ..Default::default()
                    },
                ],
            },
            AgentMsg::Heartbeat,
            AgentMsg::Goodbye,
            AgentMsg::Withdraw {
                names: vec!["old-api".into(), "blog".into()],
            },
            AgentMsg::Withdraw { names: vec![] },
            AgentMsg::DataHello {
                version: 1,
                ticket: Ticket([3; TICKET_LEN]),
            },
            AgentMsg::PeerHello { version: 1 },
            AgentMsg::PeerVisit {
                service: "web".into(),
                visitor: "[2001:db8::7]:4000".parse().unwrap(),
                mac: [4; MAC_LEN],
            },
        ];
        let relay = vec![
            RelayMsg::Challenge {
                version: 1,
                nonce: [5; NONCE_LEN],
                data_tls: true,
            },
            RelayMsg::Registered {
                results: vec![
                    ServiceResult {
                        name: "web".into(),
                        outcome: ServiceOutcome::Online {
                            port: 20001,
                            hosts: vec!["web.example.com".into()],
                        },
                    },
                    ServiceResult {
                        name: "db".into(),
                        outcome: ServiceOutcome::Rejected {
                            code: ErrorCode::PortTaken,
                            message: "port 5432 is taken".into(),
                        },
                    },
                ],
            },
            RelayMsg::Tickets {
                service: "web".into(),
                tickets: vec![Ticket([1; TICKET_LEN]), Ticket([2; TICKET_LEN])],
            },
            RelayMsg::Heartbeat,
            RelayMsg::GoingAway,
            RelayMsg::Error {
                code: ErrorCode::AuthFailed,
                message: "wrong secret".into(),
            },
            RelayMsg::Start {
                visitor: "[::1]:4000".parse().unwrap(),
            },
            RelayMsg::Start {
                visitor: "10.1.2.3:80".parse().unwrap(),
            },
        ];
        (agent, relay)
    }

    #[test]
    fn every_message_round_trips() {
        let (agent, relay) = samples();
        for m in agent {
            let buf = m.to_frame();
            assert_eq!(AgentMsg::decode(&buf), Ok(Some((m, buf.len()))));
            assert_eq!(AgentMsg::decode(&buf[..buf.len() - 1]), Ok(None));
        }
        for m in relay {
            let buf = m.to_frame();
            assert_eq!(RelayMsg::decode(&buf), Ok(Some((m, buf.len()))));
            assert_eq!(RelayMsg::decode(&buf[..buf.len() - 1]), Ok(None));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        frame::encode(0x42, b"", &mut buf);
        assert_eq!(
            AgentMsg::decode(&buf),
            Err(ProtocolError::UnknownType(0x42))
        );
        let mut buf = Vec::new();
        frame::encode(kind::REGISTER, &[200], &mut buf);
        assert!(AgentMsg::decode(&buf).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = AgentMsg::decode(&bytes);
            let _ = RelayMsg::decode(&bytes);
        }

        #[test]
        fn decoders_never_panic_on_random_bodies(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = Vec::new();
            frame::encode(kind, &body, &mut buf);
            let _ = AgentMsg::decode(&buf);
            let _ = RelayMsg::decode(&buf);
        }

        #[test]
        fn truncated_valid_frames_need_more(cut in 0usize..64, which in 0usize..11) {
            let (agent, relay) = samples();
            let buf = if which < agent.len() { agent[which].to_frame() } else { relay[which - agent.len()].to_frame() };
            let cut = cut.min(buf.len() - 1);
            prop_assert_eq!(AgentMsg::decode(&buf[..cut]).ok(), Some(None));
            prop_assert_eq!(RelayMsg::decode(&buf[..cut]).ok(), Some(None));
        }

        #[test]
        fn decoded_length_never_exceeds_cap(len in any::<u32>(), rest in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = len.to_be_bytes().to_vec();
            buf.extend_from_slice(&rest);
            match frame::decode(&buf) {
                Ok(Decoded::Frame { consumed, .. }) => prop_assert!(consumed <= MAX_FRAME_LEN + 4),
                Ok(Decoded::NeedMore(n)) => prop_assert!(n <= MAX_FRAME_LEN + 4),
                Err(_) => prop_assert!(len as usize > MAX_FRAME_LEN || len == 0),
            }
        }
    }
}
