//! Applying a batch: a draft copy of the current snapshot's maps, changed in place (copying
//! only the shards it touches), then published whole or dropped whole.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::error::TableError;
use crate::model::{Endpoint, Frontend, Scope, Service, ServicePortKey, validate_endpoints};
use crate::select::{PortInput, PortState};
use crate::stats::Counters;

use super::TableConfig;
use super::batch::Change;
use super::shards::ShardedMap;
use super::snapshot::{PortEntry, ServiceEntry, Snapshot};

pub(super) struct Draft<'a> {
    config: &'a TableConfig,
    pub(super) services: ShardedMap<Arc<str>, Arc<ServiceEntry>>,
    pub(super) frontends: ShardedMap<ServicePortKey, Arc<PortState>>,
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
                let entry = self.build(spec, endpoints, old.as_deref());
                for f in self.frontends_of(&entry.spec) {
                    if let Some(holder) = self.frontends.get(&f.key) {
                        return Err(TableError::Conflict {
                            service: entry.spec.name.clone(),
                            key: f.key,
                            other: holder.service().to_string(),
                        });
                    }
                    let state = entry.ports[f.port_index].state(f.scope).clone();
                    self.frontends.insert(f.key, state);
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
                let entry = self.build(old.spec.clone(), endpoints, Some(&old));
                for f in self.frontends_of(&entry.spec) {
                    let state = entry.ports[f.port_index].state(f.scope).clone();
                    self.frontends.insert(f.key, state);
                }
                self.services.insert(entry.name.clone(), Arc::new(entry));
            }
        }
        Ok(())
    }

    fn frontends_of(&self, spec: &Service) -> Vec<Frontend> {
        spec.frontends(&self.config.node_addresses).collect()
    }

    /// Builds a service's entry, keeping the counters and policy state of `old` where the
    /// same service port and endpoints persist.
    fn build(
        &self,
        spec: Service,
        endpoints: Vec<Endpoint>,
        old: Option<&ServiceEntry>,
    ) -> ServiceEntry {
        let name: Arc<str> = old.map_or_else(|| spec.name.as_str().into(), |o| o.name.clone());
        let node = self.config.node_name.as_deref();
        let ports =
            spec.ports
                .iter()
                .map(|port| {
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
                    let state = |scope: Scope| {
                        let input = PortInput {
                            service: &spec,
                            service_name: &name,
                            port,
                            scope,
                            endpoints: &endpoints,
                            node,
                            counters: &counters,
                            endpoint_counters: &endpoint_counters,
                        };
                        Arc::new(PortState::build(input, previous.map(|p| &**p.state(scope))))
                    };
                    let internal = state(Scope::Internal);
                    let external = if spec.internal_traffic_policy == spec.external_traffic_policy {
                        internal.clone()
                    } else {
                        state(Scope::External)
                    };
                    PortEntry {
                        counters,
                        endpoint_counters,
                        internal,
                        external,
                    }
                })
                .collect();
        ServiceEntry {
            name,
            spec,
            endpoints,
            ports,
        }
    }
}
