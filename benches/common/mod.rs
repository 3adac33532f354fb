//! The benchmark table: `services` services of `per_service` endpoints each, one TCP port.

use std::net::{Ipv4Addr, SocketAddr};

use svcproxy::core::{Batch, Endpoint, Policy, Service, ServicePort};

pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0000 + i as u32)
}

pub fn service(i: usize, policy: Policy) -> Service {
    Service::new(format!("bench/svc-{i}"))
        .address(vip(i).into())
        .port(ServicePort::tcp(80))
        .policy(policy)
}

pub fn endpoints(i: usize, per_service: usize, salt: u32) -> Vec<Endpoint> {
    (0..per_service)
        .map(|j| {
            let ip = Ipv4Addr::from(0x0b00_0000 + (i * per_service + j) as u32);
            Endpoint::new(SocketAddr::from((ip, 8080 + salt as u16)))
                .node(format!("node-{}", j % 16))
        })
        .collect()
}

pub fn batch(services: usize, per_service: usize, policy: Policy) -> Batch {
    let mut batch = Batch::new();
    for i in 0..services {
        batch = batch
            .upsert(service(i, policy))
            .replace_endpoints(format!("bench/svc-{i}"), endpoints(i, per_service, 0));
    }
    batch
}
