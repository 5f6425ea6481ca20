//! Primitive field encoding shared by the message types: big-endian integers, fixed byte
//! arrays, and strings with a `u16` length prefix. The reader never panics and never trusts a
//! length it has not checked against the bytes actually present.

use super::ProtocolError;

/// Cursor over a frame payload.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    msg: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], msg: &'static str) -> Self {
        Self { buf, msg }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated(self.msg));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, ProtocolError> {
        let len = self.u16()? as usize;
        let raw = self.bytes(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| ProtocolError::InvalidField {
            msg: self.msg,
            field,
        })
    }

    pub(crate) fn finish(self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::TrailingBytes(self.msg))
        }
    }

    pub(crate) fn invalid(&self, field: &'static str) -> ProtocolError {
        ProtocolError::InvalidField {
            msg: self.msg,
            field,
        }
    }
}

/// Appends a string with a `u16` length prefix, truncating (at a char boundary) anything past
/// `u16::MAX` bytes so that encoding never fails.
pub(crate) fn put_string(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}
