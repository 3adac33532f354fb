//! The service table: immutable snapshots, published atomically.
//!
//! Readers call [`Table::load`] and get the current [`Snapshot`] without locking or
//! allocating; a snapshot they hold stays valid (and unchanged) until they drop it. Writers
//! call [`Table::apply`] with a [`Batch`]: the changes are validated and applied to a draft in
//! order, and the draft is published as the next generation only if every change succeeded.
//! Writers are serialised by a mutex; readers never wait for them.
//!
//! A publish copies only what the batch touches: services are kept in shared shards, so a
//! one-service change to a table of 10,000 services copies a few dozen pointers. After a
//! publish, subscribers ([`Table::subscribe`]) are called with the new generation; backends use
//! this to reconcile listeners and purge UDP flows.

mod batch;
mod build;
mod shards;
mod snapshot;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::AtomicU64 as StdAtomicU64;
use std::time::{Duration, Instant, SystemTime};

use foldhash::fast::RandomState;
use ipnet::IpNet;

use crate::error::TableError;
use crate::loom::lock;
use crate::loom::sync::{Arc, Guard, Mutex, SwapCell};
use crate::select::Locality;

pub use batch::{Batch, Change};
pub use snapshot::{FrontendChanges, ServiceEntry, Snapshot};

/// Settings of a table that apply to every service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableConfig {
    /// This node's name, for [`TrafficPolicy::Local`](crate::model::TrafficPolicy::Local).
    /// Without one, `Local` services have no eligible endpoint.
    pub node_name: Option<String>,
    /// Addresses node ports are served on. Default: `0.0.0.0` (every IPv4 address).
    pub node_addresses: Vec<IpAddr>,
    /// This node's zone (Kubernetes' `topology.kubernetes.io/zone` label), for endpoints'
    /// zone [`Hints`](crate::model::Hints).
    pub node_zone: Option<String>,
    /// The cluster's address ranges (pod and node networks): clients there, like clients on
    /// this node, are inside the cluster, and reach the `Cluster` endpoints of a service
    /// whose external traffic policy is `Local` (see [`Route`](crate::select::Route)).
    pub cluster_ranges: Vec<IpNet>,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            node_name: None,
            node_addresses: vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
            node_zone: None,
            cluster_ranges: Vec::new(),
        }
    }
}

impl TableConfig {
    fn locality(&self) -> Locality {
        let specified = self.node_addresses.iter().filter(|a| !a.is_unspecified());
        Locality::new(specified.copied().collect(), self.cluster_ranges.clone())
    }
}

/// What a successful [`Table::apply`] published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Generation of the new snapshot (unchanged for an empty batch).
    pub generation: u64,
    /// Time from taking the writer lock to the new snapshot being visible.
    pub elapsed: Duration,
}

type Subscriber = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// Identifies a subscription, to end it with [`Table::unsubscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

/// A service table. Share it with `Arc<Table>`.
pub struct Table {
    id: u64,
    config: TableConfig,
    cell: SwapCell<Snapshot>,
    writer: Mutex<()>,
    subscribers: Mutex<Vec<(SubscriptionId, Subscriber)>>,
    next_subscription: StdAtomicU64,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("config", &self.config)
            .field("current", &*self.load())
            .finish_non_exhaustive()
    }
}

impl Default for Table {
    fn default() -> Self {
        Self::new(TableConfig::default())
    }
}

impl Table {
    /// An empty table (generation 0).
    pub fn new(config: TableConfig) -> Self {
        static IDS: StdAtomicU64 = StdAtomicU64::new(1);
        let id = IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let hasher = RandomState::default();
        let empty = Snapshot {
            table_id: id,
            generation: 0,
            updated: SystemTime::now(),
            services: shards::ShardedMap::new(hasher.clone()),
            frontends: shards::ShardedMap::new(hasher),
            locality: std::sync::Arc::new(config.locality()),
        };
        Self {
            id,
            config,
            cell: SwapCell::new(Arc::new(empty)),
            writer: Mutex::new(()),
            subscribers: Mutex::new(Vec::new()),
            next_subscription: StdAtomicU64::new(0),
        }
    }

    /// An empty table whose next publish is generation `generation + 1`: it goes on from a
    /// table another process published (see [`crate::handover`]), so that generations keep
    /// growing across a restart.
    pub fn continuing(config: TableConfig, generation: u64) -> Self {
        let table = Self::new(config);
        let empty = table.cell.load_full();
        table.cell.store(Arc::new(Snapshot {
            table_id: empty.table_id,
            generation,
            updated: empty.updated,
            services: empty.services.clone(),
            frontends: empty.frontends.clone(),
            locality: empty.locality.clone(),
        }));
        table
    }

    /// The table's settings.
    pub fn config(&self) -> &TableConfig {
        &self.config
    }

    /// The current snapshot: lock-free, allocation-free. Hold it briefly; to keep a snapshot
    /// for long, use [`Table::load_full`].
    #[inline]
    pub fn load(&self) -> Guard<Snapshot> {
        self.cell.load()
    }

    /// The current snapshot as an owned `Arc`.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.cell.load_full()
    }

    /// Validates and applies `batch` in order, then publishes the result as one new
    /// generation. On error nothing is published and the table is as it was.
    pub fn apply(&self, batch: impl Into<Batch>) -> Result<Published, TableError> {
        let batch = batch.into();
        let _writer = lock(&self.writer);
        let start = Instant::now();
        let current = self.cell.load_full();
        if batch.is_empty() {
            return Ok(Published {
                generation: current.generation,
                elapsed: start.elapsed(),
            });
        }
        let mut draft = build::Draft::of(&current, &self.config);
        for change in batch.changes {
            draft.apply(change)?;
        }
        let generation = current.generation + 1;
        let next = Snapshot {
            table_id: self.id,
            generation,
            updated: SystemTime::now(),
            services: draft.services,
            frontends: draft.frontends,
            locality: current.locality.clone(),
        };
        self.cell.store(Arc::new(next));
        let elapsed = start.elapsed();
        drop(current);
        let subscribers: Vec<Subscriber> = lock(&self.subscribers)
            .iter()
            .map(|(_, s)| s.clone())
            .collect();
        for notify in subscribers {
            notify(generation);
        }
        Ok(Published {
            generation,
            elapsed,
        })
    }

    /// Calls `notify` with the new generation after every publish, on the publishing thread,
    /// with the writer lock held (so calls arrive in order). Keep it short: wake someone up.
    pub fn subscribe(&self, notify: impl Fn(u64) + Send + Sync + 'static) -> SubscriptionId {
        let id = SubscriptionId(
            self.next_subscription
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        lock(&self.subscribers).push((id, std::sync::Arc::new(notify)));
        id
    }

    /// Ends a subscription. After it returns, `notify` is not called again.
    pub fn unsubscribe(&self, id: SubscriptionId) {
        let _writer = lock(&self.writer);
        lock(&self.subscribers).retain(|(s, _)| *s != id);
    }
}
