//! Choosing an endpoint for a client on one service port.
//!
//! A [`PortState`] is built when a table is published: the eligible endpoints of one service
//! port (for one traffic policy, seen from frontends of one address family), sorted by address,
//! plus the policy's state. Picking never locks and never allocates, except under ClientIP
//! session affinity, which takes one shard lock of the affinity map (and allocates when a new
//! client is remembered). A [`Route`] says which port state serves which client at one
//! frontend.
//!
//! Policy state that must persist (the round-robin cursor, Maglev and weighted tables, the
//! affinity map) is shared with the previous `PortState` of the same service port when its
//! eligible endpoints are unchanged, so a publish that does not touch a service does not reset
//! its rotation.

mod affinity;
mod eligible;
mod maglev;
mod route;
mod weighted;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::loom::sync::atomic::{AtomicUsize, Ordering};
use crate::model::{Endpoint, Policy, Protocol, Service, ServicePort, SessionAffinity};
use crate::stats::{Counters, Tally};
use affinity::Affinity;
pub(crate) use eligible::{Place, View};
pub use route::{Locality, Route, Routed};

/// One eligible backend of a service port.
#[derive(Debug, Clone)]
pub struct Backend {
    addr: SocketAddr,
    weight: u32,
    terminating: bool,
    tally: Tally,
}

impl Backend {
    /// Backend address (the endpoint's IP with the resolved target port).
    #[inline]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Endpoint weight.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Whether the endpoint is terminating (used only because no endpoint is ready).
    pub fn terminating(&self) -> bool {
        self.terminating
    }

    /// The counters a connection or flow to this backend updates.
    #[inline]
    pub fn tally(&self) -> &Tally {
        &self.tally
    }
}

#[derive(Clone)]
enum Balancer {
    RoundRobin {
        cursor: Arc<AtomicUsize>,
    },
    Random,
    Weighted {
        schedule: Arc<[u32]>,
        cursor: Arc<AtomicUsize>,
    },
    LeastConnections {
        cursor: Arc<AtomicUsize>,
    },
    Maglev {
        table: Arc<[u32]>,
    },
}

impl Balancer {
    fn new(policy: Policy, backends: &[Backend]) -> Self {
        let cursor = || Arc::new(AtomicUsize::new(0));
        match policy {
            Policy::RoundRobin => Balancer::RoundRobin { cursor: cursor() },
            Policy::Random => Balancer::Random,
            Policy::WeightedRoundRobin => {
                let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
                Balancer::Weighted {
                    schedule: weighted::schedule(&weights).into(),
                    cursor: cursor(),
                }
            }
            Policy::LeastConnections => Balancer::LeastConnections { cursor: cursor() },
            Policy::Maglev { table_size } => {
                let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
                let table = if addrs.is_empty() {
                    Vec::new()
                } else {
                    maglev::build(&addrs, table_size)
                };
                Balancer::Maglev {
                    table: table.into(),
                }
            }
        }
    }

    /// An index into `backends` (non-empty).
    #[inline]
    fn choose(&self, client: &SocketAddr, backends: &[Backend]) -> usize {
        let n = backends.len();
        match self {
            Balancer::RoundRobin { cursor } => cursor.fetch_add(1, Ordering::Relaxed) % n,
            Balancer::Random => fastrand::usize(..n),
            Balancer::Weighted { schedule, cursor } => {
                schedule[cursor.fetch_add(1, Ordering::Relaxed) % schedule.len()] as usize
            }
            Balancer::LeastConnections { cursor } => {
                // Fewest active per unit of weight; ties go to the first after a rotating
                // start, so equal loads still spread.
                let start = cursor.fetch_add(1, Ordering::Relaxed) % n;
                let load = |i: usize| (backends[i].tally.endpoint_active(), backends[i].weight);
                let mut best = start;
                let (mut best_active, mut best_weight) = load(start);
                for k in 1..n {
                    let i = (start + k) % n;
                    let (active, weight) = load(i);
                    if active * u64::from(best_weight) < best_active * u64::from(weight) {
                        (best, best_active, best_weight) = (i, active, weight);
                    }
                }
                best
            }
            Balancer::Maglev { table } => table[maglev::slot(client, table.len())] as usize,
        }
    }
}

/// The eligible backends of one service port, and how to pick among them.
pub struct PortState {
    service: Arc<str>,
    port: Arc<str>,
    protocol: Protocol,
    backends: Box<[Backend]>,
    policy: Policy,
    balancer: Balancer,
    affinity: Option<(Arc<Affinity>, Duration)>,
    counters: Arc<Counters>,
    limit: Option<u64>,
}

impl std::fmt::Debug for PortState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortState")
            .field("service", &self.service)
            .field("port", &self.port)
            .field("protocol", &self.protocol)
            .field("policy", &self.policy)
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

/// What [`PortState::build`] needs to know about one service port.
pub(crate) struct PortInput<'a> {
    pub(crate) service: &'a Service,
    pub(crate) service_name: &'a Arc<str>,
    pub(crate) port: &'a ServicePort,
    pub(crate) view: View,
    pub(crate) endpoints: &'a [Endpoint],
    pub(crate) here: Place<'a>,
    pub(crate) counters: &'a Arc<Counters>,
    /// Counters of every endpoint with a backend port for this service port, by address.
    pub(crate) endpoint_counters: &'a [(SocketAddr, Arc<Counters>)],
}

impl PortState {
    pub(crate) fn build(input: PortInput<'_>, old: Option<&PortState>) -> Self {
        let mut backends: Vec<Backend> = eligible::eligible(
            input.service,
            input.port,
            input.view,
            input.endpoints,
            input.here,
        )
        .into_iter()
        .map(|(addr, e)| {
            let i = input
                .endpoint_counters
                .binary_search_by_key(&addr, |(a, _)| *a)
                .expect("every resolved endpoint has counters");
            Backend {
                addr,
                weight: e.weight,
                terminating: e.conditions.terminating,
                tally: Tally::new(input.counters.clone(), input.endpoint_counters[i].1.clone()),
            }
        })
        .collect();
        backends.sort_unstable_by_key(|b| b.addr);
        let policy = input.service.policy;
        let same_backends = |old: &PortState| {
            old.backends.len() == backends.len()
                && old
                    .backends
                    .iter()
                    .zip(&backends)
                    .all(|(a, b)| a.addr == b.addr && a.weight == b.weight)
        };
        let balancer = match old {
            Some(old) if old.policy == policy && same_backends(old) => old.balancer.clone(),
            _ => Balancer::new(policy, &backends),
        };
        let affinity = match input.service.session_affinity {
            SessionAffinity::None => None,
            SessionAffinity::ClientIp { timeout } => {
                let map = match old.and_then(|o| o.affinity.as_ref()) {
                    Some((map, _)) => {
                        let eligible =
                            |a: SocketAddr| backends.binary_search_by_key(&a, |b| b.addr).is_ok();
                        map.retain(eligible);
                        map.clone()
                    }
                    None => Arc::new(Affinity::new()),
                };
                Some((map, timeout))
            }
        };
        PortState {
            service: input.service_name.clone(),
            port: input.port.label().into(),
            protocol: input.port.protocol,
            backends: backends.into_boxed_slice(),
            policy,
            balancer,
            affinity,
            counters: input.counters.clone(),
            limit: input.service.max_connections.map(u64::from),
        }
    }

    /// Picks the backend for a new connection or flow from `client`, or `None` when no endpoint
    /// is eligible or the service port is at its connection limit (the client must be refused).
    /// `now` drives session affinity expiry.
    #[inline]
    pub fn select(&self, client: SocketAddr, now: Instant) -> Option<&Backend> {
        if self.backends.is_empty() || self.limit.is_some_and(|l| self.counters.active() >= l) {
            return None;
        }
        let Some((map, timeout)) = &self.affinity else {
            return Some(&self.backends[self.balancer.choose(&client, &self.backends)]);
        };
        let addr = map.get_or_choose(
            client.ip(),
            now,
            *timeout,
            |a| self.find(a).is_some(),
            || self.backends[self.balancer.choose(&client, &self.backends)].addr,
        );
        self.find(addr)
    }

    /// Picks a backend after a failed connect: the next eligible one after the last in `tried`
    /// (in address order) that is not in `tried`, or `None` when every eligible backend has
    /// been tried. Under session affinity
    /// the client is moved to the new backend.
    pub fn retry(
        &self,
        client: SocketAddr,
        tried: &[SocketAddr],
        now: Instant,
    ) -> Option<&Backend> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        // Continue after the endpoint that just failed, without moving the policy's cursor:
        // a dead endpoint then costs one failed attempt per rotation, not one per connection.
        let start = match tried
            .last()
            .and_then(|a| self.backends.binary_search_by_key(a, |b| b.addr).ok())
        {
            Some(i) => i + 1,
            None => self.balancer.choose(&client, &self.backends),
        };
        let backend = (0..n)
            .map(|k| &self.backends[(start + k) % n])
            .find(|b| !tried.contains(&b.addr))?;
        if let Some((map, timeout)) = &self.affinity {
            map.set(client.ip(), backend.addr, now, *timeout);
        }
        Some(backend)
    }

    /// The eligible backend with address `addr`.
    #[inline]
    pub fn find(&self, addr: SocketAddr) -> Option<&Backend> {
        let i = self.backends.binary_search_by_key(&addr, |b| b.addr).ok()?;
        Some(&self.backends[i])
    }

    /// Whether `addr` is an eligible backend.
    #[inline]
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.find(addr).is_some()
    }

    /// The eligible backends, sorted by address (round-robin order).
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Port name, or its number when unnamed.
    pub fn port_label(&self) -> &str {
        &self.port
    }

    /// TCP or UDP.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The balancing policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Counters of the service port.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// How long ClientIP session affinity remembers a client (`None`: no affinity).
    pub fn affinity_timeout(&self) -> Option<Duration> {
        self.affinity.as_ref().map(|(_, timeout)| *timeout)
    }

    /// The most connections or flows open at once (`None`: unlimited).
    pub fn connection_limit(&self) -> Option<u64> {
        self.limit
    }

    /// Clients remembered by session affinity (0 without affinity).
    pub fn affinity_entries(&self) -> usize {
        self.affinity.as_ref().map_or(0, |(map, _)| map.len())
    }
}
