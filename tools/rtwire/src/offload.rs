//! Turning segmentation and checksum offloads off, so frames on a wire are real frames.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
// Legacy ethtool commands (linux/ethtool.h): each takes a struct ethtool_value.
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_SSG: u32 = 0x19;
const ETHTOOL_STSO: u32 = 0x1f;
const ETHTOOL_SGSO: u32 = 0x24;
const ETHTOOL_SGRO: u32 = 0x2c;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// Turns off TX checksum offload, scatter-gather, TSO, GSO and GRO on `ifname` (in the
/// calling thread's network namespace), as `ethtool -K IF tx off sg off tso off gso off gro
/// off` does.
///
/// Why: a veth hands its peer 64 KiB segments with partial checksums, which a packet socket
/// can neither shape frame by frame nor send out of another interface. Without the offloads
/// the stack sends MTU-sized frames with complete checksums.
pub fn plain_frames(ifname: &str) -> io::Result<()> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name too long: {ifname:?}"),
        ));
    }
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // TSO and GSO first: the kernel refuses to drop checksumming while they depend on it.
    for cmd in [
        ETHTOOL_STSO,
        ETHTOOL_SGSO,
        ETHTOOL_SGRO,
        ETHTOOL_SSG,
        ETHTOOL_STXCSUM,
    ] {
        let mut value = EthtoolValue { cmd, data: 0 };
        // SAFETY: zeroed ifreq is valid; the name fits (checked above) and stays NUL-ended.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
        // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points to, both live.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            // A device without the feature has nothing to turn off.
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{ifname}: ethtool command {cmd:#x}: {e}"),
                ));
            }
        }
    }
    Ok(())
}
