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
    let mut plain = Vec::with_capacity(data.len() + 256);
    requests
        .feed(data, &mut plain)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut framed = Vec::with_capacity(plain.len() + chunk::HEADER_LEN);
    chunk::push_chunks(&mut framed, &plain);
    Ok(framed)
}
