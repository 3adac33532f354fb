//! An immutable, published view of the service table.
//!
//! A [`Snapshot`] never changes once published. It holds every service (with its endpoints)
//! and an index from frontend ([`ServicePortKey`]) to the [`PortState`] that picks backends
//! for it. Unchanged services are shared with the snapshots before and after.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use crate::model::{Endpoint, Scope, Service, ServicePortKey};
use crate::select::PortState;
use crate::stats::{Counters, PortStats};

use super::shards::ShardedMap;

/// One service as published: its definition, its endpoints, and the per-port state.
#[derive(Debug)]
pub struct ServiceEntry {
    pub(crate) name: Arc<str>,
    pub(crate) spec: Service,
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) ports: Box<[PortEntry]>,
}

#[derive(Debug)]
pub(crate) struct PortEntry {
    pub(crate) counters: Arc<Counters>,
    /// Every endpoint with a backend port for this service port, sorted by backend address.
    pub(crate) endpoint_counters: Box<[(SocketAddr, Arc<Counters>)]>,
    pub(crate) internal: Arc<PortState>,
    /// The same `Arc` as `internal` when both traffic policies agree.
    pub(crate) external: Arc<PortState>,
}

impl PortEntry {
    pub(crate) fn state(&self, scope: Scope) -> &Arc<PortState> {
        match scope {
            Scope::Internal => &self.internal,
            Scope::External => &self.external,
        }
    }
}

impl ServiceEntry {
    /// Service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The service definition.
    pub fn spec(&self) -> &Service {
        &self.spec
    }

    /// The endpoints, as given.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The state of port `index` (into [`Service::ports`]) for frontends of `scope`.
    pub fn port_state(&self, index: usize, scope: Scope) -> Option<&Arc<PortState>> {
        Some(self.ports.get(index)?.state(scope))
    }
}

/// Frontends that differ between two snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontendChanges {
    /// In the newer snapshot only.
    pub added: Vec<ServicePortKey>,
    /// In the older snapshot only.
    pub removed: Vec<ServicePortKey>,
    /// In both, with a rebuilt port state (its endpoints or settings may have changed).
    pub changed: Vec<ServicePortKey>,
}

/// A published table. Obtain one with [`Table::load`](super::Table::load).
pub struct Snapshot {
    pub(crate) table_id: u64,
    pub(crate) generation: u64,
    pub(crate) updated: SystemTime,
    pub(crate) services: ShardedMap<Arc<str>, Arc<ServiceEntry>>,
    pub(crate) frontends: ShardedMap<ServicePortKey, Arc<PortState>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("generation", &self.generation)
            .field("services", &self.services.len())
            .field("frontends", &self.frontends.len())
            .finish()
    }
}

impl Snapshot {
    /// Publication number: 0 for the empty table, then one more per published batch.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// When this snapshot was published (wall clock).
    pub fn updated(&self) -> SystemTime {
        self.updated
    }

    /// The state of the service port behind a frontend: the hot-path lookup.
    #[inline]
    pub fn lookup(&self, key: &ServicePortKey) -> Option<&Arc<PortState>> {
        self.frontends.get(key)
    }

    /// A service by name.
    pub fn service(&self, name: &str) -> Option<&ServiceEntry> {
        self.services.get(name).map(|e| &**e)
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &ServiceEntry> {
        self.services.iter().map(|(_, e)| &**e)
    }

    /// Number of services.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Every frontend and its port state, in no particular order.
    pub fn frontends(&self) -> impl Iterator<Item = (&ServicePortKey, &Arc<PortState>)> {
        self.frontends.iter()
    }

    /// Number of frontends.
    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    /// Frontends added, removed and changed since `older`. Fast (only the changed parts are compared)
    /// when both snapshots come from the same table, correct for any two.
    pub fn frontend_changes(&self, older: &Snapshot) -> FrontendChanges {
        let mut changes = FrontendChanges::default();
        if self.table_id == older.table_id {
            let diff = self.frontends.diff(&older.frontends, Arc::ptr_eq);
            changes = FrontendChanges {
                added: diff.added,
                removed: diff.removed,
                changed: diff.changed,
            };
        } else {
            for (k, state) in self.frontends() {
                match older.lookup(k) {
                    None => changes.added.push(*k),
                    Some(old) if !Arc::ptr_eq(old, state) => changes.changed.push(*k),
                    Some(_) => {}
                }
            }
            let removed = older.frontends().map(|(k, _)| *k);
            changes.removed = removed.filter(|k| self.lookup(k).is_none()).collect();
        }
        changes.added.sort_unstable();
        changes.removed.sort_unstable();
        changes.changed.sort_unstable();
        changes
    }

    /// Whether a backend should listen on `key`: it is a frontend of this snapshot and its
    /// service port has an eligible endpoint (without one, clients must be refused).
    pub fn wants_listener(&self, key: &ServicePortKey) -> bool {
        self.lookup(key).is_some_and(|p| !p.backends().is_empty())
    }

    /// The frontends transparent listeners serve now (see [`crate::steering`]): those at a
    /// steerable address with an eligible endpoint, the rest being refused.
    pub fn steered_frontends(&self) -> impl Iterator<Item = ServicePortKey> + '_ {
        self.frontends()
            .filter(|(k, p)| crate::steering::steerable(k.addr.ip()) && !p.backends().is_empty())
            .map(|(k, _)| *k)
    }

    /// Listeners to open or close after moving from `older` (none: from nothing) to this
    /// snapshot: every frontend that may have changed, with [`Snapshot::wants_listener`].
    pub fn listener_changes(&self, older: Option<&Snapshot>) -> Vec<(ServicePortKey, bool)> {
        let keys: Vec<ServicePortKey> = match older {
            Some(old) => {
                let c = self.frontend_changes(old);
                c.added
                    .into_iter()
                    .chain(c.removed)
                    .chain(c.changed)
                    .collect()
            }
            None => self.frontends().map(|(k, _)| *k).collect(),
        };
        keys.into_iter()
            .map(|k| (k, self.wants_listener(&k)))
            .collect()
    }

    /// Whether `backend` is still an eligible endpoint behind `listener` (connections to one
    /// that is not follow the drain policy).
    pub fn serves(&self, listener: &ServicePortKey, backend: std::net::SocketAddr) -> bool {
        self.lookup(listener).is_some_and(|p| p.contains(backend))
    }

    /// Counters of every service port (sorted by service and port), with per-endpoint counters.
    pub fn stats(&self) -> Vec<PortStats> {
        let mut services: Vec<&ServiceEntry> = self.services().collect();
        services.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        services
            .into_iter()
            .flat_map(|s| {
                s.spec
                    .ports
                    .iter()
                    .zip(s.ports.iter())
                    .map(|(spec, entry)| PortStats {
                        service: s.name.to_string(),
                        port: spec.label(),
                        protocol: spec.protocol,
                        totals: entry.counters.values(),
                        endpoints: entry
                            .endpoint_counters
                            .iter()
                            .map(|(addr, c)| (*addr, c.values()))
                            .collect(),
                    })
            })
            .collect()
    }
}
