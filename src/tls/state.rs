//! The state directory's safety checks. It holds the relay's private key, so before trusting
//! or writing anything there the relay checks that nobody else could have put it there or can
//! read it: the directory and its files belong to the user the relay runs as, nothing in it
//! is a symbolic link, the directory is not writable by others, and the key is readable by
//! its owner alone. Files are created with `O_EXCL | O_NOFOLLOW`, so a file or link planted
//! under the temporary name makes the write fail instead of landing somewhere else.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::TlsError;

/// What a checked file may be read by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrecy {
    /// Anyone may read it (a certificate); only its owner may write it.
    Public,
    /// Only its owner may read or write it (a private key).
    Secret,
}

fn unsafe_state(path: &Path, problem: String) -> TlsError {
    TlsError::UnsafeState {
        path: path.to_path_buf(),
        problem,
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |error| TlsError::StateDir {
        path: path.to_path_buf(),
        error,
    }
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Checks what `meta` says about `path` against the rules for its kind.
fn check(path: &Path, meta: &Metadata, dir: bool, secrecy: Secrecy) -> Result<(), TlsError> {
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(unsafe_state(
            path,
            "is a symbolic link; the relay never follows links here: replace it with the real directory or file".into(),
        ));
    }
    if dir && !kind.is_dir() {
        return Err(unsafe_state(path, "is not a directory".into()));
    }
    if !dir && !kind.is_file() {
        return Err(unsafe_state(path, "is not a regular file".into()));
    }
    let me = euid();
    if meta.uid() != me {
        return Err(unsafe_state(
            path,
            format!(
                "belongs to user {} but the relay runs as user {me}: chown it to the relay's user",
                meta.uid()
            ),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    let forbidden = match (dir, secrecy) {
        (true, _) => 0o022,
        (false, Secrecy::Public) => 0o022,
        (false, Secrecy::Secret) => 0o077,
    };
    if mode & forbidden != 0 {
        let want = match (dir, secrecy) {
            (true, _) => 0o700,
            (false, Secrecy::Public) => 0o644,
            (false, Secrecy::Secret) => 0o600,
        };
        let who = if forbidden == 0o077 {
            "readable or writable by other users"
        } else {
            "writable by other users"
        };
        return Err(unsafe_state(
            path,
            format!(
                "is {who} (mode {mode:03o}): run chmod {want:03o} {}",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Makes sure the state directory exists and is safe: created with mode 0700 if missing;
/// if present, owned by the relay's user, not a link, not writable by others.
pub fn ensure_dir(dir: &Path) -> Result<(), TlsError> {
    match fs::symlink_metadata(dir) {
        Ok(meta) => check(dir, &meta, true, Secrecy::Public),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
            // The umask may have taken bits away, never added them; check what we got.
            let meta = fs::symlink_metadata(dir).map_err(io_err(dir))?;
            check(dir, &meta, true, Secrecy::Public)
        }
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// Whether `path` exists (without following a link: a dangling link exists).
pub fn exists(path: &Path) -> Result<bool, TlsError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Reads a file of the state directory after checking it (never through a link).
pub fn read(path: &Path, secrecy: Secrecy) -> Result<Vec<u8>, TlsError> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_nofollow())
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => unsafe_state(
                path,
                "is a symbolic link; the relay never follows links here: replace it with the real file".into(),
            ),
            _ => io_err(path)(e),
        })?;
    // Checked on the open file, so what is checked is what is read.
    let meta = f.metadata().map_err(io_err(path))?;
    check(path, &meta, false, secrecy)?;
    let mut out = Vec::new();
    io::Read::read_to_end(&mut f, &mut out).map_err(io_err(path))?;
    Ok(out)
}

/// Writes `bytes` to a new file at `path` with `mode`, through a temporary file created
/// exclusively (never truncating or following what is there) and renamed into place.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let open = || -> io::Result<File> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc_o_nofollow())
            .mode(mode)
            .open(&tmp)
    };
    let mut f = match open() {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Left by a crash, or planted: unlink it (unlinking never follows a link) and
            // create afresh; if it appears again, give up.
            fs::remove_file(&tmp).map_err(io_err(&tmp))?;
            open().map_err(io_err(&tmp))?
        }
        Err(e) => return Err(io_err(&tmp)(e)),
    };
    // The umask may have removed bits but never adds any; set exactly `mode` and check it.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn libc_o_nofollow() -> i32 {
    libc::O_NOFOLLOW
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ringtunnel-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_new_dir_is_private_and_loose_modes_are_refused_with_the_fix() {
        let d = scratch("modes");
        ensure_dir(&d).unwrap();
        let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let key = d.join("k");
        write_new(&key, b"secret", 0o600).unwrap();
        assert_eq!(read(&key, Secrecy::Secret).unwrap(), b"secret");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read(&key, Secrecy::Secret).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(
            read(&key, Secrecy::Public).is_ok(),
            "a certificate may be 0644"
        );
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_dir(&d).unwrap_err().to_string();
        assert!(err.contains("chmod 700"), "{err}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn links_are_never_followed() {
        let d = scratch("links");
        ensure_dir(&d).unwrap();
        let victim = d.join("victim");
        fs::write(&victim, b"precious").unwrap();
        // A link planted under the temporary name: the write neither follows nor truncates it.
        let target = d.join("key.pem");
        std::os::unix::fs::symlink(&victim, target.with_extension("tmp")).unwrap();
        write_new(&target, b"new key", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(&target).unwrap(), b"new key");
        // A link in place of a file, or of the directory, is refused.
        let link = d.join("link.pem");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = read(&link, Secrecy::Public).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        let dir_link = scratch("links-dir");
        std::os::unix::fs::symlink(&d, &dir_link).unwrap();
        let err = ensure_dir(&dir_link).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        fs::remove_file(&dir_link).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }
}
