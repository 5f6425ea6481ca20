//! What this kernel and process allow for the uring backend: io_uring. Probed once and cached
//! (kTLS, for splicing TLS data connections, is probed by `tls::ktls::probe`).

use std::sync::OnceLock;

/// Why a kernel feature cannot be used here, in words for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// Set to any value to make the io_uring probe fail, as if the kernel refused it (for tests
/// and for forcing the fallback on a machine where io_uring misbehaves).
pub const FORCE_NO_URING_ENV: &str = "RINGTUNNEL_FORCE_NO_URING";

/// `Ok(())` if io_uring works here, else why not.
pub fn io_uring() -> Result<(), Unavailable> {
    if std::env::var_os(FORCE_NO_URING_ENV).is_some() {
        return Err(Unavailable(format!("disabled by {FORCE_NO_URING_ENV}")));
    }
    static PROBE: OnceLock<Result<(), Unavailable>> = OnceLock::new();
    PROBE
        .get_or_init(|| probe_io_uring().map_err(Unavailable))
        .clone()
}

fn probe_io_uring() -> Result<(), String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        match v.trim() {
            "0" | "" => {}
            "1" => {} // only unprivileged users are refused; the setup call below tells
            other => return Err(format!("kernel.io_uring_disabled = {other}")),
        }
    }
    // SAFETY: io_uring_setup with a zeroed params struct only reads and writes that struct;
    // a successful call returns a ring fd that is closed at once.
    let mut params = [0u8; 120]; // struct io_uring_params is 120 bytes
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::ENOSYS) => "io_uring_setup is not implemented by this kernel".into(),
            Some(libc::EPERM) => "io_uring_setup not permitted (sysctl or seccomp)".into(),
            _ => format!("io_uring_setup failed: {err}"),
        });
    }
    // SAFETY: fd is a descriptor we own and have not shared.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// Environment variable that turns a skipped io_uring test into a failure. `.ci/run` sets
/// it: CI's kernel has io_uring, so a uring test that would skip there is a broken test.
pub const REQUIRE_URING_ENV: &str = "RINGTUNNEL_REQUIRE_URING";

/// Test support: whether a test that needs io_uring can run. Where io_uring is unavailable
/// it prints why the test is skipped and returns `false` — or panics when
/// [`REQUIRE_URING_ENV`] is `1`, so a skip can never pass for green where it must not happen.
#[doc(hidden)]
pub fn uring_for_tests() -> bool {
    match io_uring() {
        Ok(()) => true,
        Err(why) if std::env::var(REQUIRE_URING_ENV).is_ok_and(|v| v == "1") => {
            panic!("{REQUIRE_URING_ENV}=1 but io_uring is unavailable: {why}")
        }
        Err(why) => {
            println!("skipped: io_uring unavailable here ({why})");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_io_uring_probe_agrees_with_building_a_ring() {
        if std::env::var_os(FORCE_NO_URING_ENV).is_some() {
            assert!(io_uring().is_err());
            return;
        }
        let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .build()
            .is_ok();
        assert_eq!(io_uring().is_ok(), built, "{:?}", io_uring());
    }
}
