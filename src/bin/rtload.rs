//! `rtload`: the load generator for `scripts/loadtest/` where wrk and iperf3 do not fit.
//!
//! - `rtload echo --listen ADDR` — an echo origin that keeps idle connections open; prints
//!   `listening ADDR`.
//! - `rtload idle --target ADDR --conns N --hold SECS` — opens N connections (bounded
//!   concurrency), checks each with a round trip, prints `holding OK FAILED` and holds them
//!   until stdin closes or SECS pass; then prints a JSON summary.
//! - `rtload connect --target ADDR --path /1k [--host NAME] --secs S --conns C` — C loops of
//!   connect → `GET` with `Connection: close` → first response byte, for S seconds; prints
//!   JSON with connect-to-first-byte percentiles (HdrHistogram, microseconds).
//! - `rtload fleet-claims --registry etcd://ADDR --services N --conc C` — against a fleet
//!   registry: N plain etcd puts (the baseline), N service claims (what a relay does when an
//!   agent publishes), then N lease renewals, each C at a time; prints JSON with the rate of
//!   each.
//!
//! Traffic goes only where `--target` (or `--registry`) says; the harness only ever passes loopback addresses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Connections opened at once by `idle`; the rest queue, so a tunnel's accept queue and
/// visitor wait queue are exercised but not overrun.
const CONNECT_CONCURRENCY: usize = 128;
/// Deadline for one connection's open + round trip.
const OP_TIMEOUT: Duration = Duration::from_secs(20);

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn need<T: std::str::FromStr>(args: &[String], name: &str) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    let v = arg(args, name).with_context(|| format!("missing {name}"))?;
    v.parse::<T>()
        .map_err(|e| anyhow::anyhow!("{name} {v:?}: {e}"))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("echo") => rt.block_on(echo(need(&args, "--listen")?)),
        Some("idle") => rt.block_on(idle(
            need(&args, "--target")?,
            need(&args, "--conns")?,
            need(&args, "--hold")?,
        )),
        Some("connect") => rt.block_on(connect(
            need(&args, "--target")?,
            arg(&args, "--path").unwrap_or("/").to_string(),
            arg(&args, "--host").map(str::to_string),
            need(&args, "--secs")?,
            need(&args, "--conns")?,
        )),
        Some("fleet-claims") => rt.block_on(fleet_claims(
            need(&args, "--registry")?,
            need(&args, "--services")?,
            need(&args, "--conc")?,
        )),
        _ => bail!("usage: rtload echo|idle|connect|fleet-claims ... (see the source header)"),
    }
}

async fn echo(listen: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).await?;
    println!("listening {}", l.local_addr()?);
    loop {
        let (s, _) = match l.accept().await {
            Ok(v) => v,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let (mut r, mut w) = s.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

async fn open_checked(target: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(target).await?;
    s.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await?;
    if &buf != b"ping" {
        bail!("echo mismatch");
    }
    Ok(s)
}

async fn idle(target: SocketAddr, conns: usize, hold: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let held = Arc::new(Mutex::new(Vec::with_capacity(conns)));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (gate, held, failed) = (gate.clone(), held.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            match tokio::time::timeout(OP_TIMEOUT, open_checked(target)).await {
                Ok(Ok(s)) => held.lock().unwrap().push(s),
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let ok = held.lock().unwrap().len();
    let fail = failed.load(Ordering::Relaxed);
    let open_secs = started.elapsed().as_secs_f64();
    println!("holding {ok} {fail}");
    // Hold until the harness closes our stdin (it has measured) or the hold time passes.
    let mut line = String::new();
    let mut stdin = BufReader::new(tokio::io::stdin());
    let _ = tokio::time::timeout(Duration::from_secs(hold), stdin.read_line(&mut line)).await;
    // Still alive after the hold? Check a sample survived.
    let mut alive = 0usize;
    // Every opener has finished, so the connections can leave the mutex.
    let mut held = std::mem::take(&mut *held.lock().unwrap());
    {
        for s in held.iter_mut().take(100) {
            let mut buf = [0u8; 4];
            let probe = async {
                s.write_all(b"pong").await?;
                s.read_exact(&mut buf).await
            };
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), probe).await {
                alive += 1;
            }
        }
    }
    println!(
        "{{\"opened\": {ok}, \"failed\": {fail}, \"open_secs\": {open_secs:.3}, \"alive_of_first_100\": {alive}}}"
    );
    Ok(())
}

async fn connect(
    target: SocketAddr,
    path: String,
    host: Option<String>,
    secs: u64,
    conns: usize,
) -> anyhow::Result<()> {
    let host = host.unwrap_or_else(|| target.to_string());
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (hist, errors, request) = (hist.clone(), errors.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let one = async {
                    let mut s = TcpStream::connect(target).await?;
                    s.write_all(request.as_bytes()).await?;
                    let mut first = [0u8; 1];
                    s.read_exact(&mut first).await?;
                    let waited = t0.elapsed();
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest).await?;
                    Ok::<_, std::io::Error>(waited)
                };
                match tokio::time::timeout(OP_TIMEOUT, one).await {
                    Ok(Ok(d)) => {
                        let us = (d.as_micros() as u64).clamp(1, 60_000_000);
                        let _ = hist.lock().unwrap().record(us);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let h = hist.lock().unwrap();
    println!(
        "{{\"requests\": {}, \"errors\": {}, \"p50_us\": {}, \"p99_us\": {}, \"max_us\": {}}}",
        h.len(),
        errors.load(Ordering::Relaxed),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max()
    );
    Ok(())
}

/// Runs `n` jobs `make(i)`, `conc` at a time; their rate per second.
async fn rate<F, Fut>(n: usize, conc: usize, make: F) -> anyhow::Result<f64>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let gate = Arc::new(Semaphore::new(conc.max(1)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await?;
        let job = make(i);
        tasks.push(tokio::spawn(async move {
            let r = job.await;
            drop(permit);
            r
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn fleet_claims(registry: String, n: usize, conc: usize) -> anyhow::Result<()> {
    use ringtunnel::fleet::etcd::{Etcd, Op};
    use ringtunnel::fleet::{Claim, Fleet, FleetSettings};
    let prefix = format!("/rtload-{}/", std::process::id());
    let fleet = Arc::new(Fleet::new(FleetSettings {
        registry: registry.clone(),
        relay_id: "rtload".into(),
        advertise: "127.0.0.1:1".into(),
        prefix: prefix.clone(),
        ttl: Duration::from_secs(60),
        access: Default::default(),
    })?);
    let etcd = Arc::new(Etcd::parse(&registry)?);
    let put = rate(n, conc, |i| {
        let (etcd, key) = (etcd.clone(), format!("{prefix}bench/{i}"));
        async move {
            let put = Op::Put {
                key,
                value: b"{}".to_vec(),
                lease: 0,
            };
            etcd.txn(&[], &[put], &[]).await?;
            Ok(())
        }
    })
    .await?;
    let range = ringtunnel::config::PortRange {
        start: 1024,
        end: 65535,
    };
    let claim = rate(n, conc, |i| {
        let fleet = fleet.clone();
        async move {
            let c = Claim {
                name: format!("svc{i}"),
                kind: ringtunnel::protocol::ServiceKind::Tcp,
                port: 0,
                hosts: vec![],
                path: String::new(),
                owner: "default".into(),
            };
            fleet.claim(&c, range).await?;
            Ok(())
        }
    })
    .await?;
    let leases: Vec<i64> = fleet.holds().iter().map(|h| h.lease).collect();
    let renew = rate(leases.len(), conc, |i| {
        let (etcd, lease) = (etcd.clone(), leases[i]);
        async move {
            anyhow::ensure!(etcd.keep_alive(lease).await?.is_some(), "lease lapsed");
            Ok(())
        }
    })
    .await?;
    for l in &leases {
        let _ = etcd.revoke(*l).await;
    }
    let (left, _) = etcd.range_prefix(&prefix).await?;
    for kv in left {
        let del = Op::Delete { key: kv.key };
        let _ = etcd.txn(&[], &[del], &[]).await;
    }
    println!(
        "{}",
        serde_json::json!({
            "services": n, "concurrency": conc,
            "put_per_s": put, "claim_per_s": claim, "renew_per_s": renew,
        })
    );
    Ok(())
}
