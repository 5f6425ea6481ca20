//! Running a piece of code inside a named network namespace.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Runs `f` on a new thread that has joined the network namespace `/run/netns/NAME` (as
/// `ip netns add NAME` makes it), and returns its result. Sockets `f` opens belong to that
/// namespace and keep working from any thread afterwards; the calling thread's namespace is
/// untouched.
pub fn in_netns<T, F>(name: &str, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> io::Result<T> + Send,
{
    let ns = File::open(format!("/run/netns/{name}"))
        .map_err(|e| io::Error::new(e.kind(), format!("network namespace {name}: {e}")))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on a namespace descriptor; affects only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("panicked in a network namespace")))
    })
}
