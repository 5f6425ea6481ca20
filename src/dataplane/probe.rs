//! What this kernel and process allow: io_uring (for the uring backend) and kTLS (for
//! splicing TLS data connections). Each probe runs once and is cached.

use std::sync::OnceLock;

/// Set to any value to make the io_uring probe fail, as if the kernel refused it (for tests
/// and for forcing the fallback on a machine where io_uring misbehaves).
pub const FORCE_NO_URING_ENV: &str = "RINGTUNNEL_FORCE_NO_URING";

/// `Ok(())` if io_uring works here, else why not.
pub fn io_uring() -> Result<(), String> {
    if std::env::var_os(FORCE_NO_URING_ENV).is_some() {
        return Err(format!("disabled by {FORCE_NO_URING_ENV}"));
    }
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe_io_uring).clone()
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

/// `Ok(())` if the kernel offers the TLS upper-layer protocol (kTLS), else why not.
pub fn ktls() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe_ktls).clone()
}

fn probe_ktls() -> Result<(), String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let client = std::net::TcpStream::connect(listener.local_addr().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    use std::os::fd::AsRawFd;
    let name = b"tls\0";
    // SAFETY: setsockopt on a socket we own, with a valid buffer and length.
    let rc = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            (name.len() - 1) as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::ENOENT) => "the kernel has no tls module (TCP_ULP \"tls\": ENOENT)".into(),
        _ => format!("TCP_ULP \"tls\" failed: {err}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_answer_without_panicking() {
        // Whatever this machine says, the answer is cached and stable.
        assert_eq!(io_uring(), io_uring());
        assert_eq!(ktls(), ktls());
    }
}
