//! What an accept loop does when `accept` fails, on either runtime: log the failure without
//! flooding the log, back off, and when the process is out of descriptors shed the
//! connection waiting in the backlog instead of leaving it there.
//!
//! Out of descriptors (`EMFILE`, `ENFILE`), a level-triggered accept loop fails over and over
//! while the connection that caused it sits in the backlog: its client waits for nothing, and
//! the log fills (60 lines/s were seen). Each loop keeps one spare descriptor (`/dev/null`);
//! on exhaustion it gives the spare up, so the next `accept` succeeds, resets the connection
//! it gets (the client sees an error at once), and takes its spare back.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// Pause after a failed accept that freed nothing, so an accept loop backs off instead of
/// spinning on an error that persists for a while.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// At most one log line per accept loop per this long; the line says how many failures and
/// shed connections it stands for.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// One accept loop's failures: summarised logging and the spare descriptor.
#[derive(Debug)]
pub struct AcceptErrors {
    /// The listener, for logs.
    what: String,
    spare: Option<File>,
    /// A connection is to be shed: the spare was given up for it.
    shedding: bool,
    last_logged: Option<Instant>,
    last_error: String,
    unlogged_failures: u64,
    unlogged_shed: u64,
}

fn out_of_fds(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let code = e.raw_os_error();
    code == Some(Errno::MFILE.raw_os_error()) || code == Some(Errno::NFILE.raw_os_error())
}

fn spare() -> Option<File> {
    File::open("/dev/null").ok()
}

impl AcceptErrors {
    /// Failure handling for the listener named `what`, holding its spare descriptor.
    pub fn new(what: &str) -> Self {
        Self {
            what: what.to_string(),
            spare: spare(),
            shedding: false,
            last_logged: None,
            last_error: String::new(),
            unlogged_failures: 0,
            unlogged_shed: 0,
        }
    }

    /// `accept` failed with `e` at `now`: logs it if a line is due, and returns how long to
    /// back off before the next `accept` (none if the spare was given up, so that `accept`
    /// can take the waiting connection to shed it).
    pub fn failed(&mut self, e: &io::Error, now: Instant) -> Duration {
        self.unlogged_failures += 1;
        self.last_error = e.to_string();
        self.log_if_due(now);
        if out_of_fds(e) && !self.shedding && self.spare.take().is_some() {
            self.shedding = true;
            return Duration::ZERO;
        }
        ACCEPT_BACKOFF
    }

    /// Called with every accepted connection: gives it back to be served, or, if the spare
    /// was given up for it, resets and closes it, takes the spare back and returns `None`.
    pub fn admit<S: AsRawFd>(&mut self, conn: S, now: Instant) -> Option<S> {
        if !self.shedding {
            return Some(conn);
        }
        // SAFETY: `conn` is owned here and outlives the borrow (one setsockopt).
        let fd = unsafe { BorrowedFd::borrow_raw(conn.as_raw_fd()) };
        super::reset_on_close(fd);
        drop(conn);
        self.shedding = false;
        self.unlogged_shed += 1;
        self.spare = spare();
        self.log_if_due(now);
        None
    }

    fn log_if_due(&mut self, now: Instant) {
        let due = self
            .last_logged
            .is_none_or(|t| now.saturating_duration_since(t) >= LOG_EVERY);
        if !due {
            return;
        }
        self.last_logged = Some(now);
        tracing::warn!(
            listener = %self.what,
            error = %self.last_error,
            failures = self.unlogged_failures,
            shed = self.unlogged_shed,
            "accept failed (one line per {}s at most; shed: connections reset for want of a descriptor)",
            LOG_EVERY.as_secs()
        );
        self.unlogged_failures = 0;
        self.unlogged_shed = 0;
    }

    /// The tokio accept loops' way of handling a failed `accept`: [`Self::failed`], then
    /// the back-off it asks for.
    pub async fn back_off(&mut self, e: &io::Error) {
        let pause = self.failed(e, Instant::now());
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }

    /// Failures and sheds not logged yet (for tests).
    #[cfg(test)]
    fn unlogged(&self) -> (u64, u64) {
        (self.unlogged_failures, self.unlogged_shed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error())
    }

    #[test]
    fn a_flood_of_failures_is_one_line_per_period() {
        let t0 = Instant::now();
        let mut errors = AcceptErrors::new("test");
        let other = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(errors.failed(&other, t0), ACCEPT_BACKOFF);
        assert_eq!(errors.unlogged(), (0, 0), "the first is logged at once");
        for i in 1..=100 {
            errors.failed(&other, t0 + Duration::from_millis(i));
        }
        assert_eq!(errors.unlogged(), (100, 0), "then they are counted");
        errors.failed(&other, t0 + LOG_EVERY);
        assert_eq!(errors.unlogged(), (0, 0), "and summarised a period later");
    }

    #[test]
    fn out_of_descriptors_sheds_the_waiting_connection() {
        let t0 = Instant::now();
        let mut errors = AcceptErrors::new("test");
        assert!(errors.spare.is_some());
        assert_eq!(
            errors.failed(&emfile(), t0),
            Duration::ZERO,
            "retry at once"
        );
        assert!(errors.spare.is_none(), "the spare was given up");
        // A second failure before the shed backs off rather than spinning.
        assert_eq!(errors.failed(&emfile(), t0), ACCEPT_BACKOFF);

        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (conn, _) = l.accept().unwrap();
        assert!(errors.admit(conn, t0).is_none(), "shed");
        assert!(errors.spare.is_some(), "the spare is back");
        assert_eq!(errors.unlogged(), (1, 1));
        // The shed client sees a reset, not a clean close.
        use std::io::Read;
        let err = client.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        // The next connection is served as usual.
        let _c2 = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (conn2, _) = l.accept().unwrap();
        assert!(errors.admit(conn2, t0).is_some());
    }
}
