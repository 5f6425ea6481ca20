//! Length-prefixed frames.
//!
//! ```text
//! +----------------------+-----------+------------------------+
//! | body length: u32 BE  | type: u8  | payload (length - 1)   |
//! +----------------------+-----------+------------------------+
//! ```
//!
//! The length counts the type byte and the payload. It is capped at [`MAX_FRAME_LEN`] and checked
//! before anything is buffered, so a peer cannot make us allocate more than that.

use super::ProtocolError;

/// Largest frame body (type byte + payload) either side accepts, in bytes.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Size of the length prefix in bytes.
pub const HEADER_LEN: usize = 4;

/// Outcome of looking for one frame at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// Not enough bytes yet; at least this many more are needed.
    NeedMore(usize),
    /// A whole frame: its type, its payload, and how many bytes of the buffer it used.
    Frame {
        /// Message type byte.
        kind: u8,
        /// Payload after the type byte.
        payload: &'a [u8],
        /// Bytes consumed from the front of the buffer.
        consumed: usize,
    },
}

/// Looks for one frame at the start of `buf`. Never panics; "need more bytes" is a normal
/// outcome, and an oversized length is rejected before the body arrives.
pub fn decode(buf: &[u8]) -> Result<Decoded<'_>, ProtocolError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(Decoded::NeedMore(HEADER_LEN - buf.len()));
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    if len == 0 {
        return Err(ProtocolError::EmptyFrame);
    }
    let total = HEADER_LEN + len;
    match buf.get(HEADER_LEN..total) {
        None => Ok(Decoded::NeedMore(total - buf.len())),
        Some(body) => Ok(Decoded::Frame {
            kind: body[0],
            payload: &body[1..],
            consumed: total,
        }),
    }
}

/// Appends one frame with the given type and payload to `out`.
///
/// Panics if the payload does not fit in [`MAX_FRAME_LEN`]: every message this crate builds is
/// bounded well below it, so an oversized one is a bug here, not bad input.
pub fn encode(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    let len = payload.len() + 1;
    assert!(len <= MAX_FRAME_LEN, "frame of {len} bytes exceeds limit");
    out.reserve(HEADER_LEN + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial() {
        let mut buf = Vec::new();
        encode(7, b"hello", &mut buf);
        for cut in 0..buf.len() {
            assert!(matches!(decode(&buf[..cut]), Ok(Decoded::NeedMore(n)) if n > 0));
        }
        assert_eq!(
            decode(&buf),
            Ok(Decoded::Frame {
                kind: 7,
                payload: b"hello",
                consumed: buf.len()
            })
        );
    }

    #[test]
    fn oversized_length_rejected_before_body() {
        let buf = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            decode(&buf),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        assert_eq!(decode(&[0, 0, 0, 0]), Err(ProtocolError::EmptyFrame));
    }
}
