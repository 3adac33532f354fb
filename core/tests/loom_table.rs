//! Model-checked concurrency (loom). Run with:
//! `RUSTFLAGS="--cfg loom" cargo test -p svcproxy-core --release --test loom_table`
//!
//! Under loom the table's publication cell is a loom mutex around a loom `Arc` (see
//! `core/src/loom.rs`), so these check svcproxy's own protocol: writers serialise, readers see
//! whole snapshots, retired snapshots are freed (loom fails the run if a loom `Arc` leaks),
//! round-robin cursors are exact under concurrency, and flow purge follows publishes.
#![cfg(loom)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use loom::sync::Arc;
use loom::thread;
use svcproxy_core::*;

fn service(name: &str, ip: [u8; 4], protocol: Protocol) -> Service {
    Service::new(name)
        .address(ip.into())
        .port(ServicePort::new(protocol, 80))
}

fn key(ip: [u8; 4], protocol: Protocol) -> ServicePortKey {
    ServicePortKey::new(SocketAddr::from((ip, 80)), protocol)
}

fn ep(i: u8) -> Endpoint {
    Endpoint::new(SocketAddr::from(([198, 19, 0, i], 8080)))
}

#[test]
fn readers_see_whole_snapshots_and_retired_ones_are_freed() {
    loom::model(|| {
        let table = Arc::new(Table::default());
        let writer = {
            let table = table.clone();
            thread::spawn(move || {
                // One batch: two services and their endpoints appear together.
                table
                    .apply(
                        Batch::new()
                            .upsert(service("a", [198, 18, 0, 1], Protocol::Tcp))
                            .upsert(service("b", [198, 18, 0, 2], Protocol::Tcp))
                            .replace_endpoints("a", vec![ep(1), ep(2)])
                            .replace_endpoints("b", vec![ep(3)]),
                    )
                    .unwrap();
                table.apply(Batch::new().remove("a")).unwrap();
            })
        };
        // A reader holding an old snapshot keeps using it while the writer retires it.
        let held = table.load_full();
        for _ in 0..2 {
            let snap = table.load();
            let a = snap.lookup(&key([198, 18, 0, 1], Protocol::Tcp));
            let b = snap.lookup(&key([198, 18, 0, 2], Protocol::Tcp));
            match snap.generation() {
                0 => assert!(a.is_none() && b.is_none() && snap.service_count() == 0),
                1 => {
                    assert_eq!(a.unwrap().backends().len(), 2);
                    assert_eq!(b.unwrap().backends().len(), 1);
                    assert_eq!(snap.service_count(), 2);
                }
                2 => {
                    assert!(a.is_none());
                    assert_eq!(b.unwrap().backends().len(), 1);
                    assert_eq!(snap.service_count(), 1);
                }
                g => panic!("unexpected generation {g}"),
            }
        }
        assert!(held.generation() <= 2);
        assert_eq!(held.service_count() > 0, held.generation() > 0);
        writer.join().unwrap();
        assert_eq!(table.load().generation(), 2);
        drop(held);
    });
}

#[test]
fn concurrent_round_robin_picks_are_exact() {
    loom::model(|| {
        let table = Arc::new(Table::default());
        table
            .apply(
                Batch::new()
                    .upsert(service("a", [198, 18, 0, 1], Protocol::Tcp))
                    .replace_endpoints("a", vec![ep(1), ep(2)]),
            )
            .unwrap();
        let pick = |table: &Table| {
            let snap = table.load();
            let port = snap.lookup(&key([198, 18, 0, 1], Protocol::Tcp)).unwrap();
            let client = SocketAddr::from(([127, 0, 0, 1], 1));
            port.select(client, Instant::now()).unwrap().addr()
        };
        let other = {
            let table = table.clone();
            thread::spawn(move || [pick(&table), pick(&table)])
        };
        let mine = [pick(&table), pick(&table)];
        let theirs = other.join().unwrap();
        let first = ep(1).address;
        let n = mine
            .iter()
            .chain(theirs.iter())
            .filter(|&&a| a == first)
            .count();
        assert_eq!(n, 2, "four picks over two endpoints: two each");
    });
}

#[test]
fn no_datagram_reaches_an_endpoint_after_its_removal_is_seen() {
    loom::model(|| {
        let table = Arc::new(Table::default());
        table
            .apply(
                Batch::new()
                    .upsert(service("dns", [198, 18, 0, 10], Protocol::Udp))
                    .replace_endpoints("dns", vec![ep(1), ep(2)]),
            )
            .unwrap();
        let listener = key([198, 18, 0, 10], Protocol::Udp);
        let removed = ep(1).address;
        let flow_key = FlowKey {
            client: SocketAddr::from(([127, 0, 0, 1], 5000)),
            local: listener.addr,
        };
        let mut flows: FlowTable<()> = FlowTable::new(Duration::from_secs(30));
        {
            let snap = table.load();
            flows.sync(&snap, Instant::now());
            let backend = snap.lookup(&listener).unwrap().find(removed).unwrap();
            flows
                .insert(flow_key, listener, backend, Instant::now(), |_| {
                    Ok::<_, ()>(())
                })
                .unwrap();
        }
        let writer = {
            let table = table.clone();
            thread::spawn(move || {
                table
                    .apply(Batch::new().replace_endpoints("dns", vec![ep(2)]))
                    .unwrap();
            })
        };
        // The worker's loop: load, sync, then forward using the flow.
        for _ in 0..2 {
            let snap = table.load();
            flows.sync(&snap, Instant::now());
            let eligible = snap.lookup(&listener).unwrap().contains(removed);
            let flow = flows.lookup(&flow_key, Instant::now());
            let endpoint = flow.map(|id| flows.get(id).unwrap().endpoint);
            if !eligible {
                assert_ne!(endpoint, Some(removed), "a flow outlived the purge");
            }
        }
        writer.join().unwrap();
        flows.sync(&table.load(), Instant::now());
        assert!(
            flows
                .iter()
                .all(|(_, f)| f.endpoint != removed || f.is_retired())
        );
        assert_eq!(flows.lookup(&flow_key, Instant::now()), None);
    });
}
