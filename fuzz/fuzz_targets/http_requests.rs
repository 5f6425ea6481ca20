//! Random bytes as everything a visitor sends on a kept-alive HTTP connection: the request
//! reader must never panic, and when the bytes are accepted both whole and split into reads,
//! both give the same output. (A split stream may be refused later than the whole one, as the
//! head scanner answers "need more" until a head can have ended.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringtunnel::protocol::http::requests::Requests;
use ringtunnel::protocol::http::Trust;

fuzz_target!(|data: &[u8]| {
    let visitor = "192.0.2.1:1234".parse().unwrap();
    let mut whole = Requests::new(visitor, Trust::None, 4096);
    let mut expected = Vec::new();
    let whole_ok = whole.feed(data, &mut expected).is_ok();
    let step = usize::from(data.first().copied().unwrap_or(0) % 32) + 1;
    let mut split = Requests::new(visitor, Trust::None, 4096);
    let mut got = Vec::new();
    let mut split_ok = true;
    for piece in data.chunks(step) {
        if split.feed(piece, &mut got).is_err() {
            split_ok = false;
            break;
        }
    }
    if whole_ok && split_ok {
        assert_eq!(expected, got);
    }
});
