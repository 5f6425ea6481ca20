//! Datagrams on a data connection of a `udp` service: a *channel* carrying the datagrams of
//! many visitor flows, each behind an 8-byte header, so one TCP (and TLS) connection moves
//! datagram after datagram with no handshake per visitor and no per-datagram frame of the
//! control protocol.
//!
//! After `DataHello`, the relay accepts the connection as a channel by sending
//! [`CHANNEL_OPEN`] alone (anything else, such as an `Error` frame, is a refusal); from then on
//! both directions are sequences of items:
//!
//! ```text
//!   flow: u32 BE | len: u32 BE | len bytes      a datagram of that flow (len ≤ MAX_DATAGRAM)
//!   flow: u32 BE | CLOSE (0xFFFF_FFFF)          that flow is over (idle, or refused)
//! ```
//!
//! A flow is one visitor address (IP and port) on the relay's public UDP port, numbered by
//! the relay; the agent gives each flow a socket of its own toward the local service, so the
//! service sees one peer per visitor and its replies find their way back. Flow numbers are
//! the service's, not the channel's: the relay may move a flow to another channel (one that
//! died), and the agent answers on whichever channel last carried it. A zero-length datagram
//! is legal UDP and travels as `len = 0`. Nothing here does I/O: [`Decoder`] is fed whatever
//! bytes arrived, split anywhere.

use std::ops::Range;

/// Sent by the relay, alone, when it takes a data connection of a `udp` service as a
/// channel. Chosen from the chunk headers' reserved end so it can never be mistaken for the
/// start of a frame (whose length prefix is far smaller).
pub const CHANNEL_OPEN: u32 = u32::MAX - 4;

/// The length field of an item that ends its flow.
pub const CLOSE: u32 = u32::MAX;

/// Largest datagram a channel carries: the most a UDP payload can be (IPv4 allows 65 507;
/// larger ones cannot arrive on a socket).
pub const MAX_DATAGRAM: usize = 65_535;

/// Bytes in an item header.
pub const HEADER_LEN: usize = 8;

/// The header of a datagram of `len` bytes in `flow`. The caller keeps `len ≤ MAX_DATAGRAM`.
pub fn datagram_header(flow: u32, len: usize) -> [u8; HEADER_LEN] {
    debug_assert!(len <= MAX_DATAGRAM);
    item(flow, len as u32)
}

/// The item that ends `flow`.
pub fn close_item(flow: u32) -> [u8; HEADER_LEN] {
    item(flow, CLOSE)
}

fn item(flow: u32, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&flow.to_be_bytes());
    h[4..].copy_from_slice(&len.to_be_bytes());
    h
}

/// One item read from a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item<'a> {
    /// A datagram of `flow`.
    Datagram {
        /// The flow it belongs to.
        flow: u32,
        /// Its payload.
        payload: &'a [u8],
    },
    /// `flow` is over.
    Close {
        /// The flow that ended.
        flow: u32,
    },
}

/// What can be wrong with a channel's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadItem {
    /// A length above [`MAX_DATAGRAM`] that is not [`CLOSE`].
    #[error("datagram of {0} bytes announced (most is {MAX_DATAGRAM})")]
    TooLong(u32),
}

/// Splits a channel's byte stream into items. Holds at most one partial item
/// (`HEADER_LEN + MAX_DATAGRAM` bytes) between calls to [`Self::feed`].
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Where the next unread item starts in `buf`.
    at: usize,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the channel. Call [`Self::next_item`] until it yields `None`
    /// before feeding more, or the buffer keeps what was read but not yet taken.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.at > 0 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that are not yet a whole item.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.at
    }

    /// The next whole item, `Ok(None)` if more bytes are needed, or the error that ends the
    /// channel.
    pub fn next_item(&mut self) -> Result<Option<Item<'_>>, BadItem> {
        Ok(match self.next_at()? {
            None => None,
            Some(At::Close { flow }) => Some(Item::Close { flow }),
            Some(At::Datagram { flow, payload }) => Some(Item::Datagram {
                flow,
                payload: &self.buf[payload],
            }),
        })
    }

    /// [`Self::next_item`], with the payload as a place in the decoder ([`Self::slice`]), so
    /// several datagrams can be held at once (to send them in one batch). The places stay
    /// valid until the next [`Self::feed`].
    pub fn next_at(&mut self) -> Result<Option<At>, BadItem> {
        let rest = &self.buf[self.at..];
        if rest.len() < HEADER_LEN {
            return Ok(None);
        }
        let flow = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == CLOSE {
            self.at += HEADER_LEN;
            return Ok(Some(At::Close { flow }));
        }
        if len as usize > MAX_DATAGRAM {
            return Err(BadItem::TooLong(len));
        }
        let end = HEADER_LEN + len as usize;
        if rest.len() < end {
            return Ok(None);
        }
        let start = self.at + HEADER_LEN;
        self.at += end;
        Ok(Some(At::Datagram {
            flow,
            payload: start..start + len as usize,
        }))
    }

    /// The bytes at a place [`Self::next_at`] returned.
    pub fn slice(&self, place: Range<usize>) -> &[u8] {
        &self.buf[place]
    }
}

/// An item as [`Decoder::next_at`] returns it: the payload as a place in the decoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    /// A datagram of `flow`, at `payload`.
    Datagram {
        /// The flow it belongs to.
        flow: u32,
        /// Where its payload is ([`Decoder::slice`]).
        payload: Range<usize>,
    },
    /// `flow` is over.
    Close {
        /// The flow that ended.
        flow: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Each item as (flow, payload), `None` for a close.
    type Items = Vec<(u32, Option<Vec<u8>>)>;

    fn drain(d: &mut Decoder) -> Result<Items, BadItem> {
        let mut out = Vec::new();
        while let Some(item) = d.next_item()? {
            out.push(match item {
                Item::Datagram { flow, payload } => (flow, Some(payload.to_vec())),
                Item::Close { flow } => (flow, None),
            });
        }
        Ok(out)
    }

    #[test]
    fn datagrams_and_closes_come_out_as_they_went_in() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&datagram_header(7, 3));
        wire.extend_from_slice(b"abc");
        wire.extend_from_slice(&datagram_header(8, 0));
        wire.extend_from_slice(&close_item(7));
        let mut d = Decoder::new();
        d.feed(&wire);
        let items = drain(&mut d).unwrap();
        assert_eq!(
            items,
            vec![(7, Some(b"abc".to_vec())), (8, Some(Vec::new())), (7, None)]
        );
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn an_oversized_length_ends_the_channel() {
        let mut d = Decoder::new();
        d.feed(&item(1, MAX_DATAGRAM as u32 + 1));
        assert_eq!(
            d.next_item(),
            Err(BadItem::TooLong(MAX_DATAGRAM as u32 + 1))
        );
    }

    #[test]
    fn the_channel_marker_is_no_frame_length() {
        // A frame's length prefix is at most MAX_FRAME_LEN: the marker cannot start one.
        assert!(CHANNEL_OPEN as usize > crate::protocol::MAX_FRAME_LEN);
    }

    proptest! {
        #[test]
        fn any_split_of_the_stream_decodes_the_same(
            grams in proptest::collection::vec((any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300), any::<bool>()), 0..20),
            cuts in proptest::collection::vec(1usize..64, 0..40),
        ) {
            let mut wire = Vec::new();
            let mut want = Vec::new();
            for (flow, payload, close) in &grams {
                if *close {
                    wire.extend_from_slice(&close_item(*flow));
                    want.push((*flow, None));
                } else {
                    wire.extend_from_slice(&datagram_header(*flow, payload.len()));
                    wire.extend_from_slice(payload);
                    want.push((*flow, Some(payload.clone())));
                }
            }
            let mut d = Decoder::new();
            let mut got = Vec::new();
            let mut rest = &wire[..];
            for c in cuts {
                let c = c.min(rest.len());
                d.feed(&rest[..c]);
                rest = &rest[c..];
                got.extend(drain(&mut d).unwrap());
            }
            d.feed(rest);
            got.extend(drain(&mut d).unwrap());
            prop_assert_eq!(got, want);
            prop_assert_eq!(d.pending(), 0);
        }

        #[test]
        fn garbage_never_panics_and_never_holds_more_than_one_item(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut d = Decoder::new();
            d.feed(&bytes);
            while let Ok(Some(_)) = d.next_item() {}
            prop_assert!(d.pending() <= bytes.len());
        }
    }
}
