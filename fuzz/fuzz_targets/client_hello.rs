//! Random bytes as the first bytes on the shared TLS port: the SNI parser must never panic,
//! and a found name must be a plain host name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringtunnel::protocol::sni::{parse_client_hello, Sni};

fuzz_target!(|data: &[u8]| {
    if let Ok(Sni::Found(name)) = parse_client_hello(data) {
        assert!(!name.is_empty() && name.len() <= 253);
        assert!(name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)));
    }
});
