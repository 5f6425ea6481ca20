//! Kernel TLS (kTLS) for data connections: after rustls' handshake the traffic keys go to the
//! kernel (`TCP_ULP "tls"`, then `TLS_TX`/`TLS_RX`), and the socket carries plaintext for
//! `send`, `recv` and `splice` while the kernel encrypts and decrypts records. A TLS data
//! connection is then spliced like a plain one instead of copied through rustls.
//!
//! What the kernel does not do is left to this module:
//! - **Records other than application data.** A `recv` meets them as `EIO`, a `splice` as
//!   `EINVAL`; [`after_read_error`] reads the record with `recvmsg` and says what it means: a
//!   `close_notify` alert is the end of the stream, a session ticket is skipped, anything else
//!   (a `KeyUpdate`, another alert) ends the connection with an error, never with bytes the
//!   kernel could not authenticate.
//! - **`close_notify`.** The kernel sends none at `shutdown`; [`close_notify`] sends it, so
//!   a rustls peer (a relay or agent without kTLS) sees a clean end, not a truncation.
//! - **Key usage limits.** The kernel counts records but never rekeys (kernels before 6.14
//!   cannot take new keys at all). [`records_used`] reads the counts so a connection is retired
//!   before its cipher's confidentiality limit.
//!
//! [`probe`] checks once whether the kernel has the `tls` ULP; without it data connections
//! keep rustls, unchanged. `RINGTUNNEL_KTLS=off` turns offload off.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::OnceLock;

use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

/// `SOL_TLS` options and control messages (linux/tls.h).
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const TLS_GET_RECORD_TYPE: libc::c_int = 2;
const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// TLS record content types (RFC 8446 §5.1) and the handshake messages met after one.
pub(crate) const CONTENT_ALERT: u8 = 21;
pub(crate) const CONTENT_HANDSHAKE: u8 = 22;
pub(crate) const CONTENT_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_NEW_SESSION_TICKET: u8 = 4;
pub(crate) const ALERT_CLOSE_NOTIFY: u8 = 0;

/// Records a connection may carry under one key, either way, before it is retired: half of
/// AES-GCM's 2^24 (rustls' confidentiality limit), so the check at a visitor's end has room
/// to spare.
pub const RECORD_BUDGET: u64 = 1 << 23;

/// Why a connection could not be offloaded. The connection is lost either way (rustls gave
/// its keys away), so callers probe [`available`] first and only meet these on a kernel fault.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    /// rustls refused to hand over the keys (handshake not done, records still queued).
    #[error("extracting TLS secrets: {0}")]
    Extract(#[from] rustls::Error),
    /// A protocol version or cipher suite the kernel has no offload for.
    #[error("kTLS cannot take {0}")]
    Unsupported(&'static str),
    /// A `setsockopt` failed.
    #[error("kTLS {step}: {error}")]
    Kernel {
        /// Which option.
        step: &'static str,
        /// The kernel's answer.
        error: io::Error,
    },
}

/// Environment variable that turns kTLS offload off (`RINGTUNNEL_KTLS=off`): TLS data
/// connections then copy through rustls even where the kernel has the ULP.
pub const KTLS_ENV: &str = "RINGTUNNEL_KTLS";

/// `Ok(())` if TLS data connections can be offloaded here (the kernel has the `tls` ULP and
/// [`KTLS_ENV`] is not `off`), else why not, in words for the log. Probed once, on an
/// unconnected TCP socket: a present module answers `ENOTCONN` (and one built but not yet loaded
/// is loaded by the kernel on that request), a missing one `ENOENT`.
pub fn probe() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe_once).clone()
}

/// Whether [`probe`] found kTLS usable.
pub fn available() -> bool {
    probe().is_ok()
}

fn probe_once() -> Result<(), String> {
    if std::env::var(KTLS_ENV).is_ok_and(|v| v == "off") {
        return Err(format!("turned off by {KTLS_ENV}=off"));
    }
    // An unbound socket: the probe needs no address (nor a loopback that is up).
    let sock = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )
    .map_err(|e| format!("probing kTLS: {e}"))?;
    match set_ulp(sock.as_raw_fd()) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(
            "the kernel has no tls ULP (/proc/sys/net/ipv4/tcp_available_ulp lacks `tls`)".into(),
        ),
        Err(e) => Err(format!("setsockopt(TCP_ULP, \"tls\"): {e}")),
    }
}

fn set_ulp(fd: libc::c_int) -> io::Result<()> {
    setsockopt(fd, libc::SOL_TCP, libc::TCP_ULP, b"tls")
}

fn setsockopt(fd: libc::c_int, level: libc::c_int, name: libc::c_int, v: &[u8]) -> io::Result<()> {
    // SAFETY: `v` is valid for `v.len()` bytes; the kernel copies it before returning.
    let rc = unsafe { libc::setsockopt(fd, level, name, v.as_ptr().cast(), v.len() as _) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Hands `conn`'s traffic keys to the kernel for the connected socket `fd`. Consumes `conn`:
/// on error the connection cannot go on (close it). The caller makes sure rustls holds no
/// received bytes it has not given out (the kernel starts at the next record on the socket).
pub fn offload(fd: BorrowedFd<'_>, conn: impl Into<rustls::Connection>) -> Result<(), KtlsError> {
    let conn = conn.into();
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => TLS_1_3_VERSION,
        Some(ProtocolVersion::TLSv1_2) => TLS_1_2_VERSION,
        _ => return Err(KtlsError::Unsupported("this TLS version")),
    };
    let secrets = conn.dangerous_extract_secrets()?;
    let tx = crypto_info(version, secrets.tx.0, &secrets.tx.1)?;
    let rx = crypto_info(version, secrets.rx.0, &secrets.rx.1)?;
    let raw = fd.as_raw_fd();
    let kernel = |step| move |error| KtlsError::Kernel { step, error };
    set_ulp(raw).map_err(kernel("TCP_ULP"))?;
    setsockopt(raw, libc::SOL_TLS, TLS_TX, &tx).map_err(kernel("TLS_TX"))?;
    setsockopt(raw, libc::SOL_TLS, TLS_RX, &rx).map_err(kernel("TLS_RX"))?;
    Ok(())
}

/// The kernel's `tls12_crypto_info_*` struct for one direction, as bytes: version and cipher,
/// then (AES-GCM) the explicit IV, key, salt and record sequence, or (ChaCha20-Poly1305) the
/// whole IV, key and record sequence. rustls' 12-byte IV is salt (4) + IV (8) for AES-GCM.
fn crypto_info(
    version: u16,
    seq: u64,
    secrets: &ConnectionTrafficSecrets,
) -> Result<Vec<u8>, KtlsError> {
    let (cipher, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (TLS_CIPHER_AES_GCM_128, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (TLS_CIPHER_AES_GCM_256, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (TLS_CIPHER_CHACHA20_POLY1305, key, iv)
        }
        _ => return Err(KtlsError::Unsupported("this cipher suite")),
    };
    let (key, iv) = (key.as_ref(), iv.as_ref());
    let mut info = Vec::with_capacity(64);
    info.extend_from_slice(&version.to_ne_bytes());
    info.extend_from_slice(&cipher.to_ne_bytes());
    if cipher == TLS_CIPHER_CHACHA20_POLY1305 {
        info.extend_from_slice(iv);
        info.extend_from_slice(key);
    } else {
        info.extend_from_slice(&iv[4..]);
        info.extend_from_slice(key);
        info.extend_from_slice(&iv[..4]);
    }
    info.extend_from_slice(&seq.to_be_bytes());
    Ok(info)
}

/// What a read that failed on an offloaded socket meant.
#[derive(Debug, PartialEq, Eq)]
pub enum Control {
    /// The peer sent `close_notify`: the stream ended cleanly (read as EOF).
    Closed,
    /// A record with nothing for the stream (a session ticket): read again.
    Skipped,
}

/// After a `recv` failed with `EIO` or a `splice` from the socket with `EINVAL`: if `fd` is an
/// offloaded socket whose next record is not application data, reads that record and says what
/// it was; otherwise (or for a record that ends the connection) returns `error`, or an error
/// naming the record. Called only on those errors, so plain sockets never pay for it.
pub fn after_read_error(fd: BorrowedFd<'_>, error: io::Error) -> io::Result<Control> {
    let wanted = matches!(error.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL));
    if !wanted {
        return Err(error);
    }
    let (kind, body) = match read_control_record(fd)? {
        Some(record) => record,
        None => return Err(error),
    };
    match kind {
        CONTENT_ALERT if body.get(1) == Some(&ALERT_CLOSE_NOTIFY) => Ok(Control::Closed),
        CONTENT_ALERT => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!(
                "TLS alert {} from the peer",
                body.get(1).copied().unwrap_or(0)
            ),
        )),
        CONTENT_HANDSHAKE if only_session_tickets(&body) => Ok(Control::Skipped),
        CONTENT_HANDSHAKE => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "TLS handshake message (KeyUpdate) on an offloaded connection: this kernel cannot \
             rekey, connection closed",
        )),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("TLS record of type {other} on an offloaded connection"),
        )),
    }
}

/// Whether a handshake record holds only `NewSessionTicket` messages (type, 24-bit length).
pub(crate) fn only_session_tickets(mut body: &[u8]) -> bool {
    if body.is_empty() {
        return false;
    }
    while body.len() >= 4 {
        let len = u32::from_be_bytes([0, body[1], body[2], body[3]]) as usize;
        if body[0] != HANDSHAKE_NEW_SESSION_TICKET || body.len() < 4 + len {
            return false;
        }
        body = &body[4 + len..];
    }
    body.is_empty()
}

/// Reads the next record with its type (`TLS_GET_RECORD_TYPE`); `None` when the socket gave
/// no record type (not offloaded) or the record was application data after all.
fn read_control_record(fd: BorrowedFd<'_>) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut body = vec![0u8; 16 * 1024 + 256];
    let mut iov = libc::iovec {
        iov_base: body.as_mut_ptr().cast(),
        iov_len: body.len(),
    };
    // u64 elements keep the buffer aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: zeroed msghdr is a valid empty header; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` describes buffers owned by this frame.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    body.truncate(n as usize);
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    let mut kind = None;
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_TLS && (*cmsg).cmsg_type == TLS_GET_RECORD_TYPE {
                kind = Some(*libc::CMSG_DATA(cmsg));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    match kind {
        Some(CONTENT_APPLICATION_DATA) | None if n > 0 => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "data read while looking for a TLS control record",
        )),
        Some(kind) => Ok(Some((kind, body))),
        None => Ok(None),
    }
}

/// Sends a `close_notify` alert on an offloaded socket, before its writer is shut. Errors are
/// ignored: the connection is ending either way, and the peer then sees a truncation.
pub fn close_notify(fd: BorrowedFd<'_>) {
    let mut alert = [1u8, ALERT_CLOSE_NOTIFY]; // warning, close_notify
    let mut iov = libc::iovec {
        iov_base: alert.as_mut_ptr().cast(),
        iov_len: alert.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: as in `read_control_record`; the header written fits `control`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(1) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = CONTENT_ALERT;
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        );
    }
}

/// [`close_notify`] if `fd` is an offloaded socket (its ULP is `tls`). For the end of a
/// spliced direction, where one `getsockopt` per bulk visitor costs nothing and spares the
/// forwarder a flag in every connection's state.
pub fn close_notify_if_offloaded(fd: BorrowedFd<'_>) {
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: `name` is valid for `len` bytes; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc == 0 && name.starts_with(b"tls\0") {
        close_notify(fd);
    }
}

/// Records used so far under the current keys of an offloaded socket: the larger of the
/// kernel's send and receive record sequence numbers (`getsockopt(TLS_TX)`, `TLS_RX`). The
/// receive side is the peer's sending: a rustls peer rekeys at AES-GCM's limit, which this
/// kernel could not follow, so the connection retires before either side gets there.
pub fn records_used(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // The kernel wants the exact size of the cipher's struct: ask for the header first.
    let header = crypto_info_of(fd, TLS_TX, 4)?;
    let len = match u16::from_ne_bytes([header[2], header[3]]) {
        TLS_CIPHER_AES_GCM_128 => 40,
        TLS_CIPHER_AES_GCM_256 | TLS_CIPHER_CHACHA20_POLY1305 => 56,
        other => {
            let m = format!("cipher {other} in TLS_TX");
            return Err(io::Error::new(io::ErrorKind::Unsupported, m));
        }
    };
    // The record sequence is the struct's last 8 bytes, big-endian.
    let seq = |info: [u8; 64]| {
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&info[len - 8..len]);
        u64::from_be_bytes(seq)
    };
    let sent = seq(crypto_info_of(fd, TLS_TX, len)?);
    let received = seq(crypto_info_of(fd, TLS_RX, len)?);
    Ok(sent.max(received))
}

fn crypto_info_of(fd: BorrowedFd<'_>, direction: libc::c_int, len: usize) -> io::Result<[u8; 64]> {
    let mut info = [0u8; 64];
    let mut got = len as libc::socklen_t;
    // SAFETY: `info` is valid for 64 >= `len` bytes; the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TLS,
            direction,
            info.as_mut_ptr().cast(),
            &mut got,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_agrees_with_the_kernels_list_of_ulps() {
        let listed = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
            .is_ok_and(|s| s.split_whitespace().any(|u| u == "tls"));
        let off = std::env::var(KTLS_ENV).is_ok_and(|v| v == "off");
        match probe_once() {
            // A module not yet loaded is loaded by the probe itself, where modprobe works.
            Ok(()) => {}
            Err(why) if off => assert!(why.contains(KTLS_ENV), "{why}"),
            Err(why) => {
                assert!(!listed, "lists `tls` but the probe failed: {why}");
                assert!(why.contains("no tls ULP"), "{why}");
            }
        }
    }

    #[test]
    fn crypto_info_has_the_kernels_layout() {
        let key = rustls::crypto::cipher::AeadKey::from([7u8; 32]);
        let iv = rustls::crypto::cipher::Iv::new([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let gcm = crypto_info(
            TLS_1_3_VERSION,
            0x0102,
            &ConnectionTrafficSecrets::Aes256Gcm { key, iv },
        )
        .unwrap();
        // struct tls12_crypto_info_aes_gcm_256: 4 + iv 8 + key 32 + salt 4 + rec_seq 8.
        assert_eq!(gcm.len(), 56);
        assert_eq!(&gcm[4..12], &[5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(&gcm[44..48], &[1, 2, 3, 4]);
        assert_eq!(&gcm[48..], &[0, 0, 0, 0, 0, 0, 1, 2]);
        let key = rustls::crypto::cipher::AeadKey::from([7u8; 32]);
        let iv = rustls::crypto::cipher::Iv::new([9; 12]);
        let chacha = crypto_info(
            TLS_1_3_VERSION,
            0,
            &ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv },
        )
        .unwrap();
        // struct tls12_crypto_info_chacha20_poly1305: 4 + iv 12 + key 32 + rec_seq 8.
        assert_eq!(chacha.len(), 56);
        assert_eq!(&chacha[4..16], &[9; 12]);
    }

    #[test]
    fn only_session_tickets_are_skipped() {
        assert!(only_session_tickets(&[4, 0, 0, 2, 0xaa, 0xbb]));
        assert!(only_session_tickets(&[4, 0, 0, 0, 4, 0, 0, 1, 9]));
        // KeyUpdate (24), a cut message, an empty record.
        assert!(!only_session_tickets(&[24, 0, 0, 1, 0]));
        assert!(!only_session_tickets(&[4, 0, 0, 5, 1]));
        assert!(!only_session_tickets(&[]));
    }

    #[test]
    fn a_plain_socket_error_is_passed_through() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        use std::os::fd::AsFd;
        let e = io::Error::from_raw_os_error(libc::ECONNRESET);
        let back = after_read_error(s.as_fd(), e).unwrap_err();
        assert_eq!(back.raw_os_error(), Some(libc::ECONNRESET));
        // EIO on a plain socket with nothing queued: recvmsg would block, so that error comes
        // back and no byte is consumed.
        let e = io::Error::from_raw_os_error(libc::EIO);
        assert!(after_read_error(s.as_fd(), e).is_err());
        assert!(records_used(s.as_fd()).is_err());
    }
}
