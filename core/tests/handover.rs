//! What a handover to another process carries in the table: frontend keys as text, the
//! generation, and the counters (see `svcproxy_core::handover`; the engine's part is in
//! `engine.rs`).

use std::net::SocketAddr;

use svcproxy_core::*;

#[test]
fn a_frontend_key_reads_back_what_it_writes() {
    for key in [
        ServicePortKey::new("198.18.0.1:53".parse().unwrap(), Protocol::Udp),
        ServicePortKey::new("[2001:db8::1]:443".parse().unwrap(), Protocol::Tcp),
    ] {
        assert_eq!(key.to_string().parse::<ServicePortKey>(), Ok(key));
    }
    assert!("198.18.0.1:53".parse::<ServicePortKey>().is_err());
    assert!("198.18.0.1/TCP".parse::<ServicePortKey>().is_err());
}

#[test]
fn a_continuing_table_goes_on_from_the_generation_and_the_counters_handed_over() {
    let old = Table::default();
    let web = Service::new("web")
        .address("198.18.0.1".parse().unwrap())
        .port(ServicePort::tcp(80));
    let ep: SocketAddr = "198.18.1.1:8080".parse().unwrap();
    let batch = || {
        Batch::new()
            .upsert(web.clone())
            .replace_endpoints("web", vec![Endpoint::new(ep)])
    };
    old.apply(batch()).unwrap();
    let stats = old.load().stats();
    let port = old
        .load()
        .lookup(&ServicePortKey::new(
            "198.18.0.1:80".parse().unwrap(),
            Protocol::Tcp,
        ))
        .unwrap()
        .clone();
    port.select("127.0.0.1:1000".parse().unwrap(), std::time::Instant::now())
        .unwrap()
        .tally()
        .open();
    port.counters().add_refused();
    let carried = old.load().stats();
    assert_ne!(carried, stats);

    let new = Table::continuing(TableConfig::default(), old.load().generation());
    assert_eq!(new.apply(batch()).unwrap().generation, 2);
    assert_eq!(new.load().carry_stats(&carried), 1);
    let after = &new.load().stats()[0];
    assert_eq!(after.totals.connections_total, 1);
    assert_eq!(after.totals.refused, 1);
    assert_eq!(
        after.totals.connections_active, 0,
        "open connections stay the old process's"
    );
    assert_eq!(after.endpoints[0].1.connections_total, 1);
}
