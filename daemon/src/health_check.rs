//! Health check node ports (Kubernetes `healthCheckNodePort`, set for load-balancer services
//! under `externalTrafficPolicy: Local`): for each service that has one, an HTTP server on that
//! port of every node address. It answers any path with kube-proxy's JSON,
//! `{"service":{"namespace":..,"name":..},"localEndpoints":N,"serviceProxyHealthy":..}`:
//! 200 when this node has an endpoint for the service's external traffic and the proxy is
//! healthy, else 503. Cloud load balancers probe it and send traffic only to nodes that
//! answer 200.
//!
//! [`HealthChecks::sync`] brings the servers in line with a snapshot: it opens the ports that
//! are new, closes the ones no service has any more, and updates every count. A port that
//! cannot be bound (in use) is reported once and tried again at the next sync. Listening
//! sockets handed over by another svcproxyd ([`HealthChecks::inherit`]) are served instead of
//! binding anew, where the address matches.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Arc, PoisonError, RwLock};

use svcproxy::Snapshot;
use tracing::warn;

use crate::http::{Response, Server};

/// What one health check port says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    service: String,
    endpoints: usize,
}

type Answers = Arc<RwLock<BTreeMap<u16, Answer>>>;

/// The health check servers of every service that has a health check node port.
pub struct HealthChecks {
    addresses: Vec<IpAddr>,
    answers: Answers,
    servers: BTreeMap<u16, Vec<Server>>,
    /// Ports whose bind failed, reported once.
    failed: BTreeSet<u16>,
    healthy: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Listening sockets handed over, until the first sync takes or closes them.
    inherited: Vec<TcpListener>,
}

impl HealthChecks {
    /// Health checks served on `addresses` (the node addresses), saying the proxy is healthy
    /// when `healthy` says so.
    pub fn new(addresses: Vec<IpAddr>, healthy: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self {
            addresses,
            answers: Answers::default(),
            servers: BTreeMap::new(),
            failed: BTreeSet::new(),
            healthy: Arc::new(healthy),
            inherited: Vec::new(),
        }
    }

    /// Serves `listeners` (handed over by another svcproxyd) where they listen at a health
    /// check address; the first sync closes the others.
    pub fn inherit(&mut self, listeners: Vec<TcpListener>) {
        self.inherited = listeners;
    }

    /// Duplicates of the listening sockets, to hand over.
    pub fn listeners(&self) -> Vec<TcpListener> {
        self.servers
            .values()
            .flatten()
            .filter_map(|s| s.listener().try_clone().ok())
            .collect()
    }

    /// Serves the health check port of every service of `snapshot` that has one, and no other.
    pub fn sync(&mut self, snapshot: &Snapshot) {
        let mut wanted = BTreeMap::new();
        for entry in snapshot.services() {
            let Some(port) = entry.spec().health_check_node_port else {
                continue;
            };
            let answer = Answer {
                service: entry.name().to_string(),
                endpoints: entry.external_endpoints(),
            };
            if let Some(first) = wanted.get(&port) {
                let Answer { service, .. } = first;
                warn!(port, service = %entry.name(), first = %service, "health check node port claimed twice: the first service keeps it");
                continue;
            }
            wanted.insert(port, answer);
        }
        self.servers.retain(|port, _| wanted.contains_key(port));
        self.failed.retain(|port| wanted.contains_key(port));
        for &port in wanted.keys() {
            if self.servers.contains_key(&port) {
                continue;
            }
            match self.open(port) {
                Ok(servers) => {
                    self.failed.remove(&port);
                    self.servers.insert(port, servers);
                }
                Err(e) => {
                    if self.failed.insert(port) {
                        warn!(port, error = %e, "cannot serve a health check node port");
                    }
                }
            }
        }
        *self.answers.write().unwrap_or_else(PoisonError::into_inner) = wanted;
        self.inherited.clear();
    }

    fn open(&mut self, port: u16) -> std::io::Result<Vec<Server>> {
        let mut servers = Vec::new();
        for &ip in &self.addresses {
            let answers = self.answers.clone();
            let healthy = self.healthy.clone();
            let handler = move |_: &crate::http::Request| {
                let answers = answers.read().unwrap_or_else(PoisonError::into_inner);
                answer(answers.get(&port), healthy())
            };
            let addr = SocketAddr::new(ip, port);
            let inherited = self
                .inherited
                .iter()
                .position(|l| l.local_addr().is_ok_and(|a| a == addr))
                .map(|i| self.inherited.swap_remove(i));
            servers.push(match inherited {
                Some(listener) => Server::start_on(listener, handler)?,
                None => Server::start(addr, handler)?,
            });
        }
        Ok(servers)
    }
}

fn answer(answer: Option<&Answer>, healthy: bool) -> Response {
    let Some(Answer { service, endpoints }) = answer else {
        return Response::error(503, "no service has this health check port");
    };
    let (namespace, name) = service.split_once('/').unwrap_or(("", service));
    let body = serde_json::json!({
        "service": { "namespace": namespace, "name": name },
        "localEndpoints": endpoints,
        "serviceProxyHealthy": healthy,
    });
    let status = if *endpoints > 0 && healthy { 200 } else { 503 };
    Response::json(status, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_kube_proxys() {
        let one = Answer {
            service: "shop/web".into(),
            endpoints: 1,
        };
        let r = answer(Some(&one), true);
        assert_eq!(r.status, 200);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let expected = serde_json::json!({
            "service": {"namespace": "shop", "name": "web"},
            "localEndpoints": 1,
            "serviceProxyHealthy": true,
        });
        assert_eq!(body, expected);
        assert_eq!(answer(Some(&one), false).status, 503, "proxy unhealthy");
        let none = Answer {
            endpoints: 0,
            ..one
        };
        assert_eq!(answer(Some(&none), true).status, 503, "no local endpoint");
    }
}
