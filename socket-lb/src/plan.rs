//! Which frontends are balanced at the socket, and how: the rule that keeps the socket path's
//! choices the same as the userspace proxy's.
//!
//! A frontend is served at the socket when its choice needs nothing the kernel does not have
//! at `connect()`: a specific address (not a wildcard node port), no source ranges, round
//! robin or random balancing, no connection limit, and endpoints of the frontend's own address
//! family. The endpoints are the port state that serves clients on this node (core's
//! eligibility rules decide which). Every other frontend is left to the userspace proxy.

use std::net::SocketAddr;
use std::time::Duration;

use svcproxy_core::{Policy, Protocol, Route, ServicePortKey};

/// What the maps hold for one frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) service: String,
    pub(crate) port: String,
    /// In round-robin order; empty: clients are refused.
    pub(crate) endpoints: Vec<SocketAddr>,
    pub(crate) random: bool,
    pub(crate) affinity: Option<Duration>,
}

/// How `key` is served at the socket, or `None` when the userspace proxy serves it.
pub(crate) fn plan(key: &ServicePortKey, route: &Route) -> Option<Plan> {
    if key.addr.ip().is_unspecified() {
        return None;
    }
    let port = route.node_clients()?;
    let random = match port.policy() {
        Policy::RoundRobin => false,
        Policy::Random => true,
        _ => return None,
    };
    if port.connection_limit().is_some() {
        return None;
    }
    let endpoints: Vec<SocketAddr> = port.backends().iter().map(|b| b.addr()).collect();
    if endpoints.iter().any(|e| e.is_ipv4() != key.addr.is_ipv4()) {
        return None;
    }
    Some(Plan {
        service: port.service().to_string(),
        port: port.port_label().to_string(),
        endpoints,
        random,
        affinity: port.affinity_timeout(),
    })
}

/// The protocol number the programs see in `ctx->protocol`.
pub(crate) fn ip_protocol(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use svcproxy_core::{Batch, Endpoint, Service, ServicePort, SessionAffinity, Table};

    fn plans(service: Service, endpoints: &[&str]) -> Vec<(ServicePortKey, Option<Plan>)> {
        let table = Table::default();
        let name = service.name.clone();
        let endpoints = endpoints
            .iter()
            .map(|e| Endpoint::new(e.parse().unwrap()))
            .collect();
        table
            .apply(
                Batch::new()
                    .upsert(service)
                    .replace_endpoints(name, endpoints),
            )
            .unwrap();
        let snapshot = table.load_full();
        let mut plans: Vec<_> = snapshot
            .frontends()
            .map(|(k, r)| (*k, plan(k, r)))
            .collect();
        plans.sort_by_key(|(k, _)| *k);
        plans
    }

    fn web() -> Service {
        Service::new("default/web")
            .address("198.18.0.10".parse().unwrap())
            .port(ServicePort::tcp(80))
    }

    #[test]
    fn round_robin_frontends_get_their_eligible_endpoints_in_order() {
        let p = plans(web(), &["198.18.1.2:8080", "198.18.1.1:8080"]);
        let plan = p[0].1.clone().unwrap();
        assert_eq!(plan.service, "default/web");
        assert_eq!(plan.port, "80");
        assert_eq!(
            plan.endpoints,
            vec![
                "198.18.1.1:8080".parse::<SocketAddr>().unwrap(),
                "198.18.1.2:8080".parse().unwrap()
            ]
        );
        assert!(!plan.random);
        assert_eq!(plan.affinity, None);
    }

    #[test]
    fn no_endpoint_is_a_plan_that_refuses() {
        let p = plans(web(), &[]);
        assert_eq!(p[0].1.as_ref().unwrap().endpoints, Vec::<SocketAddr>::new());
    }

    #[test]
    fn affinity_and_random_are_carried() {
        let mut s = web();
        s.session_affinity = SessionAffinity::ClientIp {
            timeout: Duration::from_secs(7),
        };
        s.policy = Policy::Random;
        let plan = plans(s, &["198.18.1.1:8080"])[0].1.clone().unwrap();
        assert!(plan.random);
        assert_eq!(plan.affinity, Some(Duration::from_secs(7)));
    }

    #[test]
    fn what_the_kernel_cannot_decide_is_left_to_the_proxy() {
        let mut weighted = web();
        weighted.policy = Policy::LeastConnections;
        assert_eq!(plans(weighted, &["198.18.1.1:8080"])[0].1, None);
        let mut limited = web();
        limited.max_connections = Some(10);
        assert_eq!(plans(limited, &["198.18.1.1:8080"])[0].1, None);
        let wildcard = Service::new("default/np")
            .address("0.0.0.0".parse().unwrap())
            .port(ServicePort::tcp(30080));
        assert_eq!(plans(wildcard, &["198.18.1.1:8080"])[0].1, None);
    }
}
