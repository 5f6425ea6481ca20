//! TLS 1.3 records sealed and opened in place in user space, with the traffic keys rustls
//! hands over after its handshake: what kTLS does in the kernel ([`super::ktls`]), for hosts
//! whose kernel has no `tls` ULP.
//!
//! rustls' buffered API copies every byte three times on the way in (socket buffer → its
//! deframer → its plaintext queue → the caller) and once on the way out. Sealing in place
//! lets a worker `recv` plaintext straight into the record it will send, and decrypt
//! ciphertext where it was received: measured on one core, those copies were a quarter of a
//! TLS data connection's CPU (docs/DATAPLANE.md, "TLS records sealed in place").
//!
//! Only what a data connection meets after the handshake is understood (RFC 8446 §5):
//! application data; `close_notify` (the end of the stream); session tickets (skipped). Any
//! other alert, a `KeyUpdate` (the traffic secret needed to follow it is not handed over) or
//! a record that fails authentication is an error that ends the connection, never bytes
//! passed on unauthenticated. A key is never used for more than [`KEY_LIMIT`] records.

use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

use super::ktls::{only_session_tickets, ALERT_CLOSE_NOTIFY, CONTENT_ALERT, CONTENT_HANDSHAKE};
use super::ktls::{CONTENT_APPLICATION_DATA, RECORD_BUDGET};

/// Bytes of a record's header: type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// Bytes of the AEAD tag after each record's ciphertext (all three TLS 1.3 AEADs).
pub const TAG_LEN: usize = 16;
/// Most plaintext one record carries (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Bytes a sealed record adds to its plaintext: header, inner content type, tag.
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;
/// Bytes of a full record as this module seals it (no padding).
pub const FULL_RECORD: usize = MAX_PLAINTEXT + OVERHEAD;
/// Largest ciphertext body a peer may send (RFC 8446 §5.2: 2^14 + 256).
const MAX_BODY: usize = MAX_PLAINTEXT + 256;
/// Records one key may seal or open: AES-GCM's confidentiality limit (RFC 8446 §5.5, about
/// 2^24.5 full records; rustls rekeys at 2^24). A connection retires at [`RECORD_BUDGET`]
/// between visitors; one visitor that gets here is cut, since this module cannot rekey.
pub const KEY_LIMIT: u64 = 1 << 24;

const _: () = assert!(RECORD_BUDGET < KEY_LIMIT);

/// Why a record could not be sealed or opened. Each ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// rustls negotiated a cipher suite this module has no AEAD for.
    #[error("no in-place sealing for this cipher suite")]
    Unsupported,
    /// The header is not a TLS 1.3 protected record's (type 23, version 0x0303, a length
    /// between a tag and 2^14 + 256).
    #[error("bad TLS record header {0:02x?}")]
    BadHeader([u8; HEADER_LEN]),
    /// The record failed authentication (`bad_record_mac`).
    #[error("TLS record failed authentication")]
    Decrypt,
    /// The inner plaintext is all padding, or longer than 2^14.
    #[error("malformed TLS inner plaintext")]
    Malformed,
    /// The peer sent an alert other than `close_notify`.
    #[error("TLS alert {0} from the peer")]
    Alert(u8),
    /// A handshake message other than a session ticket (a `KeyUpdate`).
    #[error("TLS handshake message {0} after the handshake: keys sealed in place cannot be updated, connection closed")]
    Handshake(u8),
    /// A content type TLS 1.3 does not protect.
    #[error("TLS record of content type {0}")]
    ContentType(u8),
    /// [`KEY_LIMIT`] records under one key.
    #[error("TLS key used for {KEY_LIMIT} records: connection closed")]
    KeyExhausted,
}

/// What an opened record holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data, at this range of the buffer given to [`Records::open`] (may be
    /// empty: TLS 1.3 allows zero-length data records).
    Data(Range<usize>),
    /// `close_notify`: the peer's stream ended cleanly.
    Closed,
    /// Session tickets, which a data connection never uses.
    Skipped,
}

/// One direction's key, IV and record sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Direction, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::Unsupported),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Unsupported)?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::Unsupported)?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next record's nonce: the IV XOR the 64-bit sequence number, right-aligned.
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        if self.seq >= KEY_LIMIT {
            return Err(RecordError::KeyExhausted);
        }
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// A TLS 1.3 connection's record protection after the handshake, both ways.
pub struct Records {
    tx: Direction,
    rx: Direction,
}

impl Records {
    /// Takes over from rustls with the secrets it extracted (`dangerous_extract_secrets`),
    /// which must be TLS 1.3's: the caller checks the protocol version first.
    pub fn new(secrets: &ExtractedSecrets) -> Result<Records, RecordError> {
        Ok(Records {
            tx: Direction::new(secrets.tx.0, &secrets.tx.1)?,
            rx: Direction::new(secrets.rx.0, &secrets.rx.1)?,
        })
    }

    /// Seals one application data record in place. `record[HEADER_LEN..HEADER_LEN + len]`
    /// holds the plaintext (`len` at most [`MAX_PLAINTEXT`]) and `record` has room for
    /// [`OVERHEAD`] bytes more; the header, content type and tag are written around it.
    /// Returns the record's length.
    pub fn seal(&mut self, record: &mut [u8], len: usize) -> Result<usize, RecordError> {
        self.seal_as(record, len, CONTENT_APPLICATION_DATA)
    }

    /// [`Self::seal`] for a record whose inner content type is `kind`.
    fn seal_as(&mut self, record: &mut [u8], len: usize, kind: u8) -> Result<usize, RecordError> {
        assert!(len <= MAX_PLAINTEXT && record.len() >= len + OVERHEAD);
        let body = len + 1 + TAG_LEN;
        // Every protected record travels as application data (RFC 8446 §5.2).
        let header = [
            CONTENT_APPLICATION_DATA,
            3,
            3,
            (body >> 8) as u8,
            body as u8,
        ];
        record[..HEADER_LEN].copy_from_slice(&header);
        record[HEADER_LEN + len] = kind;
        let nonce = self.tx.next_nonce()?;
        let inner = &mut record[HEADER_LEN..HEADER_LEN + len + 1];
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), inner)
            .map_err(|_| RecordError::Unsupported)?;
        record[HEADER_LEN + len + 1..HEADER_LEN + body].copy_from_slice(tag.as_ref());
        Ok(HEADER_LEN + body)
    }

    /// Seals all of `data` as records appended to `out` (for control messages and rewritten
    /// request heads: small, and copied once).
    pub fn seal_to(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        while !data.is_empty() {
            let len = data.len().min(MAX_PLAINTEXT);
            let at = out.len();
            out.resize(at + len + OVERHEAD, 0);
            out[at + HEADER_LEN..at + HEADER_LEN + len].copy_from_slice(&data[..len]);
            self.seal(&mut out[at..], len)?;
            data = &data[len..];
        }
        Ok(())
    }

    /// The length of the record at the start of `buf` once all of it is there; `None` while
    /// it is incomplete. A header no TLS 1.3 peer sends is an error at once, so garbage is
    /// never waited on.
    pub fn next_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
        let Some(header) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let body = u16::from_be_bytes([header[3], header[4]]) as usize;
        if header[0] != CONTENT_APPLICATION_DATA
            || header[1..3] != [3, 3]
            || !(TAG_LEN + 1..=MAX_BODY).contains(&body)
        {
            let mut h = [0; HEADER_LEN];
            h.copy_from_slice(header);
            return Err(RecordError::BadHeader(h));
        }
        let len = HEADER_LEN + body;
        Ok((buf.len() >= len).then_some(len))
    }

    /// Opens the record `record` (exactly one, as measured by [`Self::next_len`]) in place.
    pub fn open(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        let mut header = [0; HEADER_LEN];
        header.copy_from_slice(&record[..HEADER_LEN]);
        let nonce = self.rx.next_nonce()?;
        let inner = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(header), &mut record[HEADER_LEN..])
            .map_err(|_| RecordError::Decrypt)?;
        // The content type is the last byte that is not padding.
        let end = inner
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(RecordError::Malformed)?;
        if end > MAX_PLAINTEXT {
            return Err(RecordError::Malformed);
        }
        let body = &inner[..end];
        match inner[end] {
            CONTENT_APPLICATION_DATA => Ok(Opened::Data(HEADER_LEN..HEADER_LEN + end)),
            CONTENT_ALERT if body.len() == 2 && body[1] == ALERT_CLOSE_NOTIFY => Ok(Opened::Closed),
            CONTENT_ALERT if body.len() == 2 => Err(RecordError::Alert(body[1])),
            CONTENT_ALERT => Err(RecordError::Malformed),
            CONTENT_HANDSHAKE if only_session_tickets(body) => Ok(Opened::Skipped),
            CONTENT_HANDSHAKE => Err(RecordError::Handshake(body.first().copied().unwrap_or(0))),
            other => Err(RecordError::ContentType(other)),
        }
    }

    /// Records sealed or opened under the current keys, whichever is more: a connection
    /// retires between visitors once this passes [`RECORD_BUDGET`].
    pub fn used(&self) -> u64 {
        self.tx.seq.max(self.rx.seq)
    }
}

/// Hands a finished TLS 1.3 handshake's record protection over from rustls. Consumes
/// `conn`; fails (the connection is then lost) unless rustls has sent everything it queued,
/// so the caller checks [`can_take_over`] first and drains any plaintext rustls holds.
pub fn take_over(conn: rustls::Connection) -> Result<Records, TakeOverError> {
    let secrets = conn.dangerous_extract_secrets()?;
    Ok(Records::new(&secrets)?)
}

/// Whether [`take_over`] would succeed: TLS 1.3, handshake done, no record left to send, and
/// a cipher suite sealed here. (TLS 1.2 data connections stay with rustls.)
pub fn can_take_over(conn: &rustls::Connection) -> bool {
    use rustls::CipherSuite as S;
    let suite = conn.negotiated_cipher_suite().map(|s| s.suite());
    conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
        && !conn.is_handshaking()
        && !conn.wants_write()
        && matches!(
            suite,
            Some(S::TLS13_AES_128_GCM_SHA256)
                | Some(S::TLS13_AES_256_GCM_SHA384)
                | Some(S::TLS13_CHACHA20_POLY1305_SHA256)
        )
}

/// Why [`take_over`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    /// rustls refused to hand over its secrets.
    #[error("extracting TLS secrets: {0}")]
    Extract(#[from] rustls::Error),
    /// The secrets were of a kind this module cannot use.
    #[error(transparent)]
    Records(#[from] RecordError),
}

#[cfg(test)]
mod tests {
    //! Interop with rustls itself: one end of an in-memory handshake hands its keys over, the
    //! other stays rustls, and records go both ways.

    use std::io::{Read, Write};

    use rustls_pki_types::ServerName;

    use super::*;
    use crate::tls::{client_config, server_config, RelayIdentity, RelayTrust};

    /// A fresh client and server of ringtunnel's own configurations, nothing exchanged yet.
    fn connections(name: &str) -> (rustls::ClientConnection, rustls::ServerConnection) {
        let dir =
            std::env::temp_dir().join(format!("ringtunnel-records-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let identity = RelayIdentity::load_or_create(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let server = rustls::ServerConnection::new(server_config(&identity).unwrap()).unwrap();
        let trust = RelayTrust::Pinned(identity.fingerprint);
        let sni = ServerName::try_from("relay.test").unwrap();
        let client = rustls::ClientConnection::new(client_config(&trust).unwrap(), sni).unwrap();
        (client, server)
    }

    /// One flight each way in memory: what the client has queued to the server, then back.
    fn round_trip(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) {
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap();
        server.read_tls(&mut wire.as_slice()).unwrap();
        server.process_new_packets().unwrap();
        wire.clear();
        server.write_tls(&mut wire).unwrap();
        client.read_tls(&mut wire.as_slice()).unwrap();
        client.process_new_packets().unwrap();
    }

    /// A handshake done in memory; returns the client (still rustls) and the server's
    /// records, taken over once it has sent its session tickets.
    fn pair(name: &str) -> (rustls::ClientConnection, Records) {
        let (mut client, mut server) = connections(name);
        while client.is_handshaking() || server.is_handshaking() || server.wants_write() {
            round_trip(&mut client, &mut server);
        }
        let server = rustls::Connection::from(server);
        assert!(can_take_over(&server));
        (client, take_over(server).unwrap())
    }

    /// A sealed `close_notify` alert.
    fn close_notify(records: &mut Records) -> Vec<u8> {
        let mut record = vec![0u8; 2 + OVERHEAD];
        record[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&[1, ALERT_CLOSE_NOTIFY]);
        records.seal_as(&mut record, 2, CONTENT_ALERT).unwrap();
        record
    }

    /// Opens every record in `wire`, collecting data and what else came.
    fn open_all(records: &mut Records, mut wire: Vec<u8>) -> (Vec<u8>, Vec<Opened>) {
        let (mut data, mut other, mut at) = (Vec::new(), Vec::new(), 0);
        while let Some(len) = Records::next_len(&wire[at..]).unwrap() {
            match records.open(&mut wire[at..at + len]).unwrap() {
                Opened::Data(r) => data.extend_from_slice(&wire[at..][r]),
                o => other.push(o),
            }
            at += len;
        }
        assert_eq!(at, wire.len(), "a record left incomplete");
        (data, other)
    }

    #[test]
    fn records_sealed_here_are_read_by_rustls_and_back() {
        let (mut client, mut records) = pair("both-ways");
        // Client → here: rustls splits 40 000 bytes into three records.
        let up: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
        client.writer().write_all(&up).unwrap();
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let (got, other) = open_all(&mut records, wire);
        assert!(other.is_empty(), "{other:?}");
        assert!(got == up);
        // Here → client: a full record sealed in place, then a few small ones.
        let mut wire = Vec::new();
        let mut record = vec![0u8; FULL_RECORD];
        record[HEADER_LEN..HEADER_LEN + MAX_PLAINTEXT].fill(7);
        let n = records.seal(&mut record, MAX_PLAINTEXT).unwrap();
        assert_eq!(n, FULL_RECORD);
        wire.extend_from_slice(&record[..n]);
        records.seal_to(b"hello", &mut wire).unwrap();
        records.seal_to(&[], &mut wire).unwrap();
        wire.extend_from_slice(&close_notify(&mut records));
        let mut rd = wire.as_slice();
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
        }
        let mut down = Vec::new();
        client.reader().read_to_end(&mut down).unwrap(); // Ok only after close_notify
        assert_eq!(down.len(), MAX_PLAINTEXT + 5);
        assert!(down[..MAX_PLAINTEXT].iter().all(|&b| b == 7));
        assert_eq!(&down[MAX_PLAINTEXT..], b"hello");
        assert_eq!(records.used(), 4);
    }

    #[test]
    fn close_notify_from_rustls_is_the_end_and_other_alerts_are_errors() {
        let (mut client, mut records) = pair("close");
        client.send_close_notify();
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap();
        let (_, other) = open_all(&mut records, wire);
        assert_eq!(other.last(), Some(&Opened::Closed));
        // A KeyUpdate from rustls cannot be followed: an error, never data.
        let (mut client, mut records) = pair("keyupdate");
        client.refresh_traffic_keys().unwrap();
        client.writer().write_all(b"after").unwrap();
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut at = 0;
        let err = loop {
            let len = Records::next_len(&wire[at..]).unwrap().unwrap();
            match records.open(&mut wire[at..at + len]) {
                Ok(Opened::Skipped) => at += len,
                Ok(o) => panic!("{o:?} before the KeyUpdate"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, RecordError::Handshake(24)), "{err}");
    }

    #[test]
    fn session_tickets_after_the_hand_over_are_skipped() {
        // The client hands over as soon as its handshake is done; the server's tickets, sent
        // once it reads the client's Finished, reach the records, followed by data.
        let (mut client, mut server) = connections("tickets");
        while client.is_handshaking() {
            round_trip(&mut client, &mut server);
        }
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap(); // the client's Finished
        let client = rustls::Connection::from(client);
        assert!(can_take_over(&client));
        let mut records = take_over(client).unwrap();
        server.read_tls(&mut wire.as_slice()).unwrap();
        server.process_new_packets().unwrap();
        server.writer().write_all(b"after the tickets").unwrap();
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire).unwrap();
        }
        let (data, other) = open_all(&mut records, wire);
        assert!(!other.is_empty() && other.iter().all(|o| *o == Opened::Skipped));
        assert_eq!(data, b"after the tickets");
    }

    #[test]
    fn tampered_or_malformed_records_are_refused() {
        let (mut client, mut records) = pair("tamper");
        client.writer().write_all(b"secret").unwrap();
        let mut wire = Vec::new();
        client.write_tls(&mut wire).unwrap();
        // One bit flipped in the ciphertext.
        assert_eq!(Records::next_len(&wire).unwrap(), Some(wire.len()));
        wire[HEADER_LEN + 2] ^= 1;
        let e = records.open(&mut wire).unwrap_err();
        assert!(matches!(e, RecordError::Decrypt), "{e}");
        // Headers no TLS 1.3 peer sends are refused before any wait for a body.
        for header in [
            [22, 3, 3, 0, 40],   // a handshake record
            [23, 3, 1, 0, 40],   // another version
            [23, 3, 3, 0, 16],   // shorter than a tag and a type
            [23, 3, 3, 0x41, 1], // longer than 2^14 + 256
            *b"GET /",           // not TLS at all
        ] {
            let e = Records::next_len(&header).unwrap_err();
            assert!(matches!(e, RecordError::BadHeader(_)), "{header:?}: {e}");
        }
        assert_eq!(Records::next_len(&[23, 3, 3, 0, 40, 1]).unwrap(), None);
        assert_eq!(Records::next_len(&[23, 3]).unwrap(), None);
    }

    #[test]
    fn a_key_is_never_used_past_its_limit() {
        let (_, mut records) = pair("limit");
        records.tx.seq = KEY_LIMIT - 1;
        let mut record = vec![0u8; 1 + OVERHEAD];
        records.seal(&mut record, 1).unwrap();
        let e = records.seal(&mut record, 1).unwrap_err();
        assert!(matches!(e, RecordError::KeyExhausted), "{e}");
        assert_eq!(records.used(), KEY_LIMIT);
    }
}
