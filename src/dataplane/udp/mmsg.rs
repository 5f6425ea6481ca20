//! Datagrams in batches: one `recvmmsg` or `sendmmsg` moves up to [`BATCH`] datagrams, so a
//! busy flow costs a system call per batch, not per datagram. Safe wrappers over libc on
//! borrowed descriptors; neither call waits (`MSG_DONTWAIT`), and "nothing now" is
//! `ErrorKind::WouldBlock`, as tokio's `try_io` expects.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Most datagrams one call moves.
pub const BATCH: usize = 32;

/// Room for one datagram of any size.
pub const SLOT: usize = 65_536;

/// Receive slots for [`recv_batch`]: [`BATCH`] slots of [`SLOT`] bytes. Its 2 MiB are
/// reserved, not touched: the kernel maps a page only once a datagram is written into it, so
/// a service of small datagrams keeps a few pages per slot.
pub struct Slots {
    buf: Vec<u8>,
    lens: [usize; BATCH],
    from: [Option<SocketAddr>; BATCH],
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            buf: vec![0u8; BATCH * SLOT],
            lens: [0; BATCH],
            from: [None; BATCH],
        }
    }
}

impl Slots {
    /// Datagram `i` of the last [`recv_batch`], and its sender.
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        (&self.buf[i * SLOT..i * SLOT + self.lens[i]], self.from[i])
    }
}

/// One `recvmmsg` that does not wait: fills `slots` with what is queued on `fd` now and
/// returns how many datagrams (at least one), or `WouldBlock`.
pub fn recv_batch(fd: BorrowedFd<'_>, slots: &mut Slots) -> io::Result<usize> {
    // SAFETY: zeroed iovecs, sockaddr_storages and mmsghdrs are valid (null pointers, zero
    // lengths) and every pointer set below points into `slots.buf` or these arrays, which
    // outlive the call.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    let base = slots.buf.as_mut_ptr();
    for i in 0..BATCH {
        iov[i].iov_base = unsafe { base.add(i * SLOT) }.cast();
        iov[i].iov_len = SLOT;
        msgs[i].msg_hdr.msg_iov = &mut iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    }
    // SAFETY: `msgs` holds BATCH valid headers (above).
    let n = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            msgs.as_mut_ptr(),
            BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for i in 0..n {
        slots.lens[i] = (msgs[i].msg_len as usize).min(SLOT);
        slots.from[i] = from_storage(&names[i]);
    }
    Ok(n)
}

/// One `sendmmsg` that does not wait: sends `datagrams` on `fd`, each to its address (or,
/// with `None`, to the socket's connected peer), and returns how many the kernel took (at
/// least one), or `WouldBlock`. The caller sends the rest later, or drops them.
pub fn send_batch(
    fd: BorrowedFd<'_>,
    datagrams: &[(&[u8], Option<SocketAddr>)],
) -> io::Result<usize> {
    let count = datagrams.len().min(BATCH);
    // SAFETY: as in `recv_batch`; every pointer set below points into `datagrams` or these
    // arrays, which outlive the call, and the kernel only reads through them.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    for (i, (payload, to)) in datagrams.iter().take(count).enumerate() {
        iov[i].iov_base = payload.as_ptr() as *mut libc::c_void;
        iov[i].iov_len = payload.len();
        msgs[i].msg_hdr.msg_iov = &mut iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        if let Some(to) = to {
            let len = to_storage(*to, &mut names[i]);
            msgs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen = len;
        }
    }
    // SAFETY: `msgs[..count]` are valid headers (above).
    let n = unsafe {
        libc::sendmmsg(
            fd.as_raw_fd(),
            msgs.as_mut_ptr(),
            count as libc::c_uint,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `UDP_SEGMENT` (linux/udp.h): a send's payload is split by the kernel into datagrams of
/// this many bytes (UDP generic segmentation offload, Linux 4.18).
const UDP_SEGMENT: libc::c_int = 103;

/// Most datagrams one segmented send may carry (the kernel's `UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;

/// Most bytes one segmented send may carry (a UDP payload's limit, with room for headers).
pub const MAX_SEGMENTED: usize = 65_000;

/// One `sendmsg` with `UDP_SEGMENT`: the kernel sends `buf` on the connected socket `fd` as
/// datagrams of `segment` bytes each (the last may be shorter), with one trip through the
/// stack for all of them. The caller keeps `buf` within [`MAX_SEGMENTED`] bytes and
/// [`MAX_SEGMENTS`] segments. An error other than `WouldBlock` may mean the kernel or the
/// route cannot segment (`EIO`, `EINVAL`): send the datagrams one by one instead.
pub fn send_segmented(fd: BorrowedFd<'_>, buf: &[u8], segment: u16) -> io::Result<usize> {
    // Room for one cmsghdr with a u16, 8-byte aligned: CMSG_SPACE(2) is 24 on 64-bit Linux.
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the pointers set point at `iov` and `control`, which
    // outlive the call, and the cmsg written fits `control` (CMSG_SPACE checked below).
    unsafe {
        let space = libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
        debug_assert!(space <= size_of::<[u64; 4]>());
        let mut msg: libc::msghdr = zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
        let n = libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddrV4::new(ip, u16::from_be(a.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(s as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(
                SocketAddrV6::new(
                    ip,
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )
                .into(),
            )
        }
        _ => None,
    }
}

fn to_storage(addr: SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and aligned for any sockaddr.
            let out: &mut libc::sockaddr_in =
                unsafe { &mut *(s as *mut _ as *mut libc::sockaddr_in) };
            out.sin_family = libc::AF_INET as libc::sa_family_t;
            out.sin_port = a.port().to_be();
            out.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let out: &mut libc::sockaddr_in6 =
                unsafe { &mut *(s as *mut _ as *mut libc::sockaddr_in6) };
            out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            out.sin6_port = a.port().to_be();
            out.sin6_addr.s6_addr = a.ip().octets();
            out.sin6_flowinfo = a.flowinfo();
            out.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    #[test]
    fn a_batch_goes_out_and_comes_back_in_order_with_its_senders() {
        for host in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(rx) = UdpSocket::bind(host) else {
                continue; // no IPv6 loopback here
            };
            let tx = UdpSocket::bind(host).unwrap();
            let to = rx.local_addr().unwrap();
            let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; i as usize * 100]).collect();
            let out: Vec<(&[u8], Option<SocketAddr>)> =
                payloads.iter().map(|p| (&p[..], Some(to))).collect();
            let mut sent = 0;
            while sent < out.len() {
                sent += send_batch(tx.as_fd(), &out[sent..]).unwrap();
            }
            let mut slots = Slots::default();
            let mut got = Vec::new();
            for _ in 0..1000 {
                match recv_batch(rx.as_fd(), &mut slots) {
                    Ok(n) => {
                        for i in 0..n {
                            let (d, from) = slots.get(i);
                            assert_eq!(from, Some(tx.local_addr().unwrap()));
                            got.push(d.to_vec());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
                if got.len() == payloads.len() {
                    break;
                }
            }
            assert_eq!(got, payloads, "{host}");
            assert_eq!(
                recv_batch(rx.as_fd(), &mut slots).unwrap_err().kind(),
                io::ErrorKind::WouldBlock,
                "nothing left: no wait"
            );
        }
    }

    #[test]
    fn a_segmented_send_arrives_as_separate_datagrams() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let mut buf = Vec::new();
        for i in 0..10u8 {
            buf.extend_from_slice(&[i; 1400]);
        }
        buf.extend_from_slice(&[10u8; 300]);
        match send_segmented(tx.as_fd(), &buf, 1400) {
            Ok(n) => assert_eq!(n, buf.len()),
            // A kernel without UDP GSO: the caller falls back; nothing to check here.
            Err(e) => return eprintln!("no UDP segmentation here: {e}"),
        }
        let mut slots = Slots::default();
        let mut got = Vec::new();
        for _ in 0..1000 {
            if let Ok(n) = recv_batch(rx.as_fd(), &mut slots) {
                got.extend((0..n).map(|i| slots.get(i).0.to_vec()));
            }
            if got.len() == 11 {
                break;
            }
        }
        assert_eq!(got.len(), 11, "ten whole segments and the short last one");
        for (i, d) in got.iter().enumerate() {
            let want = if i < 10 { 1400 } else { 300 };
            assert_eq!(d.len(), want);
            assert!(
                d.iter().all(|b| *b == i as u8),
                "segment {i} in order, intact"
            );
        }
    }

    #[test]
    fn a_connected_socket_sends_a_batch_without_addresses() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let big = vec![9u8; 65_507];
        let out: Vec<(&[u8], Option<SocketAddr>)> = vec![(b"", None), (&big, None), (b"x", None)];
        assert_eq!(send_batch(tx.as_fd(), &out).unwrap(), 3);
        let mut slots = Slots::default();
        let mut lens = Vec::new();
        for _ in 0..1000 {
            if let Ok(n) = recv_batch(rx.as_fd(), &mut slots) {
                lens.extend((0..n).map(|i| slots.get(i).0.len()));
            }
            if lens.len() == 3 {
                break;
            }
        }
        assert_eq!(
            lens,
            vec![0, 65_507, 1],
            "an empty and a largest datagram too"
        );
    }
}
