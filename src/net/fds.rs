//! The process's file-descriptor limit. Every visitor, agent connection, pipe and listener
//! is one or two descriptors; distributions start services with a soft limit of 1024 (or
//! 4096) under a much higher hard limit, and a relay that keeps the soft one runs out long
//! before memory or CPU do.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, and returns the limit now in force.
/// A failure to raise it leaves the old one (and returns it): the relay still runs, with
/// caps sized to what it has.
pub fn raise_fd_limit() -> u64 {
    let old = getrlimit(Resource::Nofile);
    let soft = old.current.unwrap_or(u64::MAX);
    let hard = old.maximum;
    if hard.is_none_or(|h| h > soft) {
        let new = Rlimit {
            current: hard,
            maximum: hard,
        };
        if setrlimit(Resource::Nofile, new).is_ok() {
            return hard.unwrap_or(u64::MAX);
        }
    }
    soft
}

/// The file-descriptor limit in force now.
pub fn fd_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit() {
        let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
        assert_eq!(raise_fd_limit(), hard);
        assert_eq!(fd_limit(), hard);
    }
}
