//! Random bytes as a PROXY header: the parser must never panic or claim bytes it was not given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringtunnel::protocol::proxy::parse;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = parse(data) {
        assert!(h.len <= data.len());
    }
});
