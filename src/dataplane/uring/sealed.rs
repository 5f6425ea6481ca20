//! TLS data connections whose records a worker seals and opens in place (`tls::records`),
//! where the kernel has no kTLS: rustls does the handshake, then hands its keys over.
//!
//! Plaintext from the peer is read straight into the records it will travel in (four full
//! records per `readv`, each with room for its header, content type and tag), sealed there
//! and sent with one `send`. Ciphertext is received into the worker's buffer and opened where
//! it lies; each record's plaintext goes to the peer from there. Against rustls' buffered API
//! that saves three copies per byte received and one per byte sent. The buffer is the
//! worker's: a connection keeps only a record cut short by a `recv`, or the records behind a
//! full peer, in a carry that is empty (unallocated) otherwise.

use std::cell::RefCell;
use std::io::{self, IoSliceMut};
use std::os::fd::BorrowedFd;

use monoio::net::TcpStream;

use super::chunked::{both, cut_short, end_peer, Ended, Unchunk};
use super::sockio::{self, fd};
use super::tls::{requests_up, Encrypting};
use crate::dataplane::forwarded::{ForwardError, Forwarded, Outcome, Side};
use crate::dataplane::sock::{recv_now, send_now, shutdown, Half};
use crate::dataplane::tally::{Count, Tally};
use crate::protocol::chunk::{self, HEADER_LEN as CHUNK_HEADER};
use crate::protocol::http::requests::Requests;
use crate::tls::records::{self, Opened, RecordError, Records, FULL_RECORD, HEADER_LEN};

/// Full records one step moves: one `readv` or `recv` and one `send` carry 64 KiB.
const RECORDS_PER_STEP: usize = 4;
/// Bytes of the worker's buffer: that many full records.
const STEP: usize = RECORDS_PER_STEP * FULL_RECORD;
/// Visitor bytes one record carries: a full record's plaintext less its chunk header.
const DATA_PER_RECORD: usize = records::MAX_PLAINTEXT - CHUNK_HEADER;

thread_local! {
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; STEP].into_boxed_slice());
}

/// Runs `f` on the worker's record buffer. `f` is sync, so tasks on one worker never see each
/// other's bytes in it.
fn with_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    BUF.with(|b| f(&mut b.borrow_mut()))
}

fn invalid(e: RecordError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A connection's record state between steps.
pub struct Sealed {
    records: Records,
    /// Ciphertext received but not opened yet: a record cut short by a `recv`, or records
    /// behind a peer that was full or a visitor that ended.
    carry: Vec<u8>,
    /// Plaintext opened but not taken yet (by [`SealedStream::read`], or handed over by
    /// rustls with its keys).
    plain: Vec<u8>,
    /// The peer sent `close_notify`.
    closed: bool,
}

impl Sealed {
    /// Record state taking over from rustls; `plain`: plaintext rustls had received and not
    /// given out yet.
    pub fn new(records: Records, plain: Vec<u8>) -> Sealed {
        Sealed {
            records,
            carry: Vec::new(),
            plain,
            closed: false,
        }
    }
}

/// Where [`pull`] stopped.
enum Pulled {
    /// `take` asked to stop; what follows is in the carry.
    Stopped,
    /// The socket has nothing more for now.
    Drained,
    /// The peer sent `close_notify`.
    Closed,
}

/// Opens records from the carry, then from the socket, handing each one's plaintext to
/// `take` until it returns `true` (stop), the socket has nothing more (a cut record waits in
/// the carry), or `close_notify` comes. The socket's EOF without `close_notify` is an error
/// (a truncation, as rustls reads it).
fn pull<E>(
    st: &mut Sealed,
    sfd: BorrowedFd<'_>,
    buf: &mut [u8],
    tunnel: impl Fn(io::Error) -> E,
    mut take: impl FnMut(&[u8]) -> Result<bool, E>,
) -> Result<Pulled, E> {
    let mut have = st.carry.len();
    buf[..have].copy_from_slice(&st.carry);
    st.carry.clear();
    let mut at = 0;
    loop {
        while let Some(len) = Records::next_len(&buf[at..have]).map_err(|e| tunnel(invalid(e)))? {
            let record = &mut buf[at..at + len];
            let opened = st.records.open(record).map_err(|e| tunnel(invalid(e)))?;
            let start = at;
            at += len;
            match opened {
                Opened::Data(range) => {
                    if take(&buf[start..][range])? {
                        st.carry.extend_from_slice(&buf[at..have]);
                        return Ok(Pulled::Stopped);
                    }
                }
                Opened::Skipped => {}
                Opened::Closed => {
                    st.closed = true;
                    return Ok(Pulled::Closed);
                }
            }
        }
        // What is left is the start of a record: read the rest behind it.
        buf.copy_within(at..have, 0);
        (have, at) = (have - at, 0);
        match recv_now(sfd, &mut buf[have..]).map_err(&tunnel)? {
            Some(0) => {
                return Err(tunnel(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the TLS connection without close_notify",
                )))
            }
            Some(n) => have += n,
            None => {
                st.carry.extend_from_slice(&buf[..have]);
                return Ok(Pulled::Drained);
            }
        }
    }
}

/// Reads from `pfd` straight into the plaintext room of [`RECORDS_PER_STEP`] records laid out
/// back to back in `buf`, after a record header and a chunk header each. `None`: nothing to
/// read now.
fn read_into_records(pfd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let mut slots: [IoSliceMut<'_>; RECORDS_PER_STEP] = {
        let mut it = buf[..STEP].chunks_exact_mut(FULL_RECORD).map(|record| {
            IoSliceMut::new(&mut record[HEADER_LEN + CHUNK_HEADER..][..DATA_PER_RECORD])
        });
        std::array::from_fn(|_| it.next().expect("STEP holds RECORDS_PER_STEP records"))
    };
    match rustix::io::readv(pfd, &mut slots) {
        Ok(n) => Ok(Some(n)),
        Err(rustix::io::Errno::AGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Seals the `n` visitor bytes [`read_into_records`] placed as chunks, one per record (0: an
/// `END` chunk). Every record but the last is full, so they lie back to back: returns how
/// many bytes of `buf` to send.
fn seal_chunks(records: &mut Records, buf: &mut [u8], n: usize) -> Result<usize, RecordError> {
    if n == 0 {
        buf[HEADER_LEN..][..CHUNK_HEADER].copy_from_slice(&chunk::header(chunk::END));
        return records.seal(buf, CHUNK_HEADER);
    }
    let (mut left, mut len) = (n, 0);
    for record in buf[..STEP].chunks_exact_mut(FULL_RECORD) {
        let data = left.min(DATA_PER_RECORD);
        record[HEADER_LEN..][..CHUNK_HEADER].copy_from_slice(&chunk::header(data as u32));
        len += records.seal(record, CHUNK_HEADER + data)?;
        left -= data;
        if left == 0 {
            break;
        }
    }
    Ok(len)
}

/// A TLS data connection on a worker, its records sealed and opened in place.
///
/// Both forwarding directions use it at once from one thread; the record state is borrowed
/// only between awaits, never across one. Only the sending direction seals, so records go
/// out in sequence.
pub struct SealedStream {
    sock: TcpStream,
    state: RefCell<Sealed>,
}

impl SealedStream {
    /// `sock` (non-blocking, handshake done) with the record state rustls handed over.
    pub fn new(sock: TcpStream, state: Sealed) -> SealedStream {
        SealedStream {
            sock,
            state: RefCell::new(state),
        }
    }

    /// The socket and the record state, taken apart (to move to another worker).
    pub fn into_parts(self) -> (TcpStream, Sealed) {
        (self.sock, self.state.into_inner())
    }

    /// The socket, for readiness waits and the idle watcher.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Records used under the current keys (see `records::Records::used`).
    pub fn records_used(&self) -> u64 {
        self.state.borrow().records.used()
    }

    /// Seals all of `data` and sends it.
    pub async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(data.len() + records::OVERHEAD);
        let sealed = self.state.borrow_mut().records.seal_to(data, &mut out);
        sealed.map_err(invalid)?;
        sockio::write_all(&self.sock, &out).await
    }

    /// Reads plaintext into `buf`: at least one byte, or 0 once the peer sent close_notify.
    /// A TCP close without close_notify is an `UnexpectedEof` error.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut st = self.state.borrow_mut();
                if !st.plain.is_empty() {
                    let n = buf.len().min(st.plain.len());
                    buf[..n].copy_from_slice(&st.plain[..n]);
                    st.plain.drain(..n);
                    return Ok(n);
                }
                if st.closed {
                    return Ok(0);
                }
            }
            let mut got = Vec::new();
            let pulled = with_buffer(|b| {
                let mut st = self.state.borrow_mut();
                pull(
                    &mut st,
                    fd(&self.sock),
                    b,
                    |e| e,
                    |data| {
                        got.extend_from_slice(data);
                        Ok(!got.is_empty())
                    },
                )
            })?;
            self.state.borrow_mut().plain = got;
            if let Pulled::Drained = pulled {
                self.sock.readable(false).await?;
            }
        }
    }
}

/// Tunnel → peer: opens records and unwraps chunks until `END` (then FIN on `plain`), or,
/// after `RAW`, passes bytes on to close_notify. `early`: plaintext already read past
/// `Start`.
async fn sealed_to_plain(
    s: &SealedStream,
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
    let opened_before = std::mem::take(&mut s.state.borrow_mut().plain);
    st.feed_all(plain, &opened_before).await?;
    while !st.chunks.is_ended() {
        let mut blocked = None;
        let pulled = with_buffer(|buf| {
            let mut state = s.state.borrow_mut();
            pull(&mut state, fd(&s.sock), buf, tunnel, |data| {
                blocked = st.feed(pfd, data)?;
                Ok(blocked.is_some() || st.chunks.is_ended())
            })
        })?;
        if let Some(b) = blocked {
            sockio::write_all(plain, &b.pending)
                .await
                .map_err(ForwardError::peer)?;
            st.feed_all(plain, &b.rest).await?;
            continue;
        }
        match pulled {
            Pulled::Stopped => {}
            Pulled::Drained => s.sock.readable(false).await.map_err(tunnel)?,
            Pulled::Closed if st.chunks.is_raw() => {
                shutdown(pfd, Half::Write);
                return Ok((st.moved, Ended::Raw, Vec::new()));
            }
            Pulled::Closed => return Err(tunnel(cut_short())),
        }
    }
    shutdown(pfd, Half::Write);
    Ok((st.moved, Ended::Clean, st.chunks.take_leftover()))
}

/// Peer → tunnel: reads into records, sealed in place, one chunk per record, until the
/// peer's EOF (sent as `END`). `requests`: an HTTP visitor's reader, which rewrites every
/// request head on the way.
async fn plain_to_sealed(
    plain: &TcpStream,
    s: &SealedStream,
    quiet: bool,
    requests: Option<&mut Requests>,
    count: Count<'_, true>,
) -> Forwarded<u64> {
    let (peer, tunnel) = (ForwardError::peer, ForwardError::tunnel);
    let (pfd, sfd) = (fd(plain), fd(&s.sock));
    if quiet {
        // Nothing to read yet (see `chunked::encode`).
        plain.readable(false).await.map_err(peer)?;
    }
    if let Some(requests) = requests {
        // Boxed: inline, its state would grow every connection's task, rewriting or not.
        return Box::pin(requests_up(plain, s, requests, count)).await;
    }
    let mut total = 0u64;
    loop {
        let step = with_buffer(|buf| -> Forwarded<Option<(usize, Option<Vec<u8>>)>> {
            let Some(n) = read_into_records(pfd, buf).map_err(peer)? else {
                return Ok(None);
            };
            let sealed = seal_chunks(&mut s.state.borrow_mut().records, buf, n);
            let len = sealed.map_err(|e| tunnel(invalid(e)))?;
            let sent = send_now(sfd, &buf[..len]).map_err(tunnel)?;
            Ok(Some((n, (sent < len).then(|| buf[sent..len].to_vec()))))
        })?;
        match step {
            None => plain.readable(false).await.map_err(peer)?,
            Some((n, rest)) => {
                if let Some(rest) = rest {
                    sockio::write_all(&s.sock, &rest).await.map_err(tunnel)?;
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

impl Encrypting for SealedStream {
    async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        SealedStream::write_all(self, data).await
    }
}

/// Forwards a plain socket ↔ a sealed TLS data connection in chunks until both directions
/// end or either fails, in which case both sockets are shut down (the plain one to be reset
/// on close if the tunnel failed); the error names the end that failed first. Arguments as
/// for `tls::forward`.
pub async fn forward(
    plain: &TcpStream,
    s: &SealedStream,
    early: &[u8],
    peer_quiet: bool,
    requests: Option<&mut Requests>,
    tally: Tally<'_>,
) -> Forwarded<Outcome> {
    let up = std::pin::pin!(plain_to_sealed(plain, s, peer_quiet, requests, tally.up));
    let down = std::pin::pin!(sealed_to_plain(s, plain, early, tally.down));
    let shut = |failed: Side| {
        end_peer(fd(plain), failed);
        shutdown(fd(&s.sock), Half::Both);
    };
    let (up, (down, ended, leftover)) = both(up, down, shut).await?;
    Ok(Outcome {
        up,
        down,
        reusable: ended == Ended::Clean,
        leftover,
    })
}

#[cfg(test)]
mod tests {
    //! A sealed data connection on a real ring against a rustls one: the relay's end takes
    //! rustls' keys over after the handshake; the agent's end stays rustls. A burst of many
    //! small chunks comes down far faster than a visitor with small socket buffers reads, so
    //! records wait in the carry; a bulk upload goes up in full records at the same time.

    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::sync::Arc;

    use rustls_pki_types::ServerName;

    use super::*;
    use crate::dataplane::uring::tls::TlsStream;
    use crate::dataplane::uring::tunnel::Tunnel;
    use crate::dataplane::uring::{on_ring, socket_pair as pair};
    use crate::protocol::chunk::Unchunker;
    use crate::tls::{client_config, server_config, RelayIdentity, RelayTrust};

    /// ringtunnel's own server and client configurations, for a fresh relay identity.
    fn configs(name: &str) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let dir = std::env::temp_dir().join(format!("ringtunnel-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let identity = RelayIdentity::load_or_create(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let server = server_config(&identity).unwrap();
        let client = client_config(&RelayTrust::Pinned(identity.fingerprint)).unwrap();
        (server, client)
    }

    /// A handshake over a loopback pair on this thread's ring: the relay's end, its session
    /// tickets sent and its keys taken over by `Tunnel::after_handshake`, and the agent's end,
    /// still rustls.
    async fn handshaken(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (Tunnel, TlsStream) {
        let (t_relay, t_agent) = pair();
        let relay_conn = rustls::ServerConnection::new(server).unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let agent_conn = rustls::ClientConnection::new(client, name).unwrap();
        let relay = TlsStream::new(on_ring(t_relay), relay_conn);
        let agent = TlsStream::new(on_ring(t_agent), agent_conn);
        let (r, a) = monoio::join!(relay.handshake(), agent.handshake());
        r.unwrap();
        a.unwrap();
        relay.flush().await.unwrap(); // session tickets, before the keys go
        (Tunnel::after_handshake(relay).unwrap(), agent)
    }

    #[test]
    fn records_sealed_in_place_interoperate_with_rustls_both_ways() {
        if !crate::dataplane::probe::uring_for_tests() {
            return;
        }
        let (server, client) = configs("sealed");
        // Down: 2 MiB in 1 KiB chunks, then END and the start of what follows (kept as the
        // leftover). Up: 3 MiB and more, not a multiple of a record.
        let down: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
        let up: Vec<u8> = (0..(3u32 << 20) + 12345).map(|i| (i % 241) as u8).collect();
        let mut wire = Vec::new();
        for part in down.chunks(1024) {
            wire.extend_from_slice(&chunk::header(part.len() as u32));
            wire.extend_from_slice(part);
        }
        wire.extend_from_slice(&chunk::header(chunk::END));
        wire.extend_from_slice(b"next");

        let (mut visitor, v_side) = pair();
        rustix::net::sockopt::set_socket_send_buffer_size(&v_side, 16 * 1024).unwrap();
        rustix::net::sockopt::set_socket_recv_buffer_size(&visitor, 16 * 1024).unwrap();
        let up_sent = up.clone();
        let visitor = std::thread::spawn(move || {
            let mut reader = visitor.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                visitor.write_all(&up_sent).unwrap();
                visitor.shutdown(Shutdown::Write).unwrap();
            });
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            writer.join().unwrap();
            got
        });
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let (outcome, got_up, used) = rt.block_on(async move {
            let (relay, agent) = handshaken(server, client).await;
            let Tunnel::Sealed(sealed) = &relay else {
                panic!("a TLS 1.3 connection was not taken over");
            };
            let v_side = on_ring(v_side);
            let (outcome, got_up) = monoio::join!(
                forward(&v_side, sealed, &[], false, None, Tally::none()),
                async {
                    let (_, got) = monoio::join!(agent.write_all(&wire), async {
                        let mut chunks = Unchunker::default();
                        let mut got = Vec::new();
                        let mut buf = vec![0u8; 64 * 1024];
                        while !chunks.is_ended() {
                            let n = agent.read(&mut buf).await.unwrap();
                            assert!(n > 0, "the relay's end closed before END");
                            let mut input = &buf[..n];
                            while let Some(data) = chunks.next_data(&mut input).unwrap() {
                                got.extend_from_slice(data);
                            }
                        }
                        got
                    });
                    got
                }
            );
            // The connection is still in step: another message each way.
            relay.write_all(b"READY").await.unwrap();
            let mut ready = [0u8; 5];
            let mut n = 0;
            while n < 5 {
                n += agent.read(&mut ready[n..]).await.unwrap();
            }
            assert_eq!(&ready, b"READY");
            (outcome.unwrap(), got_up, sealed.records_used())
        });
        let got_down = visitor.join().unwrap();
        assert!(got_down == down, "2 MiB down, intact and in order");
        assert!(got_up == up, "3 MiB up, intact and in order");
        assert_eq!(outcome.down, down.len() as u64);
        assert_eq!(outcome.up, up.len() as u64);
        assert!(outcome.reusable, "{outcome:?}");
        assert_eq!(outcome.leftover, b"next");
        assert!(used > 0);
    }

    /// TLS 1.2 (which a peer could insist on) has another record format: such a connection
    /// stays with rustls and still carries messages both ways.
    #[test]
    fn a_tls12_connection_stays_with_rustls() {
        if !crate::dataplane::probe::uring_for_tests() {
            return;
        }
        use crate::tls::fingerprint::PinnedVerifier;
        let dir = std::env::temp_dir().join(format!("ringtunnel-tls12-{}", std::process::id()));
        let identity = RelayIdentity::load_or_create(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let server = server_config(&identity).unwrap();
        let provider = crate::tls::provider();
        let verifier = PinnedVerifier::new(identity.fingerprint, provider.clone());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        client.enable_secret_extraction = true;
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (relay, agent) = handshaken(server, client.into()).await;
            assert!(
                matches!(relay, Tunnel::Tls(_)),
                "TLS 1.2 must stay with rustls"
            );
            let agent = Tunnel::after_handshake(agent).unwrap();
            assert!(matches!(agent, Tunnel::Tls(_)));
            relay.write_all(b"down").await.unwrap();
            agent.write_all(b"up").await.unwrap();
            let mut buf = [0u8; 8];
            let n = agent.read_some(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"down");
            let n = relay.read_some(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"up");
        });
    }

    /// Bytes that are not a TLS record on a sealed connection (a peer gone wrong, or a
    /// middlebox) end its visitor as the tunnel's failure, named, and cut the visitor, who must
    /// not take a truncated stream for a whole one.
    #[test]
    fn garbage_on_a_sealed_connection_cuts_the_visitor() {
        if !crate::dataplane::probe::uring_for_tests() {
            return;
        }
        let (server, client) = configs("garbage");
        let (mut visitor, v_side) = pair();
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let err = rt.block_on(async move {
            let (relay, agent) = handshaken(server, client).await;
            let Tunnel::Sealed(sealed) = &relay else {
                panic!("not taken over");
            };
            let v_side = on_ring(v_side);
            let garbage = sockio::write_all(agent.socket(), b"HTTP/1.1 200 OK\r\n\r\n");
            let (outcome, sent) = monoio::join!(
                forward(&v_side, sealed, &[], true, None, Tally::none()),
                garbage
            );
            sent.unwrap();
            // The ring closes the visitor's socket (sending the RST) once it runs again.
            drop(v_side);
            monoio::time::sleep(std::time::Duration::from_millis(20)).await;
            outcome.unwrap_err()
        });
        assert_eq!(err.side, Side::Tunnel, "{err}");
        assert!(
            err.source.to_string().contains("bad TLS record header"),
            "{err}"
        );
        let mut got = Vec::new();
        let read = visitor.read_to_end(&mut got);
        assert!(got.is_empty(), "no byte of the garbage reached the visitor");
        assert!(
            read.is_err(),
            "the visitor is reset, not given a clean end: {read:?}"
        );
    }
}
