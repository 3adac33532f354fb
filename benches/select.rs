//! Data-plane benchmarks: load the snapshot, look up the service port, pick an endpoint, per
//! policy, on one thread, in a table of 10,000 services and 100,000 endpoints.
//! Run: `cargo bench --bench select`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use svcproxy::core::{Policy, Protocol, ServicePortKey, SessionAffinity, Table};

const SERVICES: usize = 10_000;
const PER_SERVICE: usize = 10;

fn table(policy: Policy, affinity: SessionAffinity) -> Table {
    let table = Table::default();
    let mut batch = common::batch(SERVICES, PER_SERVICE, policy);
    let svc = common::service(77, policy).affinity(affinity);
    batch = batch.upsert(svc);
    table.apply(batch).unwrap();
    table
}

fn select(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup+select");
    let policies = [
        ("round_robin", Policy::RoundRobin, SessionAffinity::None),
        ("random", Policy::Random, SessionAffinity::None),
        (
            "weighted_round_robin",
            Policy::WeightedRoundRobin,
            SessionAffinity::None,
        ),
        (
            "least_connections",
            Policy::LeastConnections,
            SessionAffinity::None,
        ),
        ("maglev", Policy::maglev(), SessionAffinity::None),
        (
            "round_robin+client_ip_affinity",
            Policy::RoundRobin,
            SessionAffinity::ClientIp {
                timeout: Duration::from_secs(10_800),
            },
        ),
    ];
    let key = ServicePortKey::new(SocketAddr::from((common::vip(77), 80)), Protocol::Tcp);
    for (name, policy, affinity) in policies {
        let table = table(policy, affinity);
        let now = Instant::now();
        let mut port = 1024u16;
        group.bench_function(name, |b| {
            b.iter(|| {
                port = port.wrapping_add(1);
                let client = SocketAddr::from(([127, 0, 0, 1], port));
                let snap = table.load();
                let state = snap.lookup(black_box(&key)).unwrap();
                black_box(state.select(client, now).unwrap().addr())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, select);
criterion_main!(benches);
