//! Publishing: generations, structural sharing, cursors that survive unrelated publishes,
//! frontend diffs, node ports, subscribers and counters that persist.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use svcproxy_core::*;

fn svc(name: &str, ip: &str, port: u16) -> Service {
    Service::new(name)
        .address(ip.parse().unwrap())
        .port(ServicePort::tcp(port))
}

fn eps(addrs: &[&str]) -> Vec<Endpoint> {
    addrs
        .iter()
        .map(|a| Endpoint::new(a.parse().unwrap()))
        .collect()
}

fn key(s: &str) -> ServicePortKey {
    ServicePortKey::new(s.parse().unwrap(), Protocol::Tcp)
}

fn client() -> SocketAddr {
    "127.0.0.1:50000".parse().unwrap()
}

#[test]
fn generations_count_publishes_and_empty_batches_publish_nothing() {
    let table = Table::default();
    assert_eq!(table.load().generation(), 0);
    let p = table
        .apply(Batch::new().upsert(svc("a", "198.19.0.1", 80)))
        .unwrap();
    assert_eq!(p.generation, 1);
    assert_eq!(table.apply(Batch::new()).unwrap().generation, 1);
    table.apply(Batch::new().remove("a")).unwrap();
    let snap = table.load();
    assert_eq!(snap.generation(), 2);
    assert!(snap.lookup(&key("198.19.0.1:80")).is_none());
    assert_eq!(snap.service_count(), 0);
}

#[test]
fn unchanged_services_are_shared_and_keep_their_cursor() {
    let table = Table::default();
    table
        .apply(
            Batch::new()
                .upsert(svc("a", "198.19.0.1", 80))
                .replace_endpoints(
                    "a",
                    eps(&["198.19.10.1:80", "198.19.10.2:80", "198.19.10.3:80"]),
                )
                .upsert(svc("b", "198.19.0.2", 80)),
        )
        .unwrap();
    let before = table.load_full();
    let a = before.lookup(&key("198.19.0.1:80")).unwrap().clone();
    let first = a.select(client(), Instant::now()).unwrap().addr();

    // Changing b does not touch a.
    table
        .apply(Batch::new().replace_endpoints("b", eps(&["198.19.20.1:80"])))
        .unwrap();
    let after = table.load();
    let a2 = after.lookup(&key("198.19.0.1:80")).unwrap();
    assert!(Arc::ptr_eq(&a, a2), "service a is shared, not rebuilt");
    assert!(!Arc::ptr_eq(
        before.lookup(&key("198.19.0.2:80")).unwrap(),
        after.lookup(&key("198.19.0.2:80")).unwrap()
    ));

    // Rebuilding a with the same endpoints (e.g. a new affinity-free spec) keeps the cursor.
    let second = a2.select(client(), Instant::now()).unwrap().addr();
    table
        .apply(Batch::new().replace_endpoints(
            "a",
            eps(&["198.19.10.3:80", "198.19.10.1:80", "198.19.10.2:80"]),
        ))
        .unwrap();
    let third = table
        .load()
        .lookup(&key("198.19.0.1:80"))
        .unwrap()
        .select(client(), Instant::now())
        .unwrap()
        .addr();
    let order: Vec<SocketAddr> = ["198.19.10.1:80", "198.19.10.2:80", "198.19.10.3:80"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!([first, second, third], [order[0], order[1], order[2]]);
}

#[test]
fn frontend_changes_report_what_appeared_and_went() {
    let table = Table::default();
    table
        .apply(Batch::new().upsert(svc("a", "198.19.0.1", 80)))
        .unwrap();
    let old = table.load_full();
    table
        .apply(Batch::new().remove("a").upsert(svc("b", "198.19.0.2", 81)))
        .unwrap();
    let changes = table.load().frontend_changes(&old);
    assert_eq!(changes.added, vec![key("198.19.0.2:81")]);
    assert_eq!(changes.removed, vec![key("198.19.0.1:80")]);

    // Snapshots of different tables are compared in full.
    let other = Table::default();
    other
        .apply(Batch::new().upsert(svc("b", "198.19.0.2", 81)))
        .unwrap();
    let changes = table.load().frontend_changes(&other.load());
    assert!(changes.added.is_empty() && changes.removed.is_empty());
}

#[test]
fn node_ports_and_external_addresses_use_the_external_policy() {
    let config = TableConfig {
        node_name: Some("node-a".into()),
        node_addresses: vec!["198.18.2.1".parse().unwrap()],
        ..TableConfig::default()
    };
    let table = Table::new(config);
    let mut s = Service::new("np")
        .address("198.19.0.1".parse().unwrap())
        .port(ServicePort::tcp(80).node_port(30080));
    s.external_addresses.push("198.51.100.7".parse().unwrap());
    s.external_traffic_policy = TrafficPolicy::Local;
    let local = Endpoint::new("198.19.10.1:80".parse().unwrap()).node("node-a");
    let remote = Endpoint::new("198.19.10.2:80".parse().unwrap()).node("node-b");
    table
        .apply(
            Batch::new()
                .upsert(s)
                .replace_endpoints("np", vec![local, remote]),
        )
        .unwrap();
    let snap = table.load();
    let count = |k: &str| snap.lookup(&key(k)).unwrap().backends().len();
    assert_eq!(count("198.19.0.1:80"), 2, "cluster IP: cluster-wide");
    assert_eq!(count("198.18.2.1:30080"), 1, "node port: local only");
    assert_eq!(count("198.51.100.7:80"), 1, "external IP: local only");
    assert_eq!(snap.frontend_count(), 3);
}

#[test]
fn subscribers_hear_every_publish_until_unsubscribed() {
    let table = Table::default();
    let heard = Arc::new(AtomicU64::new(0));
    let h = heard.clone();
    let id = table.subscribe(move |generation| h.store(generation, Ordering::SeqCst));
    table
        .apply(Batch::new().upsert(svc("a", "198.19.0.1", 80)))
        .unwrap();
    assert_eq!(heard.load(Ordering::SeqCst), 1);
    table.apply(Batch::new().remove("a")).unwrap();
    assert_eq!(heard.load(Ordering::SeqCst), 2);
    table.unsubscribe(id);
    table
        .apply(Batch::new().upsert(svc("a", "198.19.0.1", 80)))
        .unwrap();
    assert_eq!(heard.load(Ordering::SeqCst), 2);
}

#[test]
fn counters_persist_across_publishes_and_show_in_stats() {
    let table = Table::default();
    table
        .apply(
            Batch::new()
                .upsert(svc("a", "198.19.0.1", 80))
                .replace_endpoints("a", eps(&["198.19.10.1:80", "198.19.10.2:80"])),
        )
        .unwrap();
    let open = {
        let snap = table.load();
        let b = snap
            .lookup(&key("198.19.0.1:80"))
            .unwrap()
            .select(client(), Instant::now())
            .unwrap();
        b.tally().bytes_in(100);
        b.tally().bytes_out(7);
        b.tally().open()
    };
    // Add a third endpoint: the first keeps its counters.
    table
        .apply(Batch::new().replace_endpoints(
            "a",
            eps(&["198.19.10.1:80", "198.19.10.2:80", "198.19.10.3:80"]),
        ))
        .unwrap();
    let stats = table.load().stats();
    assert_eq!(stats.len(), 1);
    let s = &stats[0];
    assert_eq!(
        (s.service.as_str(), s.port.as_str(), s.protocol),
        ("a", "80", Protocol::Tcp)
    );
    assert_eq!(s.totals.bytes_in, 100);
    assert_eq!(s.totals.connections_active, 1);
    assert_eq!(s.endpoints.len(), 3);
    assert_eq!(s.endpoints[0].0, "198.19.10.1:80".parse().unwrap());
    assert_eq!(s.endpoints[0].1.bytes_out, 7);
    assert_eq!(s.endpoints[2].1, CounterValues::default());
    drop(open);
    assert_eq!(table.load().stats()[0].totals.connections_active, 0);
}
