//! The table as a document (JSON, TOML): what the daemon's config and admin API, and the C and
//! Go bindings, read and write. One schema for all of them.
//!
//! ```json
//! {
//!   "upsert": [{
//!     "name": "default/web",
//!     "addresses": ["198.18.0.10"],
//!     "ports": [{"name": "http", "protocol": "TCP", "port": 80, "target_port": "http"}],
//!     "policy": "round_robin",
//!     "session_affinity": "client_ip", "affinity_timeout_seconds": 10800,
//!     "endpoints": [
//!       {"address": "198.19.1.5", "ports": {"http": 8080}, "ready": true, "node": "node-a"},
//!       {"address": "198.19.2.7:8080"}
//!     ]
//!   }],
//!   "remove": ["default/old"]
//! }
//! ```
//!
//! A service's `endpoints`, when present, replace its endpoints; when absent, the endpoints it
//! has stay. Converting a document checks what the serde layer cannot (address syntax) and
//! names the field; [`Table::apply`](crate::Table::apply) then validates the rest.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{Problem, ValidationError};
use crate::model::{
    Conditions, Endpoint, Hints, NamedPort, Policy, Protocol, Service, ServicePort,
    SessionAffinity, TargetPort, TrafficPolicy,
};
use crate::table::{Batch, Change, ServiceEntry};

/// A batch of changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchDoc {
    /// Services to add or replace (with their endpoints, if given).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upsert: Vec<ServiceDoc>,
    /// Names of services to remove (applied before the upserts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// The whole table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableDoc {
    /// Every service, with its endpoints.
    pub services: Vec<ServiceDoc>,
}

/// One service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDoc {
    /// Unique name, e.g. `namespace/name`.
    pub name: String,
    /// Cluster IPs or listen addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    /// External addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_addresses: Vec<IpAddr>,
    /// Load-balancer addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_addresses: Vec<IpAddr>,
    /// Client ranges allowed at the load-balancer addresses (`198.18.0.0/15`; empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// Health check node port (svcproxyd answers there with the node's endpoint count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    /// Ports.
    pub ports: Vec<PortDoc>,
    /// Balancing policy.
    #[serde(default)]
    pub policy: PolicyDoc,
    /// Maglev table size (prime; default 65537).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maglev_table_size: Option<u32>,
    /// Session affinity.
    #[serde(default)]
    pub session_affinity: AffinityDoc,
    /// Affinity timeout (default 10800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_seconds: Option<u64>,
    /// Use endpoints whatever their conditions.
    #[serde(default)]
    pub publish_not_ready: bool,
    /// Traffic policy for the service addresses.
    #[serde(default)]
    pub internal_traffic_policy: TrafficDoc,
    /// Traffic policy for external addresses and node ports.
    #[serde(default)]
    pub external_traffic_policy: TrafficDoc,
    /// Most connections or flows open at once per service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// The endpoints; absent: keep the current ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<EndpointDoc>>,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortDoc {
    /// Port name (required with several ports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `TCP` (default) or `UDP`.
    #[serde(default = "tcp", with = "protocol")]
    pub protocol: Protocol,
    /// Port clients connect to.
    pub port: u16,
    /// Backend port: a number, a name, or absent for the endpoint's own port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<TargetDoc>,
    /// Node port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

mod protocol {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::model::Protocol;

    pub(super) fn serialize<S: Serializer>(p: &Protocol, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&p.to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A target port by number or by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetDoc {
    /// A port number.
    Number(u16),
    /// A port name, resolved per endpoint.
    Name(String),
}

/// Balancing policy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyDoc {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// At random.
    Random,
    /// In turn, by weight.
    WeightedRoundRobin,
    /// Fewest active connections per weight.
    LeastConnections,
    /// Maglev consistent hashing.
    Maglev,
}

/// Session affinity names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AffinityDoc {
    /// No affinity.
    #[default]
    None,
    /// By client IP.
    ClientIp,
}

/// Traffic policy names, as Kubernetes spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TrafficDoc {
    /// Any endpoint.
    #[default]
    Cluster,
    /// Endpoints on this node only.
    Local,
}

/// One endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointDoc {
    /// `ip:port`, or just `ip` for endpoints reached through named ports.
    pub address: String,
    /// Named ports.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    /// Ready (default true).
    #[serde(default = "yes")]
    pub ready: bool,
    /// Serving (default: as ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    /// Terminating (default false).
    #[serde(default)]
    pub terminating: bool,
    /// Weight (default 1).
    #[serde(default = "one")]
    pub weight: u32,
    /// Node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Zones it should serve (topology hints).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub for_zones: Vec<String>,
    /// Nodes it should serve (topology hints).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub for_nodes: Vec<String>,
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

impl BatchDoc {
    /// The batch this document describes: removals first, then each service and, where given,
    /// its endpoints. Errors name the service and field.
    pub fn to_batch(&self) -> Result<Batch, (String, ValidationError)> {
        let mut batch = Batch::new();
        for name in &self.remove {
            batch.push(Change::Remove(name.clone()));
        }
        for (i, doc) in self.upsert.iter().enumerate() {
            let (service, endpoints) = doc
                .to_model()
                .map_err(|e| (doc.name.clone(), e.within(format!("upsert[{i}]"))))?;
            let name = service.name.clone();
            batch.push(Change::Upsert(service));
            if let Some(endpoints) = endpoints {
                batch.push(Change::ReplaceEndpoints {
                    service: name,
                    endpoints,
                });
            }
        }
        Ok(batch)
    }
}

impl ServiceDoc {
    /// The service and, if given, its endpoints.
    pub fn to_model(&self) -> Result<(Service, Option<Vec<Endpoint>>), ValidationError> {
        let policy = match self.policy {
            PolicyDoc::RoundRobin => Policy::RoundRobin,
            PolicyDoc::Random => Policy::Random,
            PolicyDoc::WeightedRoundRobin => Policy::WeightedRoundRobin,
            PolicyDoc::LeastConnections => Policy::LeastConnections,
            PolicyDoc::Maglev => Policy::Maglev {
                table_size: self
                    .maglev_table_size
                    .unwrap_or(Policy::MAGLEV_DEFAULT_SIZE),
            },
        };
        let session_affinity = match self.session_affinity {
            AffinityDoc::None => SessionAffinity::None,
            AffinityDoc::ClientIp => SessionAffinity::ClientIp {
                timeout: self
                    .affinity_timeout_seconds
                    .map_or(SessionAffinity::DEFAULT_TIMEOUT, Duration::from_secs),
            },
        };
        let traffic = |t: TrafficDoc| match t {
            TrafficDoc::Cluster => TrafficPolicy::Cluster,
            TrafficDoc::Local => TrafficPolicy::Local,
        };
        let service = Service {
            name: self.name.clone(),
            addresses: self.addresses.clone(),
            external_addresses: self.external_addresses.clone(),
            load_balancer_addresses: self.load_balancer_addresses.clone(),
            load_balancer_source_ranges: self.load_balancer_source_ranges.clone(),
            health_check_node_port: self.health_check_node_port,
            ports: self.ports.iter().map(PortDoc::to_model).collect(),
            policy,
            session_affinity,
            publish_not_ready: self.publish_not_ready,
            internal_traffic_policy: traffic(self.internal_traffic_policy),
            external_traffic_policy: traffic(self.external_traffic_policy),
            max_connections: self.max_connections,
        };
        let endpoints = match &self.endpoints {
            None => None,
            Some(eps) => Some(
                eps.iter()
                    .enumerate()
                    .map(|(i, e)| {
                        e.to_model()
                            .map_err(|err| err.within(format!("endpoints[{i}]")))
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok((service, endpoints))
    }

    /// The document of a published service, with its endpoints.
    pub fn from_entry(entry: &ServiceEntry) -> Self {
        let spec = entry.spec();
        let (policy, maglev_table_size) = match spec.policy {
            Policy::RoundRobin => (PolicyDoc::RoundRobin, None),
            Policy::Random => (PolicyDoc::Random, None),
            Policy::WeightedRoundRobin => (PolicyDoc::WeightedRoundRobin, None),
            Policy::LeastConnections => (PolicyDoc::LeastConnections, None),
            Policy::Maglev { table_size } => (PolicyDoc::Maglev, Some(table_size)),
        };
        let (session_affinity, affinity_timeout_seconds) = match spec.session_affinity {
            SessionAffinity::None => (AffinityDoc::None, None),
            SessionAffinity::ClientIp { timeout } => {
                (AffinityDoc::ClientIp, Some(timeout.as_secs()))
            }
        };
        let traffic = |t: TrafficPolicy| match t {
            TrafficPolicy::Cluster => TrafficDoc::Cluster,
            TrafficPolicy::Local => TrafficDoc::Local,
        };
        Self {
            name: spec.name.clone(),
            addresses: spec.addresses.clone(),
            external_addresses: spec.external_addresses.clone(),
            load_balancer_addresses: spec.load_balancer_addresses.clone(),
            load_balancer_source_ranges: spec.load_balancer_source_ranges.clone(),
            health_check_node_port: spec.health_check_node_port,
            ports: spec.ports.iter().map(PortDoc::from_model).collect(),
            policy,
            maglev_table_size,
            session_affinity,
            affinity_timeout_seconds,
            publish_not_ready: spec.publish_not_ready,
            internal_traffic_policy: traffic(spec.internal_traffic_policy),
            external_traffic_policy: traffic(spec.external_traffic_policy),
            max_connections: spec.max_connections,
            endpoints: Some(
                entry
                    .endpoints()
                    .iter()
                    .map(EndpointDoc::from_model)
                    .collect(),
            ),
        }
    }
}

impl TableDoc {
    /// Every service of a snapshot, sorted by name.
    pub fn from_snapshot(snapshot: &crate::table::Snapshot) -> Self {
        let mut services: Vec<ServiceDoc> =
            snapshot.services().map(ServiceDoc::from_entry).collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Self { services }
    }
}

impl PortDoc {
    fn to_model(&self) -> ServicePort {
        ServicePort {
            name: self.name.clone(),
            protocol: self.protocol,
            port: self.port,
            target_port: match &self.target_port {
                None => TargetPort::EndpointPort,
                Some(TargetDoc::Number(n)) => TargetPort::Number(*n),
                Some(TargetDoc::Name(s)) => TargetPort::Named(s.clone()),
            },
            node_port: self.node_port,
        }
    }

    fn from_model(p: &ServicePort) -> Self {
        Self {
            name: p.name.clone(),
            protocol: p.protocol,
            port: p.port,
            target_port: match &p.target_port {
                TargetPort::EndpointPort => None,
                TargetPort::Number(n) => Some(TargetDoc::Number(*n)),
                TargetPort::Named(s) => Some(TargetDoc::Name(s.clone())),
            },
            node_port: p.node_port,
        }
    }
}

impl EndpointDoc {
    fn to_model(&self) -> Result<Endpoint, ValidationError> {
        let address = match self.address.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => match self.address.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, 0),
                Err(_) => {
                    let problem =
                        Problem::BadAddress(self.address.clone(), "not an IP address or ip:port");
                    return Err(ValidationError::new("address", problem));
                }
            },
        };
        Ok(Endpoint {
            address,
            ports: self
                .ports
                .iter()
                .map(|(name, port)| NamedPort {
                    name: name.clone(),
                    port: *port,
                })
                .collect(),
            conditions: Conditions {
                ready: self.ready,
                serving: self.serving.unwrap_or(self.ready),
                terminating: self.terminating,
            },
            weight: self.weight,
            node: self.node.clone(),
            zone: self.zone.clone(),
            hints: (!self.for_zones.is_empty() || !self.for_nodes.is_empty()).then(|| {
                Box::new(Hints {
                    for_zones: self.for_zones.clone(),
                    for_nodes: self.for_nodes.clone(),
                })
            }),
        })
    }

    fn from_model(e: &Endpoint) -> Self {
        let address = if e.address.port() == 0 {
            e.address.ip().to_string()
        } else {
            e.address.to_string()
        };
        Self {
            address,
            ports: e.ports.iter().map(|p| (p.name.clone(), p.port)).collect(),
            ready: e.conditions.ready,
            serving: (e.conditions.serving != e.conditions.ready).then_some(e.conditions.serving),
            terminating: e.conditions.terminating,
            weight: e.weight,
            node: e.node.clone(),
            zone: e.zone.clone(),
            for_zones: e.topology_hints().for_zones.clone(),
            for_nodes: e.topology_hints().for_nodes.clone(),
        }
    }
}
