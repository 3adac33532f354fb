//! The model: services, their ports, and the endpoints behind them, with validation.
//!
//! These are plain values; nothing here touches the network. A [`Service`] says where clients
//! connect (its frontends: addresses × ports, node ports, external addresses) and how a backend
//! is chosen; an [`Endpoint`] says where a backend is and whether it may take traffic. Both are
//! validated before they can reach a table ([`Service::validate`], [`validate_endpoints`]), and
//! validation names the offending field.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use crate::error::{Problem, ValidationError};

/// Transport protocol of a service port. TCP and UDP on the same port number are separate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// Stream: one backend per connection.
    Tcp,
    /// Datagrams: one backend per flow (client address and port).
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("tcp") {
            Ok(Protocol::Tcp)
        } else if s.eq_ignore_ascii_case("udp") {
            Ok(Protocol::Udp)
        } else {
            Err(format!("unknown protocol {s:?} (expected TCP or UDP)"))
        }
    }
}

/// Where clients reach a service port: address, port and protocol. The address may be the
/// unspecified address (`0.0.0.0`, `::`) to listen on every local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortKey {
    /// Address and port clients connect or send to.
    pub addr: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
}

impl ServicePortKey {
    /// A key for `addr` and `protocol`.
    pub const fn new(addr: SocketAddr, protocol: Protocol) -> Self {
        Self { addr, protocol }
    }
}

impl fmt::Display for ServicePortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.protocol)
    }
}

/// As its text (`ADDRESS:PORT/PROTOCOL`).
#[cfg(feature = "serde")]
impl serde::Serialize for ServicePortKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for ServicePortKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for ServicePortKey {
    type Err = String;

    /// Parses what [`fmt::Display`] writes: `ADDRESS:PORT/PROTOCOL`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, protocol) = s
            .rsplit_once('/')
            .ok_or_else(|| format!("{s:?}: expected ADDRESS:PORT/PROTOCOL"))?;
        let addr = addr
            .parse()
            .map_err(|e| format!("{s:?}: the address: {e}"))?;
        Ok(ServicePortKey::new(addr, protocol.parse()?))
    }
}

/// Which backend port a service port forwards to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum TargetPort {
    /// The port in the endpoint's own address. Endpoints whose address has port 0 have none
    /// and are not used for this service port.
    #[default]
    EndpointPort,
    /// The same port number on every endpoint.
    Number(u16),
    /// A port name, resolved per endpoint through [`Endpoint::ports`]; endpoints without that
    /// name are not used for this service port (Kubernetes' named target ports).
    Named(String),
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name; required when the service has more than one port.
    pub name: Option<String>,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Port clients connect to on the service's addresses.
    pub port: u16,
    /// Backend port.
    pub target_port: TargetPort,
    /// Port served on every node address of the table as well (Kubernetes NodePort).
    pub node_port: Option<u16>,
}

impl ServicePort {
    /// An unnamed TCP port forwarding to the endpoints' own ports.
    pub fn tcp(port: u16) -> Self {
        Self::new(Protocol::Tcp, port)
    }

    /// An unnamed UDP port forwarding to the endpoints' own ports.
    pub fn udp(port: u16) -> Self {
        Self::new(Protocol::Udp, port)
    }

    /// An unnamed port forwarding to the endpoints' own ports.
    pub fn new(protocol: Protocol, port: u16) -> Self {
        Self {
            name: None,
            protocol,
            port,
            target_port: TargetPort::EndpointPort,
            node_port: None,
        }
    }

    /// Names the port.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the backend port.
    pub fn target(mut self, target: TargetPort) -> Self {
        self.target_port = target;
        self
    }

    /// Also serves the port as a node port.
    pub fn node_port(mut self, port: u16) -> Self {
        self.node_port = Some(port);
        self
    }

    /// How this port is named in messages and statistics: its name, else its number.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => self.port.to_string(),
        }
    }
}

/// How a backend is chosen among the eligible endpoints of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Each endpoint in turn (kube-proxy's behaviour). Weights are ignored.
    #[default]
    RoundRobin,
    /// Uniformly at random. Weights are ignored.
    Random,
    /// In turn, each endpoint as often as its weight, interleaved.
    WeightedRoundRobin,
    /// The endpoint with the fewest active connections per unit of weight.
    LeastConnections,
    /// Maglev consistent hashing of the client address (IP and port), so that several proxy
    /// instances agree and removing one of N endpoints moves about 1/N of the clients.
    Maglev {
        /// Lookup table size; must be prime. [`Policy::MAGLEV_DEFAULT_SIZE`] by default.
        table_size: u32,
    },
}

impl Policy {
    /// Default Maglev table size (prime).
    pub const MAGLEV_DEFAULT_SIZE: u32 = 65_537;

    /// Maglev with the default table size.
    pub const fn maglev() -> Self {
        Policy::Maglev {
            table_size: Self::MAGLEV_DEFAULT_SIZE,
        }
    }
}

/// Session affinity: whether a client keeps its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionAffinity {
    /// Every connection (TCP) or flow (UDP) is balanced on its own.
    #[default]
    None,
    /// The same client IP gets the same endpoint until it has been idle for `timeout`
    /// (Kubernetes `ClientIP`). The key is the IP alone, for UDP too.
    ClientIp {
        /// Idle time after which the client is balanced again. Kubernetes' default is 10800 s.
        timeout: Duration,
    },
}

impl SessionAffinity {
    /// Kubernetes' default affinity timeout (3 hours).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10_800);
    /// Kubernetes' largest affinity timeout (1 day).
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
}

/// Which endpoints traffic may go to (Kubernetes internal/external traffic policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    /// Any eligible endpoint in the cluster.
    #[default]
    Cluster,
    /// Only endpoints on this node (the table's node name); none elsewhere, so traffic is refused.
    Local,
}

/// A service: frontends clients reach, and how they are balanced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Unique name, e.g. `namespace/name`.
    pub name: String,
    /// Cluster IPs or listen addresses; the unspecified address listens on all local addresses.
    pub addresses: Vec<IpAddr>,
    /// External addresses (Kubernetes `externalIPs`); their traffic follows
    /// [`Service::external_traffic_policy`].
    pub external_addresses: Vec<IpAddr>,
    /// Load-balancer ingress addresses: external addresses that only clients in
    /// [`Service::load_balancer_source_ranges`] may reach, when it is not empty.
    pub load_balancer_addresses: Vec<IpAddr>,
    /// The client address ranges allowed at [`Service::load_balancer_addresses`] (Kubernetes
    /// `loadBalancerSourceRanges`); empty: any client.
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// The TCP port on which the node says how many endpoints this node has for the service's
    /// external traffic (Kubernetes `healthCheckNodePort`, for `externalTrafficPolicy: Local`).
    /// The table only holds it; svcproxyd serves it.
    pub health_check_node_port: Option<u16>,
    /// The ports, each served on every address.
    pub ports: Vec<ServicePort>,
    /// Balancing policy.
    pub policy: Policy,
    /// Session affinity.
    pub session_affinity: SessionAffinity,
    /// Use endpoints whatever their conditions (Kubernetes `publishNotReadyAddresses`).
    pub publish_not_ready: bool,
    /// Policy for traffic to [`Service::addresses`].
    pub internal_traffic_policy: TrafficPolicy,
    /// Policy for traffic to external addresses and node ports.
    pub external_traffic_policy: TrafficPolicy,
    /// Most connections (TCP) or flows (UDP) open at once per service port; clients beyond it
    /// are refused. Approximate by at most one per worker, as workers check it concurrently.
    pub max_connections: Option<u32>,
}

impl Service {
    /// A service with no frontends yet, round robin, no affinity.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            addresses: Vec::new(),
            external_addresses: Vec::new(),
            load_balancer_addresses: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            health_check_node_port: None,
            ports: Vec::new(),
            policy: Policy::default(),
            session_affinity: SessionAffinity::default(),
            publish_not_ready: false,
            internal_traffic_policy: TrafficPolicy::default(),
            external_traffic_policy: TrafficPolicy::default(),
            max_connections: None,
        }
    }

    /// Adds an address.
    pub fn address(mut self, addr: IpAddr) -> Self {
        self.addresses.push(addr);
        self
    }

    /// Adds a port.
    pub fn port(mut self, port: ServicePort) -> Self {
        self.ports.push(port);
        self
    }

    /// Sets the balancing policy.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets session affinity.
    pub fn affinity(mut self, affinity: SessionAffinity) -> Self {
        self.session_affinity = affinity;
        self
    }

    /// Checks every field; the first problem found is returned with its path.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_name(&self.name).map_err(|p| ValidationError::new("name", p))?;
        check_addresses(&self.addresses, "addresses", true)?;
        check_addresses(&self.external_addresses, "external_addresses", false)?;
        check_addresses(
            &self.load_balancer_addresses,
            "load_balancer_addresses",
            false,
        )?;
        if self.ports.is_empty() {
            return Err(ValidationError::new("ports", Problem::Empty));
        }
        let mut names = HashSet::new();
        let mut numbers = HashSet::new();
        let mut node_ports = HashSet::new();
        for (i, port) in self.ports.iter().enumerate() {
            let at = |field: &str| format!("ports[{i}].{field}");
            match &port.name {
                Some(name) => {
                    check_name(name).map_err(|p| ValidationError::new(at("name"), p))?;
                    if !names.insert(name.as_str()) {
                        return Err(ValidationError::new(
                            at("name"),
                            Problem::Duplicate(name.clone()),
                        ));
                    }
                }
                None if self.ports.len() > 1 => {
                    return Err(ValidationError::new(at("name"), Problem::Unnamed));
                }
                None => {}
            }
            if port.port == 0 {
                return Err(ValidationError::new(at("port"), Problem::ZeroPort));
            }
            if !numbers.insert((port.protocol, port.port)) {
                let what = format!("{}/{}", port.port, port.protocol);
                return Err(ValidationError::new(at("port"), Problem::Duplicate(what)));
            }
            match &port.target_port {
                TargetPort::EndpointPort => {}
                TargetPort::Number(0) => {
                    return Err(ValidationError::new(at("target_port"), Problem::ZeroPort));
                }
                TargetPort::Number(_) => {}
                TargetPort::Named(name) => {
                    check_name(name).map_err(|p| ValidationError::new(at("target_port"), p))?;
                }
            }
            if let Some(node_port) = port.node_port {
                if node_port == 0 {
                    return Err(ValidationError::new(at("node_port"), Problem::ZeroPort));
                }
                if !node_ports.insert((port.protocol, node_port)) {
                    let what = format!("{node_port}/{}", port.protocol);
                    return Err(ValidationError::new(
                        at("node_port"),
                        Problem::Duplicate(what),
                    ));
                }
            }
        }
        if let Some(port) = self.health_check_node_port {
            if port == 0 {
                let field = "health_check_node_port";
                return Err(ValidationError::new(field, Problem::ZeroPort));
            }
            if node_ports.contains(&(Protocol::Tcp, port)) {
                let what = format!("{port}/TCP");
                let field = "health_check_node_port";
                return Err(ValidationError::new(field, Problem::Duplicate(what)));
            }
        }
        let has_node_port = self.ports.iter().any(|p| p.node_port.is_some());
        if self.frontend_addresses().next().is_none() && !has_node_port {
            return Err(ValidationError::new("addresses", Problem::NoFrontend));
        }
        if let SessionAffinity::ClientIp { timeout } = self.session_affinity {
            let max = SessionAffinity::MAX_TIMEOUT.as_secs();
            if timeout < Duration::from_secs(1) || timeout > SessionAffinity::MAX_TIMEOUT {
                let problem = Problem::OutOfRange {
                    got: timeout.as_secs(),
                    min: 1,
                    max,
                };
                return Err(ValidationError::new("affinity_timeout_seconds", problem));
            }
        }
        if self.max_connections == Some(0) {
            let problem = Problem::OutOfRange {
                got: 0,
                min: 1,
                max: u64::from(u32::MAX),
            };
            return Err(ValidationError::new("max_connections", problem));
        }
        if let Policy::Maglev { table_size } = self.policy {
            let size = u64::from(table_size);
            if !(MAGLEV_MIN_SIZE..=MAGLEV_MAX_SIZE).contains(&size) {
                let problem = Problem::OutOfRange {
                    got: size,
                    min: MAGLEV_MIN_SIZE,
                    max: MAGLEV_MAX_SIZE,
                };
                return Err(ValidationError::new("maglev_table_size", problem));
            }
            if !is_prime(size) {
                return Err(ValidationError::new(
                    "maglev_table_size",
                    Problem::NotPrime(size),
                ));
            }
        }
        Ok(())
    }

    /// Every address the service has frontends at, apart from node ports: its addresses,
    /// external addresses and load-balancer addresses.
    pub fn frontend_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses
            .iter()
            .chain(&self.external_addresses)
            .chain(&self.load_balancer_addresses)
            .copied()
    }

    /// Every frontend of the service: its addresses, external and load-balancer addresses
    /// with each port, and each node port on each of `node_addresses`.
    pub fn frontends<'a>(
        &'a self,
        node_addresses: &'a [IpAddr],
    ) -> impl Iterator<Item = Frontend> + 'a {
        self.ports
            .iter()
            .enumerate()
            .flat_map(move |(index, port)| {
                let at = move |kind: FrontendKind, number: u16| {
                    move |ip: &IpAddr| Frontend {
                        key: ServicePortKey::new(SocketAddr::new(*ip, number), port.protocol),
                        port_index: index,
                        kind,
                    }
                };
                let internal = self
                    .addresses
                    .iter()
                    .map(at(FrontendKind::Address, port.port));
                let external = self
                    .external_addresses
                    .iter()
                    .map(at(FrontendKind::External, port.port));
                let balancer = self
                    .load_balancer_addresses
                    .iter()
                    .map(at(FrontendKind::LoadBalancer, port.port));
                let node = port.node_port.into_iter().flat_map(move |number| {
                    node_addresses
                        .iter()
                        .map(at(FrontendKind::NodePort, number))
                });
                internal.chain(external).chain(balancer).chain(node)
            })
    }
}

/// Smallest accepted Maglev table size.
pub const MAGLEV_MIN_SIZE: u64 = 101;
/// Largest accepted Maglev table size.
pub const MAGLEV_MAX_SIZE: u64 = 4_194_304;

/// Whose traffic policy applies to a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Service addresses: [`Service::internal_traffic_policy`].
    Internal,
    /// External addresses and node ports: [`Service::external_traffic_policy`].
    External,
}

/// What kind of address a frontend is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrontendKind {
    /// One of [`Service::addresses`].
    Address,
    /// One of [`Service::external_addresses`].
    External,
    /// One of [`Service::load_balancer_addresses`].
    LoadBalancer,
    /// A node port on a node address.
    NodePort,
}

impl FrontendKind {
    /// Whose traffic policy applies.
    pub fn scope(self) -> Scope {
        match self {
            FrontendKind::Address => Scope::Internal,
            _ => Scope::External,
        }
    }
}

/// One place a service port is reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frontend {
    /// Address, port and protocol.
    pub key: ServicePortKey,
    /// Index into [`Service::ports`].
    pub port_index: usize,
    /// What kind of address it is at.
    pub kind: FrontendKind,
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of `ip` (an IPv4-mapped IPv6 address is IPv4).
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Endpoint conditions, as in a Kubernetes EndpointSlice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conditions {
    /// Ready for new traffic.
    pub ready: bool,
    /// Serving (may be true while terminating).
    pub serving: bool,
    /// Shutting down.
    pub terminating: bool,
}

impl Default for Conditions {
    fn default() -> Self {
        Self::READY
    }
}

impl Conditions {
    /// Ready and serving.
    pub const READY: Self = Self {
        ready: true,
        serving: true,
        terminating: false,
    };
    /// Not ready, not serving.
    pub const NOT_READY: Self = Self {
        ready: false,
        serving: false,
        terminating: false,
    };
    /// Terminating but still serving: used when no endpoint is ready.
    pub const SERVING_TERMINATING: Self = Self {
        ready: false,
        serving: true,
        terminating: true,
    };
}

/// A named port of an endpoint, for [`TargetPort::Named`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamedPort {
    /// Port name.
    pub name: String,
    /// Port number.
    pub port: u16,
}

/// A backend a service may forward to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Address; its port is used by [`TargetPort::EndpointPort`] (0: none).
    pub address: SocketAddr,
    /// Named ports, for [`TargetPort::Named`].
    pub ports: Vec<NamedPort>,
    /// Whether it may take traffic.
    pub conditions: Conditions,
    /// Relative weight, 1 to [`Endpoint::MAX_WEIGHT`].
    pub weight: u32,
    /// Node it runs on (for [`TrafficPolicy::Local`]).
    pub node: Option<String>,
    /// Zone it runs in (informational).
    pub zone: Option<String>,
    /// Where it should be used from (EndpointSlice `hints`); `None` for none, as most
    /// endpoints have (boxed: it would double the size of every endpoint).
    pub hints: Option<Box<Hints>>,
}

/// No hints.
static NO_HINTS: Hints = Hints {
    for_zones: Vec::new(),
    for_nodes: Vec::new(),
};

/// Topology hints of an endpoint (Kubernetes EndpointSlice `hints.forZones`, `hints.forNodes`),
/// which the EndpointSlice controller sets for `trafficDistribution`. When every ready endpoint of
/// a service port has node hints and one is hinted for this node, only those hinted for it are
/// used; else the same with zone hints and this node's zone; else hints are ignored (as
/// kube-proxy's `topology.go` does).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    /// Zones it should serve.
    pub for_zones: Vec<String>,
    /// Nodes it should serve.
    pub for_nodes: Vec<String>,
}

impl Endpoint {
    /// Largest weight.
    pub const MAX_WEIGHT: u32 = 65_535;

    /// A ready endpoint of weight 1.
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            ports: Vec::new(),
            conditions: Conditions::READY,
            weight: 1,
            node: None,
            zone: None,
            hints: None,
        }
    }

    /// Its topology hints (empty without any).
    pub fn topology_hints(&self) -> &Hints {
        self.hints.as_deref().unwrap_or(&NO_HINTS)
    }

    /// Sets the conditions.
    pub fn conditions(mut self, conditions: Conditions) -> Self {
        self.conditions = conditions;
        self
    }

    /// Sets the weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the node.
    pub fn node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// Adds a named port.
    pub fn named_port(mut self, name: impl Into<String>, port: u16) -> Self {
        self.ports.push(NamedPort {
            name: name.into(),
            port,
        });
        self
    }

    /// The backend address this endpoint has for `target`, if any.
    pub fn resolve(&self, target: &TargetPort) -> Option<SocketAddr> {
        let port = match target {
            TargetPort::EndpointPort => self.address.port(),
            TargetPort::Number(n) => *n,
            TargetPort::Named(name) => self.ports.iter().find(|p| p.name == *name)?.port,
        };
        (port != 0).then(|| SocketAddr::new(self.address.ip(), port))
    }

    fn validate(&self) -> Result<(), ValidationError> {
        check_ip(self.address.ip(), false).map_err(|p| ValidationError::new("address", p))?;
        let mut names = HashSet::new();
        for (i, port) in self.ports.iter().enumerate() {
            let at = |field: &str| format!("ports[{i}].{field}");
            check_name(&port.name).map_err(|p| ValidationError::new(at("name"), p))?;
            if !names.insert(port.name.as_str()) {
                let problem = Problem::Duplicate(port.name.clone());
                return Err(ValidationError::new(at("name"), problem));
            }
            if port.port == 0 {
                return Err(ValidationError::new(at("port"), Problem::ZeroPort));
            }
        }
        if !(1..=Self::MAX_WEIGHT).contains(&self.weight) {
            let problem = Problem::OutOfRange {
                got: u64::from(self.weight),
                min: 1,
                max: u64::from(Self::MAX_WEIGHT),
            };
            return Err(ValidationError::new("weight", problem));
        }
        if let Some(node) = &self.node {
            check_name(node).map_err(|p| ValidationError::new("node", p))?;
        }
        if let Some(zone) = &self.zone {
            check_name(zone).map_err(|p| ValidationError::new("zone", p))?;
        }
        let hinted = [
            ("hints.for_zones", &self.topology_hints().for_zones),
            ("hints.for_nodes", &self.topology_hints().for_nodes),
        ];
        for (field, names) in hinted {
            for (i, name) in names.iter().enumerate() {
                check_name(name).map_err(|p| ValidationError::new(format!("{field}[{i}]"), p))?;
            }
        }
        Ok(())
    }
}

/// Validates the endpoint list of a service with `ports`: each endpoint, no address twice, and
/// each one reachable through at least one of the ports (an endpoint no port resolves to
/// would be counted and never used).
pub fn validate_endpoints(
    endpoints: &[Endpoint],
    ports: &[ServicePort],
) -> Result<(), ValidationError> {
    let mut seen = HashSet::with_capacity(endpoints.len());
    for (i, endpoint) in endpoints.iter().enumerate() {
        endpoint
            .validate()
            .map_err(|e| e.within(format!("endpoints[{i}]")))?;
        if !seen.insert(endpoint.address) {
            let problem = Problem::Duplicate(endpoint.address.to_string());
            return Err(ValidationError::new(
                format!("endpoints[{i}].address"),
                problem,
            ));
        }
        if !ports
            .iter()
            .any(|p| endpoint.resolve(&p.target_port).is_some())
        {
            return Err(ValidationError::new(
                format!("endpoints[{i}]"),
                Problem::NoPort,
            ));
        }
    }
    Ok(())
}

/// Longest name accepted (Kubernetes' limit for names and namespace/name pairs).
pub const MAX_NAME_LEN: usize = 253;

fn check_name(name: &str) -> Result<(), Problem> {
    if name.is_empty() {
        return Err(Problem::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Problem::TooLong {
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/')))
    {
        Some(c) => Err(Problem::InvalidChar(c)),
        None => Ok(()),
    }
}

fn check_ip(ip: IpAddr, allow_unspecified: bool) -> Result<(), Problem> {
    let reason = if ip.is_multicast() {
        Some("multicast")
    } else if ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
        Some("broadcast")
    } else if ip.is_unspecified() && !allow_unspecified {
        Some("unspecified")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Problem::BadAddress(ip.to_string(), reason)),
        None => Ok(()),
    }
}

fn check_addresses(
    addresses: &[IpAddr],
    field: &str,
    allow_unspecified: bool,
) -> Result<(), ValidationError> {
    let mut seen = HashSet::new();
    for (i, ip) in addresses.iter().enumerate() {
        let at = format!("{field}[{i}]");
        check_ip(*ip, allow_unspecified).map_err(|p| ValidationError::new(&at, p))?;
        if !seen.insert(ip) {
            return Err(ValidationError::new(at, Problem::Duplicate(ip.to_string())));
        }
    }
    Ok(())
}

pub(crate) fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}
