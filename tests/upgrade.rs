//! Zero-downtime upgrade: SIGUSR2 makes the relay start the binary again with its command
//! line, hand it every listening socket, and drain. Under a steady load of short visits to a
//! `tcp` and an `http` service, nothing is refused or fails, a 256 MiB download that started
//! before the upgrade finishes intact through the old process, and the agents come back on the
//! new one with the same ports.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP origin that answers each request with `200 ok` and closes.
async fn ok_origin() -> SocketAddr {
    origin(|mut s: TcpStream| async move {
        let mut buf = Vec::new();
        if next_head(&mut s, &mut buf).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
            let _ = s.shutdown().await;
        }
    })
    .await
}

/// One short HTTP visit through the shared port: whether it got the origin's `200 ok`.
async fn http_visit(http: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(http).await.map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: web.up.test\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    match text.starts_with("HTTP/1.1 200") && text.ends_with("ok") {
        true => Ok(()),
        false => Err(text.lines().next().unwrap_or("nothing").to_string()),
    }
}

/// One short visit to the echo service.
async fn tcp_visit(public: SocketAddr) -> Result<(), String> {
    let payload = pseudo_random(3, 1024);
    match roundtrip(public, &payload).await {
        Ok(back) if back == payload => Ok(()),
        Ok(back) => Err(format!("{} bytes back", back.len())),
        Err(e) => Err(e.to_string()),
    }
}

/// The successor process, killed when the test ends (it outlives the relay that started it).
async fn an_upgrade_refuses_no_one_and_finishes_what_was_in_flight(backend: Backend) {
    let data = Arc::new(pseudo_random(5, 256 << 20));
    let want = sha256(&data);
    // The load comes from one address, faster than the default per-address rate.
    let (_dir, path) = config_file("[limits]\nconn_rate_per_ip = 0\n");
    let mut relay = Relay::spawn(
        backend,
        &[
            "--http",
            "127.0.0.1:0",
            "--domain",
            "up.test",
            "--config",
            &path,
        ],
    );
    let http = relay.http.unwrap();
    let mut bulk = Agent::spawn(relay.agent_args(bulk_origin(data).await, "bulk"));
    let mut echo = Agent::spawn(relay.agent_args(echo_origin().await, "echo"));
    let mut web_args = relay.agent_args(ok_origin().await, "web");
    web_args.extend(["--http-host".into(), "web".into()]);
    let mut web = Agent::spawn(web_args);
    assert_eq!(http_visit(http).await, Ok(()));

    // The download starts and pauses after its first MiB, held inside the old relay.
    let mut v = TcpStream::connect(bulk.public).await.unwrap();
    v.write_all(b"go").await.unwrap();
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0;
    read_hashing(&mut v, &mut hash, &mut got, 1 << 20).await;

    // A steady load of short visits, each one checked, for the whole upgrade.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let mut load = Vec::new();
    for i in 0..8 {
        let (stop, ok, failed, public) = (stop.clone(), ok.clone(), failed.clone(), echo.public);
        load.push(tokio::spawn(async move {
            // Bounded: at most this many visits per task.
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = match i % 2 {
                    0 => tcp_visit(public).await,
                    _ => http_visit(http).await,
                };
                match r {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failed.lock().unwrap().push(e);
                        0
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    relay.proc.signal("-USR2");
    let ready = relay.proc.wait_line("ready ");
    assert_eq!(
        field(&ready, "control"),
        relay.control.to_string(),
        "{ready}"
    );
    assert_eq!(
        field(&ready, "fingerprint"),
        relay.fingerprint,
        "the same identity"
    );
    let _successor = KillOnDrop(relay.successor_pid());
    // Every agent comes back, on the new process, with its public address.
    for agent in [&mut bulk, &mut echo, &mut web] {
        let again = agent.proc.wait_line("online ");
        assert_eq!(again, agent.online);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The download finishes through the old process, every byte right; then it exits.
    read_hashing(&mut v, &mut hash, &mut got, usize::MAX).await;
    assert_eq!(got, 256 << 20);
    assert_eq!(hash.finish().as_ref(), want.as_slice());
    drop(v);
    assert!(relay.proc.wait_exit().success(), "{}", relay.proc.stderr());
    assert!(
        relay.proc.stderr().contains("relay stopped: drained="),
        "{}",
        relay.proc.stderr()
    );
    assert!(
        relay.proc.stderr().contains(" cut=0"),
        "{}",
        relay.proc.stderr()
    );
    // Data connections dialled with the old process's tickets that reach the new one are an
    // expected race there: refused quietly, not counted (nor throttled) as guesses.
    assert!(
        !relay
            .proc
            .stderr()
            .contains("unknown or already used ticket"),
        "{}",
        relay.proc.stderr()
    );

    // The load ran on across the handover and after the old process was gone.
    let before = ok.load(Ordering::Relaxed);
    let deadline = std::time::Instant::now() + WAIT;
    while ok.load(Ordering::Relaxed) < before + 50 {
        assert!(std::time::Instant::now() < deadline, "the load stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let failed = std::mem::take(&mut *failed.lock().unwrap());
    assert!(
        failed.is_empty(),
        "{} of {} visits failed: {:?}\n{}",
        failed.len(),
        failed.len() + ok.load(Ordering::Relaxed),
        &failed[..failed.len().min(5)],
        relay.proc.stderr()
    );
    assert_eq!(tcp_visit(echo.public).await, Ok(()));
}

async fn a_failed_upgrade_changes_nothing(backend: Backend) {
    let (_dir, path) = config_file("[limits]\nmax_visitors = 100\n");
    let mut relay = Relay::spawn(backend, &["--config", &path]);
    let echo = Agent::spawn(relay.agent_args(echo_origin().await, "echo"));
    // The new process reads the same command line: a broken file stops it at the start.
    std::fs::write(&path, "[limits]\nmax_visitors = \"lots\"\n").unwrap();
    relay.proc.signal("-USR2");
    relay
        .proc
        .wait_stderr("upgrade failed, this relay carries on");
    assert!(
        relay.proc.stderr().contains("max_visitors"),
        "{}",
        relay.proc.stderr()
    );
    assert!(relay.proc.is_running());
    assert_eq!(tcp_visit(echo.public).await, Ok(()));
    // And a later upgrade, with the file mended, goes through.
    std::fs::write(&path, "[limits]\nmax_visitors = 100\n").unwrap();
    relay.proc.signal("-USR2");
    let _successor = KillOnDrop(relay.successor_pid());
    assert!(relay.proc.wait_exit().success());
    assert_eq!(tcp_visit(echo.public).await, Ok(()));
}

/// Under systemd (`Type=notify`, `NotifyAccess=all`): the relay says it is ready, and after
/// an upgrade the new process names itself the main process, so systemd follows it rather
/// than stopping the service when the old one exits. A unix datagram socket stands in for
/// systemd's: the protocol is the datagrams.
async fn systemd_hears_ready_and_follows_the_new_process(backend: Backend) {
    let dir = TempDir::new("notify");
    let path = dir.0.join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    systemd.set_read_timeout(Some(WAIT)).unwrap();
    let hear = || {
        let mut buf = [0u8; 512];
        let n = systemd.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let socket = path.display().to_string();
    let mut relay = Relay::spawn_env(backend, &[], &[("NOTIFY_SOCKET", &socket)]);
    assert_eq!(hear(), "READY=1");

    relay.proc.signal("-USR2");
    let said = hear();
    let pid: u32 = said
        .strip_prefix("MAINPID=")
        .and_then(|rest| rest.strip_suffix("\nREADY=1"))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("{said:?}"));
    let _successor = KillOnDrop(pid);
    assert_ne!(pid, relay.proc.child.id());
    assert!(relay.proc.wait_exit().success());
    // The old process said nothing more: a STOPPING=1 from it would stop the service.
    systemd.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(systemd.recv(&mut buf).is_err(), "{:?}", &buf);
    let echo = Agent::spawn(relay.agent_args(echo_origin().await, "echo"));
    assert_eq!(
        tcp_visit(echo.public).await,
        Ok(()),
        "the new process serves"
    );
}

both_backends!(
    an_upgrade_refuses_no_one_and_finishes_what_was_in_flight,
    a_failed_upgrade_changes_nothing,
    systemd_hears_ready_and_follows_the_new_process,
);
