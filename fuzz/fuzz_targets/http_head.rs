//! Random bytes as a visitor's first request head: the parser must never panic, never claim
//! more bytes than it was given or than the limit, and its forwarded-header rewrite of any
//! head it accepts must parse again to the same host. The incremental scanner, fed the same
//! bytes in chunks, must answer either "need more" or exactly what the parser says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringtunnel::protocol::http::{add_forwarded, parse_head, HeadScanner, Trust};

fuzz_target!(|data: &[u8]| {
    let max = 4096;
    if let Ok(Some(head)) = parse_head(data, max) {
        assert!(head.len <= data.len() && head.len <= max);
        let visitor = "192.0.2.1:1234".parse().unwrap();
        let rewritten = add_forwarded(&data[..head.len], visitor, "http", &head.host, Trust::Proxy);
        let again = parse_head(&rewritten, rewritten.len() + 1)
            .expect("rewritten head parses")
            .expect("rewritten head is complete");
        assert_eq!(again.host, head.host);
        assert_eq!(again.len, rewritten.len());
    }
    let chunk = usize::from(data.first().copied().unwrap_or(0) % 16) + 1;
    let mut scanner = HeadScanner::new(max);
    let mut end = 0;
    while end < data.len() {
        end = (end + chunk).min(data.len());
        match scanner.feed(&data[..end]) {
            Ok(None) => continue,
            answer => {
                assert_eq!(answer, parse_head(&data[..end], max));
                break;
            }
        }
    }
});
