//! Socket-level load balancing: node-local clients connect straight to an endpoint.
//!
//! [`SocketLb::attach`] loads cgroup `sock_addr` programs (`bpf/socklb.bpf.c`, compiled and
//! checked in as `bpf/socklb.bpf.o`) and attaches them to one cgroup v2 directory: every
//! process in it and below, in any network namespace, is served. On `connect()` (TCP and
//! connected UDP) and on each unconnected UDP `sendmsg()`, the programs replace a service
//! address with an endpoint chosen as the userspace proxy would choose it; on `recvmsg()` and
//! `getpeername()` they show the service address again. No proxy and no conntrack entry stay
//! on the data path, and the endpoint sees the client's own address.
//!
//! The maps follow the table: every publish writes the frontends it changed (see [`plan`] for
//! which frontends qualify; the rest, and any destination without an entry, go on to the
//! userspace proxy at the service address). A changed frontend's endpoints are written under a
//! new revision first (its slots and the membership set), and only then is the frontend entry
//! switched to that revision, so a `connect()` never sees half a change. The old revision is
//! deleted at the next publish; a `connect()` that still misses a slot falls back to the
//! userspace proxy. A frontend without an eligible endpoint refuses `connect()` and `sendmsg()`
//! with `ECONNREFUSED`.
//!
//! A hash map hands a replaced or deleted element to a later update at once, so a program may
//! read an element that now holds another key's value. Frontend and slot values carry their own
//! key; the programs copy the value and check it, and a mismatch goes to the userspace proxy.
//! Counters of frontends and endpoints taken off the socket path are folded into their service
//! port's totals, which never go back.
//!
//! Choices differ from the userspace proxy's in two ways, both documented for users: the
//! endpoint is chosen once, at `connect()` (a refused connect is not retried on the next
//! endpoint), and under ClientIP affinity the client is the network namespace (its address is
//! not chosen yet at `connect()`); a pod has one.
//!
//! Nothing is pinned: the programs are attached by BPF links held by this process, so they are
//! detached, and the maps freed, when the [`SocketLb`] is dropped or the process ends.

mod maps;
mod plan;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, include_bytes_aligned};
use svcproxy_core::table::SubscriptionId;
use svcproxy_core::{CounterValues, PortStats, ServicePortKey, Snapshot, Table};

use maps::{
    Cursor, Endpoint, FRONTEND_RANDOM, Frontend, FrontendKey, MemberKey, Slot, SlotKey, Stat,
    StatKey,
};
use plan::Plan;

/// The compiled programs (rebuild with `socket-lb/bpf/build.sh`).
static OBJECT: &[u8] = include_bytes_aligned!("../bpf/socklb.bpf.o");

/// The programs, each attached at the hook its section names.
const PROGRAMS: [&str; 8] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
];

/// Why socket-level load balancing could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cgroup directory could not be opened (it must be a cgroup v2 directory).
    #[error("cgroup {path}: {source}")]
    Cgroup {
        /// The directory given.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Loading or attaching the programs failed (this needs root, or CAP_BPF and
    /// CAP_NET_ADMIN, and a kernel with the cgroup socket hooks).
    #[error("BPF {what}: {message}")]
    Bpf {
        /// What was being done.
        what: String,
        /// The loader's error.
        message: String,
    },
}

/// An [`Error::Bpf`] for `what`, whose message is the error with its sources.
fn bpf(what: impl Into<String>) -> impl FnOnce(&dyn std::error::Error) -> Error {
    let what = what.into();
    move |e| {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message = format!("{message}: {s}");
            source = s.source();
        }
        Error::Bpf { what, message }
    }
}

/// The loader found no `what` in the object (it was built from another source).
fn missing(what: String) -> Error {
    Error::Bpf {
        what,
        message: "missing from the object".into(),
    }
}

/// What an attached [`SocketLb`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The cgroup the programs are attached to.
    pub cgroup: PathBuf,
    /// Frontends balanced at the socket now (the others go to the userspace proxy).
    pub frontends: usize,
}

/// Where cgroup v2 is mounted (its root cgroup: every process of the host below it), from
/// `/proc/self/mounts`.
pub fn cgroup2_mount() -> std::io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .map(|f| PathBuf::from(f[1]))
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "cgroup v2 is not mounted")
        })
}

/// Socket-level load balancing for the processes of one cgroup, following one table.
pub struct SocketLb {
    table: Arc<Table>,
    subscription: SubscriptionId,
    cgroup: PathBuf,
    state: Arc<Mutex<Maps>>,
}

impl std::fmt::Debug for SocketLb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketLb")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

impl SocketLb {
    /// Loads the programs, writes the table's current frontends and attaches to `cgroup` (a
    /// cgroup v2 directory, such as `/sys/fs/cgroup` or a test's own). From then on every
    /// publish of `table` updates the maps before [`Table::apply`] returns.
    pub fn attach(cgroup: &Path, table: Arc<Table>) -> Result<SocketLb, Error> {
        let dir = File::open(cgroup).map_err(|source| Error::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| bpf("load")(&e))?;
        let state = Arc::new(Mutex::new(Maps::take(&mut ebpf)?));
        let sync = {
            let state = state.clone();
            let table = Arc::downgrade(&table);
            move |_generation| {
                if let Some(table) = table.upgrade() {
                    lock(&state).sync(&table.load_full());
                }
            }
        };
        // Subscribe first, then write what is published: a publish in between is written by
        // one or the other (each writes the difference from what it last wrote).
        let subscription = table.subscribe(sync);
        lock(&state).sync(&table.load_full());
        let attached = attach_programs(&mut ebpf, &dir);
        if let Err(e) = attached {
            table.unsubscribe(subscription);
            return Err(e);
        }
        lock(&state).ebpf = Some(ebpf);
        Ok(SocketLb {
            table,
            subscription,
            cgroup: cgroup.to_path_buf(),
            state,
        })
    }

    /// Where the programs are attached and what they serve.
    pub fn status(&self) -> Status {
        Status {
            cgroup: self.cgroup.clone(),
            frontends: lock(&self.state).installed.len(),
        }
    }

    /// Adds what the programs counted to `stats` (as taken from the snapshot): each connection
    /// or new UDP flow to `connections_total`, each UDP datagram to `datagrams_in`, each
    /// refusal to `refused`, on the service port and on its endpoint.
    pub fn add_stats(&self, stats: &mut [PortStats]) {
        let counted = lock(&self.state).counted();
        for (service, port, endpoint, values) in counted {
            let Some(s) = stats
                .iter_mut()
                .find(|s| s.service == service && s.port == port)
            else {
                continue;
            };
            s.totals += values;
            if let Some(addr) = endpoint {
                match s.endpoints.binary_search_by_key(&addr, |(a, _)| *a) {
                    Ok(i) => s.endpoints[i].1 += values,
                    Err(i) => s.endpoints.insert(i, (addr, values)),
                }
            }
        }
    }
}

impl Drop for SocketLb {
    fn drop(&mut self) {
        self.table.unsubscribe(self.subscription);
        // Dropping the loaded object closes the links (detaching the programs) and the maps.
        lock(&self.state).ebpf = None;
    }
}

fn lock(state: &Mutex<Maps>) -> MutexGuard<'_, Maps> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn attach_programs(ebpf: &mut Ebpf, cgroup: &File) -> Result<(), Error> {
    for name in PROGRAMS {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| missing(format!("program {name}")))?
            .try_into()
            .map_err(|e| bpf(format!("program {name}"))(&e))?;
        program
            .load()
            .map_err(|e| bpf(format!("loading {name}"))(&e))?;
        program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(|e| bpf(format!("attaching {name}"))(&e))?;
    }
    Ok(())
}

/// A frontend as written to the maps.
struct Installed {
    id: u32,
    rev: u32,
    plan: Plan,
    /// The endpoints whose counters it holds: those of its plan (and, until the next change,
    /// those it just lost).
    counted: BTreeSet<SocketAddr>,
}

/// The maps, and what has been written to them.
struct Maps {
    /// The programs and links, from attaching until drop.
    ebpf: Option<Ebpf>,
    frontends: BpfHashMap<MapData, FrontendKey, Frontend>,
    slots: BpfHashMap<MapData, SlotKey, Slot>,
    members: BpfHashMap<MapData, MemberKey, u32>,
    cursors: BpfHashMap<MapData, u32, Cursor>,
    stats: PerCpuHashMap<MapData, StatKey, Stat>,
    installed: HashMap<ServicePortKey, Installed>,
    /// Ids are never reused: a program running during a removal must not count or route for
    /// the frontend that would get the id next.
    next_id: u32,
    next_rev: u32,
    /// Revisions replaced by the last publish, deleted at the next.
    retired: Vec<(u32, Vec<SocketAddr>)>,
    /// What the programs counted for frontends and endpoints since taken off the socket path,
    /// by service and port, so that a service port's totals never go back; kept while the
    /// service exists.
    departed: BTreeMap<(String, String), CounterValues>,
    last: Option<Arc<Snapshot>>,
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Maps, Error> {
        fn map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, Error>
        where
            T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
        {
            let m = ebpf
                .take_map(name)
                .ok_or_else(|| missing(format!("map {name}")))?;
            T::try_from(m).map_err(|e| bpf(format!("map {name}"))(&e))
        }
        Ok(Maps {
            ebpf: None,
            frontends: map(ebpf, "frontends")?,
            slots: map(ebpf, "slots")?,
            members: map(ebpf, "members")?,
            cursors: map(ebpf, "cursors")?,
            stats: map(ebpf, "stats")?,
            installed: HashMap::new(),
            next_id: 0,
            next_rev: 0,
            retired: Vec::new(),
            departed: BTreeMap::new(),
            last: None,
        })
    }

    /// Writes what changed from the last snapshot written to `snapshot`.
    fn sync(&mut self, snapshot: &Arc<Snapshot>) {
        if self
            .last
            .as_ref()
            .is_some_and(|l| l.generation() >= snapshot.generation())
        {
            return;
        }
        let keys: Vec<ServicePortKey> = match &self.last {
            Some(old) => {
                let c = snapshot.frontend_changes(old);
                c.added
                    .into_iter()
                    .chain(c.removed)
                    .chain(c.changed)
                    .collect()
            }
            None => snapshot.frontends().map(|(k, _)| *k).collect(),
        };
        for (rev, endpoints) in std::mem::take(&mut self.retired) {
            self.delete_revision(rev, &endpoints);
        }
        for key in keys {
            let plan = snapshot.frontend(&key).and_then(|r| plan::plan(&key, r));
            self.set(key, plan);
        }
        self.departed
            .retain(|(service, _), _| snapshot.service(service).is_some());
        self.last = Some(snapshot.clone());
    }

    fn set(&mut self, key: ServicePortKey, plan: Option<Plan>) {
        let old = self.installed.get(&key);
        if old.map(|o| &o.plan) == plan.as_ref() {
            return;
        }
        let Some(plan) = plan else {
            self.remove(key);
            return;
        };
        let id = match old {
            Some(o) => o.id,
            None => {
                self.next_id += 1;
                self.next_id
            }
        };
        self.next_rev = self.next_rev.wrapping_add(1);
        let rev = self.next_rev;
        if let Err(e) = self.write(key, id, rev, &plan) {
            tracing::warn!(frontend = %key.addr, protocol = %key.protocol, error = %e,
                "socket-level load balancing: could not write the frontend; the userspace proxy serves it");
            self.delete_revision(rev, &plan.endpoints);
            self.remove(key);
            return;
        }
        match self.installed.get_mut(&key) {
            Some(entry) => {
                // Endpoints in neither the old plan nor the new one were lost two changes ago:
                // no program counts for them any more.
                let current: BTreeSet<SocketAddr> = entry
                    .plan
                    .endpoints
                    .iter()
                    .chain(&plan.endpoints)
                    .copied()
                    .collect();
                let (kept, lost): (BTreeSet<_>, BTreeSet<_>) = std::mem::take(&mut entry.counted)
                    .into_iter()
                    .partition(|a| current.contains(a));
                entry.counted = kept;
                entry.counted.extend(plan.endpoints.iter().copied());
                let old = std::mem::replace(&mut entry.plan, plan);
                self.retired.push((entry.rev, old.endpoints));
                entry.rev = rev;
                let (id, service, port) = (
                    entry.id,
                    entry.plan.service.clone(),
                    entry.plan.port.clone(),
                );
                self.depart(id, &service, &port, lost.into_iter().map(Some));
            }
            None => {
                let counted = plan.endpoints.iter().copied().collect();
                let entry = Installed {
                    id,
                    rev,
                    plan,
                    counted,
                };
                self.installed.insert(key, entry);
            }
        }
    }

    /// Writes revision `rev` of `key`'s endpoints, then points the frontend at it.
    fn write(
        &mut self,
        key: ServicePortKey,
        id: u32,
        rev: u32,
        plan: &Plan,
    ) -> Result<(), aya::maps::MapError> {
        for (index, addr) in (0u32..).zip(&plan.endpoints) {
            let endpoint = Endpoint::from(*addr);
            let key = SlotKey { rev, index };
            self.slots.insert(key, Slot { endpoint, key }, 0)?;
            self.members.insert(MemberKey { rev, endpoint }, index, 0)?;
        }
        self.cursors.insert(id, Cursor::default(), 0)?;
        let frontend = Frontend {
            id,
            rev,
            count: u32::try_from(plan.endpoints.len()).unwrap_or(u32::MAX),
            flags: if plan.random { FRONTEND_RANDOM } else { 0 },
            affinity_ns: plan.affinity.map_or(0, |t| {
                u64::try_from(t.as_nanos()).unwrap_or(u64::MAX).max(1)
            }),
            key: frontend_key(&key),
        };
        self.frontends.insert(frontend_key(&key), frontend, 0)
    }

    fn remove(&mut self, key: ServicePortKey) {
        let Some(old) = self.installed.remove(&key) else {
            return;
        };
        // Errors here mean the entry is already gone.
        let _ = self.frontends.remove(&frontend_key(&key));
        let _ = self.cursors.remove(&old.id);
        let addrs = old.counted.iter().map(|a| Some(*a)).chain([None]);
        self.depart(old.id, &old.plan.service, &old.plan.port, addrs);
        self.retired.push((old.rev, old.plan.endpoints));
    }

    /// Moves the counters of frontend `id` for `addrs` (`None`: its own) out of the map, into
    /// the service port's departed totals.
    fn depart(
        &mut self,
        id: u32,
        service: &str,
        port: &str,
        addrs: impl Iterator<Item = Option<SocketAddr>>,
    ) {
        for addr in addrs {
            if let Some(values) = self.stat(id, addr) {
                *self
                    .departed
                    .entry((service.to_string(), port.to_string()))
                    .or_default() += values;
            }
            let _ = self.stats.remove(&stat_key(id, addr));
        }
    }

    /// What the programs counted for frontend `id` and endpoint `addr`, summed over CPUs.
    fn stat(&self, id: u32, addr: Option<SocketAddr>) -> Option<CounterValues> {
        let per_cpu = self.stats.get(&stat_key(id, addr), 0).ok()?;
        let mut values = CounterValues::default();
        for s in per_cpu.iter() {
            values.connections_total += s.connections;
            values.datagrams_in += s.datagrams;
            values.refused += s.refused;
        }
        Some(values)
    }

    fn delete_revision(&mut self, rev: u32, endpoints: &[SocketAddr]) {
        for (index, addr) in (0u32..).zip(endpoints) {
            let _ = self.slots.remove(&SlotKey { rev, index });
            let _ = self.members.remove(&MemberKey {
                rev,
                endpoint: Endpoint::from(*addr),
            });
        }
    }

    /// Every counter: service, port, endpoint (`None`: the service port's own, and what
    /// departed) and values, summed over CPUs.
    fn counted(&self) -> Vec<(String, String, Option<SocketAddr>, CounterValues)> {
        let mut out = Vec::new();
        for installed in self.installed.values() {
            let addrs = installed.counted.iter().map(|a| Some(*a)).chain([None]);
            for addr in addrs {
                if let Some(values) = self.stat(installed.id, addr) {
                    let (service, port) = (&installed.plan.service, &installed.plan.port);
                    out.push((service.clone(), port.clone(), addr, values));
                }
            }
        }
        for ((service, port), values) in &self.departed {
            out.push((service.clone(), port.clone(), None, *values));
        }
        out
    }
}

fn frontend_key(key: &ServicePortKey) -> FrontendKey {
    FrontendKey {
        service: Endpoint::from(key.addr),
        protocol: plan::ip_protocol(key.protocol),
        pad: [0; 3],
    }
}

fn stat_key(id: u32, endpoint: Option<SocketAddr>) -> StatKey {
    StatKey {
        id,
        endpoint: endpoint.map(Endpoint::from).unwrap_or_default(),
    }
}
