//! The visitor → tunnel direction of an HTTP visitor whose request heads are rewritten: what
//! each read becomes on the tunnel, for every forwarder of both backends.

use std::io;

use crate::protocol::chunk;
use crate::protocol::http::requests::Requests;

/// Visitor bytes `data` passed through `requests` and framed as chunks for the tunnel. Empty
/// when nothing is ready to go yet (a head still arriving). A stream the reader refuses (two
/// lengths, a request for another host) is an `InvalidData` error: the forwarder ends the
/// visitor.
pub fn chunks(requests: &mut Requests, data: &[u8]) -> io::Result<Vec<u8>> {
    // Rewritten straight after room for one chunk header, which is filled in after.
    let mut out = Vec::with_capacity(chunk::HEADER_LEN + data.len() + 256);
    out.extend_from_slice(&[0; chunk::HEADER_LEN]);
    requests
        .feed(data, &mut out)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let len = out.len() - chunk::HEADER_LEN;
    if len == 0 {
        out.clear();
    } else if len <= chunk::MAX_CHUNK {
        out[..chunk::HEADER_LEN].copy_from_slice(&chunk::header(len as u32));
    } else {
        // A full read that grew past one chunk: frame it again.
        let mut framed = Vec::with_capacity(len + 2 * chunk::HEADER_LEN);
        chunk::push_chunks(&mut framed, &out[chunk::HEADER_LEN..]);
        out = framed;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::chunk::{Deframer, Piece};
    use crate::protocol::http::Trust;

    #[test]
    fn rewritten_reads_are_framed_as_chunks_of_any_size() {
        let mut r = Requests::new("10.0.0.1:1".parse().unwrap(), Trust::None, 16 * 1024);
        assert!(
            chunks(&mut r, b"GET / HTTP/1.1\r\nHo").unwrap().is_empty(),
            "a head arriving"
        );
        let body = vec![b'x'; chunk::MAX_CHUNK];
        let mut input = format!("st: a\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        input.extend_from_slice(&body);
        let wire = chunks(&mut r, &input).unwrap();
        let mut d = Deframer::default();
        let (mut rest, mut got) = (&wire[..], Vec::new());
        while !rest.is_empty() {
            match d.next(rest).unwrap() {
                Piece::Data(range) => {
                    got.extend_from_slice(&rest[range.clone()]);
                    rest = &rest[range.end..];
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(got.starts_with(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(got.ends_with(&body));
        assert!(r.at_boundary());
    }
}
