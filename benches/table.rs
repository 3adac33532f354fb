//! Control-plane benchmarks: publishing a one-service change into a table of 10,000 services
//! and 100,000 endpoints, and building that table from scratch.
//! Run: `cargo bench --bench table`.

mod common;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use svcproxy::core::{Batch, Policy, Table};

const SERVICES: usize = 10_000;
const PER_SERVICE: usize = 10;

fn publish(c: &mut Criterion) {
    let table = Table::default();
    table
        .apply(common::batch(SERVICES, PER_SERVICE, Policy::RoundRobin))
        .unwrap();
    let mut salt = 0u32;
    c.bench_function(
        "publish one-service endpoint change (10k services, 100k endpoints)",
        |b| {
            b.iter_batched(
                || {
                    salt ^= 1;
                    Batch::new().replace_endpoints(
                        "bench/svc-4242",
                        common::endpoints(4242, PER_SERVICE, salt),
                    )
                },
                |batch| black_box(table.apply(batch).unwrap()),
                BatchSize::SmallInput,
            )
        },
    );
    let mut present = false;
    c.bench_function("publish one-service add or remove (10k services)", |b| {
        b.iter_batched(
            || {
                present = !present;
                if present {
                    Batch::new()
                        .upsert(common::service(SERVICES, Policy::RoundRobin))
                        .replace_endpoints(
                            format!("bench/svc-{SERVICES}"),
                            common::endpoints(SERVICES, PER_SERVICE, 0),
                        )
                } else {
                    Batch::new().remove(format!("bench/svc-{SERVICES}"))
                }
            },
            |batch| black_box(table.apply(batch).unwrap()),
            BatchSize::SmallInput,
        )
    });
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group.sample_size(10);
    group.bench_function(
        "build table from scratch (10k services, 100k endpoints)",
        |b| {
            b.iter_batched(
                || common::batch(SERVICES, PER_SERVICE, Policy::RoundRobin),
                |batch| {
                    let table = Table::default();
                    table.apply(batch).unwrap();
                    table
                },
                BatchSize::LargeInput,
            )
        },
    );
    group.finish();
}

criterion_group!(benches, publish, build);
criterion_main!(benches);
