//! Which endpoints serve which client at which frontend: external traffic policy `Local` and
//! its in-cluster short-circuit, load-balancer source ranges, topology hints, and one
//! endpoint set per address family.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use svcproxy_core::*;

mod common;

use common::published as table;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn key(addr: &str) -> ServicePortKey {
    ServicePortKey::new(addr.parse().unwrap(), Protocol::Tcp)
}

/// The backends that may serve `client` at `frontend`; `None` when it is denied.
fn serving(table: &Table, frontend: &str, client: &str) -> Option<BTreeSet<SocketAddr>> {
    let snapshot = table.load();
    let port = snapshot
        .route(&key(frontend), ip(client))
        .unwrap()
        .serving()?;
    Some(port.backends().iter().map(Backend::addr).collect())
}

fn set(addrs: &[&str]) -> Option<BTreeSet<SocketAddr>> {
    Some(addrs.iter().map(|a| a.parse().unwrap()).collect())
}

fn node_a() -> TableConfig {
    TableConfig {
        node_name: Some("node-a".into()),
        node_addresses: vec![ip("198.18.2.1")],
        cluster_ranges: vec!["198.19.0.0/16".parse().unwrap()],
        ..TableConfig::default()
    }
}

#[test]
fn external_policy_local_serves_outside_clients_from_this_node_and_inside_ones_from_all() {
    let mut s = Service::new("lb")
        .address(ip("198.18.100.1"))
        .port(ServicePort::tcp(80).node_port(30080));
    s.load_balancer_addresses.push(ip("198.18.200.1"));
    s.external_traffic_policy = TrafficPolicy::Local;
    let local = Endpoint::new("198.19.10.1:80".parse().unwrap()).node("node-a");
    let remote = Endpoint::new("198.19.10.2:80".parse().unwrap()).node("node-b");
    let t = table(node_a(), s, vec![local, remote]);
    let mine = set(&["198.19.10.1:80"]);
    let all = set(&["198.19.10.1:80", "198.19.10.2:80"]);
    for frontend in ["198.18.2.1:30080", "198.18.200.1:80"] {
        assert_eq!(
            serving(&t, frontend, "198.18.50.5"),
            mine,
            "{frontend}: outside"
        );
        for inside in ["198.19.7.7", "127.0.0.1", "198.18.2.1"] {
            assert_eq!(
                serving(&t, frontend, inside),
                all,
                "{frontend}: from {inside}"
            );
        }
    }
    // A local client's source is often the very address it reached.
    assert_eq!(serving(&t, "198.18.200.1:80", "198.18.200.1"), all);
    assert_eq!(
        serving(&t, "198.18.100.1:80", "198.18.50.5"),
        all,
        "cluster IP"
    );
}

#[test]
fn a_local_policy_frontend_without_local_endpoints_still_listens_for_inside_clients() {
    let mut s = Service::new("np").port(ServicePort::tcp(80).node_port(30080));
    s.external_traffic_policy = TrafficPolicy::Local;
    let remote = Endpoint::new("198.19.10.2:80".parse().unwrap()).node("node-b");
    let t = table(node_a(), s, vec![remote]);
    let snapshot = t.load();
    let frontend = key("198.18.2.1:30080");
    assert_eq!(serving(&t, "198.18.2.1:30080", "198.18.50.5"), set(&[]));
    assert_eq!(
        serving(&t, "198.18.2.1:30080", "198.19.1.1"),
        set(&["198.19.10.2:80"])
    );
    assert!(snapshot.wants_listener(&frontend));
    let entry = snapshot.service("np").unwrap();
    assert_eq!(
        entry.external_endpoints(),
        0,
        "what its health check node port says"
    );
}

#[test]
fn external_endpoints_counts_each_local_endpoint_once_across_ports() {
    let mut s = Service::new("hc")
        .port(ServicePort::tcp(80).named("a").node_port(30080))
        .port(ServicePort::udp(53).named("b").node_port(30053));
    s.external_traffic_policy = TrafficPolicy::Local;
    s.health_check_node_port = Some(31000);
    let ep = |i: u8, node: &str| Endpoint::new(SocketAddr::from(([198, 19, 0, i], 80))).node(node);
    let t = table(
        node_a(),
        s,
        vec![ep(1, "node-a"), ep(2, "node-a"), ep(3, "node-b")],
    );
    assert_eq!(t.load().service("hc").unwrap().external_endpoints(), 2);
}

#[test]
fn source_ranges_limit_who_reaches_load_balancer_addresses_only() {
    let mut s = Service::new("lb")
        .address(ip("198.18.100.1"))
        .port(ServicePort::tcp(80).node_port(30080));
    s.load_balancer_addresses.push(ip("198.18.200.1"));
    s.external_addresses.push(ip("198.18.201.1"));
    s.load_balancer_source_ranges = vec!["198.18.50.0/24".parse().unwrap()];
    let t = table(
        node_a(),
        s,
        vec![Endpoint::new("198.19.10.1:80".parse().unwrap())],
    );
    let one = set(&["198.19.10.1:80"]);
    assert_eq!(
        serving(&t, "198.18.200.1:80", "198.18.50.9"),
        one,
        "inside the range"
    );
    assert_eq!(
        serving(&t, "198.18.200.1:80", "198.18.60.9"),
        None,
        "outside it"
    );
    assert_eq!(
        serving(&t, "198.18.200.1:80", "::ffff:198.18.50.9"),
        one,
        "v4-mapped"
    );
    for other in ["198.18.100.1:80", "198.18.201.1:80", "198.18.2.1:30080"] {
        assert_eq!(
            serving(&t, other, "198.18.60.9"),
            one,
            "{other} is not limited"
        );
    }
    // The frontend still listens: clients in range are served.
    assert!(t.load().wants_listener(&key("198.18.200.1:80")));
}

fn hinted(i: u8, zones: &[&str], nodes: &[&str]) -> Endpoint {
    let mut e = Endpoint::new(SocketAddr::from(([198, 19, 0, i], 80)));
    let names = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
    e.hints = Some(Box::new(Hints {
        for_zones: names(zones),
        for_nodes: names(nodes),
    }));
    e
}

fn in_zone(zone: Option<&str>) -> TableConfig {
    TableConfig {
        node_zone: zone.map(str::to_string),
        ..node_a()
    }
}

fn cluster_ip_service() -> Service {
    Service::new("web")
        .address(ip("198.18.100.1"))
        .port(ServicePort::tcp(80))
}

fn backends_for(config: TableConfig, endpoints: Vec<Endpoint>) -> Option<BTreeSet<SocketAddr>> {
    let t = table(config, cluster_ip_service(), endpoints);
    serving(&t, "198.18.100.1:80", "198.19.1.1")
}

#[test]
fn zone_hints_keep_traffic_in_the_zone_when_every_endpoint_has_one() {
    let hinted_all = || {
        vec![
            hinted(1, &["z1"], &[]),
            hinted(2, &["z2"], &[]),
            hinted(3, &["z1"], &[]),
        ]
    };
    assert_eq!(
        backends_for(in_zone(Some("z1")), hinted_all()),
        set(&["198.19.0.1:80", "198.19.0.3:80"])
    );
    let all = set(&["198.19.0.1:80", "198.19.0.2:80", "198.19.0.3:80"]);
    assert_eq!(
        backends_for(in_zone(Some("z3")), hinted_all()),
        all,
        "no endpoint for this zone"
    );
    assert_eq!(
        backends_for(in_zone(None), hinted_all()),
        all,
        "a node without a zone"
    );
    let mut one_unhinted = hinted_all();
    one_unhinted[1].hints = None;
    assert_eq!(
        backends_for(in_zone(Some("z1")), one_unhinted),
        all,
        "one without hints"
    );
    // Not-ready endpoints do not count.
    let mut unready_unhinted = hinted_all();
    unready_unhinted[1] = hinted(2, &[], &[]).conditions(Conditions::NOT_READY);
    assert_eq!(
        backends_for(in_zone(Some("z1")), unready_unhinted),
        set(&["198.19.0.1:80", "198.19.0.3:80"])
    );
}

#[test]
fn node_hints_come_before_zone_hints() {
    let endpoints = || {
        vec![
            hinted(1, &["z1"], &["node-a"]),
            hinted(2, &["z1"], &["node-b"]),
            hinted(3, &["z2"], &["node-c"]),
        ]
    };
    assert_eq!(
        backends_for(in_zone(Some("z1")), endpoints()),
        set(&["198.19.0.1:80"])
    );
    let mut elsewhere = in_zone(Some("z1"));
    elsewhere.node_name = Some("node-d".into());
    assert_eq!(
        backends_for(elsewhere, endpoints()),
        set(&["198.19.0.1:80", "198.19.0.2:80"]),
        "no endpoint for this node: the zone's"
    );
}

#[test]
fn each_frontend_forwards_to_endpoints_of_its_own_family() {
    let mut s = Service::new("dual")
        .address(ip("198.18.100.1"))
        .address(ip("2001:db8::100"))
        .port(ServicePort::tcp(80).node_port(30080));
    s.external_traffic_policy = TrafficPolicy::Local;
    let config = TableConfig {
        node_addresses: vec![ip("198.18.2.1"), ip("2001:db8::2")],
        ..node_a()
    };
    let eps = vec![
        Endpoint::new("198.19.0.1:80".parse().unwrap()).node("node-a"),
        Endpoint::new("[2001:db8:1::1]:80".parse().unwrap()).node("node-a"),
        Endpoint::new("[2001:db8:1::2]:80".parse().unwrap()).node("node-b"),
    ];
    let t = table(config, s, eps);
    let client = "198.18.50.5";
    assert_eq!(
        serving(&t, "198.18.100.1:80", client),
        set(&["198.19.0.1:80"])
    );
    assert_eq!(
        serving(&t, "[2001:db8::100]:80", client),
        set(&["[2001:db8:1::1]:80", "[2001:db8:1::2]:80"])
    );
    assert_eq!(
        serving(&t, "198.18.2.1:30080", client),
        set(&["198.19.0.1:80"])
    );
    assert_eq!(
        serving(&t, "[2001:db8::2]:30080", "2001:db8:5::5"),
        set(&["[2001:db8:1::1]:80"]),
        "node port on IPv6, local endpoints"
    );
}

#[test]
fn a_frontend_forwards_across_families_when_no_endpoint_is_of_its_own() {
    let s = Service::new("v6")
        .address(ip("::1"))
        .port(ServicePort::tcp(80));
    let t = table(
        TableConfig::default(),
        s,
        vec![Endpoint::new("127.0.0.1:8080".parse().unwrap())],
    );
    assert_eq!(serving(&t, "[::1]:80", "::1"), set(&["127.0.0.1:8080"]));
}

#[test]
fn health_check_node_port_is_validated() {
    let table = Table::default();
    let base = || Service::new("hc").port(ServicePort::tcp(80).node_port(30080));
    let mut zero = base();
    zero.health_check_node_port = Some(0);
    let err = table.apply(Batch::new().upsert(zero)).unwrap_err();
    assert!(err.to_string().contains("health_check_node_port"), "{err}");
    let mut clash = base();
    clash.health_check_node_port = Some(30080);
    let err = table.apply(Batch::new().upsert(clash)).unwrap_err();
    assert!(err.to_string().contains("health_check_node_port"), "{err}");
    assert_eq!(table.load().generation(), 0, "nothing published");
}
