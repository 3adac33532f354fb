//! Builds a service table, picks endpoints with several policies, and shows what a publish
//! does to a running rotation. Run: `cargo run --release --example table_demo`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use svcproxy::core::{
    Batch, Conditions, Endpoint, Policy, Protocol, Service, ServicePort, ServicePortKey,
    SessionAffinity, Table,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let table = Table::default();
    let endpoints: Vec<Endpoint> = (1..=3)
        .map(|i| Endpoint::new(SocketAddr::from(([127, 0, 0, 1], 9000 + i))).weight(i as u32))
        .collect();
    let policies = [
        ("round robin", Policy::RoundRobin, 10),
        ("weighted round robin", Policy::WeightedRoundRobin, 11),
        ("least connections", Policy::LeastConnections, 12),
        ("maglev", Policy::maglev(), 13),
        ("random", Policy::Random, 14),
    ];
    let mut batch = Batch::new();
    for (name, policy, ip) in policies {
        let svc = Service::new(name.replace(' ', "-"))
            .address([198, 18, 0, ip].into())
            .port(ServicePort::tcp(80))
            .policy(policy);
        batch = batch
            .upsert(svc)
            .replace_endpoints(name.replace(' ', "-"), endpoints.clone());
    }
    let published = table.apply(batch)?;
    println!(
        "published generation {} ({} services) in {:?}",
        published.generation,
        table.load().service_count(),
        published.elapsed
    );
    println!("endpoints: 127.0.0.1:9001 (weight 1), :9002 (weight 2), :9003 (weight 3)\n");

    for (name, _, ip) in policies {
        let key = ServicePortKey::new(SocketAddr::from(([198, 18, 0, ip], 80)), Protocol::Tcp);
        let snapshot = table.load();
        let port = snapshot.lookup(&key).expect("published");
        let mut counts = BTreeMap::new();
        let mut open = Vec::new();
        for c in 0..600u16 {
            let client = SocketAddr::from(([127, 0, 0, 2], 20_000 + c));
            let backend = port
                .select(client, Instant::now())
                .expect("endpoints are ready");
            // As a backend does: count the connection as open (least connections reads this)
            // for as long as it is kept.
            open.push(backend.tally().open());
            *counts.entry(backend.addr().port()).or_insert(0) += 1;
        }
        println!("{name:>22}: 600 connections kept open -> {counts:?}");
    }

    // A publish that does not change a service's endpoints keeps its rotation going.
    let key = ServicePortKey::new(SocketAddr::from(([198, 18, 0, 10], 80)), Protocol::Tcp);
    let client = SocketAddr::from(([127, 0, 0, 2], 30_000));
    let pick = |t: &Table| {
        t.load()
            .lookup(&key)
            .unwrap()
            .select(client, Instant::now())
            .unwrap()
            .addr()
    };
    let before = pick(&table);
    table.apply(Batch::new().replace_endpoints("maglev", endpoints[..2].to_vec()))?;
    let after = pick(&table);
    println!("\nround robin across an unrelated publish: {before} then {after}");

    // Endpoint conditions and session affinity.
    let mut draining = endpoints.clone();
    draining[0].conditions = Conditions::SERVING_TERMINATING;
    let sticky = Service::new("sticky")
        .address([198, 18, 0, 20].into())
        .port(ServicePort::tcp(80))
        .affinity(SessionAffinity::ClientIp {
            timeout: Duration::from_secs(10_800),
        });
    table.apply(
        Batch::new()
            .upsert(sticky)
            .replace_endpoints("sticky", draining),
    )?;
    let key = ServicePortKey::new(SocketAddr::from(([198, 18, 0, 20], 80)), Protocol::Tcp);
    let snapshot = table.load();
    let port = snapshot.lookup(&key).unwrap();
    let picks: Vec<u16> = (0..5u16)
        .map(|p| {
            let client = SocketAddr::from(([127, 0, 0, 7], 40_000 + p));
            port.select(client, Instant::now()).unwrap().addr().port()
        })
        .collect();
    println!(
        "session affinity, 5 connections from one client IP (terminating :9001 skipped): {picks:?}"
    );
    println!(
        "\nactive connections per endpoint, generation {}:",
        snapshot.generation()
    );
    for s in snapshot
        .stats()
        .iter()
        .filter(|s| s.totals.connections_active > 0)
    {
        let per: Vec<String> = s
            .endpoints
            .iter()
            .map(|(addr, v)| format!(":{} {}", addr.port(), v.connections_active))
            .collect();
        println!("  {:>22}: {}", s.service, per.join(", "));
    }
    Ok(())
}
