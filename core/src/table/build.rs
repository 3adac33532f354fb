//! Applying a batch: a draft copy of the current snapshot's maps, changed in place (copying
//! only the shards it touches), then published whole or dropped whole.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::error::TableError;
use crate::model::{
    Endpoint, Family, Frontend, FrontendKind, Scope, Service, ServicePortKey, TrafficPolicy,
    validate_endpoints,
};
use crate::select::{Place, PortInput, PortState, Route, View};
use crate::stats::Counters;

use super::TableConfig;
use super::batch::Change;
use super::shards::ShardedMap;
use super::snapshot::{PortEntry, ServiceEntry, Snapshot};

pub(super) struct Draft<'a> {
    config: &'a TableConfig,
    pub(super) services: ShardedMap<Arc<str>, Arc<ServiceEntry>>,
    pub(super) frontends: ShardedMap<ServicePortKey, Arc<Route>>,
}

impl<'a> Draft<'a> {
    pub(super) fn of(snapshot: &Snapshot, config: &'a TableConfig) -> Self {
        Self {
            config,
            services: snapshot.services.clone(),
            frontends: snapshot.frontends.clone(),
        }
    }

    pub(super) fn apply(&mut self, change: Change) -> Result<(), TableError> {
        match change {
            Change::Upsert(spec) => {
                spec.validate().map_err(|error| TableError::Invalid {
                    service: spec.name.clone(),
                    error,
                })?;
                let old = self.services.get(spec.name.as_str()).cloned();
                let endpoints = old
                    .as_ref()
                    .map(|o| o.endpoints.clone())
                    .unwrap_or_default();
                if let Some(old) = &old {
                    for f in self.frontends_of(&old.spec) {
                        self.frontends.remove(&f.key);
                    }
                }
                let frontends = self.frontends_of(&spec);
                let entry = self.build(spec, endpoints, &frontends, old.as_deref());
                for f in &frontends {
                    if let Some(holder) = self.frontends.get(&f.key) {
                        return Err(TableError::Conflict {
                            service: entry.spec.name.clone(),
                            key: f.key,
                            other: holder.port().service().to_string(),
                        });
                    }
                    self.frontends.insert(f.key, entry.route(f));
                }
                self.services.insert(entry.name.clone(), Arc::new(entry));
            }
            Change::Remove(name) => {
                let old = self
                    .services
                    .remove(name.as_str())
                    .ok_or(TableError::UnknownService(name))?;
                for f in self.frontends_of(&old.spec) {
                    self.frontends.remove(&f.key);
                }
            }
            Change::ReplaceEndpoints { service, endpoints } => {
                let old = self
                    .services
                    .get(service.as_str())
                    .cloned()
                    .ok_or_else(|| TableError::UnknownService(service.clone()))?;
                validate_endpoints(&endpoints, &old.spec.ports).map_err(|error| {
                    TableError::Invalid {
                        service: service.clone(),
                        error,
                    }
                })?;
                let frontends = self.frontends_of(&old.spec);
                let entry = self.build(old.spec.clone(), endpoints, &frontends, Some(&old));
                for f in &frontends {
                    self.frontends.insert(f.key, entry.route(f));
                }
                self.services.insert(entry.name.clone(), Arc::new(entry));
            }
        }
        Ok(())
    }

    fn frontends_of(&self, spec: &Service) -> Vec<Frontend> {
        spec.frontends(&self.config.node_addresses).collect()
    }

    /// Builds a service's entry with a port state for each view its `frontends` use, keeping
    /// the counters and policy state of `old` where the same service port and endpoints
    /// persist.
    fn build(
        &self,
        spec: Service,
        endpoints: Vec<Endpoint>,
        frontends: &[Frontend],
        old: Option<&ServiceEntry>,
    ) -> ServiceEntry {
        let name: Arc<str> = old.map_or_else(|| spec.name.as_str().into(), |o| o.name.clone());
        let here = Place {
            node: self.config.node_name.as_deref(),
            zone: self.config.node_zone.as_deref(),
        };
        let ports =
            spec.ports
                .iter()
                .enumerate()
                .map(|(index, port)| {
                    let previous = old.and_then(|o| {
                        let i = o.spec.ports.iter().position(|p| {
                            p.protocol == port.protocol && p.label() == port.label()
                        })?;
                        Some(&o.ports[i])
                    });
                    let counters =
                        previous.map_or_else(|| Arc::new(Counters::new()), |p| p.counters.clone());
                    let mut resolved: Vec<SocketAddr> = endpoints
                        .iter()
                        .filter_map(|e| e.resolve(&port.target_port))
                        .collect();
                    resolved.sort_unstable();
                    resolved.dedup();
                    let endpoint_counters: Box<[(SocketAddr, Arc<Counters>)]> = resolved
                        .into_iter()
                        .map(|addr| {
                            let kept = previous.and_then(|p| {
                                let i = p
                                    .endpoint_counters
                                    .binary_search_by_key(&addr, |(a, _)| *a)
                                    .ok()?;
                                Some(p.endpoint_counters[i].1.clone())
                            });
                            (addr, kept.unwrap_or_else(|| Arc::new(Counters::new())))
                        })
                        .collect();
                    let mut states: Vec<(View, Arc<PortState>)> = Vec::new();
                    let used = frontends.iter().filter(|f| f.port_index == index);
                    for view in used.flat_map(|f| views(&spec, f)) {
                        if states.iter().any(|(v, _)| *v == view) {
                            continue;
                        }
                        let input = PortInput {
                            service: &spec,
                            service_name: &name,
                            port,
                            view,
                            endpoints: &endpoints,
                            here,
                            counters: &counters,
                            endpoint_counters: &endpoint_counters,
                        };
                        let kept = previous.and_then(|p| p.state(view)).map(|s| &**s);
                        states.push((view, Arc::new(PortState::build(input, kept))));
                    }
                    PortEntry {
                        counters,
                        endpoint_counters,
                        states,
                    }
                })
                .collect();
        let sources = (!spec.load_balancer_source_ranges.is_empty())
            .then(|| spec.load_balancer_source_ranges.as_slice().into());
        ServiceEntry {
            name,
            spec,
            endpoints,
            ports,
            sources,
        }
    }
}

/// The views frontend `f` of `spec` uses: the one for its traffic policy and, for an external
/// frontend under `externalTrafficPolicy: Local`, the `Cluster` one for clients inside the
/// cluster.
fn views(spec: &Service, f: &Frontend) -> impl Iterator<Item = View> {
    let family = Family::of(f.key.addr.ip());
    let policy = match f.kind.scope() {
        Scope::Internal => spec.internal_traffic_policy,
        Scope::External => spec.external_traffic_policy,
    };
    let inside =
        (f.kind.scope() == Scope::External && policy == TrafficPolicy::Local).then_some(View {
            policy: TrafficPolicy::Cluster,
            family,
        });
    std::iter::once(View { policy, family }).chain(inside)
}

impl ServiceEntry {
    /// The route of frontend `f`, built by [`Draft::build`] with a state for each of its views.
    fn route(&self, f: &Frontend) -> Arc<Route> {
        let port = &self.ports[f.port_index];
        let mut states = views(&self.spec, f)
            .filter_map(|view| port.state(view))
            .cloned();
        let primary = states
            .next()
            .expect("the entry has a state for every view of its frontends");
        let sources = match f.kind {
            FrontendKind::LoadBalancer => self.sources.clone(),
            _ => None,
        };
        Arc::new(Route::new(primary, states.next(), sources))
    }
}
