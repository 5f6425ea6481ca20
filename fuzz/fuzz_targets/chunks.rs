//! Random bytes as a data connection's chunk stream, fed in two pieces at a fuzzed cut: the
//! deframer must never panic, never return a range outside its input, and must decode the same
//! visitor bytes however the stream is cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringtunnel::protocol::chunk::{Deframer, Piece};

/// Visitor bytes and whether the stream ended (END or RAW), or `None` on a bad header.
fn decode(pieces: &[&[u8]]) -> Option<(Vec<u8>, bool)> {
    let mut d = Deframer::new();
    let mut out = Vec::new();
    for piece in pieces {
        let mut input = *piece;
        loop {
            match d.next(input).ok()? {
                Piece::Data(r) => {
                    assert!(r.start <= r.end && r.end <= input.len());
                    out.extend_from_slice(&input[r.clone()]);
                    input = &input[r.end..];
                }
                Piece::End { used } | Piece::Raw { used } => {
                    assert!(used <= input.len());
                    return Some((out, true));
                }
                Piece::NeedMore => break,
            }
        }
    }
    Some((out, false))
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, wire)) = data.split_first() else {
        return;
    };
    let cut = cut as usize % (wire.len() + 1);
    let whole = decode(&[wire]);
    let split = decode(&[&wire[..cut], &wire[cut..]]);
    if let (Some(a), Some(b)) = (whole, split) {
        assert_eq!(a, b);
    }
});
