//! Random bytes as frames from either peer: decoding must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringtunnel::protocol::msg::Message;
use ringtunnel::protocol::{AgentMsg, RelayMsg};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, used))) = AgentMsg::decode(data) {
        assert!(used <= data.len());
    }
    if let Ok(Some((_, used))) = RelayMsg::decode(data) {
        assert!(used <= data.len());
    }
});
