//! The life of one data connection, sans-IO, once per side: what each end sends, what it
//! expects, and when the connection may carry the next visitor. Both backends drive these
//! machines (tokio's tasks and the uring workers); they own the sockets and the timers, the
//! machines own the protocol. Events go in (`on_*`), bytes and decisions come out; time is a
//! parameter.
//!
//! ```text
//!  relay:  Parked ──visitor──▶ Forwarding ──both END──▶ AwaitingReady ──READY──▶ Parked
//!            │                     │ (not reusable)          │ (other bytes, EOF, deadline)
//!            └─agent sent/closed──▶ Closed ◀─────────────────┘
//!  agent:  Pooled ──Start (sends STARTED)──▶ Forwarding ──both END (sends READY)──▶ Pooled
//!            │ (Error, bad frame, EOF)      │ (not reusable)
//!            └────────────▶ Closed ◀────────┘
//! ```

use std::net::SocketAddr;
use std::time::Instant;

use super::auth::Ticket;
use super::chunk::{self, READY_WAIT};
use super::msg::{AgentMsg, Message, RelayMsg};
use super::{MAX_FRAME_LEN, PROTOCOL_VERSION};

/// Where a relay-side data connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayState {
    /// In a pool, waiting for a visitor; the agent must stay silent.
    Parked,
    /// Carrying a visitor.
    Forwarding,
    /// The visitor ended cleanly both ways; waiting for the agent's `READY` until `until`.
    AwaitingReady {
        /// When the wait gives up.
        until: Instant,
    },
    /// Done: the driver closes the connection.
    Closed,
}

/// What the relay does after a visitor, or while waiting for `READY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayNext {
    /// Read more from the agent, until the given deadline.
    WaitReady(Instant),
    /// Park the connection again (offer it to the pool).
    Park,
    /// Close the connection.
    Close,
}

/// The relay's side of one data connection (after its ticket was redeemed).
#[derive(Debug)]
pub struct RelayDataConn {
    state: RelayState,
    /// Bytes read from the agent since its last `END`, while awaiting `READY`.
    got: Vec<u8>,
}

impl Default for RelayDataConn {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayDataConn {
    /// A connection just parked.
    pub fn new() -> Self {
        RelayDataConn {
            state: RelayState::Parked,
            got: Vec::new(),
        }
    }

    /// Where the connection is.
    pub fn state(&self) -> RelayState {
        self.state
    }

    /// A visitor was assigned to the parked connection: returns the bytes to send before
    /// forwarding: `Start`, then `held` (PROXY header, request head) and `early` (what the
    /// visitor sent already) as chunks, so they travel in one send.
    pub fn on_visitor(&mut self, visitor: SocketAddr, held: &[u8], early: &[u8]) -> Vec<u8> {
        debug_assert_eq!(self.state, RelayState::Parked);
        self.state = RelayState::Forwarding;
        let mut out = RelayMsg::Start { visitor }.to_frame();
        chunk::push_chunks(&mut out, held);
        chunk::push_chunks(&mut out, early);
        out
    }

    /// The agent sent a byte or closed while parked: the connection is gone or misbehaving
    /// and leaves the pool.
    pub fn on_parked_input(&mut self) -> RelayNext {
        self.state = RelayState::Closed;
        RelayNext::Close
    }

    /// The visitor is done. `reusable`: both directions ended with `END`; `leftover`: agent
    /// bytes read past its `END`. A reusable connection waits for `READY` (the agent is done
    /// with its local connection) until `now + READY_WAIT`.
    pub fn on_visitor_done(
        &mut self,
        reusable: bool,
        leftover: Vec<u8>,
        now: Instant,
    ) -> RelayNext {
        if !reusable {
            self.state = RelayState::Closed;
            return RelayNext::Close;
        }
        let until = now + READY_WAIT;
        self.state = RelayState::AwaitingReady { until };
        self.got = leftover;
        self.check_ready(until)
    }

    /// Agent bytes while awaiting `READY` (`bytes` empty: EOF), at `now`.
    pub fn on_ready_input(&mut self, bytes: &[u8], now: Instant) -> RelayNext {
        let RelayState::AwaitingReady { until } = self.state else {
            return RelayNext::Close;
        };
        if bytes.is_empty() || now >= until {
            self.state = RelayState::Closed;
            return RelayNext::Close;
        }
        self.got.extend_from_slice(bytes);
        self.check_ready(until)
    }

    /// The `READY` deadline passed at `now` (the driver's timer fired).
    pub fn on_timeout(&mut self, now: Instant) -> RelayNext {
        match self.state {
            RelayState::AwaitingReady { until } if now < until => RelayNext::WaitReady(until),
            _ => {
                self.state = RelayState::Closed;
                RelayNext::Close
            }
        }
    }

    fn check_ready(&mut self, until: Instant) -> RelayNext {
        match chunk::check_ready(&self.got) {
            Ok(true) => {
                self.got.clear();
                self.state = RelayState::Parked;
                RelayNext::Park
            }
            Ok(false) => RelayNext::WaitReady(until),
            Err(_) => {
                self.state = RelayState::Closed;
                RelayNext::Close
            }
        }
    }
}

/// Where an agent-side data connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// Waiting, unbounded, for the relay's `Start`.
    Pooled,
    /// Carrying a visitor.
    Forwarding,
    /// Done: the driver closes the connection.
    Closed,
}

/// What the agent's pooled connection heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// Not a whole frame yet: read more.
    NeedMore,
    /// A visitor: dial the local service and forward; `early` are tunnel bytes already
    /// read past `Start` (the visitor's first chunks).
    Start {
        /// The visitor's address, for logs.
        visitor: SocketAddr,
        /// Tunnel bytes after `Start`, to decode first.
        early: Vec<u8>,
    },
    /// The relay refused the connection: close, saying why.
    Refused {
        /// The relay's reason.
        message: String,
        /// A refused ticket: routine when a session ends or the relay restarts (the agent
        /// cannot recall connections it was dialling then), so not worth a warning.
        routine: bool,
    },
    /// The relay closed the pooled connection: close quietly.
    Ended,
    /// Anything else breaks the protocol: close.
    Invalid(String),
}

/// The agent's side of one data connection.
#[derive(Debug)]
pub struct AgentDataConn {
    state: AgentState,
    /// Relay bytes not decoded yet.
    buf: Vec<u8>,
}

impl AgentDataConn {
    /// A connection about to present `ticket`: the machine, and the `DataHello` to send.
    pub fn open(ticket: Ticket) -> (Self, Vec<u8>) {
        let hello = AgentMsg::DataHello {
            version: PROTOCOL_VERSION,
            ticket,
        };
        let conn = AgentDataConn {
            state: AgentState::Pooled,
            buf: Vec::new(),
        };
        (conn, hello.to_frame())
    }

    /// Where the connection is.
    pub fn state(&self) -> AgentState {
        self.state
    }

    /// Relay bytes while pooled (`bytes` empty: EOF).
    pub fn on_pooled_input(&mut self, bytes: &[u8]) -> AgentEvent {
        if self.state != AgentState::Pooled {
            return AgentEvent::Invalid("bytes outside the pooled state".into());
        }
        if bytes.is_empty() {
            self.state = AgentState::Closed;
            return AgentEvent::Ended;
        }
        self.buf.extend_from_slice(bytes);
        self.decode()
    }

    fn decode(&mut self) -> AgentEvent {
        let event = match RelayMsg::decode(&self.buf) {
            Ok(None) if self.buf.len() > MAX_FRAME_LEN + 4 => {
                AgentEvent::Invalid("oversized frame from relay".into())
            }
            Ok(None) => return AgentEvent::NeedMore,
            Ok(Some((RelayMsg::Start { visitor }, used))) => {
                let early = self.buf.split_off(used);
                self.buf.clear();
                self.state = AgentState::Forwarding;
                return AgentEvent::Start { visitor, early };
            }
            Ok(Some((RelayMsg::Error { code, message }, _))) => AgentEvent::Refused {
                message,
                routine: code == super::ErrorCode::BadTicket,
            },
            Ok(Some((other, _))) => {
                AgentEvent::Invalid(format!("unexpected {other:?} on data connection"))
            }
            Err(e) => AgentEvent::Invalid(e.to_string()),
        };
        self.state = AgentState::Closed;
        event
    }

    /// The visitor is done (`reusable`: both directions ended with `END`; `leftover`: relay
    /// bytes past its `END`). A reusable connection is pooled again and the returned bytes
    /// (`READY`: done with the local connection) must be sent; `None`: close. Whatever the
    /// relay already sent of the next `Start` is decoded on the next
    /// [`Self::on_pooled_input`] (or [`Self::pending`]).
    pub fn on_visitor_done(&mut self, reusable: bool, leftover: Vec<u8>) -> Option<[u8; 4]> {
        if !reusable {
            self.state = AgentState::Closed;
            return None;
        }
        self.state = AgentState::Pooled;
        self.buf = leftover;
        Some(chunk::header(chunk::READY))
    }

    /// The answer to the `Start` just decoded ([`chunk::STARTED`]), to send at once, before
    /// dialing the local service: the relay hands the visitor to another connection if this
    /// one stays silent.
    pub fn started(&self) -> [u8; 4] {
        debug_assert_eq!(self.state, AgentState::Forwarding);
        chunk::header(chunk::STARTED)
    }

    /// The local service could not be reached for the visitor just started: the returned
    /// bytes ([`chunk::UNREACHABLE`]) tell the relay (which answers an HTTP visitor 502), and
    /// the connection then closes.
    pub fn on_dial_failed(&mut self) -> [u8; 4] {
        self.state = AgentState::Closed;
        chunk::header(chunk::UNREACHABLE)
    }

    /// Decodes relay bytes already held (after [`Self::on_visitor_done`]) before reading more.
    pub fn pending(&mut self) -> AgentEvent {
        if self.buf.is_empty() {
            AgentEvent::NeedMore
        } else {
            self.decode()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr() -> SocketAddr {
        "203.0.113.9:4242".parse().unwrap()
    }

    #[test]
    fn relay_and_agent_carry_visitor_after_visitor() {
        let t0 = Instant::now();
        let mut relay = RelayDataConn::new();
        let (mut agent, hello) = AgentDataConn::open(Ticket([7; 16]));
        assert!(matches!(
            AgentMsg::decode(&hello),
            Ok(Some((AgentMsg::DataHello { .. }, _)))
        ));
        for round in 0..3u8 {
            let start = relay.on_visitor(addr(), b"GET / HTTP/1.1\r\n\r\n", &[round]);
            assert_eq!(relay.state(), RelayState::Forwarding);
            // Delivered in two pieces: a frame split anywhere still decodes.
            let (a, b) = start.split_at(3);
            let first = if round == 0 {
                agent.on_pooled_input(a)
            } else {
                // The first bytes arrived with the previous visitor's leftover.
                agent.pending()
            };
            assert_eq!(first, AgentEvent::NeedMore);
            let AgentEvent::Start { visitor, early } = agent.on_pooled_input(b) else {
                panic!("no Start in round {round}")
            };
            assert_eq!(visitor, addr());
            let mut want = Vec::new();
            chunk::push_chunks(&mut want, b"GET / HTTP/1.1\r\n\r\n");
            chunk::push_chunks(&mut want, &[round]);
            assert_eq!(early, want);
            // Both END: the agent says READY; the relay parks the connection again.
            let ready = agent.on_visitor_done(true, Vec::new()).unwrap();
            assert_eq!(agent.state(), AgentState::Pooled);
            assert_eq!(
                relay.on_visitor_done(true, ready[..1].to_vec(), t0),
                RelayNext::WaitReady(t0 + READY_WAIT)
            );
            assert_eq!(relay.on_ready_input(&ready[1..], t0), RelayNext::Park);
            assert_eq!(relay.state(), RelayState::Parked);
            // The next Start's first bytes may already be with the agent: keep them.
            let next =
                RelayDataConn::new().on_visitor(addr(), b"GET / HTTP/1.1\r\n\r\n", &[round + 1]);
            agent.buf = next[..3].to_vec();
        }
    }

    #[test]
    fn the_relay_closes_on_anything_but_ready() {
        let t0 = Instant::now();
        let mut c = RelayDataConn::new();
        c.on_visitor(addr(), &[], &[]);
        assert_eq!(c.on_visitor_done(false, Vec::new(), t0), RelayNext::Close);

        let mut c = RelayDataConn::new();
        c.on_visitor(addr(), &[], &[]);
        c.on_visitor_done(true, Vec::new(), t0);
        assert_eq!(
            c.on_ready_input(&chunk::header(5), t0),
            RelayNext::Close,
            "a chunk"
        );

        let mut c = RelayDataConn::new();
        c.on_visitor(addr(), &[], &[]);
        c.on_visitor_done(true, Vec::new(), t0);
        assert_eq!(c.on_ready_input(&[], t0), RelayNext::Close, "EOF");

        let mut c = RelayDataConn::new();
        c.on_visitor(addr(), &[], &[]);
        c.on_visitor_done(true, Vec::new(), t0);
        let late = t0 + READY_WAIT;
        assert_eq!(
            c.on_timeout(t0 + Duration::from_secs(1)),
            RelayNext::WaitReady(late)
        );
        assert_eq!(
            c.on_timeout(late),
            RelayNext::Close,
            "silence past the wait"
        );

        let mut c = RelayDataConn::new();
        assert_eq!(
            c.on_parked_input(),
            RelayNext::Close,
            "agent spoke while parked"
        );
        assert_eq!(c.state(), RelayState::Closed);
    }

    #[test]
    fn an_unreachable_local_service_is_said_and_ends_the_connection() {
        let mut relay = RelayDataConn::new();
        let (mut agent, _) = AgentDataConn::open(Ticket([3; 16]));
        let start = relay.on_visitor(addr(), b"", b"hi");
        assert!(matches!(
            agent.on_pooled_input(&start),
            AgentEvent::Start { .. }
        ));
        let said = agent.on_dial_failed();
        assert_eq!(agent.state(), AgentState::Closed);
        // What the relay's decoder makes of it: the origin's fault, not a broken frame.
        let mut down = chunk::Unchunker::default();
        let err = down.next_data(&mut &said[..]).unwrap_err();
        assert!(err.origin_unreachable(), "{err}");
    }

    #[test]
    fn the_agent_closes_on_refusal_garbage_or_eof() {
        let (mut a, _) = AgentDataConn::open(Ticket([1; 16]));
        let refusal = RelayMsg::Error {
            code: super::super::ErrorCode::BadTicket,
            message: "expired ticket".into(),
        }
        .to_frame();
        assert_eq!(
            a.on_pooled_input(&refusal),
            AgentEvent::Refused {
                message: "expired ticket".into(),
                routine: true,
            }
        );
        assert_eq!(a.state(), AgentState::Closed);

        let (mut a, _) = AgentDataConn::open(Ticket([1; 16]));
        assert!(matches!(
            a.on_pooled_input(&RelayMsg::Heartbeat.to_frame()),
            AgentEvent::Invalid(_)
        ));

        let (mut a, _) = AgentDataConn::open(Ticket([1; 16]));
        assert!(matches!(
            a.on_pooled_input(&[0xff, 0xff, 0xff, 0xff, 1]),
            AgentEvent::Invalid(_)
        ));

        let (mut a, _) = AgentDataConn::open(Ticket([1; 16]));
        assert_eq!(a.on_pooled_input(&[]), AgentEvent::Ended);

        let (mut a, _) = AgentDataConn::open(Ticket([1; 16]));
        a.on_pooled_input(&RelayMsg::Start { visitor: addr() }.to_frame());
        assert_eq!(a.on_visitor_done(false, Vec::new()), None);
        assert_eq!(a.state(), AgentState::Closed);
    }
}
