//! Zero-downtime upgrade: a running relay starts a new process (the binary on disk now, with
//! the same command line), hands it every listening socket — control, admin, the shared HTTP
//! and TLS ports, each service's own port, one per worker where the workers each have one —
//! with a record of each published service, and steps back once the new process says it is
//! ready. The sockets never close, so no visitor or agent is refused: the new process accepts
//! from then on, agents move to it when the old one tells them it is going away, and the old
//! one drains the visitors it is serving.

use std::ffi::OsString;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::control::service::ServiceRecord;
use crate::net::handover::{self, Channel};

/// How long the new process has to start and say it is ready.
pub const READY_WAIT: Duration = Duration::from_secs(30);

/// What travels with the descriptors: how many belong to each port, in the order they
/// travel (control, admin, shared HTTP, shared TLS, then each service's own).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Manifest {
    control: usize,
    admin: usize,
    http: usize,
    tls: usize,
    services: Vec<ServiceRecord>,
}

/// Why an upgrade did not happen. The old process carries on as before.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The handover socket or a descriptor failed.
    #[error("handover: {0}")]
    Io(#[from] io::Error),
    /// What arrived was not a handover this process understands.
    #[error("handover manifest: {0}")]
    Manifest(String),
    /// The new binary did not start.
    #[error("starting {exe}: {why}")]
    Spawn {
        /// The binary.
        exe: PathBuf,
        /// Why not.
        why: io::Error,
    },
    /// The new process started but could not take over.
    #[error("the new process could not take over: {0}")]
    Refused(String),
}

/// Listening sockets a process passes on (duplicates: the originals keep serving until the
/// successor is ready).
#[derive(Debug, Default)]
pub struct Outgoing {
    /// The control port.
    pub control: Vec<OwnedFd>,
    /// The admin endpoint.
    pub admin: Vec<OwnedFd>,
    /// The shared HTTP port (one per worker on uring).
    pub http: Vec<OwnedFd>,
    /// The shared TLS port (one per worker on uring).
    pub tls: Vec<OwnedFd>,
    /// Every published service, with its own port's listeners.
    pub services: Vec<(ServiceRecord, Vec<OwnedFd>)>,
}

/// Listening sockets handed over by the process this one takes over from.
#[derive(Debug, Default)]
pub struct Inherited {
    /// The control port.
    pub control: Option<TcpListener>,
    /// The admin endpoint.
    pub admin: Option<TcpListener>,
    /// The shared HTTP port's listeners.
    pub http: Vec<TcpListener>,
    /// The shared TLS port's listeners.
    pub tls: Vec<TcpListener>,
    /// Services to publish again (unowned, until their agents return), with their listeners.
    pub services: Vec<(ServiceRecord, Vec<TcpListener>)>,
}

impl Inherited {
    /// Receives a handover on `channel` (from [`hand_over`] in the old process).
    pub fn receive(channel: &Channel) -> Result<Inherited, UpgradeError> {
        let (manifest, fds) = channel.receive()?;
        let manifest: Manifest =
            serde_json::from_slice(&manifest).map_err(|e| UpgradeError::Manifest(e.to_string()))?;
        let wanted = manifest.control
            + manifest.admin
            + manifest.http
            + manifest.tls
            + manifest.services.iter().map(|s| s.listeners).sum::<usize>();
        if wanted != fds.len() || manifest.control != 1 || manifest.admin > 1 {
            return Err(UpgradeError::Manifest(format!(
                "{} descriptors for {wanted} listeners",
                fds.len()
            )));
        }
        let mut fds = fds.into_iter().map(TcpListener::from);
        let mut take = |n: usize| fds.by_ref().take(n).collect::<Vec<_>>();
        let control = take(1).pop();
        let admin = take(manifest.admin).pop();
        let http = take(manifest.http);
        let tls = take(manifest.tls);
        let services = manifest
            .services
            .into_iter()
            .map(|s| {
                let listeners = take(s.listeners);
                (s, listeners)
            })
            .collect();
        Ok(Inherited {
            control,
            admin,
            http,
            tls,
            services,
        })
    }
}

/// Starts `exe` with `args` as this relay's successor, hands it `outgoing`, and waits (up to
/// [`READY_WAIT`]) until it is ready. Returns its process id. On failure the new process is
/// stopped if it still runs; this one has given up nothing. Blocking: run it off the runtime.
pub fn hand_over(exe: &Path, args: &[OsString], outgoing: Outgoing) -> Result<u32, UpgradeError> {
    let mut manifest = Manifest {
        control: outgoing.control.len(),
        admin: outgoing.admin.len(),
        http: outgoing.http.len(),
        tls: outgoing.tls.len(),
        services: Vec::new(),
    };
    let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
    for group in [
        &outgoing.control,
        &outgoing.admin,
        &outgoing.http,
        &outgoing.tls,
    ] {
        fds.extend(group.iter().map(|f| f.as_fd()));
    }
    for (record, listeners) in &outgoing.services {
        manifest.services.push(record.clone());
        fds.extend(listeners.iter().map(|f| f.as_fd()));
    }
    let manifest =
        serde_json::to_vec(&manifest).map_err(|e| UpgradeError::Manifest(e.to_string()))?;
    let (channel, theirs) = Channel::pair()?;
    let mut child = Command::new(exe)
        .args(args)
        .env(handover::ENV, theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|why| UpgradeError::Spawn {
            exe: exe.to_path_buf(),
            why,
        })?;
    drop(theirs);
    let pid = child.id();
    // A new process that fails early (its settings) says why and exits, maybe before
    // reading what was sent: its answer is the better error than the broken pipe.
    let sent = channel.send(&manifest, &fds);
    let wait = match sent {
        Ok(()) => READY_WAIT,
        Err(_) => Duration::from_secs(1),
    };
    let outcome = match (channel.receive_status(wait), sent) {
        (Ok(Ok(())), Ok(())) => Ok(()),
        (Ok(Err(why)), _) => Err(UpgradeError::Refused(why)),
        (Ok(Ok(())), Err(e)) | (Err(_), Err(e)) => Err(UpgradeError::Io(e)),
        (Err(e), Ok(())) => Err(UpgradeError::Io(e)),
    };
    match outcome {
        Ok(()) => {
            // Reaped when it exits, should that happen while this process still runs.
            std::thread::spawn(move || child.wait());
            Ok(pid)
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ServiceKind;

    #[test]
    fn what_is_sent_is_what_arrives_in_its_place() {
        let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (control, http, svc) = (bind(), [bind(), bind()], [bind(), bind()]);
        let dup = |l: &TcpListener| l.as_fd().try_clone_to_owned().unwrap();
        let record = ServiceRecord {
            name: "web".into(),
            kind: ServiceKind::Tcp,
            port: svc[0].local_addr().unwrap().port(),
            hosts: vec![],
            path: String::new(),
            listeners: 2,
            draining: true,
        };
        let outgoing = Outgoing {
            control: vec![dup(&control)],
            admin: vec![],
            http: http.iter().map(dup).collect(),
            tls: vec![],
            services: vec![(record.clone(), svc.iter().map(dup).collect())],
        };
        let (ours, theirs) = Channel::pair().unwrap();
        // The receiving half of what `hand_over` does, on a thread of our own.
        let got = std::thread::scope(|s| {
            let h = s.spawn(|| Inherited::receive(&Channel::adopt(theirs)));
            let m = Manifest {
                control: 1,
                admin: 0,
                http: 2,
                tls: 0,
                services: vec![record.clone()],
            };
            let mut fds: Vec<BorrowedFd<'_>> = outgoing.control.iter().map(|f| f.as_fd()).collect();
            fds.extend(outgoing.http.iter().map(|f| f.as_fd()));
            fds.extend(outgoing.services[0].1.iter().map(|f| f.as_fd()));
            ours.send(&serde_json::to_vec(&m).unwrap(), &fds).unwrap();
            h.join().unwrap().unwrap()
        });
        let addr = |l: &TcpListener| l.local_addr().unwrap();
        assert_eq!(got.control.as_ref().map(addr), Some(addr(&control)));
        assert!(got.admin.is_none());
        assert_eq!(
            got.http.iter().map(addr).collect::<Vec<_>>(),
            http.iter().map(addr).collect::<Vec<_>>()
        );
        assert_eq!(got.services.len(), 1);
        assert_eq!(got.services[0].0, record);
        assert_eq!(
            got.services[0].1.iter().map(addr).collect::<Vec<_>>(),
            svc.iter().map(addr).collect::<Vec<_>>()
        );
    }
}
