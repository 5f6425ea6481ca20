//! Chunked visitor bytes on a data connection, so one connection can carry visitor after
//! visitor instead of costing a TCP (and TLS) handshake each.
//!
//! After `Start`, each direction is a sequence of chunks, each behind a 4-byte big-endian
//! header:
//!
//! - `1..=`[`MAX_CHUNK`]: that many bytes of the visitor's stream follow;
//! - [`END`] (0): this direction is over, as a FIN would say; the connection stays open;
//! - [`RAW`] (`0xFFFF_FFFF`): the rest of this direction is raw bytes up to the transport's own
//!   end (FIN, or TLS close_notify). A sender switches to raw to splice a bulk transfer; the
//!   connection then ends with this visitor.
//!
//! Anything else is a protocol error. A data connection is reused only when both directions
//! ended with [`END`] and the agent then sent [`READY`]: it has finished with its local
//! connection without error and waits for the next `Start`. Without that last word the relay
//! could hand a new visitor to a connection the agent is about to close. Nothing here does
//! I/O: [`Deframer`] is fed whatever bytes arrived, split anywhere.

use std::ops::Range;

/// Header announcing the end of one direction.
pub const END: u32 = 0;
/// Header announcing that the rest of the direction is raw.
pub const RAW: u32 = u32::MAX;
/// Sent by the agent, alone, after a visitor ended cleanly both ways: ready for the next one.
/// Not a chunk header (a deframer refuses it).
pub const READY: u32 = u32::MAX - 1;
/// Sent by the agent, alone, instead of the first chunk from its side when it could not
/// reach its local service; the connection then ends. The relay answers an HTTP visitor
/// 502 and resets any other. Not a chunk header: to a decoder it is a [`BadChunk`] that
/// says so ([`BadChunk::origin_unreachable`]).
pub const UNREACHABLE: u32 = u32::MAX - 2;

/// Sent by the agent (protocol 4 on), alone, as the first thing after it decoded `Start`,
/// before it dials its local service: the data connection is alive. Not a chunk header, but
/// a [`Deframer`] skips it as the first header of a direction (a relay that did not wait for
/// it reads it with the agent's first chunks).
pub const STARTED: u32 = u32::MAX - 3;

/// A relay waits for [`STARTED`] before forwarding only on a connection parked at least this
/// long. One that was parked more recently carried a visitor (or was opened) moments ago, so
/// it is taken as alive and the visitor is forwarded at once: under load, when connections
/// go back and forth within milliseconds, no visitor pays for the wait (measured: 8 % more
/// tunnel CPU per `Connection: close` request, and a round trip for bytes the visitor sent
/// after `Start`, when every visitor waited).
pub const ANSWER_IF_PARKED: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the relay waits for [`STARTED`] after sending `Start`. A connection that stays
/// silent that long (a link cut without a reset: the kernel still takes the writes) is taken
/// for dead, and the visitor, of whom nothing has been answered yet, moves to another one.
pub const START_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the relay waits for [`READY`] after a visitor's `END`s before closing the
/// connection instead of reusing it.
pub const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest chunk payload a sender may announce, in bytes.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Bytes in a chunk header.
pub const HEADER_LEN: usize = 4;

/// The header for a chunk of `len` bytes (`1..=MAX_CHUNK`), or [`END`]/[`RAW`].
pub fn header(len: u32) -> [u8; HEADER_LEN] {
    len.to_be_bytes()
}

/// Appends `data` to `out` as chunks (none when `data` is empty): how the relay sends the
/// bytes it already holds for a visitor (PROXY header, request head) after `Start`.
pub fn push_chunks(out: &mut Vec<u8>, data: &[u8]) {
    for part in data.chunks(MAX_CHUNK) {
        out.extend_from_slice(&header(part.len() as u32));
        out.extend_from_slice(part);
    }
}

/// Checks what the relay read after a visitor's two `END`s: `Ok(true)` once it is exactly
/// [`READY`], `Ok(false)` while it is still a prefix of it, an error for anything else.
pub fn check_ready(buf: &[u8]) -> Result<bool, BadChunk> {
    let ready = header(READY);
    if buf.len() > HEADER_LEN || buf != &ready[..buf.len()] {
        let mut h = [0u8; HEADER_LEN];
        let n = buf.len().min(HEADER_LEN);
        h[..n].copy_from_slice(&buf[..n]);
        return Err(BadChunk(u32::from_be_bytes(h)));
    }
    Ok(buf.len() == HEADER_LEN)
}

/// What the agent's first bytes after `Start` say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAnswer {
    /// Not four bytes yet: read more.
    NeedMore,
    /// [`STARTED`].
    Started,
    /// Another header first (an agent that does not send [`STARTED`] is not asked to): it
    /// goes to the chunk decoder, which knows [`UNREACHABLE`] and refuses the rest.
    Other,
}

/// Reads the agent's answer to `Start` from its first bytes `buf` (what was read so far).
pub fn start_answer(buf: &[u8]) -> StartAnswer {
    match buf.get(..HEADER_LEN) {
        None => StartAnswer::NeedMore,
        Some(h) if h == header(STARTED) => StartAnswer::Started,
        Some(_) => StartAnswer::Other,
    }
}

/// A chunk header that is neither a valid length nor [`END`] nor [`RAW`] (or the agent's
/// [`UNREACHABLE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChunk(pub u32);

impl BadChunk {
    /// It is the agent's [`UNREACHABLE`]: not a broken connection, a dead local service.
    pub fn origin_unreachable(&self) -> bool {
        self.0 == UNREACHABLE
    }
}

impl std::fmt::Display for BadChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.origin_unreachable() {
            return f.write_str("the agent could not reach its local service");
        }
        write!(
            f,
            "invalid chunk header 0x{:08x} on a data connection",
            self.0
        )
    }
}

impl std::error::Error for BadChunk {}

/// What the next bytes of the input are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Visitor bytes at this range of the input; the input is consumed up to its end.
    Data(Range<usize>),
    /// The direction ended with [`END`]; `used` bytes of the input belong to it. Later bytes
    /// belong to whatever follows on the connection (the next `Start`).
    End {
        /// Input bytes consumed, up to and including the header.
        used: usize,
    },
    /// The rest of the direction is raw; `used` bytes of the input were the header.
    Raw {
        /// Input bytes consumed, up to and including the header.
        used: usize,
    },
    /// The whole input was consumed (part of a header); feed more.
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `first`: no header decoded yet (a [`STARTED`] here is skipped). Kept in the variant,
    /// where padding has room for it: the decoder lives in every forwarding task.
    Header {
        buf: [u8; HEADER_LEN],
        have: usize,
        first: bool,
    },
    Data {
        left: usize,
    },
    Ended,
}

/// Incremental decoder for one direction's chunks.
#[derive(Debug, Clone)]
pub struct Deframer {
    state: State,
}

impl Default for Deframer {
    fn default() -> Self {
        Self::new()
    }
}

impl Deframer {
    /// A decoder at the start of a direction.
    pub fn new() -> Self {
        Deframer {
            state: State::Header {
                buf: [0; HEADER_LEN],
                have: 0,
                first: true,
            },
        }
    }

    /// The next piece of `input`. After [`Piece::End`] or [`Piece::Raw`] the decoder is done
    /// and must not be fed again.
    pub fn next(&mut self, input: &[u8]) -> Result<Piece, BadChunk> {
        let mut pos = 0;
        loop {
            match &mut self.state {
                State::Ended => return Ok(Piece::NeedMore),
                State::Data { left } => {
                    if pos == input.len() {
                        return Ok(Piece::NeedMore);
                    }
                    let n = (*left).min(input.len() - pos);
                    *left -= n;
                    if *left == 0 {
                        self.state = State::Header {
                            buf: [0; HEADER_LEN],
                            have: 0,
                            first: false,
                        };
                    }
                    return Ok(Piece::Data(pos..pos + n));
                }
                State::Header { buf, have, first } => {
                    let n = (HEADER_LEN - *have).min(input.len() - pos);
                    buf[*have..*have + n].copy_from_slice(&input[pos..pos + n]);
                    *have += n;
                    pos += n;
                    if *have < HEADER_LEN {
                        return Ok(Piece::NeedMore);
                    }
                    let first = *first;
                    match u32::from_be_bytes(*buf) {
                        // The agent's answer to `Start`, when the relay forwarded without
                        // waiting for it: only ever first, and carries nothing.
                        STARTED if first => {
                            self.state = State::Header {
                                buf: [0; HEADER_LEN],
                                have: 0,
                                first: false,
                            };
                        }
                        END => {
                            self.state = State::Ended;
                            return Ok(Piece::End { used: pos });
                        }
                        RAW => {
                            self.state = State::Ended;
                            return Ok(Piece::Raw { used: pos });
                        }
                        len if len as usize <= MAX_CHUNK => {
                            self.state = State::Data { left: len as usize };
                        }
                        bad => return Err(BadChunk(bad)),
                    }
                }
            }
        }
    }
}

/// One direction's decoding after `Start`, whatever carries it: chunks until `END`, or
/// every byte after `RAW`. Both backends feed it what they read and write out what it yields.
#[derive(Debug, Default)]
pub struct Unchunker {
    deframer: Deframer,
    raw: bool,
    ended: bool,
    leftover: Vec<u8>,
}

impl Unchunker {
    /// The next run of visitor bytes in `input`, which is advanced past it. `None` once `input`
    /// is used up or the direction has ended; bytes after `END` are kept as leftover.
    pub fn next_data<'a>(&mut self, input: &mut &'a [u8]) -> Result<Option<&'a [u8]>, BadChunk> {
        loop {
            if self.ended || input.is_empty() {
                return Ok(None);
            }
            if self.raw {
                return Ok(Some(std::mem::take(input)));
            }
            match self.deframer.next(input)? {
                Piece::NeedMore => {
                    *input = &[];
                    return Ok(None);
                }
                Piece::End { used } => {
                    self.leftover.extend_from_slice(&input[used..]);
                    *input = &[];
                    self.ended = true;
                    return Ok(None);
                }
                Piece::Raw { used } => {
                    self.raw = true;
                    *input = &input[used..];
                }
                Piece::Data(r) => {
                    let data = &input[r.clone()];
                    *input = &input[r.end..];
                    return Ok(Some(data));
                }
            }
        }
    }

    /// The direction switched to raw bytes (the connection ends with this visitor).
    pub fn is_raw(&self) -> bool {
        self.raw
    }

    /// The direction ended with `END`.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Bytes that followed `END` (the start of whatever comes next on the connection).
    pub fn take_leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.leftover)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_answer_to_start_is_read_whole() {
        let started = header(STARTED);
        assert_eq!(start_answer(&[]), StartAnswer::NeedMore);
        assert_eq!(start_answer(&started[..3]), StartAnswer::NeedMore);
        assert_eq!(start_answer(&started), StartAnswer::Started);
        let mut more = started.to_vec();
        push_chunks(&mut more, b"hi");
        assert_eq!(start_answer(&more), StartAnswer::Started);
        // An agent that could not reach its service, or one that does not answer `Start`:
        // the header goes to the chunk decoder as it came.
        assert_eq!(start_answer(&header(UNREACHABLE)), StartAnswer::Other);
        let mut chunks = Vec::new();
        push_chunks(&mut chunks, b"hello");
        assert_eq!(start_answer(&chunks), StartAnswer::Other);
        // First on a direction, a decoder skips it (the relay forwarded without waiting for
        // it); anywhere else it is not a chunk header.
        let mut wire = started.to_vec();
        push_chunks(&mut wire, b"ok");
        wire.extend_from_slice(&header(END));
        assert_eq!(
            decode_split(&wire, &[1, 5, 7]),
            Ok((b"ok".to_vec(), Some(END), vec![]))
        );
        let mut late = Vec::new();
        push_chunks(&mut late, b"ok");
        late.extend_from_slice(&started);
        assert_eq!(decode_split(&late, &[]), Err(BadChunk(STARTED)));
    }

    /// Decodes `wire` fed in pieces cut at `cuts`; returns the data, how it ended, and the
    /// bytes after the end.
    type Decoded = (Vec<u8>, Option<u32>, Vec<u8>);

    fn decode_split(wire: &[u8], cuts: &[usize]) -> Result<Decoded, BadChunk> {
        let mut d = Deframer::new();
        let mut out = Vec::new();
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        bounds.push(0);
        bounds.push(wire.len());
        bounds.sort_unstable();
        bounds.dedup();
        for w in bounds.windows(2) {
            let mut input = &wire[w[0]..w[1]];
            loop {
                match d.next(input)? {
                    Piece::Data(r) => {
                        out.extend_from_slice(&input[r.clone()]);
                        input = &input[r.end..];
                    }
                    Piece::End { used } => {
                        let after = w[0] + (w[1] - w[0] - input.len()) + used;
                        return Ok((out, Some(END), wire[after..].to_vec()));
                    }
                    Piece::Raw { used } => {
                        let after = w[0] + (w[1] - w[0] - input.len()) + used;
                        return Ok((out, Some(RAW), wire[after..].to_vec()));
                    }
                    Piece::NeedMore => break,
                }
            }
        }
        Ok((out, None, Vec::new()))
    }

    fn encode(chunks: &[Vec<u8>], last: u32, trailer: &[u8]) -> Vec<u8> {
        let mut wire = Vec::new();
        for c in chunks {
            wire.extend_from_slice(&header(c.len() as u32));
            wire.extend_from_slice(c);
        }
        wire.extend_from_slice(&header(last));
        wire.extend_from_slice(trailer);
        wire
    }

    proptest! {
        #[test]
        fn any_split_decodes_the_same(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
            raw in any::<bool>(),
            trailer in proptest::collection::vec(any::<u8>(), 0..40),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let last = if raw { RAW } else { END };
            let wire = encode(&chunks, last, &trailer);
            let (data, end, after) = decode_split(&wire, &cuts).unwrap();
            prop_assert_eq!(data, chunks.concat());
            prop_assert_eq!(end, Some(last));
            prop_assert_eq!(after, trailer);
        }

        #[test]
        fn garbage_never_panics(wire in proptest::collection::vec(any::<u8>(), 0..200),
                                cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
            let _ = decode_split(&wire, &cuts);
        }
    }

    #[test]
    fn held_bytes_go_out_as_chunks() {
        let data: Vec<u8> = (0..150_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        push_chunks(&mut wire, &data);
        assert_eq!(wire.len(), data.len() + 3 * HEADER_LEN, "three chunks");
        wire.extend_from_slice(&header(END));
        let (got, end, after) = decode_split(&wire, &[7, 70_000]).unwrap();
        assert_eq!((got, end, after), (data, Some(END), Vec::new()));
        let mut none = Vec::new();
        push_chunks(&mut none, &[]);
        assert!(none.is_empty(), "nothing held, nothing sent");
    }

    #[test]
    fn ready_is_exactly_one_marker() {
        let ready = header(READY);
        assert_eq!(check_ready(&[]), Ok(false));
        assert_eq!(check_ready(&ready[..3]), Ok(false));
        assert_eq!(check_ready(&ready), Ok(true));
        assert!(
            check_ready(&[ready, ready].concat()).is_err(),
            "nothing may follow"
        );
        assert!(check_ready(&header(END)).is_err());
        assert_eq!(
            Deframer::new().next(&ready),
            Err(BadChunk(READY)),
            "not a chunk"
        );
    }

    #[test]
    fn oversized_header_is_refused() {
        let mut d = Deframer::new();
        let wire = header(MAX_CHUNK as u32 + 1);
        assert_eq!(d.next(&wire), Err(BadChunk(MAX_CHUNK as u32 + 1)));
        let mut d = Deframer::new();
        assert_eq!(
            d.next(&header(MAX_CHUNK as u32)),
            Ok(Piece::NeedMore),
            "a full-size chunk is fine"
        );
    }
}
