//! User-space TLS on a worker, for data connections that cannot be spliced (TLS without kTLS).
//!
//! rustls is driven over the same non-blocking socket the splice path uses: the ring is only
//! used to wait for readiness, and records are read and written with plain `recv`/`send`.
//! Plaintext moves through the worker's scratch buffer, so an idle connection holds no buffer
//! of its own beyond rustls' state.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::fd::BorrowedFd;

use monoio::net::TcpStream;

use super::chunked::{both, cut_short, end_peer, Blocked, Ended, Unchunk};
use super::sockio::{self, fd};
use crate::dataplane::forwarded::{ForwardError, Forwarded, Outcome, Side};
use crate::dataplane::rewrite;
use crate::dataplane::sock::{recv_now, send_now, shutdown, Half};
use crate::dataplane::tally::{Count, Tally};
use crate::protocol::chunk::{self, HEADER_LEN};
use crate::protocol::http::requests::Requests;
use rustix::net::{SendAncillaryBuffer, SendFlags};

/// Bytes of plaintext or ciphertext one step moves: four full TLS records, so one `recv` or one
/// `sendmsg` carries several records (rustls alone reads 4 KiB per call).
const TLS_CHUNK: usize = 64 * 1024;

thread_local! {
    static PLAIN_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; TLS_CHUNK].into_boxed_slice());
    static CIPHER_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; TLS_CHUNK].into_boxed_slice());
}

/// Runs `f` on the worker's two TLS buffers (plaintext, ciphertext). `f` is sync, so tasks on
/// one worker never see each other's bytes in them.
fn with_buffers<R>(f: impl FnOnce(&mut [u8], &mut [u8]) -> R) -> R {
    PLAIN_BUF.with(|p| CIPHER_BUF.with(|c| f(&mut p.borrow_mut(), &mut c.borrow_mut())))
}

/// `io::Read`/`io::Write` straight on a non-blocking socket, for `read_tls`/`write_tls`.
struct FdIo<'a>(BorrowedFd<'a>);

impl Read for FdIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        recv_now(self.0, buf)?.ok_or_else(|| io::ErrorKind::WouldBlock.into())
    }
}

impl Write for FdIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match send_now(self.0, buf)? {
            0 if !buf.is_empty() => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }
    /// rustls hands over every queued record at once; one `sendmsg` sends them all (the
    /// default would send one record per syscall).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut no_control = SendAncillaryBuffer::default();
        match rustix::net::sendmsg(self.0, bufs, &mut no_control, SendFlags::NOSIGNAL) {
            Ok(n) => Ok(n),
            Err(rustix::io::Errno::AGAIN) => Err(io::ErrorKind::WouldBlock.into()),
            Err(e) => Err(e.into()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TLS connection (client or server side) on a non-blocking socket owned by one worker.
///
/// Both forwarding directions use it at once from one thread; the rustls state is borrowed only
/// between awaits, never across one.
pub struct TlsStream {
    sock: TcpStream,
    conn: RefCell<rustls::Connection>,
}

impl TlsStream {
    /// Wraps `sock` (already non-blocking) and a rustls connection that may still be
    /// handshaking or may hold records read by another runtime before the hand-over.
    pub fn new(sock: TcpStream, conn: impl Into<rustls::Connection>) -> TlsStream {
        TlsStream {
            sock,
            conn: RefCell::new(conn.into()),
        }
    }

    /// The socket and the rustls state, taken apart (to hand the keys to the kernel).
    pub fn into_parts(self) -> (TcpStream, rustls::Connection) {
        (self.sock, self.conn.into_inner())
    }

    /// The socket, for readiness waits and the idle watcher.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Completes the handshake.
    pub async fn handshake(&self) -> io::Result<()> {
        loop {
            self.flush().await?;
            let (handshaking, wants_read) = {
                let c = self.conn.borrow();
                (c.is_handshaking(), c.wants_read())
            };
            if !handshaking {
                return Ok(());
            }
            if wants_read && !self.fill().await? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the TLS handshake",
                ));
            }
        }
    }

    /// Writes every queued TLS record to the socket.
    pub async fn flush(&self) -> io::Result<()> {
        let sfd = fd(&self.sock);
        loop {
            let written = {
                let mut c = self.conn.borrow_mut();
                if !c.wants_write() {
                    return Ok(());
                }
                c.write_tls(&mut FdIo(sfd))
            };
            match written {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sock.writable(false).await?
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes queued TLS records while the socket takes them, without waiting.
    fn try_flush(&self) -> io::Result<()> {
        let sfd = fd(&self.sock);
        loop {
            let mut c = self.conn.borrow_mut();
            if !c.wants_write() {
                return Ok(());
            }
            match c.write_tls(&mut FdIo(sfd)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads what the socket has into rustls and processes it. `false` at the peer's EOF.
    async fn fill(&self) -> io::Result<bool> {
        let sfd = fd(&self.sock);
        loop {
            let read = self.conn.borrow_mut().read_tls(&mut FdIo(sfd));
            match read {
                Ok(0) => return Ok(false),
                Ok(_) => {
                    let processed = self.conn.borrow_mut().process_new_packets().map(|_| ());
                    if let Err(e) = processed {
                        // rustls queued an alert for the peer; a failed send changes nothing.
                        let _ = self.flush().await;
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    // Whatever processing queued (an alert, a handshake reply) goes out if the
                    // socket takes it now. Waiting here would deadlock: when the other
                    // direction has filled the socket, this reader must keep reading so the
                    // peer can drain and make room. The writing direction flushes the rest.
                    self.try_flush()?;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sock.readable(false).await?
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads plaintext into `buf`: at least one byte, or 0 once the peer sent close_notify.
    /// A TCP close without close_notify is an `UnexpectedEof` error.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let got = self.conn.borrow_mut().reader().read(buf);
            match got {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // An EOF here makes the next read report it (clean or not).
                    self.fill().await?;
                }
                other => return other,
            }
        }
    }

    /// Encrypts and sends all of `data`.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.conn.borrow_mut().writer().write(data)?;
            data = &data[n..];
            self.flush().await?;
        }
        Ok(())
    }
}

/// What one synchronous step of the TLS → plain direction did.
enum Step {
    /// The socket has no more records for now.
    NeedRecords,
    /// The peer sent close_notify.
    CloseNotify,
    /// The direction ended with `END`.
    Ended,
    /// The plain socket is full; `Blocked` holds what waits for it.
    Blocked(Blocked),
    /// Some bytes moved; go on.
    Progress,
}

/// Decrypts what rustls holds and what the socket has, unwrapping chunks into `pfd`, until
/// the socket is empty, the direction ends, or `pfd` is full. Ciphertext is read 64 KiB per
/// `recv` and fed to rustls from memory; what rustls cannot take yet (it holds at most 16 KiB
/// of plaintext) is kept in `carry` for the next step. Plaintext after `END` stays in rustls
/// (or in `st`'s leftover) for the next visitor.
fn decrypt_step(
    tls: &TlsStream,
    pfd: BorrowedFd<'_>,
    st: &mut Unchunk<'_>,
    carry: &mut Vec<u8>,
) -> Forwarded<Step> {
    let tunnel = ForwardError::tunnel;
    let tfd = fd(&tls.sock);
    with_buffers(|plain, cipher| {
        let mut moved = false;
        let mut fed = 0usize; // of `carry`, or of `cipher` once carry is empty
        let mut have = 0usize; // bytes of `cipher` from the last recv
        let mut conn = tls.conn.borrow_mut();
        let keep_cipher = |carry: &mut Vec<u8>, fed: usize, have: usize, cipher: &[u8]| {
            if carry.is_empty() {
                carry.extend_from_slice(&cipher[fed..have]);
            } else {
                carry.drain(..fed);
            }
        };
        loop {
            match conn.reader().read(plain) {
                Ok(0) => return Ok(Step::CloseNotify),
                Ok(n) => {
                    moved = true;
                    let blocked = st.feed(pfd, &plain[..n])?;
                    if st.chunks.is_ended() {
                        keep_cipher(carry, fed, have, cipher);
                        return Ok(Step::Ended);
                    }
                    if let Some(b) = blocked {
                        keep_cipher(carry, fed, have, cipher);
                        return Ok(Step::Blocked(b));
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(tunnel(e)),
            }
            // rustls wants records: from the carry first, then from the socket.
            let src: &[u8] = if !carry.is_empty() {
                if fed == carry.len() {
                    carry.clear();
                    fed = 0;
                    continue;
                }
                &carry[fed..]
            } else if fed < have {
                &cipher[fed..have]
            } else {
                match FdIo(tfd).read(cipher) {
                    Ok(0) => {
                        // EOF: let rustls see it; the next read reports it, clean or not.
                        conn.read_tls(&mut io::empty()).map_err(tunnel)?;
                        continue;
                    }
                    Ok(n) => {
                        (fed, have) = (0, n);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(if moved {
                            Step::Progress
                        } else {
                            Step::NeedRecords
                        });
                    }
                    Err(e) => return Err(tunnel(e)),
                }
            };
            let mut rd = src;
            fed += conn.read_tls(&mut rd).map_err(tunnel)?;
            if let Err(e) = conn.process_new_packets() {
                drop(conn);
                let _ = tls.try_flush();
                return Err(tunnel(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    })
}

/// TLS → plain: unwraps chunks until `END` (then FIN on `plain`), or, after `RAW`, copies to
/// close_notify. `early`: plaintext already read past `Start`.
async fn tls_to_plain(
    tls: &TlsStream,
    plain: &TcpStream,
    early: &[u8],
    count: Count<'_, false>,
) -> Forwarded<(u64, Ended, Vec<u8>)> {
    let tunnel = ForwardError::tunnel;
    let pfd = fd(plain);
    let mut st = Unchunk {
        count,
        ..Unchunk::default()
    };
    st.feed_all(plain, early).await?;
    let mut carry = Vec::new();
    while !st.chunks.is_ended() {
        match decrypt_step(tls, pfd, &mut st, &mut carry)? {
            Step::NeedRecords => {
                // Anything processing queued for the peer goes out if it can (see `fill`).
                tls.try_flush().map_err(tunnel)?;
                tls.sock.readable(false).await.map_err(tunnel)?;
            }
            Step::Progress | Step::Ended => {}
            Step::Blocked(b) => {
                let pending = sockio::write_all(plain, &b.pending).await;
                pending.map_err(ForwardError::peer)?;
                st.feed_all(plain, &b.rest).await?;
            }
            Step::CloseNotify if st.chunks.is_raw() => {
                shutdown(pfd, Half::Write);
                return Ok((st.moved, Ended::Raw, Vec::new()));
            }
            Step::CloseNotify => return Err(tunnel(cut_short())),
        }
    }
    shutdown(pfd, Half::Write);
    Ok((st.moved, Ended::Clean, st.chunks.take_leftover()))
}

/// Plain → TLS in chunks (one per read) until EOF, which is sent as `END`. `requests`: an
/// HTTP visitor's reader, which rewrites every request head on the way.
async fn plain_to_tls(
    plain: &TcpStream,
    tls: &TlsStream,
    quiet: bool,
    requests: Option<&mut Requests>,
    count: Count<'_, true>,
) -> Forwarded<u64> {
    let (peer, tunnel) = (ForwardError::peer, ForwardError::tunnel);
    let pfd = fd(plain);
    let mut total = 0u64;
    if quiet {
        // Nothing to read yet (see `chunked::encode`).
        plain.readable(false).await.map_err(peer)?;
    }
    if let Some(requests) = requests {
        // Boxed: inline, its state would grow every connection's task, rewriting or not.
        return Box::pin(requests_up(plain, tls, requests, count)).await;
    }
    loop {
        let read = with_buffers(|buf, _| -> Forwarded<Option<(usize, Option<Vec<u8>>)>> {
            let n = match FdIo(pfd).read(&mut buf[HEADER_LEN..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(peer(e)),
            };
            let len = if n == 0 { chunk::END } else { n as u32 };
            buf[..HEADER_LEN].copy_from_slice(&chunk::header(len));
            let frame = &buf[..HEADER_LEN + n];
            // rustls takes up to its buffer limit now; the rest waits on the heap.
            let taken = tls
                .conn
                .borrow_mut()
                .writer()
                .write(frame)
                .map_err(tunnel)?;
            Ok(Some((
                n,
                (taken < frame.len()).then(|| frame[taken..].to_vec()),
            )))
        })?;
        match read {
            None => plain.readable(false).await.map_err(peer)?,
            Some((n, rest)) => {
                tls.flush().await.map_err(tunnel)?;
                if let Some(rest) = rest {
                    tls.write_all(&rest).await.map_err(tunnel)?;
                }
                if n == 0 {
                    return Ok(total);
                }
                count.add(n);
                total += n as u64;
            }
        }
    }
}

/// The sending end of a TLS data connection in user space: rustls, or records sealed in place.
pub(super) trait Encrypting {
    /// Encrypts and sends all of `data`.
    async fn write_all(&self, data: &[u8]) -> io::Result<()>;
}

impl Encrypting for TlsStream {
    async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        TlsStream::write_all(self, data).await
    }
}

/// Peer → a TLS data connection for an HTTP visitor whose request heads are rewritten: each
/// read becomes chunks with every head rewritten, encrypted by `tls`, until the peer's EOF
/// (sent as `END`). Both user-space TLS forwarders use it.
pub(super) async fn requests_up(
    plain: &TcpStream,
    tls: &impl Encrypting,
    requests: &mut Requests,
    count: Count<'_, true>,
) -> Forwarded<u64> {
    let (peer, tunnel) = (ForwardError::peer, ForwardError::tunnel);
    let pfd = fd(plain);
    let mut total = 0u64;
    loop {
        let read = with_buffers(|buf, _| -> io::Result<Option<(usize, Vec<u8>)>> {
            let Some(n) = recv_now(pfd, buf)? else {
                return Ok(None);
            };
            let frames = match n {
                0 => chunk::header(chunk::END).to_vec(),
                n => rewrite::chunks(requests, &buf[..n])?,
            };
            Ok(Some((n, frames)))
        })
        .map_err(peer)?;
        match read {
            None => plain.readable(false).await.map_err(peer)?,
            Some((n, frames)) => {
                if !frames.is_empty() {
                    tls.write_all(&frames).await.map_err(tunnel)?;
                }
                if n == 0 {
                    return Ok(total);
                }
                count.add(n);
                total += n as u64;
            }
        }
    }
}

/// Forwards a plain socket ↔ a TLS data connection in chunks until both directions end or
/// either fails, in which case both sockets are shut down (the plain one to be reset on close
/// if the tunnel failed); the error names the end that failed first. `early`: plaintext already read past `Start`; `peer_quiet`: `plain` has
/// nothing to read now (just connected, or its early bytes already taken); `requests`: an
/// HTTP visitor's reader (see `plain_to_tls`); `tally`: where the visitor's bytes are counted
/// as they move.
pub async fn forward(
    plain: &TcpStream,
    tls: &TlsStream,
    early: &[u8],
    peer_quiet: bool,
    requests: Option<&mut Requests>,
    tally: Tally<'_>,
) -> Forwarded<Outcome> {
    let up = std::pin::pin!(plain_to_tls(plain, tls, peer_quiet, requests, tally.up));
    let down = std::pin::pin!(tls_to_plain(tls, plain, early, tally.down));
    let (up, (down, ended, leftover)) =
        both(up, down, |failed| shut_both(plain, tls, failed)).await?;
    Ok(Outcome {
        up,
        down,
        reusable: ended == Ended::Clean,
        leftover,
    })
}

fn shut_both(plain: &TcpStream, tls: &TlsStream, failed: Side) {
    end_peer(fd(plain), failed);
    shutdown(fd(&tls.sock), Half::Both);
}

#[cfg(test)]
mod tests {
    //! A TLS data connection on one real ring: the agent's end sends a burst of many small
    //! chunks, far more ciphertext than rustls takes in one go, so the relay's end must carry
    //! what rustls refused into the next step without losing or reordering a byte.

    use std::io::Read;
    use std::net::Shutdown;

    use rustls_pki_types::ServerName;

    use super::*;
    use crate::tls::{client_config, server_config, RelayIdentity, RelayTrust};

    use crate::dataplane::uring::{on_ring, socket_pair as pair};

    #[test]
    fn a_burst_of_records_is_carried_over_intact() {
        if !crate::dataplane::probe::uring_for_tests() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("ringtunnel-tls-carry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let identity = RelayIdentity::load_or_create(&dir).unwrap();
        let server = server_config(&identity).unwrap();
        let client = client_config(&RelayTrust::Pinned(identity.fingerprint)).unwrap();
        // 2 MiB in 1 KiB chunks, then END.
        let payload: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        for part in payload.chunks(1024) {
            wire.extend_from_slice(&chunk::header(part.len() as u32));
            wire.extend_from_slice(part);
        }
        wire.extend_from_slice(&chunk::header(chunk::END));

        let (mut visitor, v_side) = pair();
        // Small socket buffers on the visitor's side: its writes block often, and each time
        // the relay's end must keep the ciphertext it read but could not decode yet.
        rustix::net::sockopt::set_socket_send_buffer_size(&v_side, 16 * 1024).unwrap();
        rustix::net::sockopt::set_socket_recv_buffer_size(&visitor, 16 * 1024).unwrap();
        let reader = std::thread::spawn(move || {
            visitor.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            visitor.read_to_end(&mut got).unwrap();
            got
        });
        let (t_relay, t_agent) = pair();
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let outcome = rt.block_on(async move {
            let relay_conn = rustls::ServerConnection::new(server).unwrap();
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let agent_conn = rustls::ClientConnection::new(client, name).unwrap();
            let relay = TlsStream::new(on_ring(t_relay), relay_conn);
            let agent = TlsStream::new(on_ring(t_agent), agent_conn);
            let (r, a) = monoio::join!(relay.handshake(), agent.handshake());
            r.unwrap();
            a.unwrap();
            let v_side = on_ring(v_side);
            let (outcome, sent) = monoio::join!(
                forward(&v_side, &relay, &[], false, None, Tally::none()),
                async {
                    agent.write_all(&wire).await.unwrap();
                    // The relay's END for the visitor's (empty) direction.
                    let mut end = [0u8; HEADER_LEN];
                    let mut got = 0;
                    while got < HEADER_LEN {
                        got += agent.read(&mut end[got..]).await.unwrap();
                    }
                    end
                }
            );
            assert_eq!(sent, chunk::header(chunk::END));
            outcome.unwrap()
        });
        let got = reader.join().unwrap();
        assert!(got == payload, "2 MiB through rustls, intact and in order");
        assert_eq!(outcome.down, payload.len() as u64);
        assert!(outcome.reusable, "{outcome:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
