//! Forwarding cost of the data path on loopback: N bytes from a client through the tokio
//! backend's copy (`dataplane::forward`) and through the uring backend's splice
//! (`dataplane::uring::splice::forward`, on its own monoio thread), against the same transfer
//! on a direct socket pair in the same run. Read the ratio, not the absolute numbers: loopback on
//! a shared machine is noisy, and loopback understates what zero-copy would save.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringtunnel::dataplane::forward::forward;
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
    TokioCopy,
    UringSplice,
}

/// (client, server): direct, or with a forwarder running between two pairs.
async fn path(via: Via) -> (TcpStream, TcpStream) {
    if let Via::Direct = via {
        return pair().await;
    }
    let (client, mut a) = pair().await;
    let (mut b, server) = pair().await;
    match via {
        Via::TokioCopy => {
            tokio::spawn(async move { forward(&mut a, &mut b, &[]).await });
        }
        _ => {
            let (a, b) = (a.into_std().unwrap(), b.into_std().unwrap());
            std::thread::spawn(move || splice_thread(a, b));
        }
    }
    (client, server)
}

fn splice_thread(a: std::net::TcpStream, b: std::net::TcpStream) {
    use ringtunnel::dataplane::uring::splice::{self, PipePool};
    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("io_uring runtime");
    rt.block_on(async move {
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let a = monoio::net::TcpStream::from_std(a).unwrap();
        let b = monoio::net::TcpStream::from_std(b).unwrap();
        let pipes = PipePool::default();
        let _ = splice::forward(&a, &b, &pipes).await;
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
            eprintln!("forward/uring-splice skipped: io_uring unavailable ({why})");
        }
        let mut vias = vec![("direct", Via::Direct), ("tokio-copy", Via::TokioCopy)];
        if uring.is_ok() {
            vias.push(("uring-splice", Via::UringSplice));
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
