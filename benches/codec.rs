//! Control-plane costs: encoding and decoding frames, and ticket issue + redeem.
//! These run on every control exchange and every data connection, never per visitor byte.

use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringtunnel::config::SecretId;
use ringtunnel::control::tickets::{Owner, Redeemed, TicketStore};
use ringtunnel::protocol::auth::{register_mac, verify_register_mac, Ticket};
use ringtunnel::protocol::msg::Message;
use ringtunnel::protocol::{AgentMsg, RelayMsg, ServiceRequest};

fn codec(c: &mut Criterion) {
    let tickets = RelayMsg::Tickets {
        service: "web".into(),
        tickets: (0..64u8).map(|i| Ticket([i; 16])).collect(),
    };
    let frame = tickets.to_frame();
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("encode/tickets-64", |b| {
        b.iter(|| black_box(&tickets).to_frame())
    });
    g.bench_function("decode/tickets-64", |b| {
        b.iter(|| RelayMsg::decode(black_box(&frame)).unwrap())
    });
    let hello = AgentMsg::DataHello {
        version: 1,
        ticket: Ticket([7; 16]),
    }
    .to_frame();
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode/data-hello", |b| {
        b.iter(|| AgentMsg::decode(black_box(&hello)).unwrap())
    });
    let register = AgentMsg::Register {
        services: (0..8)
            .map(|i| ServiceRequest {
                name: format!("service-{i}"),
                remote_port: 20000 + i,
                pool: 4,
                mac: [1; 32],
                ..Default::default()
            })
            .collect(),
    }
    .to_frame();
    g.bench_function("decode/register-8", |b| {
        b.iter(|| AgentMsg::decode(black_box(&register)).unwrap())
    });
    g.finish();
}

fn auth(c: &mut Criterion) {
    let mut g = c.benchmark_group("auth");
    g.throughput(Throughput::Elements(1));
    let nonce = [3u8; 32];
    let mac = register_mac(b"secret", &nonce, "web");
    g.bench_function("hmac/verify-register", |b| {
        b.iter(|| {
            assert!(verify_register_mac(
                b"secret",
                black_box(&nonce),
                "web",
                &mac
            ))
        })
    });
    g.bench_function("tickets/issue+redeem", |b| {
        let mut store = TicketStore::default();
        let owner = Owner {
            session: 1,
            secret: SecretId::Default,
        };
        b.iter(|| {
            let now = Instant::now();
            let t = store.issue(now, owner.clone(), 1u32).unwrap();
            assert_eq!(store.redeem(now, &t), Redeemed::Valid(1));
        })
    });
    g.finish();
}

criterion_group!(benches, codec, auth);
criterion_main!(benches);
