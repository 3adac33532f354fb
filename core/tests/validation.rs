//! Validation: every bad field is rejected with its path and a readable problem, and a
//! rejected batch leaves the table as it was.

mod common;

use std::time::Duration;

use svcproxy_core::*;

fn web() -> Service {
    Service::new("default/web")
        .address("198.18.0.10".parse().unwrap())
        .port(ServicePort::tcp(80))
}

fn field_error(s: &Service) -> (String, String) {
    let e = s.validate().expect_err("must be rejected");
    (e.field.clone(), e.to_string())
}

#[test]
fn a_plain_service_is_valid() {
    web().validate().unwrap();
}

#[test]
fn names_are_checked() {
    let mut s = web();
    s.name = String::new();
    assert_eq!(
        field_error(&s),
        ("name".into(), "name: must not be empty".into())
    );
    s.name = "web server".into();
    assert_eq!(
        field_error(&s).1,
        "name: contains ' ', allowed are letters, digits and - . _ /"
    );
    s.name = "x".repeat(254);
    assert_eq!(
        field_error(&s).1,
        "name: is 254 bytes long, at most 253 are allowed"
    );
}

#[test]
fn ports_are_checked() {
    let mut s = web();
    s.ports.clear();
    assert_eq!(field_error(&s).1, "ports: must not be empty");

    let s = web().port(ServicePort::tcp(81));
    assert_eq!(
        field_error(&s).1,
        "ports[0].name: must be set when a service has more than one port"
    );

    let mut s = web();
    s.ports[0].port = 0;
    assert_eq!(field_error(&s).1, "ports[0].port: must not be 0");

    let s = Service::new("a")
        .address("198.19.0.1".parse().unwrap())
        .port(ServicePort::tcp(80).named("http"))
        .port(ServicePort::tcp(80).named("other"));
    assert_eq!(
        field_error(&s).1,
        "ports[1].port: 80/TCP appears more than once"
    );

    // TCP and UDP on one number are two ports.
    Service::new("dns")
        .address("198.19.0.1".parse().unwrap())
        .port(ServicePort::udp(53).named("dns"))
        .port(ServicePort::tcp(53).named("dns-tcp"))
        .validate()
        .unwrap();

    let s = web().port(ServicePort::tcp(81).named("x"));
    let mut s = s;
    s.ports[0].name = Some("x".into());
    assert_eq!(field_error(&s).1, "ports[1].name: x appears more than once");

    let mut s = web();
    s.ports[0].target_port = TargetPort::Number(0);
    assert_eq!(field_error(&s).1, "ports[0].target_port: must not be 0");
    s.ports[0].target_port = TargetPort::Named("bad name".into());
    assert_eq!(field_error(&s).0, "ports[0].target_port");
    s.ports[0].target_port = TargetPort::EndpointPort;
    s.ports[0].node_port = Some(0);
    assert_eq!(field_error(&s).1, "ports[0].node_port: must not be 0");
}

#[test]
fn addresses_are_checked() {
    let s = web().address("224.0.0.1".parse().unwrap());
    assert_eq!(
        field_error(&s).1,
        "addresses[1]: 224.0.0.1 cannot be used here (multicast)"
    );
    let s = web().address("198.18.0.10".parse().unwrap());
    assert_eq!(
        field_error(&s).1,
        "addresses[1]: 198.18.0.10 appears more than once"
    );
    let mut s = web();
    s.external_addresses.push("0.0.0.0".parse().unwrap());
    assert_eq!(
        field_error(&s).1,
        "external_addresses[0]: 0.0.0.0 cannot be used here (unspecified)"
    );
    // A wildcard listen address is fine.
    let mut s = web();
    s.addresses = vec!["0.0.0.0".parse().unwrap(), "::".parse().unwrap()];
    s.validate().unwrap();
    // No frontend at all.
    let mut s = web();
    s.addresses.clear();
    assert_eq!(
        field_error(&s).1,
        "addresses: the service has no address, external address or node port"
    );
    s.ports[0].node_port = Some(30080);
    s.validate().unwrap();
}

#[test]
fn affinity_and_maglev_are_checked() {
    let s = web().affinity(SessionAffinity::ClientIp {
        timeout: Duration::from_secs(86_401),
    });
    assert_eq!(
        field_error(&s).1,
        "affinity_timeout_seconds: is 86401, must be between 1 and 86400"
    );
    let s = web().policy(Policy::Maglev { table_size: 65_536 });
    assert_eq!(
        field_error(&s).1,
        "maglev_table_size: 65536 is not a prime number"
    );
    let s = web().policy(Policy::Maglev { table_size: 7 });
    assert_eq!(field_error(&s).0, "maglev_table_size");
    web().policy(Policy::maglev()).validate().unwrap();
    let mut s = web();
    s.max_connections = Some(0);
    assert_eq!(field_error(&s).0, "max_connections");
}

#[test]
fn endpoints_are_checked_through_the_table() {
    let table = Table::default();
    table.apply(Batch::new().upsert(web())).unwrap();
    let bad = |endpoints: Vec<Endpoint>| {
        table
            .apply(Batch::new().replace_endpoints("default/web", endpoints))
            .unwrap_err()
            .to_string()
    };
    let ep = |s: &str| Endpoint::new(s.parse().unwrap());
    assert_eq!(
        bad(vec![ep("198.19.0.1:80"), ep("0.0.0.0:80")]),
        "service \"default/web\": endpoints[1].address: 0.0.0.0 cannot be used here (unspecified)"
    );
    assert_eq!(
        bad(vec![ep("198.19.0.1:80"), ep("198.19.0.1:80")]),
        "service \"default/web\": endpoints[1].address: 198.19.0.1:80 appears more than once"
    );
    assert_eq!(
        bad(vec![ep("198.19.0.1:80").weight(0)]),
        "service \"default/web\": endpoints[0].weight: is 0, must be between 1 and 65535"
    );
    assert_eq!(
        bad(vec![ep("198.19.0.1:80").named_port("http", 0)]),
        "service \"default/web\": endpoints[0].ports[0].port: must not be 0"
    );
    assert_eq!(
        bad(vec![ep("198.19.0.1:80").node("node a")]),
        "service \"default/web\": endpoints[0].node: contains ' ', allowed are letters, digits and - . _ /"
    );
}

#[test]
fn a_rejected_batch_changes_nothing() {
    let table = Table::default();
    let ok = table
        .apply(Batch::new().upsert(web()).replace_endpoints(
            "default/web",
            vec![Endpoint::new("198.19.0.1:80".parse().unwrap())],
        ))
        .unwrap();
    let before = table.load_full();

    // The first change is fine, the second is not: neither lands.
    let other = Service::new("default/other")
        .address("198.18.0.11".parse().unwrap())
        .port(ServicePort::tcp(80));
    let err = table
        .apply(Batch::new().upsert(other).remove("default/missing"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "service \"default/missing\" does not exist"
    );
    assert_eq!(err, TableError::UnknownService("default/missing".into()));

    let err = table
        .apply(Batch::new().replace_endpoints("nope", vec![]))
        .unwrap_err();
    assert_eq!(err, TableError::UnknownService("nope".into()));

    let after = table.load();
    assert_eq!(after.generation(), ok.generation);
    assert!(
        std::ptr::eq(&*before, &**after),
        "the same snapshot is still published"
    );
    assert!(after.service("default/other").is_none());
}

#[test]
fn two_services_cannot_share_a_frontend() {
    let table = Table::default();
    table.apply(Batch::new().upsert(web())).unwrap();
    let mut twin = web();
    twin.name = "default/twin".into();
    let err = table.apply(Batch::new().upsert(twin)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "service \"default/twin\": 198.18.0.10:80/TCP is already used by service \"default/web\""
    );
    // The same frontend in UDP is another service port.
    let mut udp = web();
    udp.name = "default/web-udp".into();
    udp.ports[0].protocol = Protocol::Udp;
    table.apply(Batch::new().upsert(udp)).unwrap();
    // Moving a frontend between services inside one batch works.
    let mut moved = web();
    moved.name = "default/moved".into();
    table
        .apply(Batch::new().remove("default/web").upsert(moved))
        .unwrap();
}

mod properties {
    use proptest::prelude::*;
    use svcproxy_core::*;

    fn arb_service() -> impl Strategy<Value = Service> {
        let name = prop_oneof!["[a-z0-9/.-]{1,20}", ".{0,6}"];
        let port = (
            any::<bool>(),
            0u16..4,
            prop::option::of("[a-z]{0,3}"),
            prop::option::of(0u16..3),
        );
        (
            name,
            prop::collection::vec(any::<[u8; 4]>(), 0..3),
            prop::collection::vec(port, 0..3),
            0u32..70_000,
        )
            .prop_map(|(name, ips, ports, maglev)| {
                let mut s = Service::new(name);
                s.addresses = ips.into_iter().map(|b| b.into()).collect();
                for (udp, number, pname, node_port) in ports {
                    let mut p =
                        ServicePort::new(if udp { Protocol::Udp } else { Protocol::Tcp }, number);
                    p.name = pname;
                    p.node_port = node_port;
                    s.ports.push(p);
                }
                if maglev % 2 == 1 {
                    s.policy = Policy::Maglev { table_size: maglev };
                }
                s
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(super::common::cases(512)))]

        /// Whatever the input, the table accepts exactly what validates, never panics, and a
        /// rejected change leaves the published snapshot untouched.
        #[test]
        fn the_table_accepts_exactly_what_validates(s in arb_service()) {
            let table = Table::default();
            let valid = s.validate();
            let before = table.load_full();
            match table.apply(Batch::new().upsert(s.clone())) {
                Ok(p) => {
                    prop_assert!(valid.is_ok());
                    prop_assert_eq!(p.generation, 1);
                    prop_assert!(table.load().service(&s.name).is_some());
                }
                Err(TableError::Invalid { service, error }) => {
                    prop_assert_eq!(Some(error), valid.err());
                    prop_assert_eq!(service, s.name);
                    let after = table.load();
                    prop_assert!(std::ptr::eq(&*before, &**after));
                }
                Err(other) => {
                    // A service can collide only with itself (same frontend twice).
                    prop_assert!(valid.is_ok());
                    prop_assert!(matches!(other, TableError::Conflict { .. }), "{}", other);
                    prop_assert_eq!(table.load().generation(), 0);
                }
            }
        }
    }
}
