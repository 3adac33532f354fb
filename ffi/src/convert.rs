//! C descriptions of services and endpoints, and their conversion to the model. Conversion
//! checks what C can get wrong (NULLs, UTF-8, enum values, address syntax) and names the
//! field; the table validates the rest when the batch is applied.

use std::ffi::c_char;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use svcproxy::{
    Conditions, Endpoint, Policy, Protocol, Service, ServicePort, SessionAffinity, TargetPort,
    TrafficPolicy,
};
use svcproxy_core::{Hints, NamedPort};

use crate::abi::{Failure, array, optional_text, text};
use crate::svcproxy_result;

/// Protocol: TCP.
pub const SVCPROXY_PROTOCOL_TCP: u32 = 0;
/// Protocol: UDP.
pub const SVCPROXY_PROTOCOL_UDP: u32 = 1;
/// Policy: round robin.
pub const SVCPROXY_POLICY_ROUND_ROBIN: u32 = 0;
/// Policy: random.
pub const SVCPROXY_POLICY_RANDOM: u32 = 1;
/// Policy: weighted round robin.
pub const SVCPROXY_POLICY_WEIGHTED_ROUND_ROBIN: u32 = 2;
/// Policy: least connections.
pub const SVCPROXY_POLICY_LEAST_CONNECTIONS: u32 = 3;
/// Policy: Maglev consistent hashing.
pub const SVCPROXY_POLICY_MAGLEV: u32 = 4;
/// Traffic policy: any endpoint.
pub const SVCPROXY_TRAFFIC_CLUSTER: u32 = 0;
/// Traffic policy: endpoints on this node only.
pub const SVCPROXY_TRAFFIC_LOCAL: u32 = 1;

/// A named port of an endpoint.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct svcproxy_named_port {
    /// Port name.
    pub name: *const c_char,
    /// Port number.
    pub port: u16,
}

/// One port of a service.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct svcproxy_port {
    /// Port name; NULL for none (required when a service has several ports).
    pub name: *const c_char,
    /// `SVCPROXY_PROTOCOL_*`.
    pub protocol: u32,
    /// Port clients connect to.
    pub port: u16,
    /// Backend port number; 0: the endpoint's own port. Ignored when `target_port_name` is set.
    pub target_port: u16,
    /// Backend port name, resolved per endpoint; NULL for none.
    pub target_port_name: *const c_char,
    /// Node port; 0: none.
    pub node_port: u16,
}

/// A service.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct svcproxy_service {
    /// Unique name, e.g. "namespace/name".
    pub name: *const c_char,
    /// Addresses (IPv4 or IPv6 text) clients connect to.
    pub addresses: *const *const c_char,
    /// Number of `addresses`.
    pub addresses_len: usize,
    /// External addresses.
    pub external_addresses: *const *const c_char,
    /// Number of `external_addresses`.
    pub external_addresses_len: usize,
    /// Ports.
    pub ports: *const svcproxy_port,
    /// Number of `ports`.
    pub ports_len: usize,
    /// `SVCPROXY_POLICY_*`.
    pub policy: u32,
    /// Maglev table size (prime); 0: the default (65537).
    pub maglev_table_size: u32,
    /// ClientIP session affinity timeout in seconds; 0: no affinity.
    pub affinity_timeout_s: u32,
    /// Use endpoints whatever their conditions.
    pub publish_not_ready: bool,
    /// `SVCPROXY_TRAFFIC_*` for the addresses.
    pub internal_traffic_policy: u32,
    /// `SVCPROXY_TRAFFIC_*` for external addresses and node ports.
    pub external_traffic_policy: u32,
    /// Most connections or flows open at once per service port; 0: no limit.
    pub max_connections: u32,
    /// Load balancer ingress addresses (served like external addresses).
    pub load_balancer_addresses: *const *const c_char,
    /// Number of `load_balancer_addresses`.
    pub load_balancer_addresses_len: usize,
    /// Client ranges (CIDR text) allowed at the load balancer addresses; none: every client.
    pub load_balancer_source_ranges: *const *const c_char,
    /// Number of `load_balancer_source_ranges`.
    pub load_balancer_source_ranges_len: usize,
    /// Port of the health check node port (external traffic policy Local); 0: none.
    pub health_check_node_port: u16,
}

/// An endpoint.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct svcproxy_endpoint {
    /// "ip:port", or "ip" for an endpoint reached only through named ports.
    pub address: *const c_char,
    /// Named ports.
    pub ports: *const svcproxy_named_port,
    /// Number of `ports`.
    pub ports_len: usize,
    /// Ready for new traffic.
    pub ready: bool,
    /// Serving (may be true while terminating).
    pub serving: bool,
    /// Shutting down.
    pub terminating: bool,
    /// Weight, 1 to 65535.
    pub weight: u32,
    /// Node; NULL for none.
    pub node: *const c_char,
    /// Zone; NULL for none.
    pub zone: *const c_char,
    /// Zones it should serve (topology hints); none: no zone hints.
    pub for_zones: *const *const c_char,
    /// Number of `for_zones`.
    pub for_zones_len: usize,
    /// Nodes it should serve (topology hints); none: no node hints.
    pub for_nodes: *const *const c_char,
    /// Number of `for_nodes`.
    pub for_nodes_len: usize,
}

fn invalid(field: &str, why: impl std::fmt::Display) -> Failure {
    Failure::new(svcproxy_result::Invalid, format!("{field}: {why}"))
}

/// The `len` strings at `ptr` parsed as `T`, or the first one that is NULL, not UTF-8 or not
/// a `what`.
fn parsed<T: std::str::FromStr>(
    ptr: *const *const c_char,
    len: usize,
    field: &str,
    what: &str,
) -> Result<Vec<T>, Failure> {
    array(ptr, len, field)?
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let at = format!("{field}[{i}]");
            let s = text(*p, &at)?;
            s.parse()
                .map_err(|_| invalid(&at, format!("{s:?} is not {what}")))
        })
        .collect()
}

/// An array of IP addresses in text.
pub(crate) fn ips(
    ptr: *const *const c_char,
    len: usize,
    field: &str,
) -> Result<Vec<IpAddr>, Failure> {
    parsed(ptr, len, field, "an IP address")
}

/// An array of address ranges in CIDR text.
pub(crate) fn nets(
    ptr: *const *const c_char,
    len: usize,
    field: &str,
) -> Result<Vec<IpNet>, Failure> {
    parsed(ptr, len, field, "an address range (CIDR)")
}

/// An array of strings.
fn texts(ptr: *const *const c_char, len: usize, field: &str) -> Result<Vec<String>, Failure> {
    array(ptr, len, field)?
        .iter()
        .enumerate()
        .map(|(i, p)| text(*p, &format!("{field}[{i}]")).map(str::to_string))
        .collect()
}

fn traffic(v: u32, field: &str) -> Result<TrafficPolicy, Failure> {
    match v {
        SVCPROXY_TRAFFIC_CLUSTER => Ok(TrafficPolicy::Cluster),
        SVCPROXY_TRAFFIC_LOCAL => Ok(TrafficPolicy::Local),
        other => Err(invalid(
            field,
            format!("{other} is not a traffic policy (0 or 1)"),
        )),
    }
}

pub(crate) fn service(s: &svcproxy_service) -> Result<Service, Failure> {
    let name = text(s.name, "service.name")?.to_string();
    let ports = array(s.ports, s.ports_len, "service.ports")?
        .iter()
        .enumerate()
        .map(|(i, p)| port(p, i))
        .collect::<Result<_, _>>()?;
    let policy = match s.policy {
        SVCPROXY_POLICY_ROUND_ROBIN => Policy::RoundRobin,
        SVCPROXY_POLICY_RANDOM => Policy::Random,
        SVCPROXY_POLICY_WEIGHTED_ROUND_ROBIN => Policy::WeightedRoundRobin,
        SVCPROXY_POLICY_LEAST_CONNECTIONS => Policy::LeastConnections,
        SVCPROXY_POLICY_MAGLEV => Policy::Maglev {
            table_size: match s.maglev_table_size {
                0 => Policy::MAGLEV_DEFAULT_SIZE,
                n => n,
            },
        },
        other => {
            return Err(invalid(
                "service.policy",
                format!("{other} is not a policy (0 to 4)"),
            ));
        }
    };
    Ok(Service {
        name,
        addresses: ips(s.addresses, s.addresses_len, "service.addresses")?,
        external_addresses: ips(
            s.external_addresses,
            s.external_addresses_len,
            "service.external_addresses",
        )?,
        load_balancer_addresses: ips(
            s.load_balancer_addresses,
            s.load_balancer_addresses_len,
            "service.load_balancer_addresses",
        )?,
        load_balancer_source_ranges: nets(
            s.load_balancer_source_ranges,
            s.load_balancer_source_ranges_len,
            "service.load_balancer_source_ranges",
        )?,
        health_check_node_port: (s.health_check_node_port != 0).then_some(s.health_check_node_port),
        ports,
        policy,
        session_affinity: match s.affinity_timeout_s {
            0 => SessionAffinity::None,
            t => SessionAffinity::ClientIp {
                timeout: Duration::from_secs(u64::from(t)),
            },
        },
        publish_not_ready: s.publish_not_ready,
        internal_traffic_policy: traffic(
            s.internal_traffic_policy,
            "service.internal_traffic_policy",
        )?,
        external_traffic_policy: traffic(
            s.external_traffic_policy,
            "service.external_traffic_policy",
        )?,
        max_connections: (s.max_connections > 0).then_some(s.max_connections),
    })
}

fn port(p: &svcproxy_port, i: usize) -> Result<ServicePort, Failure> {
    let at = |f: &str| format!("service.ports[{i}].{f}");
    let protocol = match p.protocol {
        SVCPROXY_PROTOCOL_TCP => Protocol::Tcp,
        SVCPROXY_PROTOCOL_UDP => Protocol::Udp,
        other => {
            return Err(invalid(
                &at("protocol"),
                format!("{other} is not a protocol (0 or 1)"),
            ));
        }
    };
    let target_port = match optional_text(p.target_port_name, &at("target_port_name"))? {
        Some(name) => TargetPort::Named(name.to_string()),
        None if p.target_port == 0 => TargetPort::EndpointPort,
        None => TargetPort::Number(p.target_port),
    };
    Ok(ServicePort {
        name: optional_text(p.name, &at("name"))?.map(str::to_string),
        protocol,
        port: p.port,
        target_port,
        node_port: (p.node_port != 0).then_some(p.node_port),
    })
}

pub(crate) fn endpoint(e: &svcproxy_endpoint, i: usize) -> Result<Endpoint, Failure> {
    let at = |f: &str| format!("endpoints[{i}].{f}");
    let text_address = text(e.address, &at("address"))?;
    let address = text_address
        .parse::<SocketAddr>()
        .or_else(|_| {
            text_address
                .parse::<IpAddr>()
                .map(|ip| SocketAddr::new(ip, 0))
        })
        .map_err(|_| {
            invalid(
                &at("address"),
                format!("{text_address:?} is not an IP address or ip:port"),
            )
        })?;
    let ports = array(e.ports, e.ports_len, &at("ports"))?
        .iter()
        .enumerate()
        .map(|(j, p)| {
            Ok(NamedPort {
                name: text(p.name, &format!("{}[{j}].name", at("ports")))?.to_string(),
                port: p.port,
            })
        })
        .collect::<Result<_, Failure>>()?;
    Ok(Endpoint {
        address,
        ports,
        conditions: Conditions {
            ready: e.ready,
            serving: e.serving,
            terminating: e.terminating,
        },
        weight: e.weight,
        node: optional_text(e.node, &at("node"))?.map(str::to_string),
        zone: optional_text(e.zone, &at("zone"))?.map(str::to_string),
        hints: hints(e, at)?,
    })
}

fn hints(
    e: &svcproxy_endpoint,
    at: impl Fn(&str) -> String,
) -> Result<Option<Box<Hints>>, Failure> {
    let for_zones = texts(e.for_zones, e.for_zones_len, &at("for_zones"))?;
    let for_nodes = texts(e.for_nodes, e.for_nodes_len, &at("for_nodes"))?;
    Ok((!for_zones.is_empty() || !for_nodes.is_empty()).then(|| {
        Box::new(Hints {
            for_zones,
            for_nodes,
        })
    }))
}
