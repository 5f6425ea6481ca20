//! Forwarding cost of the production data path on loopback: N bytes from a visitor through a
//! relay-side and an agent-side forwarder joined by one tunnel connection (a tunnel's shape),
//! for the tokio backend (`dataplane::tokio::chunked::forward`) and the uring backend
//! (`dataplane::uring::chunked::forward`, each side on its own monoio thread, as relay and
//! agent workers are), against the same transfer on a direct socket pair in the same run.
//! Read the ratio, not the absolute numbers: loopback on a shared machine is noisy, and
//! loopback understates what zero-copy would save. The relay side counts its bytes as the
//! relay does (into per-thread sharded counters).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringtunnel::admin::Metrics;
use ringtunnel::config::Limits;
use ringtunnel::dataplane::gate::{Admission, Gate};
use ringtunnel::dataplane::tally::Tally;
use ringtunnel::dataplane::tokio::chunked;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    c.set_nodelay(true).unwrap();
    s.set_nodelay(true).unwrap();
    (c, s)
}

#[derive(Clone, Copy)]
enum Via {
    Direct,
    Tokio,
    Uring,
}

/// (visitor, origin): directly connected, or through relay forwarder ⇄ tunnel ⇄ agent forwarder.
async fn path(via: Via) -> (TcpStream, TcpStream) {
    if let Via::Direct = via {
        return pair().await;
    }
    let (visitor, mut v_side) = pair().await;
    let (mut t_relay, mut t_agent) = pair().await;
    let (mut o_side, origin) = pair().await;
    match via {
        Via::Tokio => {
            tokio::spawn(async move {
                let admission = admitted();
                let tally = Tally::admitted(Some(&admission));
                chunked::forward(&mut v_side, &mut t_relay, &[], &[], None, tally).await
            });
            tokio::spawn(async move {
                chunked::forward(&mut o_side, &mut t_agent, &[], &[], None, Tally::none()).await
            });
        }
        _ => {
            for (peer, tunnel, relay) in [(v_side, t_relay, true), (o_side, t_agent, false)] {
                let (peer, tunnel) = (peer.into_std().unwrap(), tunnel.into_std().unwrap());
                std::thread::spawn(move || uring_side(peer, tunnel, relay));
            }
        }
    }
    (visitor, origin)
}

/// A visitor let in by a service's gate, as the relay counts its bytes.
fn admitted() -> Admission {
    let gate = Gate::new(
        "bench",
        &Limits::default(),
        std::sync::Arc::new(Metrics::default()),
    );
    gate.admit("127.0.0.1:1".parse().unwrap())
        .expect("no limits")
}

/// One side of the tunnel on its own ring, as a relay (counting bytes) or agent worker runs it.
fn uring_side(peer: std::net::TcpStream, tunnel: std::net::TcpStream, relay: bool) {
    use ringtunnel::dataplane::uring::{chunked, pipe::PipePool};
    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("io_uring runtime");
    rt.block_on(async move {
        peer.set_nonblocking(true).unwrap();
        tunnel.set_nonblocking(true).unwrap();
        let peer = monoio::net::TcpStream::from_std(peer).unwrap();
        let tunnel = monoio::net::TcpStream::from_std(tunnel).unwrap();
        let pipes = PipePool::default();
        let admission = admitted();
        let tally = match relay {
            true => Tally::admitted(Some(&admission)),
            false => Tally::none(),
        };
        let _ = chunked::forward(&peer, &tunnel, &pipes, &[], false, None, tally).await;
    });
}

async fn transfer(client: &mut TcpStream, server: &mut TcpStream, data: &[u8], sink: &mut [u8]) {
    let n = data.len();
    let send = client.write_all(data);
    let recv = async {
        let mut got = 0;
        while got < n {
            let cap = sink.len().min(n - got);
            got += server.read(&mut sink[..cap]).await.unwrap();
        }
    };
    let (r, ()) = tokio::join!(send, recv);
    r.unwrap();
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("forward");
    for (label, size) in [
        ("1KiB", 1usize << 10),
        ("64KiB", 64 << 10),
        ("1MiB", 1 << 20),
    ] {
        g.throughput(Throughput::Bytes(size as u64));
        let data = vec![0x5au8; size];
        let mut sink = vec![0u8; 256 << 10];
        let uring = ringtunnel::dataplane::probe::io_uring();
        if let Err(why) = &uring {
            eprintln!("forward/uring-chunked skipped: io_uring unavailable ({why})");
        }
        let mut vias = vec![("direct", Via::Direct), ("tokio-chunked", Via::Tokio)];
        if uring.is_ok() {
            vias.push(("uring-chunked", Via::Uring));
        }
        for (name, via) in vias {
            let (mut client, mut server) = rt.block_on(path(via));
            g.bench_with_input(BenchmarkId::new(name, label), &size, |b, _| {
                b.iter(|| run(&rt, &mut client, &mut server, &data, &mut sink))
            });
        }
    }
    g.finish();
}

fn run(rt: &Runtime, client: &mut TcpStream, server: &mut TcpStream, data: &[u8], sink: &mut [u8]) {
    rt.block_on(transfer(client, server, data, sink));
}

criterion_group!(benches, bench);
criterion_main!(benches);
