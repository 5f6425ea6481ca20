//! Handing open sockets to another process: a `SOCK_SEQPACKET` unix socket pair, the
//! descriptors passed with `SCM_RIGHTS`, and a manifest (bytes, the caller's format) that
//! says what each one is. Used for a relay upgrade: the new process inherits every listening
//! socket, so no connection is refused while one process takes over from the other.
//!
//! Messages, one per packet: `M` + a piece of the manifest, `F` + descriptors (as ancillary
//! data), `E` (the end), then from the receiver `R` (ready) or `X` + why not. Blocking calls:
//! run them off the async runtime.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, socketpair, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage,
    RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

/// The environment variable that tells a new process which descriptor is its end.
pub const ENV: &str = "RINGTUNNEL_HANDOVER_FD";
/// Descriptors per packet (the kernel takes at most 253).
const FDS_PER_PACKET: usize = 200;
/// Manifest bytes per packet.
const CHUNK: usize = 32 * 1024;
/// Largest manifest accepted.
const MAX_MANIFEST: usize = 16 << 20;
/// Most descriptors accepted.
const MAX_FDS: usize = 65_536;

/// One end of a handover.
#[derive(Debug)]
pub struct Channel(OwnedFd);

impl Channel {
    /// A connected pair: this process's end, and the end for the new process (inherited
    /// across `exec`: close-on-exec is off on it; the caller closes its copy after spawning).
    pub fn pair() -> io::Result<(Channel, OwnedFd)> {
        let (ours, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())?;
        Ok((Channel(ours), theirs))
    }

    /// A channel on a descriptor already known to be one end of a handover pair.
    pub fn adopt(fd: OwnedFd) -> Channel {
        Channel(fd)
    }

    /// The end named by [`ENV`], if this process was started by a handover; the variable is
    /// removed (so a later upgrade of this process starts clean) and the descriptor made
    /// close-on-exec.
    pub fn from_env() -> Option<io::Result<Channel>> {
        let value = std::env::var(ENV).ok()?;
        std::env::remove_var(ENV);
        let fd: i32 = match value.parse() {
            Ok(fd) if fd > 2 => fd,
            _ => return Some(Err(invalid(format!("{ENV}={value:?} is not a descriptor")))),
        };
        // SAFETY: the parent put this descriptor there for us alone; nothing else in this
        // process knows it, so taking ownership cannot double-close.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let checked = rustix::net::sockopt::socket_type(&owned)
            .map_err(io::Error::from)
            .and_then(|t| match t {
                SocketType::SEQPACKET => Ok(()),
                _ => Err(invalid(format!("{ENV}={fd} is not a handover socket"))),
            })
            .and_then(|()| {
                Ok(rustix::io::fcntl_setfd(
                    &owned,
                    rustix::io::FdFlags::CLOEXEC,
                )?)
            });
        Some(checked.map(|()| Channel(owned)))
    }

    /// Sends `manifest` and `fds` (in order), then the end mark.
    pub fn send(&self, manifest: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        for piece in manifest.chunks(CHUNK) {
            self.packet(b'M', piece, &[])?;
        }
        for group in fds.chunks(FDS_PER_PACKET) {
            self.packet(b'F', &[], group)?;
        }
        self.packet(b'E', &[], &[])
    }

    /// Receives what [`Self::send`] sent: the manifest and the descriptors, in order.
    pub fn receive(&self) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let mut manifest = Vec::new();
        let mut fds = Vec::new();
        let mut buf = vec![0u8; CHUNK + 1];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_PACKET))];
        loop {
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let got = recvmsg(
                &self.0,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )?;
            for msg in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = msg {
                    fds.extend(received);
                }
            }
            if fds.len() > MAX_FDS {
                return Err(invalid(format!("more than {MAX_FDS} descriptors")));
            }
            match buf.get(..got.bytes) {
                Some([b'M', piece @ ..]) => {
                    if manifest.len() + piece.len() > MAX_MANIFEST {
                        return Err(invalid(format!("a manifest over {MAX_MANIFEST} bytes")));
                    }
                    manifest.extend_from_slice(piece);
                }
                Some([b'F']) => {}
                Some([b'E']) => return Ok((manifest, fds)),
                Some([]) => return Err(io::ErrorKind::UnexpectedEof.into()),
                _ => return Err(invalid("an unknown handover packet".into())),
            }
        }
    }

    /// Tells the other end the takeover worked (`Ok`) or why not.
    pub fn send_status(&self, status: Result<(), String>) -> io::Result<()> {
        match status {
            Ok(()) => self.packet(b'R', &[], &[]),
            Err(why) => {
                let why = why.as_bytes();
                self.packet(b'X', &why[..why.len().min(CHUNK)], &[])
            }
        }
    }

    /// Waits up to `timeout` for [`Self::send_status`] from the other end. An error if the
    /// other end went away (the new process died) or said nothing in time.
    pub fn receive_status(&self, timeout: Duration) -> io::Result<Result<(), String>> {
        rustix::net::sockopt::set_socket_timeout(
            &self.0,
            rustix::net::sockopt::Timeout::Recv,
            Some(timeout),
        )?;
        let mut buf = vec![0u8; CHUNK + 1];
        let n = rustix::net::recv(&self.0, &mut buf, RecvFlags::empty())
            .map_err(|e| match e {
                rustix::io::Errno::AGAIN => io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                ),
                e => e.into(),
            })?
            .0;
        match &buf[..n] {
            [b'R'] => Ok(Ok(())),
            [b'X', why @ ..] => Ok(Err(String::from_utf8_lossy(why).into_owned())),
            [] => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the new process exited before it was ready",
            )),
            _ => Err(invalid("an unknown handover answer".into())),
        }
    }

    fn packet(&self, kind: u8, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut space =
            vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(invalid("descriptors do not fit a packet".into()));
        }
        let head = [kind];
        let iov = [IoSlice::new(&head), IoSlice::new(bytes)];
        sendmsg(&self.0, &iov, &mut control, SendFlags::empty())?;
        Ok(())
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_and_a_large_manifest_cross_intact() {
        let (ours, theirs) = Channel::pair().unwrap();
        let theirs = Channel(theirs);
        let listeners: Vec<std::net::TcpListener> = (0..450)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|l| l.as_fd()).collect();
        let manifest: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sender = std::thread::scope(|s| {
            let h = s.spawn(|| ours.send(&manifest, &fds));
            let got = theirs.receive().unwrap();
            h.join().unwrap().unwrap();
            got
        });
        let (got_manifest, got_fds) = sender;
        assert_eq!(got_manifest, manifest);
        assert_eq!(got_fds.len(), listeners.len());
        for (fd, l) in got_fds.into_iter().zip(&listeners) {
            let passed = std::net::TcpListener::from(fd);
            assert_eq!(
                passed.local_addr().unwrap(),
                l.local_addr().unwrap(),
                "in order"
            );
        }
        theirs.send_status(Err("no".into())).unwrap();
        assert_eq!(
            ours.receive_status(Duration::from_secs(5)).unwrap(),
            Err("no".into())
        );
        theirs.send_status(Ok(())).unwrap();
        assert_eq!(ours.receive_status(Duration::from_secs(5)).unwrap(), Ok(()));
    }

    #[test]
    fn a_vanished_receiver_is_an_error_not_a_hang() {
        let (ours, theirs) = Channel::pair().unwrap();
        drop(theirs);
        let e = ours.receive_status(Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let (ours, _theirs) = Channel::pair().unwrap();
        let e = ours.receive_status(Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn garbage_is_refused() {
        let (ours, theirs) = Channel::pair().unwrap();
        let theirs = Channel(theirs);
        ours.packet(b'?', b"junk", &[]).unwrap();
        assert_eq!(
            theirs.receive().unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
