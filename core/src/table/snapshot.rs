//! An immutable, published view of the service table.
//!
//! A [`Snapshot`] never changes once published. It holds every service (with its endpoints)
//! and an index from frontend ([`ServicePortKey`]) to the [`Route`] that says which
//! [`PortState`] picks backends for which client. Unchanged services are shared with the
//! snapshots before and after.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use crate::model::{Endpoint, Family, Service, ServicePortKey, TrafficPolicy};
use crate::select::{Locality, PortState, Route, Routed, View};
use crate::stats::{Counters, PortStats};

use super::shards::ShardedMap;

/// One service as published: its definition, its endpoints, and the per-port state.
#[derive(Debug)]
pub struct ServiceEntry {
    pub(crate) name: Arc<str>,
    pub(crate) spec: Service,
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) ports: Box<[PortEntry]>,
    /// The load-balancer source ranges, when there are some.
    pub(crate) sources: Option<Arc<[ipnet::IpNet]>>,
}

#[derive(Debug)]
pub(crate) struct PortEntry {
    pub(crate) counters: Arc<Counters>,
    /// Every endpoint with a backend port for this service port, sorted by backend address.
    pub(crate) endpoint_counters: Box<[(SocketAddr, Arc<Counters>)]>,
    /// One state per view that a frontend of the service uses.
    pub(crate) states: Vec<(View, Arc<PortState>)>,
}

impl PortEntry {
    pub(crate) fn state(&self, view: View) -> Option<&Arc<PortState>> {
        self.states.iter().find(|(v, _)| *v == view).map(|(_, s)| s)
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

    /// The state of port `index` (into [`Service::ports`]) under traffic `policy` for
    /// frontends of `family`, when a frontend of the service uses it.
    pub fn port_state(
        &self,
        index: usize,
        policy: TrafficPolicy,
        family: Family,
    ) -> Option<&Arc<PortState>> {
        self.ports.get(index)?.state(View { policy, family })
    }

    /// How many endpoints take the service's external traffic: those eligible on some port
    /// for external addresses and node ports (under `externalTrafficPolicy: Local`, this
    /// node's), counted once per address. What a `healthCheckNodePort` reports.
    pub fn external_endpoints(&self) -> usize {
        let policy = self.spec.external_traffic_policy;
        let eligible: HashSet<IpAddr> = self
            .ports
            .iter()
            .flat_map(|p| &p.states)
            .filter(|(view, _)| view.policy == policy)
            .flat_map(|(_, state)| state.backends())
            .map(|b| b.addr().ip())
            .collect();
        eligible.len()
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
    pub(crate) frontends: ShardedMap<ServicePortKey, Arc<Route>>,
    pub(crate) locality: Arc<Locality>,
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

    /// The state of the service port behind a frontend, for clients from outside the cluster
    /// (see [`Snapshot::route`] for a given client).
    #[inline]
    pub fn lookup(&self, key: &ServicePortKey) -> Option<&Arc<PortState>> {
        self.frontends.get(key).map(|r| r.port())
    }

    /// The route of frontend `key`.
    pub fn frontend(&self, key: &ServicePortKey) -> Option<&Arc<Route>> {
        self.frontends.get(key)
    }

    /// How the frontend `key` serves `client`: the hot-path lookup. `None`: no such frontend.
    #[inline]
    pub fn route(&self, key: &ServicePortKey, client: IpAddr) -> Option<Routed<'_>> {
        let route = self.frontends.get(key)?;
        Some(route.route(client, key.addr.ip(), &self.locality))
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

    /// Every frontend and its route, in no particular order.
    pub fn frontends(&self) -> impl Iterator<Item = (&ServicePortKey, &Arc<Route>)> {
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
            for (k, route) in self.frontends() {
                match older.frontends.get(k) {
                    None => changes.added.push(*k),
                    Some(old) if !Arc::ptr_eq(old, route) => changes.changed.push(*k),
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
    /// service port has an eligible endpoint for some client (without one, clients must be
    /// refused).
    pub fn wants_listener(&self, key: &ServicePortKey) -> bool {
        self.frontends.get(key).is_some_and(|r| r.serves_anyone())
    }

    /// The frontends transparent listeners serve now (see [`crate::steering`]): those at a
    /// steerable address with an eligible endpoint, the rest being refused.
    pub fn steered_frontends(&self) -> impl Iterator<Item = ServicePortKey> + '_ {
        self.frontends()
            .filter(|(k, r)| crate::steering::steerable(k.addr.ip()) && r.serves_anyone())
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

    /// Whether `backend` is still an eligible endpoint for `client` behind `listener`
    /// (connections to one that is not follow the drain policy).
    pub fn serves(&self, listener: &ServicePortKey, client: IpAddr, backend: SocketAddr) -> bool {
        self.route(listener, client)
            .and_then(Routed::serving)
            .is_some_and(|p| p.contains(backend))
    }

    /// Adds counters another process counted (its [`Snapshot::stats`], handed over; see
    /// [`crate::handover`]) to this table's, matched by service name and port label, and by
    /// endpoint address. Returns how many service ports matched; the others are dropped.
    pub fn carry_stats(&self, stats: &[PortStats]) -> usize {
        let mut matched = 0;
        for carried in stats {
            let Some(service) = self.service(&carried.service) else {
                continue;
            };
            let Some(entry) = service
                .spec
                .ports
                .iter()
                .position(|p| p.label() == carried.port)
                .map(|i| &service.ports[i])
            else {
                continue;
            };
            matched += 1;
            entry.counters.carry(&carried.totals);
            for (addr, values) in &carried.endpoints {
                if let Some((_, c)) = entry.endpoint_counters.iter().find(|(a, _)| a == addr) {
                    c.carry(values);
                }
            }
        }
        matched
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
