//! The systemd notification protocol (`sd_notify`): a datagram of `KEY=value` lines to the
//! unix socket named by `$NOTIFY_SOCKET`, which systemd sets for a `Type=notify` service.
//! The relay says `READY=1` once it serves, `STOPPING=1` when it starts a drain, and the
//! process taking over in an upgrade says `MAINPID=<its pid>` with its `READY=1`, so systemd
//! follows it (with `NotifyAccess=all`) instead of ending the service when the old process
//! exits.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` to systemd. `Ok(false)`: not started by systemd (no `$NOTIFY_SOCKET`),
/// nothing sent.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    use std::os::unix::ffi::OsStrExt;
    let addr = match path.as_bytes().strip_prefix(b"@") {
        // An abstract socket: '@' stands for the leading NUL byte.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(&path)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}
