//! Which port state serves a client at one frontend.
//!
//! Most frontends have one [`PortState`] for every client. Two Kubernetes rules make it depend
//! on the client:
//!
//! - **`externalTrafficPolicy: Local`**: clients from outside the cluster reach only endpoints
//!   on this node at external addresses, load-balancer addresses and node ports; clients inside
//!   it (this node, or an address in the cluster's ranges: kube-proxy's "short-circuit") use the
//!   service's `Cluster` endpoints.
//! - **`loadBalancerSourceRanges`**: at load-balancer addresses, a client outside the ranges is
//!   not served at all.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::PortState;

/// Who counts as inside the cluster: this node (loopback, the node addresses, or the very
/// address the client reached, which is a local one) and the cluster's address ranges (pod and
/// node networks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    node_addresses: Vec<IpAddr>,
    cluster_ranges: Vec<IpNet>,
}

impl Locality {
    /// Clients at `node_addresses` or in `cluster_ranges` (or on loopback) are inside.
    pub fn new(node_addresses: Vec<IpAddr>, cluster_ranges: Vec<IpNet>) -> Self {
        Self {
            node_addresses,
            cluster_ranges,
        }
    }

    /// Whether `client`, which reached address `frontend`, is inside the cluster.
    pub fn inside(&self, client: IpAddr, frontend: IpAddr) -> bool {
        let client = client.to_canonical();
        client.is_loopback()
            || client == frontend.to_canonical()
            || self.node_addresses.contains(&client)
            || self.cluster_ranges.iter().any(|r| r.contains(&client))
    }
}

/// What serves one frontend.
#[derive(Debug)]
pub struct Route {
    port: Arc<PortState>,
    in_cluster: Option<Arc<PortState>>,
    sources: Option<Arc<[IpNet]>>,
}

/// How a client is served at a frontend.
#[derive(Debug, Clone, Copy)]
pub enum Routed<'a> {
    /// By this port state.
    Serve(&'a Arc<PortState>),
    /// Not at all: its address is outside the frontend's source ranges. The port state is
    /// the frontend's, to count the refusal on.
    Denied(&'a Arc<PortState>),
}

impl<'a> Routed<'a> {
    /// The port state that serves the client, if any.
    pub fn serving(self) -> Option<&'a Arc<PortState>> {
        match self {
            Routed::Serve(port) => Some(port),
            Routed::Denied(_) => None,
        }
    }
}

impl Route {
    /// `port` serves every client allowed by `sources` (none: any), except that clients inside
    /// the cluster use `in_cluster` when there is one.
    pub(crate) fn new(
        port: Arc<PortState>,
        in_cluster: Option<Arc<PortState>>,
        sources: Option<Arc<[IpNet]>>,
    ) -> Self {
        Self {
            port,
            in_cluster,
            sources,
        }
    }

    /// The port state that serves clients from outside the cluster.
    #[inline]
    pub fn port(&self) -> &Arc<PortState> {
        &self.port
    }

    /// How `client`, which reached address `frontend`, is served.
    #[inline]
    pub fn route(&self, client: IpAddr, frontend: IpAddr, locality: &Locality) -> Routed<'_> {
        if let Some(sources) = &self.sources {
            let client = client.to_canonical();
            if !sources.iter().any(|r| r.contains(&client)) {
                return Routed::Denied(&self.port);
            }
        }
        match &self.in_cluster {
            Some(inside) if locality.inside(client, frontend) => Routed::Serve(inside),
            _ => Routed::Serve(&self.port),
        }
    }

    /// The port state that serves every client on this node (they are inside the cluster), or
    /// `None` when serving depends on the client's address (source ranges).
    pub fn node_clients(&self) -> Option<&Arc<PortState>> {
        match self.sources {
            Some(_) => None,
            None => Some(self.in_cluster.as_ref().unwrap_or(&self.port)),
        }
    }

    /// Whether some client may be served: a port state here has an eligible endpoint.
    pub fn serves_anyone(&self) -> bool {
        !self.port.backends().is_empty()
            || self
                .in_cluster
                .as_ref()
                .is_some_and(|p| !p.backends().is_empty())
    }
}
