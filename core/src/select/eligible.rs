//! Which endpoints of a service may take traffic on one service port, as Kubernetes' own
//! proxies choose them (EndpointSlice conditions and hints).
//!
//! In order: the endpoint must have a backend port for the service port (named target ports
//! resolve per endpoint); it must be of the frontend's address family, unless no endpoint of
//! the service port is (a library user's IPv6 listen address in front of IPv4 backends); under
//! [`TrafficPolicy::Local`] it must run on this node. Then, unless the service publishes
//! not-ready addresses, the ready endpoints are used, or when none is ready, those that are
//! serving and terminating. Under [`TrafficPolicy::Cluster`], the ready (or published) ones
//! are narrowed by their topology [`Hints`](crate::model::Hints), as kube-proxy's
//! `topology.go` does.

use std::net::SocketAddr;

use crate::model::{Endpoint, Family, Service, ServicePort, TrafficPolicy};

/// Which endpoints one port state holds: those for a traffic policy, seen from frontends of
/// one address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct View {
    pub(crate) policy: TrafficPolicy,
    pub(crate) family: Family,
}

/// Where this proxy runs, for traffic policy `Local` and topology hints.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Place<'a> {
    pub(crate) node: Option<&'a str>,
    pub(crate) zone: Option<&'a str>,
}

/// The eligible endpoints of `port` in `view`, with their resolved backend addresses, in the
/// order given.
pub(crate) fn eligible<'a>(
    service: &Service,
    port: &ServicePort,
    view: View,
    endpoints: &'a [Endpoint],
    here: Place<'_>,
) -> Vec<(SocketAddr, &'a Endpoint)> {
    let resolved = || {
        endpoints
            .iter()
            .filter_map(|e| Some((e.resolve(&port.target_port)?, e)))
    };
    let same_family = |a: &SocketAddr| Family::of(a.ip()) == view.family;
    let any_of_family = resolved().any(|(a, _)| same_family(&a));
    let local = |e: &Endpoint| match view.policy {
        TrafficPolicy::Cluster => true,
        TrafficPolicy::Local => here.node.is_some() && e.node.as_deref() == here.node,
    };
    let candidates = resolved().filter(|(a, e)| (!any_of_family || same_family(a)) && local(e));
    let by_topology = |set| match view.policy {
        TrafficPolicy::Cluster => topology(set, here),
        TrafficPolicy::Local => set,
    };
    if service.publish_not_ready {
        return by_topology(candidates.collect());
    }
    let (ready, rest): (Vec<_>, Vec<_>) = candidates.partition(|(_, e)| e.conditions.ready);
    if !ready.is_empty() {
        return by_topology(ready);
    }
    rest.into_iter()
        .filter(|(_, e)| e.conditions.serving && e.conditions.terminating)
        .collect()
}

/// `usable` narrowed by hints: to those hinted for this node when every one has node hints
/// and one is for this node; else to those hinted for this node's zone when every one has
/// zone hints and one is for this zone; else all of them.
fn topology<'a>(
    usable: Vec<(SocketAddr, &'a Endpoint)>,
    here: Place<'_>,
) -> Vec<(SocketAddr, &'a Endpoint)> {
    type Hinted = fn(&Endpoint) -> &[String];
    let levels: [(Hinted, Option<&str>); 2] = [
        (|e| &e.topology_hints().for_nodes, here.node),
        (|e| &e.topology_hints().for_zones, here.zone),
    ];
    for (hints, name) in levels {
        let Some(name) = name else { continue };
        let has = |e: &Endpoint| hints(e).iter().any(|h| h == name);
        let all_hinted = usable.iter().all(|(_, e)| !hints(e).is_empty());
        if all_hinted && usable.iter().any(|(_, e)| has(e)) {
            return usable.into_iter().filter(|(_, e)| has(e)).collect();
        }
    }
    usable
}
