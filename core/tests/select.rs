//! Selection: eligibility, named ports, each policy's distribution, session affinity, retry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

mod common;

use proptest::prelude::*;
use svcproxy_core::*;

const VIP: &str = "198.18.0.1:80";

fn key() -> ServicePortKey {
    ServicePortKey::new(VIP.parse().unwrap(), Protocol::Tcp)
}

fn service(policy: Policy) -> Service {
    Service::new("default/svc")
        .address("198.18.0.1".parse().unwrap())
        .port(ServicePort::tcp(80))
        .policy(policy)
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([198, 19, (i >> 8) as u8, i as u8], 8080))
}

fn endpoints(n: usize) -> Vec<Endpoint> {
    (0..n).map(|i| Endpoint::new(addr(i))).collect()
}

fn table_with(service: Service, endpoints: Vec<Endpoint>) -> Table {
    common::published(TableConfig::default(), service, endpoints)
}

fn client(i: u32) -> SocketAddr {
    SocketAddr::from((
        [127, 0, (i >> 8) as u8, i as u8 | 1],
        40_000 + (i % 20_000) as u16,
    ))
}

fn picks(table: &Table, n: usize) -> HashMap<SocketAddr, usize> {
    let snap = table.load();
    let port = snap.lookup(&key()).unwrap();
    let mut counts = HashMap::new();
    for i in 0..n {
        let b = port.select(client(i as u32), Instant::now()).unwrap();
        *counts.entry(b.addr()).or_default() += 1;
    }
    counts
}

fn eligible(table: &Table) -> Vec<SocketAddr> {
    let snap = table.load();
    snap.lookup(&key())
        .unwrap()
        .backends()
        .iter()
        .map(|b| b.addr())
        .collect()
}

#[test]
fn ready_endpoints_first_then_serving_terminating_then_none() {
    let ready = Endpoint::new(addr(0));
    let not_ready = Endpoint::new(addr(1)).conditions(Conditions::NOT_READY);
    let draining = Endpoint::new(addr(2)).conditions(Conditions::SERVING_TERMINATING);
    let t = table_with(
        service(Policy::RoundRobin),
        vec![ready.clone(), not_ready.clone(), draining.clone()],
    );
    assert_eq!(eligible(&t), vec![addr(0)]);

    let t = table_with(
        service(Policy::RoundRobin),
        vec![not_ready.clone(), draining.clone()],
    );
    assert_eq!(
        eligible(&t),
        vec![addr(2)],
        "fallback to serving+terminating"
    );
    assert!(t.load().lookup(&key()).unwrap().backends()[0].terminating());

    let t = table_with(service(Policy::RoundRobin), vec![not_ready.clone()]);
    assert!(eligible(&t).is_empty());
    let snap = t.load();
    assert!(
        snap.lookup(&key())
            .unwrap()
            .select(client(1), Instant::now())
            .is_none()
    );

    let mut s = service(Policy::RoundRobin);
    s.publish_not_ready = true;
    let t = table_with(s, vec![ready, not_ready, draining]);
    assert_eq!(eligible(&t), vec![addr(0), addr(1), addr(2)]);
}

#[test]
fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
    let mut s = service(Policy::RoundRobin);
    s.internal_traffic_policy = TrafficPolicy::Local;
    let eps = vec![
        Endpoint::new(addr(0)).node("node-a"),
        Endpoint::new(addr(1)).node("node-b"),
        Endpoint::new(addr(2)),
    ];
    let table = Table::new(TableConfig {
        node_name: Some("node-a".into()),
        ..TableConfig::default()
    });
    table
        .apply(
            Batch::new()
                .upsert(s.clone())
                .replace_endpoints("default/svc", eps.clone()),
        )
        .unwrap();
    assert_eq!(eligible(&table), vec![addr(0)]);
    // Without a node name, Local has nothing.
    assert!(eligible(&table_with(s, eps)).is_empty());
}

#[test]
fn named_target_ports_resolve_per_endpoint() {
    let s = service(Policy::RoundRobin);
    let mut s = s;
    s.ports[0].target_port = TargetPort::Named("http".into());
    let a = Endpoint::new(SocketAddr::from(([198, 19, 10, 1], 0))).named_port("http", 8080);
    let b = Endpoint::new(SocketAddr::from(([198, 19, 10, 2], 0))).named_port("http", 9090);
    let c = Endpoint::new(SocketAddr::from(([198, 19, 10, 3], 0))).named_port("metrics", 9100);
    let t = table_with(s.clone(), vec![a, b]);
    assert_eq!(
        eligible(&t),
        vec![
            "198.19.10.1:8080".parse().unwrap(),
            "198.19.10.2:9090".parse().unwrap()
        ],
    );
    // An endpoint no port of the service reaches would never be used: an error.
    let e = t
        .apply(Batch::new().replace_endpoints(s.name.as_str(), vec![c]))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "service {:?}: endpoints[0]: {}",
            s.name,
            svcproxy_core::Problem::NoPort
        )
    );
    let mut s = service(Policy::RoundRobin);
    s.ports[0].target_port = TargetPort::Number(7000);
    let t = table_with(s, endpoints(2));
    assert_eq!(
        eligible(&t),
        vec![
            "198.19.0.0:7000".parse().unwrap(),
            "198.19.0.1:7000".parse().unwrap()
        ]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(64)))]

    #[test]
    fn round_robin_is_exact(n in 1usize..40, rounds in 1usize..6) {
        let t = table_with(service(Policy::RoundRobin), endpoints(n));
        let counts = picks(&t, n * rounds);
        prop_assert_eq!(counts.len(), n);
        prop_assert!(counts.values().all(|&c| c == rounds));
    }

    #[test]
    fn weighted_round_robin_is_proportional(weights in prop::collection::vec(1u32..20, 1..12)) {
        let eps: Vec<Endpoint> = weights.iter().enumerate()
            .map(|(i, &w)| Endpoint::new(addr(i)).weight(w)).collect();
        let t = table_with(service(Policy::WeightedRoundRobin), eps);
        let total: u32 = weights.iter().sum();
        let counts = picks(&t, total as usize * 3);
        for (i, &w) in weights.iter().enumerate() {
            // The schedule is reduced by the weights' common divisor, so three passes of the
            // full sum give each endpoint exactly three times its weight.
            prop_assert_eq!(counts.get(&addr(i)).copied().unwrap_or(0), 3 * w as usize);
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "builds two 65,537-slot tables per case: minutes under Miri")]
    fn maglev_moves_about_one_nth_when_one_endpoint_goes(n in 3usize..30, gone in 0usize..30) {
        let gone = gone % n;
        let before = table_with(service(Policy::maglev()), endpoints(n));
        let mut fewer = endpoints(n);
        fewer.remove(gone);
        let after = table_with(service(Policy::maglev()), fewer);
        let (b, a) = (before.load(), after.load());
        let (pb, pa) = (b.lookup(&key()).unwrap(), a.lookup(&key()).unwrap());
        let clients = 20_000u32;
        let mut moved = 0;
        for i in 0..clients {
            let c = client(i);
            let x = pb.select(c, Instant::now()).unwrap().addr();
            let y = pa.select(c, Instant::now()).unwrap().addr();
            if x != addr(gone) && x != y {
                moved += 1;
            }
            // The same client always lands on the same endpoint.
            prop_assert_eq!(x, pb.select(c, Instant::now()).unwrap().addr());
        }
        // Clients of surviving endpoints barely move: well under 1/N of all clients.
        let bound = clients as f64 / n as f64 * 0.5 + 200.0;
        prop_assert!((moved as f64) < bound, "{} of {} clients moved, n = {}", moved, clients, n);
    }
}

#[test]
fn random_reaches_every_endpoint() {
    let t = table_with(service(Policy::Random), endpoints(5));
    let counts = picks(&t, 2_000);
    assert_eq!(counts.len(), 5);
    assert!(counts.values().all(|&c| c > 200), "{counts:?}");
}

#[test]
fn least_connections_prefers_the_least_loaded() {
    let t = table_with(service(Policy::LeastConnections), endpoints(3));
    let snap = t.load();
    let port = snap.lookup(&key()).unwrap();
    // Load endpoints 0 and 1 with four connections each; 2 stays idle.
    let mut open: Vec<Vec<_>> = port.backends()[..2]
        .iter()
        .map(|b| (0..4).map(|_| b.tally().open()).collect())
        .collect();
    for i in 0..4 {
        let b = port.select(client(i), Instant::now()).unwrap();
        assert_eq!(b.addr(), addr(2));
        open[0].push(b.tally().open());
    }
    // All have four now: the next three go one to each.
    let mut next: Vec<SocketAddr> = (0..3)
        .map(|i| {
            let b = port.select(client(i), Instant::now()).unwrap();
            open[0].push(b.tally().open());
            b.addr()
        })
        .collect();
    next.sort();
    assert_eq!(next, vec![addr(0), addr(1), addr(2)]);
    // Closing connections makes an endpoint preferred again.
    open[1].truncate(1);
    assert_eq!(
        port.select(client(9), Instant::now()).unwrap().addr(),
        addr(1)
    );
}

#[test]
fn weighted_least_connections_scales_by_weight() {
    let eps = vec![Endpoint::new(addr(0)).weight(3), Endpoint::new(addr(1))];
    let t = table_with(service(Policy::LeastConnections), eps);
    let snap = t.load();
    let port = snap.lookup(&key()).unwrap();
    let mut counts = HashMap::<SocketAddr, usize>::new();
    let mut open = Vec::new();
    for i in 0..400 {
        let b = port.select(client(i), Instant::now()).unwrap();
        open.push(b.tally().open());
        *counts.entry(b.addr()).or_default() += 1;
    }
    assert_eq!(counts[&addr(0)], 300);
    assert_eq!(counts[&addr(1)], 100);
}

fn affinity_service(timeout_secs: u64) -> Service {
    service(Policy::RoundRobin).affinity(SessionAffinity::ClientIp {
        timeout: Duration::from_secs(timeout_secs),
    })
}

#[test]
fn client_ip_affinity_sticks_across_source_ports_and_expires() {
    let t = table_with(affinity_service(10), endpoints(4));
    let snap = t.load();
    let port = snap.lookup(&key()).unwrap();
    let now = Instant::now();
    let ip = [127, 0, 0, 9];
    let first = port
        .select(SocketAddr::from((ip, 1000)), now)
        .unwrap()
        .addr();
    for p in 1001..1050 {
        let at = now + Duration::from_secs(5);
        assert_eq!(
            port.select(SocketAddr::from((ip, p)), at).unwrap().addr(),
            first
        );
    }
    // Another client moves the cursor on; after the timeout this client is balanced anew.
    let other = port.select(client(77), now).unwrap().addr();
    assert_ne!(other, first);
    let later = now + Duration::from_secs(5 + 11);
    let again = port
        .select(SocketAddr::from((ip, 2000)), later)
        .unwrap()
        .addr();
    assert_ne!(again, first, "expired affinity is balanced again");
    assert_eq!(port.affinity_entries(), 2);
}

#[test]
fn affinity_to_an_endpoint_that_is_no_longer_eligible_is_dropped() {
    let t = table_with(affinity_service(3600), endpoints(3));
    let c = client(5);
    let now = Instant::now();
    let stuck = t
        .load()
        .lookup(&key())
        .unwrap()
        .select(c, now)
        .unwrap()
        .addr();
    // Publish the endpoints without the one this client sticks to.
    let remaining: Vec<Endpoint> = endpoints(3)
        .into_iter()
        .filter(|e| e.address != stuck)
        .collect();
    t.apply(Batch::new().replace_endpoints("default/svc", remaining))
        .unwrap();
    let snap = t.load();
    let port = snap.lookup(&key()).unwrap();
    assert_eq!(port.affinity_entries(), 0, "entry dropped at publish");
    let moved = port.select(c, now).unwrap().addr();
    assert_ne!(moved, stuck);
    // And it sticks to its new endpoint.
    assert_eq!(port.select(c, now).unwrap().addr(), moved);
}

#[test]
fn retry_skips_what_was_tried_and_moves_affinity() {
    let t = table_with(affinity_service(3600), endpoints(3));
    let snap = t.load();
    let port = snap.lookup(&key()).unwrap();
    let c = client(1);
    let now = Instant::now();
    let first = port.select(c, now).unwrap().addr();
    let second = port.retry(c, &[first], now).unwrap().addr();
    assert_ne!(second, first);
    assert_eq!(
        port.select(c, now).unwrap().addr(),
        second,
        "affinity follows the retry"
    );
    let third = port.retry(c, &[first, second], now).unwrap().addr();
    assert!(third != first && third != second);
    assert!(port.retry(c, &[first, second, third], now).is_none());
}

#[test]
fn session_policy_walks_endpoints_until_attempts_run_out() {
    let t = table_with(service(Policy::RoundRobin), endpoints(5));
    let snap = t.load();
    let port = snap.lookup(&key()).unwrap();
    let policy = TcpPolicy::default();
    let mut session = TcpSession::new();
    let c = client(3);
    let mut b = port.select(c, Instant::now()).unwrap().addr();
    let mut seen = vec![];
    for _ in 0..policy.connect_attempts {
        session.connecting(&policy, b);
        seen.push(b);
        match session.next_backend(&policy, port, c, Instant::now()) {
            Some(next) => b = next.addr(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 3);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3, "each attempt went to a different endpoint");
    assert!(
        session
            .next_backend(&policy, port, c, Instant::now())
            .is_none()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases(128)))]

    /// A client keeps its endpoint exactly while its idle gaps stay within the timeout.
    #[test]
    fn affinity_holds_until_an_idle_gap_exceeds_the_timeout(
        timeout in 1u64..100,
        gaps in prop::collection::vec(0u64..150, 1..8),
    ) {
        let t = table_with(affinity_service(timeout), endpoints(4));
        let snap = t.load();
        let port = snap.lookup(&key()).unwrap();
        let ip = [127, 0, 0, 9];
        let mut now = Instant::now();
        let mut current = port.select(SocketAddr::from((ip, 1)), now).unwrap().addr();
        for (i, gap) in gaps.into_iter().enumerate() {
            // Another client in between: the round-robin pick after its pick is what a
            // rebalanced client gets.
            let other = port.select(client(1000 + i as u32), now).unwrap().addr();
            let backends = port.backends();
            let j = backends.iter().position(|b| b.addr() == other).unwrap();
            let rebalanced = backends[(j + 1) % backends.len()].addr();
            now += Duration::from_secs(gap);
            let next = port.select(SocketAddr::from((ip, 2 + i as u16)), now).unwrap().addr();
            let want = if gap <= timeout { current } else { rebalanced };
            prop_assert_eq!(next, want);
            current = next;
        }
    }
}
