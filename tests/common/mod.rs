//! Shared helpers for end-to-end tests: spawn the real `ringtunnel` binary as relay and agent
//! on loopback with ephemeral ports, wait for their stable stdout lines, and run origins.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringtunnel::protocol::auth::{register_mac, Ticket};
use ringtunnel::protocol::{
    AgentMsg, RelayMsg, ServiceOutcome, ServiceRequest, ServiceResult, PROTOCOL_VERSION,
};
use ringtunnel::tls::{client_config, Fingerprint, RelayTrust};
use ringtunnel::transport::{BoxStream, Framed};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

/// The value of one series on the relay's `/metrics` (admin endpoint without a token), e.g.
/// `ringtunnel_data_accepted_total` or `ringtunnel_service_idle_connections{service="x",kind="tcp"}`.
pub async fn metric(admin: SocketAddr, series: &str) -> Option<u64> {
    let mut s = TcpStream::connect(admin).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Waits (bounded) until `series` on the relay's `/metrics` is at least `n`: a condition, not
/// a sleep, for "the relay has done X".
pub async fn wait_metric(admin: SocketAddr, series: &str, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = metric(admin, series).await;
        if v.is_some_and(|v| v >= n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached {n} (last {v:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The idle-connection gauge of a `tcp` service.
pub fn idle_series(service: &str) -> String {
    format!("ringtunnel_service_idle_connections{{service=\"{service}\",kind=\"tcp\"}}")
}

/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(30);

pub const SECRET: &str = "correct horse battery staple";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("ringtunnel-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process whose stdout lines arrive on a channel and whose stderr is collected.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub stderr: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(args: &[String]) -> Proc {
        Self::spawn_env(args, &[])
    }

    pub fn spawn_env(args: &[String], env: &[(&str, &str)]) -> Proc {
        Self::spawn_limited(args, env, None)
    }

    /// [`Self::spawn_env`], with the process's descriptor limit (soft and hard) set to
    /// `nofile` when given.
    pub fn spawn_limited(args: &[String], env: &[(&str, &str)], nofile: Option<u64>) -> Proc {
        Self::spawn_program(
            Path::new(env!("CARGO_BIN_EXE_ringtunnel")),
            args,
            env,
            nofile,
        )
    }

    /// [`Self::spawn_limited`] of another `ringtunnel` binary (an installed one).
    pub fn spawn_program(
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Proc {
        let mut cmd = Command::new(program);
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            let limit = rustix::process::Rlimit {
                current: Some(n),
                maximum: Some(n),
            };
            // SAFETY: only setrlimit runs between fork and exec (async-signal-safe).
            unsafe {
                cmd.pre_exec(move || {
                    rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let mut child = cmd
            .args(args)
            .env_remove("RINGTUNNEL_SECRET")
            // An agent takes a proxy from the environment; a test that wants one says so.
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            // `RINGTUNNEL_TEST_LOG=debug cargo test ...` puts debug lines in failure output.
            // Before `env`, so a test can set its own.
            .env(
                "RINGTUNNEL_LOG",
                std::env::var("RINGTUNNEL_TEST_LOG").unwrap_or("info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringtunnel");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Proc {
            child,
            lines,
            stderr,
        }
    }

    /// Waits for a stdout line starting with `prefix`; panics with stderr after `WAIT`.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => continue,
                Err(_) => panic!(
                    "no line starting with {prefix:?} within {WAIT:?}; stderr:\n{}",
                    self.stderr()
                ),
            }
        }
    }

    /// Waits for the process to exit (bounded); panics if it does not.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the stderr reader drain.
                std::thread::sleep(Duration::from_millis(100));
                return st;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "process did not exit within {WAIT:?}; stderr:\n{}",
            self.stderr()
        );
    }

    /// Waits (bounded) until stderr contains `needle` at least `n` times.
    pub fn wait_stderr_count(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.stderr().matches(needle).count() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "stderr never contained {needle:?} {n} times:\n{}",
            self.stderr()
        );
    }

    /// Waits (bounded) until stderr contains `needle`.
    pub fn wait_stderr(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.stderr().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("stderr never contained {needle:?}:\n{}", self.stderr());
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends `sig` (as `kill` takes it: `-TERM`, `-STOP`, ...) to the process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The data-plane backend a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Tokio,
    Uring,
}

impl Backend {
    /// `Some(Uring)` if io_uring works here; otherwise prints why the test is skipped (or
    /// fails it, under `RINGTUNNEL_REQUIRE_URING=1` as in `.ci/run`).
    pub fn uring() -> Option<Backend> {
        ringtunnel::dataplane::probe::uring_for_tests().then_some(Backend::Uring)
    }

    pub fn flag(self) -> &'static str {
        match self {
            Backend::Tokio => "tokio",
            Backend::Uring => "uring",
        }
    }
}

/// Runs each named `async fn name(backend: Backend)` as two tests, one per backend.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod tokio_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Tokio).await
                }
            )*
        }
        mod uring_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(b) = super::Backend::uring() {
                        super::$name(b).await
                    }
                }
            )*
        }
    };
}

/// A relay process and what it printed.
pub struct Relay {
    pub proc: Proc,
    pub control: SocketAddr,
    /// The shared HTTP port, when started with `--http`.
    pub http: Option<SocketAddr>,
    /// The shared TLS port, when started with `--tls`.
    pub tls: Option<SocketAddr>,
    /// The admin endpoint, when started with `--admin`.
    pub admin: Option<SocketAddr>,
    pub fingerprint: String,
    pub state: Arc<TempDir>,
    pub extra: Vec<String>,
    pub backend: Backend,
}

impl Relay {
    /// Starts a relay on `127.0.0.1:0` with its own state dir, the given backend, plus `extra`
    /// flags. Unless a test asks for `--data-tls` itself, the uring relay runs with
    /// `--data-tls off`, so its data connections take the splice path; with `--data-tls on`
    /// its workers copy them through rustls.
    pub fn spawn(backend: Backend, extra: &[&str]) -> Relay {
        Self::spawn_env(backend, extra, &[])
    }

    /// [`Self::spawn`] with `env` set for the relay process (not for its restarts).
    pub fn spawn_env(backend: Backend, extra: &[&str], env: &[(&str, &str)]) -> Relay {
        Self::spawn_limited(backend, extra, env, None)
    }

    /// [`Self::spawn_env`] with the relay's descriptor limit set to `nofile` (see
    /// [`Proc::spawn_limited`]).
    pub fn spawn_limited(
        backend: Backend,
        extra: &[&str],
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Relay {
        let state = Arc::new(TempDir::new("relay"));
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let tls_flag = args
            .iter()
            .position(|a| a == "--data-tls")
            .map(|i| args[i + 1].clone());
        match (backend, tls_flag.as_deref()) {
            (Backend::Tokio, _) => args.extend(["--backend".into(), "tokio".into()]),
            (Backend::Uring, Some(_)) => args.extend(["--backend".into(), "uring".into()]),
            (Backend::Uring, None) => args.extend([
                "--backend".into(),
                "uring".into(),
                "--data-tls".into(),
                "off".into(),
            ]),
        }
        Self::spawn_at(
            "127.0.0.1:0".parse().unwrap(),
            state,
            args,
            backend,
            env,
            nofile,
        )
    }

    /// A relay whose control and public ports are on `ip` (127.0.0.2, say: several relays
    /// side by side on one machine, each with the same ports), with the state directory
    /// `state` and `extra` flags exactly as given (the backend included).
    pub fn spawn_on(ip: [u8; 4], state: Arc<TempDir>, extra: &[&str]) -> Relay {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let backend = match extra.iter().position(|a| a == "--backend") {
            Some(i) if extra[i + 1] == "uring" => Backend::Uring,
            _ => Backend::Tokio,
        };
        Self::spawn_at(SocketAddr::from((ip, 0)), state, extra, backend, &[], None)
    }

    fn spawn_at(
        control: SocketAddr,
        state: Arc<TempDir>,
        extra: Vec<String>,
        backend: Backend,
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Relay {
        let mut args: Vec<String> = vec![
            "relay".into(),
            "--control".into(),
            control.to_string(),
            "--secret".into(),
            SECRET.into(),
            "--bind-addr".into(),
            control.ip().to_string(),
            "--state-dir".into(),
            state.0.display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        let mut proc = Proc::spawn_limited(&args, env, nofile);
        let line = proc.wait_line("ready ");
        let control = field(&line, "control").parse().unwrap();
        let fingerprint = field(&line, "fingerprint");
        let http = field_opt(&line, "http").map(|a| a.parse().unwrap());
        let tls = field_opt(&line, "tls").map(|a| a.parse().unwrap());
        let admin = field_opt(&line, "admin").map(|a| a.parse().unwrap());
        Relay {
            proc,
            control,
            http,
            tls,
            admin,
            fingerprint,
            state,
            extra,
            backend,
        }
    }

    /// Kills this relay and starts a new one on the same control port and state directory.
    pub fn restart(mut self) -> Relay {
        self.proc.kill();
        let (control, state, extra, backend) = (
            self.control,
            self.state.clone(),
            self.extra.clone(),
            self.backend,
        );
        drop(self);
        Self::spawn_at(control, state, extra, backend, &[], None)
    }

    /// Starts a second relay on this one's control port and state directory (same
    /// fingerprint), once this one has closed its doors (it is draining): its successor.
    pub fn successor(&self) -> Relay {
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(self.control).is_ok() {
            assert!(Instant::now() < deadline, "the control port never closed");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self::spawn_at(
            self.control,
            self.state.clone(),
            self.extra.clone(),
            self.backend,
            &[],
            None,
        )
    }

    /// After SIGUSR2: waits until the new process took over every port, and returns its pid
    /// (it is not a child of the test: see [`KillOnDrop`]).
    pub fn successor_pid(&self) -> u32 {
        let line = "upgrade: the new process took over every port";
        self.proc.wait_stderr(line);
        let stderr = self.proc.stderr();
        stderr
            .lines()
            .find(|l| l.contains(line))
            .and_then(|l| field_opt(l, "pid"))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in:\n{stderr}"))
    }

    /// Agent flags that reach this relay with the right secret and fingerprint.
    pub fn agent_args(&self, local: SocketAddr, name: &str) -> Vec<String> {
        vec![
            "agent".into(),
            "--relay".into(),
            self.control.to_string(),
            "--relay-fingerprint".into(),
            self.fingerprint.clone(),
            "--secret".into(),
            SECRET.into(),
            "--local".into(),
            local.to_string(),
            "--name".into(),
            name.into(),
            "--backend".into(),
            self.backend.flag().into(),
        ]
    }
}

/// An agent process that printed its `online` line.
pub struct Agent {
    pub proc: Proc,
    pub public: SocketAddr,
    /// The `online ...` line it printed.
    pub online: String,
}

impl Agent {
    pub fn spawn(args: Vec<String>) -> Agent {
        Self::from_proc(Proc::spawn(&args))
    }

    /// Waits for the `online` line of an agent already started as `proc`.
    pub fn from_proc(mut proc: Proc) -> Agent {
        let line = proc.wait_line("online ");
        // The agent prints the relay host as it was given (maybe a name); tests reach the
        // relay on loopback.
        // `HOST:PORT`, or `http://NAME:PORT/PREFIX` for an http service with a prefix.
        let port: u16 = field(&line, "public")
            .rsplit(':')
            .next()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let public = SocketAddr::from(([127, 0, 0, 1], port));
        Agent {
            proc,
            public,
            online: line,
        }
    }
}

/// The value of `key=value` in a space-separated line.
pub fn field(line: &str, key: &str) -> String {
    field_opt(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// The value of `key=value` in a space-separated line, if present.
pub fn field_opt(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

/// `ringtunnel relay` arguments: a free loopback control port, the test secret, `state` as
/// the state directory, then `extra` (for tests that run the relay as a plain [`Proc`]).
pub fn relay_command(state: &Path, extra: &[&str]) -> Vec<String> {
    let state = state.display().to_string();
    [
        "relay",
        "--control",
        "127.0.0.1:0",
        "--secret",
        SECRET,
        "--state-dir",
        &state,
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// Writes `toml` to a fresh file and returns its directory (keep it alive) and path.
pub fn config_file(toml: &str) -> (TempDir, String) {
    let dir = TempDir::new("config");
    let path = dir.0.join("relay.toml");
    std::fs::write(&path, toml).unwrap();
    let path = path.display().to_string();
    (dir, path)
}

/// One read from `s` appended to `buf`; `false` at EOF or on an error.
pub async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// The next HTTP head on `s` (through its blank line), taken off the front of `buf` (bytes
/// read but not used yet); `None` if the stream ends first.
pub async fn next_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        if !read_more(s, buf).await {
            return None;
        }
    }
}

/// An origin that echoes every byte and half-closes when the visitor does.
pub async fn echo_origin() -> SocketAddr {
    origin(serve_echo).await
}

/// An origin on a fresh loopback port that runs `serve` on every connection, each in its
/// own task, for the rest of the test.
pub async fn origin<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    origin_at([127, 0, 0, 1].into(), serve).await
}

/// [`origin`], listening on `ip` (an address of a link the test made).
pub async fn origin_at<F, Fut>(ip: std::net::IpAddr, serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// An origin that sends `data` to every connection that first sends a byte, then closes.
pub async fn bulk_origin(data: Arc<Vec<u8>>) -> SocketAddr {
    bulk_origin_at([127, 0, 0, 1].into(), data).await
}

/// [`bulk_origin`], listening on `ip`.
pub async fn bulk_origin_at(ip: std::net::IpAddr, data: Arc<Vec<u8>>) -> SocketAddr {
    origin_at(ip, move |mut s: TcpStream| {
        let data = data.clone();
        async move {
            let mut b = [0u8; 16];
            if matches!(s.read(&mut b).await, Ok(n) if n > 0) {
                let _ = s.write_all(&data).await;
                let _ = s.shutdown().await;
            }
        }
    })
    .await
}

/// Reads from `v` into `hash` until `total` reaches `until` or the stream ends; each read
/// bounded by [`WAIT`]; panics on a reset.
pub async fn read_hashing(
    v: &mut TcpStream,
    hash: &mut ring::digest::Context,
    total: &mut usize,
    until: usize,
) {
    let mut buf = vec![0u8; 256 * 1024];
    while *total < until {
        let n = tokio::time::timeout(WAIT, v.read(&mut buf))
            .await
            .expect("the transfer moves")
            .expect("no reset");
        if n == 0 {
            return;
        }
        hash.update(&buf[..n]);
        *total += n;
    }
}

/// Reads `s` to its end (bounded by [`WAIT`]): `Ok(bytes)` at a clean FIN, or the error.
pub async fn read_to_end_or_error(s: &mut TcpStream) -> std::io::Result<usize> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the visitor's connection ended")
}

/// Echoes one connection until the peer half-closes, then half-closes too.
pub async fn serve_echo(s: TcpStream) {
    let (mut r, mut w) = s.into_split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// An origin that reads the whole request (until the visitor half-closes), then answers with
/// `reply_len` bytes derived from the request, then closes.
pub async fn answer_after_eof_origin(reply_len: usize) -> SocketAddr {
    origin(move |mut s| async move {
        let mut req = Vec::new();
        if s.read_to_end(&mut req).await.is_err() {
            return;
        }
        let _ = s.write_all(&reply_for(&req, reply_len)).await;
        let _ = s.shutdown().await;
    })
    .await
}

/// The reply [`answer_after_eof_origin`] sends for `req`.
pub fn reply_for(req: &[u8], len: usize) -> Vec<u8> {
    let seed = req.iter().fold(len as u64 + 1, |a, b| {
        a.wrapping_mul(31).wrapping_add(u64::from(*b))
    });
    pseudo_random(seed, len)
}

/// Deterministic pseudo-random bytes (xorshift64*), fast enough for tens of MiB.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// Sends `payload` through `public`, half-closes, and returns everything read back.
pub async fn roundtrip(public: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let s = tokio::net::TcpStream::connect(public).await?;
    let (mut r, mut w) = s.into_split();
    let send = async {
        w.write_all(payload).await?;
        w.shutdown().await
    };
    let mut got = Vec::new();
    let recv = r.read_to_end(&mut got);
    let (a, b) = tokio::time::timeout(WAIT, async { tokio::join!(send, recv) })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "roundtrip timed out"))?;
    a?;
    b?;
    Ok(got)
}

/// Asserts an echo through `public` works for a small payload.
pub async fn assert_echo(public: SocketAddr) {
    let payload = b"still alive?".to_vec();
    let got = roundtrip(public, &payload)
        .await
        .expect("echo through tunnel");
    assert_eq!(got, payload);
}

// ------------------------------------------------ a hand-rolled agent, for attacks and silence

pub async fn tls_connect(relay: &Relay) -> BoxStream {
    let fp: Fingerprint = relay.fingerprint.parse().unwrap();
    let connector = TlsConnector::from(client_config(&RelayTrust::Pinned(fp)).unwrap());
    let tcp = TcpStream::connect(relay.control).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    Box::new(connector.connect(name, tcp).await.unwrap())
}

pub async fn connect_data(relay: &Relay, tls: bool) -> BoxStream {
    if tls {
        tls_connect(relay).await
    } else {
        Box::new(TcpStream::connect(relay.control).await.unwrap())
    }
}

/// Opens a control session as a hand-rolled agent holding `secret` and registers `requests`
/// (their MACs are computed here); returns the control connection and the relay's results.
pub async fn fake_session(
    relay: &Relay,
    secret: &str,
    mut requests: Vec<ServiceRequest>,
) -> (Framed<BoxStream>, Vec<ServiceResult>) {
    let limit = Duration::from_secs(10);
    let mut ctl = Framed::new(tls_connect(relay).await);
    ctl.write_msg(
        &AgentMsg::ControlHello {
            version: PROTOCOL_VERSION,
        },
        limit,
    )
    .await
    .unwrap();
    let RelayMsg::Challenge { nonce, .. } = ctl.read_msg_within(limit).await.unwrap() else {
        panic!("expected challenge")
    };
    for r in &mut requests {
        r.mac = register_mac(secret.as_bytes(), &nonce, &r.name);
    }
    ctl.write_msg(&AgentMsg::Register { services: requests }, limit)
        .await
        .unwrap();
    match ctl.read_msg_within(limit).await.unwrap() {
        RelayMsg::Registered { results } => (ctl, results),
        other => panic!("expected Registered, got {other:?}"),
    }
}

/// Registers service `name` as a hand-rolled agent; returns the control connection, the
/// public port and the first tickets.
pub async fn fake_agent(relay: &Relay, name: &str) -> (Framed<BoxStream>, u16, Vec<Ticket>) {
    let limit = Duration::from_secs(10);
    let req = ServiceRequest {
        name: name.into(),
        remote_port: 0,
        pool: 2,
        ..Default::default()
    };
    let (mut ctl, results) = fake_session(relay, SECRET, vec![req]).await;
    let ServiceOutcome::Online { port, .. } = results[0].outcome else {
        panic!("{results:?}")
    };
    let RelayMsg::Tickets { tickets, .. } = ctl.read_msg_within(limit).await.unwrap() else {
        panic!("expected tickets")
    };
    (ctl, port, tickets)
}

/// Sends `raw` (a whole HTTP request) to `addr` and reads until the server closes: the
/// status and the body.
pub async fn http_request(addr: SocketAddr, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A counter from the relay's admin endpoint (`--admin` on loopback, no token), by its name
/// without the `ringtunnel_` prefix and `_total` suffix.
pub async fn admin_counter(admin: SocketAddr, name: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let key = format!("ringtunnel_{name}_total ");
    out.lines()
        .find_map(|l| l.strip_prefix(&key))
        .unwrap_or_else(|| panic!("no {key} in {out}"))
        .trim()
        .parse()
        .unwrap()
}

/// The next piece of a chunked direction (a hand-rolled agent reading what the relay sends
/// after `Start`): the bytes it carried, `END` with how many bytes followed it in `wire`, or
/// `RAW`.
#[derive(Debug)]
pub enum Chunk {
    Data(Vec<u8>),
    End { after: usize },
    Raw,
}

/// Reads from `s` (bounded by [`WAIT`]) until `deframer` yields the next [`Chunk`]; `wire`
/// holds bytes read but not decoded yet.
pub async fn next_chunk(
    s: &mut BoxStream,
    wire: &mut Vec<u8>,
    deframer: &mut ringtunnel::protocol::chunk::Deframer,
) -> Chunk {
    use ringtunnel::protocol::chunk::Piece;
    loop {
        if wire.is_empty() {
            let mut buf = [0u8; 256];
            let n = tokio::time::timeout(WAIT, s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "relay closed mid-visitor");
            wire.extend_from_slice(&buf[..n]);
        }
        match deframer.next(wire).unwrap() {
            Piece::Data(r) => {
                let data = wire[r.clone()].to_vec();
                wire.drain(..r.end);
                return Chunk::Data(data);
            }
            Piece::NeedMore => wire.clear(),
            Piece::End { used } => {
                return Chunk::End {
                    after: wire.len() - used,
                }
            }
            Piece::Raw { .. } => return Chunk::Raw,
        }
    }
}

/// Whether `program` (from Debian's `package`) runs here (`program version_arg`). When it
/// does not, the test says so and is skipped, unless `require_env=1` (as `.ci/run` sets it,
/// having installed it), where that is a failure.
pub fn installed(program: &str, version_arg: &str, package: &str, require_env: &str) -> bool {
    let found = Command::new(program)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var(require_env).as_deref() != Ok("1"),
            "{require_env}=1 but no {program} on PATH"
        );
        eprintln!("skipped: no {program} on PATH (apt-get install {package})");
    }
    found
}

/// Kills, when dropped, a process the test did not start itself (the relay that took over
/// in a live upgrade).
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

/// A real ClientHello for `name` (what a TLS visitor sends first).
pub fn client_hello(name: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let server = ServerName::try_from(name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// A loopback port free now (TCP and UDP), for programs that cannot be told port 0.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // 16000-18999: outside every port range the tests give relays (the default 20000-29999,
    // where a port asked of the relay must not be; the fleet's 12000-15999) and below the
    // kernel's ephemeral range, so no connection's source port and no `bind(0)` of another
    // test takes the port between this check and the program binding it; the counter never
    // hands one binary the same port twice. (Ports from `bind(0)` did collide under the
    // parallel suite: pebble lost its management port that way.)
    let (base, end) = (16_000u64, 19_000u64);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(32768);
    if low < end {
        return std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let span = end - base;
    let start = u64::from(std::process::id()) * 7919;
    for _ in 0..span {
        let port = (base + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        // UDP too: pebble's DNS server binds both.
        if std::net::TcpListener::bind(addr).is_ok() && std::net::UdpSocket::bind(addr).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {base}..{end}");
}

/// A TLS client that trusts only `root`.
pub fn tls_client(root: &rustls_pki_types::CertificateDer<'static>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(cfg))
}

/// Waits (at most [`WAIT`]) until `program`, which a test started as `what`, listens on
/// `addr`; panics with its stderr when it exits first or never listens.
pub fn wait_listening(program: &mut Proc, addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(addr).is_err() {
        if !program.is_running() {
            std::thread::sleep(Duration::from_millis(100));
            panic!(
                "{what} exited before listening on {addr}; stderr:\n{}",
                program.stderr()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} never listened on {addr}; stderr:\n{}",
            program.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
