//! Which endpoints of a service may take traffic on one service port, as Kubernetes' own
//! proxies choose them (EndpointSlice conditions).
//!
//! In order: the endpoint must have a backend port for the service port (named target ports
//! resolve per endpoint); under [`TrafficPolicy::Local`] it must run on this node; then, unless
//! the service publishes not-ready addresses, the ready endpoints are used, or when none is
//! ready, those that are serving and terminating.

use std::net::SocketAddr;

use crate::model::{Endpoint, Scope, Service, ServicePort, TrafficPolicy};

/// The eligible endpoints of `port` as seen from `scope`, with their resolved backend
/// addresses, in the order given.
pub(crate) fn eligible<'a>(
    service: &Service,
    port: &ServicePort,
    scope: Scope,
    endpoints: &'a [Endpoint],
    node: Option<&str>,
) -> Vec<(SocketAddr, &'a Endpoint)> {
    let policy = match scope {
        Scope::Internal => service.internal_traffic_policy,
        Scope::External => service.external_traffic_policy,
    };
    let local = |e: &Endpoint| match policy {
        TrafficPolicy::Cluster => true,
        TrafficPolicy::Local => node.is_some() && e.node.as_deref() == node,
    };
    let candidates = endpoints
        .iter()
        .filter(|e| local(e))
        .filter_map(|e| Some((e.resolve(&port.target_port)?, e)));
    if service.publish_not_ready {
        return candidates.collect();
    }
    let (ready, rest): (Vec<_>, Vec<_>) = candidates.partition(|(_, e)| e.conditions.ready);
    if !ready.is_empty() {
        return ready;
    }
    rest.into_iter()
        .filter(|(_, e)| e.conditions.serving && e.conditions.terminating)
        .collect()
}
