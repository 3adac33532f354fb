//! The UDP flow table ("conntrack"): which endpoint each client flow goes to.
//!
//! A flow is keyed by the client's address and the exact local address it sent to (the
//! service address, even when the listener is bound to a wildcard). It records the endpoint,
//! the listener's [`ServicePortKey`] (to find the service port again), the counters, the
//! backend's handle for its backend-side socket, and when it was last used. [`FlowId`]s carry
//! a generation, so an id kept after its flow ended never matches a later flow in the same
//! slot; [`FlowTable::get`] is the reverse lookup for replies.
//!
//! A table is owned by one worker, so it needs no locks. Purge follows publishes: before
//! handling datagrams the worker calls [`FlowTable::sync`] with the snapshot it loaded, and
//! when the generation changed every flow whose endpoint is no longer eligible is retired: it
//! leaves the index at once, so the client's next datagram (same source port) picks a live
//! endpoint, but keeps its backend-side socket for [`REPLY_GRACE`] (at most the idle timeout)
//! so that replies already on their way still reach the client. Without that grace a request
//! in flight during an endpoint change is lost, and a DNS client waits seconds to retry.
//! [`FlowTable::expire`] removes retired flows after the grace and idle flows after the idle
//! timeout, or, for a flow no reply has come back on yet, after [`UNREPLIED_TIMEOUT`] (kernel
//! conntrack keeps unreplied UDP entries for 30 s against 120 s once replied: a flood of
//! datagrams from new source ports must not hold a socket each for the whole idle timeout).
//! A table at its flow limit makes room by evicting its oldest unreplied flow
//! ([`FlowTable::evict_oldest_unreplied`]).

use std::collections::VecDeque;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use hashbrown::HashMap;

use crate::clients::{ClientCounts, KeyCounts};
use crate::handover::HandedFlow;
use crate::model::ServicePortKey;
use crate::select::{Backend, Routed};
use crate::slots::{SlotId, Slots};
use crate::stats::Opened;
use crate::table::Snapshot;

/// How long a retired flow still delivers its endpoint's replies (capped by the idle timeout).
pub const REPLY_GRACE: Duration = Duration::from_secs(2);

/// How long a flow that no reply has come back on lasts without datagrams (capped by the idle
/// timeout).
pub const UNREPLIED_TIMEOUT: Duration = Duration::from_secs(5);

/// How many flows a table may hold, in all and from one client IP address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    /// Flows in all.
    pub total: usize,
    /// Flows from one client IP address.
    pub per_client: usize,
}

impl FlowLimits {
    /// No limits.
    pub const NONE: FlowLimits = FlowLimits {
        total: usize::MAX,
        per_client: usize::MAX,
    };
}

/// A client flow: who sent, and to which exact local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client address and port.
    pub client: SocketAddr,
    /// The local address the client sent to; replies must come from it.
    pub local: SocketAddr,
}

/// Where a client's datagram was sent, as the listener's socket reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Destination {
    /// The local address (`IP_PKTINFO` / `IPV6_PKTINFO`); the port is the listener's.
    pub local: Option<IpAddr>,
    /// The original destination, port included (`IP_ORIGDSTADDR` / `IPV6_ORIGDSTADDR`, on a
    /// transparent socket).
    pub original: Option<SocketAddr>,
}

/// Names a flow in its table; see [`SlotId`].
pub type FlowId = SlotId;

/// One flow.
#[derive(Debug)]
pub struct Flow<H> {
    /// Client and local address.
    pub key: FlowKey,
    /// The listener the flow arrived on (may be a wildcard address).
    pub listener: ServicePortKey,
    /// The endpoint's backend address.
    pub endpoint: SocketAddr,
    /// Counters to update for the flow's datagrams.
    pub tally: Opened,
    /// The backend's handle (its backend-side socket).
    pub handle: H,
    last_seen: Instant,
    retired_at: Option<Instant>,
    replied: bool,
}

impl<H> Flow<H> {
    /// When a datagram last passed, either way.
    pub fn last_seen(&self) -> Instant {
        self.last_seen
    }

    /// Whether the flow was retired: no new datagrams go to it, replies still come back.
    pub fn is_retired(&self) -> bool {
        self.retired_at.is_some()
    }
}

/// Flows of one worker. See the module docs.
#[derive(Debug)]
pub struct FlowTable<H> {
    index: HashMap<FlowKey, FlowId, RandomState>,
    slots: Slots<Flow<H>>,
    /// Flows in the order they started, while (as far as this knows) unreplied: entries for
    /// flows since replied or gone are dropped on the way (and at each expiry).
    unreplied: VecDeque<FlowId>,
    /// Flows per client IP address.
    clients: ClientCounts,
    /// Flows per service port (`Flow::listener`).
    frontends: KeyCounts<ServicePortKey>,
    idle_timeout: Duration,
    seen_generation: Option<u64>,
}

impl<H> FlowTable<H> {
    /// An empty table whose flows expire after `idle_timeout` without datagrams.
    pub fn new(idle_timeout: Duration) -> Self {
        Self {
            index: HashMap::default(),
            slots: Slots::new(),
            unreplied: VecDeque::new(),
            clients: ClientCounts::default(),
            frontends: KeyCounts::default(),
            idle_timeout,
            seen_generation: None,
        }
    }

    /// The flow for `key`, marked as used at `now`.
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, now: Instant) -> Option<FlowId> {
        let id = *self.index.get(key)?;
        self.touch(id, now);
        Some(id)
    }

    /// The flow named by `id` (the reverse lookup for replies).
    #[inline]
    pub fn get(&self, id: FlowId) -> Option<&Flow<H>> {
        self.slots.get(id)
    }

    /// The flow named by `id`, mutably (its handle is the caller's to change).
    #[inline]
    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut Flow<H>> {
        self.slots.get_mut(id)
    }

    /// Marks the flow as used at `now`.
    #[inline]
    pub fn touch(&mut self, id: FlowId, now: Instant) {
        if let Some(flow) = self.slots.get_mut(id) {
            flow.last_seen = now;
        }
    }

    /// A reply came back on the flow at `now`: it is used, and lasts the whole idle timeout.
    #[inline]
    pub fn replied(&mut self, id: FlowId, now: Instant) {
        if let Some(flow) = self.slots.get_mut(id) {
            flow.last_seen = now;
            flow.replied = true;
        }
    }

    /// Removes and returns the oldest flow no reply has come back on, if any (to make room
    /// for a new flow at the limit).
    pub fn evict_oldest_unreplied(&mut self) -> Option<Flow<H>> {
        while let Some(id) = self.unreplied.pop_front() {
            if self.slots.get(id).is_some_and(|f| !f.replied) {
                return self.remove(id);
            }
        }
        None
    }

    /// Starts a flow from `key` to an endpoint of the service port `listener` in `snapshot`,
    /// chosen by the port's policy, as every backend does for a client's first datagram.
    /// `Ok(None)`, with nothing added, when the port is gone, has no eligible endpoint (counted
    /// as refused), or this table already holds `limits.total` flows, or `limits.per_client`
    /// from the client's IP address (counted as limited). Otherwise
    /// as [`FlowTable::insert`], with `make_handle` also given the endpoint; when it fails,
    /// the endpoint counts a connect error and the error comes back with the endpoint.
    pub fn open<E>(
        &mut self,
        key: FlowKey,
        listener: ServicePortKey,
        snapshot: &Snapshot,
        now: Instant,
        limits: FlowLimits,
        make_handle: impl FnOnce(FlowId, SocketAddr) -> Result<H, E>,
    ) -> Result<Option<FlowId>, (SocketAddr, E)> {
        let port = match snapshot.route(&listener, key.client.ip()) {
            Some(Routed::Serve(port)) => port,
            Some(Routed::Denied(port)) => {
                port.counters().add_refused();
                return Ok(None);
            }
            None => return Ok(None),
        };
        let Some(backend) = port.select(key.client, now) else {
            port.counters().add_refused();
            return Ok(None);
        };
        let theirs = self.clients.get(key.client.ip());
        if self.len() >= limits.total || theirs >= limits.per_client {
            port.counters().add_limited();
            return Ok(None);
        }
        let endpoint = backend.addr();
        match self.insert(key, listener, backend, now, |id| make_handle(id, endpoint)) {
            Ok(id) => Ok(Some(id)),
            Err(e) => {
                backend.tally().connect_error();
                Err((endpoint, e))
            }
        }
    }

    /// Goes on with a flow another process handed over ([`crate::handover`]): to its
    /// endpoint, if `snapshot` still serves the client there, idle as long as it was.
    /// `Ok(None)`, with nothing added, when it does not (the client's next datagram starts a
    /// flow anew). Otherwise as [`FlowTable::insert`].
    pub fn adopt<E>(
        &mut self,
        handed: &HandedFlow,
        snapshot: &Snapshot,
        now: Instant,
        make_handle: impl FnOnce(FlowId) -> Result<H, E>,
    ) -> Result<Option<FlowId>, E> {
        let port = match snapshot.route(&handed.listener, handed.key.client.ip()) {
            Some(Routed::Serve(port)) => port,
            _ => return Ok(None),
        };
        let Some(backend) = port.find(handed.endpoint) else {
            return Ok(None);
        };
        let last_seen = now.checked_sub(handed.idle).unwrap_or(now);
        let tally = || backend.tally().carry_on();
        let id = self.add(
            handed.key,
            handed.listener,
            backend,
            tally,
            last_seen,
            make_handle,
        )?;
        if handed.replied {
            self.replied(id, last_seen);
        }
        Ok(Some(id))
    }

    /// The flow `id` as it would be handed over at `now`.
    pub fn handed(&self, id: FlowId, now: Instant) -> Option<HandedFlow> {
        let flow = self.slots.get(id)?;
        Some(HandedFlow {
            key: flow.key,
            listener: flow.listener,
            endpoint: flow.endpoint,
            idle: now.saturating_duration_since(flow.last_seen),
            replied: flow.replied,
        })
    }

    /// Starts a flow from `key` to `backend`. `make_handle` gets the new flow's id (to tag
    /// the backend-side socket with) and returns its handle; if it fails, nothing is added.
    /// Counts the flow as opened.
    pub fn insert<E>(
        &mut self,
        key: FlowKey,
        listener: ServicePortKey,
        backend: &Backend,
        now: Instant,
        make_handle: impl FnOnce(FlowId) -> Result<H, E>,
    ) -> Result<FlowId, E> {
        let tally = || backend.tally().open();
        self.add(key, listener, backend, tally, now, make_handle)
    }

    /// As [`FlowTable::insert`], counted by `tally` once the handle is made.
    fn add<E>(
        &mut self,
        key: FlowKey,
        listener: ServicePortKey,
        backend: &Backend,
        tally: impl FnOnce() -> Opened,
        now: Instant,
        make_handle: impl FnOnce(FlowId) -> Result<H, E>,
    ) -> Result<FlowId, E> {
        let id = self.slots.insert_with(|id| {
            Ok(Flow {
                key,
                listener,
                endpoint: backend.addr(),
                handle: make_handle(id)?,
                tally: tally(),
                last_seen: now,
                retired_at: None,
                replied: false,
            })
        })?;
        self.unreplied.push_back(id);
        self.clients.add(key.client.ip());
        self.frontends.add(listener);
        if let Some(old) = self.index.insert(key, id) {
            // The caller replaced a live flow; dropping it ends its accounting.
            self.remove(old);
        }
        Ok(id)
    }

    /// Removes a flow; it counts as closed once dropped.
    pub fn remove(&mut self, id: FlowId) -> Option<Flow<H>> {
        let flow = self.slots.remove(id)?;
        if self.index.get(&flow.key) == Some(&id) {
            self.index.remove(&flow.key);
        }
        self.clients.remove(flow.key.client.ip());
        self.frontends.remove(flow.listener);
        Some(flow)
    }

    /// Flows from the client IP address `ip`.
    pub fn client_flows(&self, ip: IpAddr) -> usize {
        self.clients.get(ip)
    }

    /// Flows (retired ones too) of the service port `listener`.
    pub fn frontend_flows(&self, listener: &ServicePortKey) -> usize {
        self.frontends.get(*listener)
    }

    /// Removes and returns every flow idle for longer than the idle timeout (unreplied ones:
    /// than [`UNREPLIED_TIMEOUT`]), and every flow retired for longer than the reply grace.
    pub fn expire(&mut self, now: Instant) -> Vec<Flow<H>> {
        let timeout = self.idle_timeout;
        let unreplied = UNREPLIED_TIMEOUT.min(timeout);
        let grace = REPLY_GRACE.min(timeout);
        let ids: Vec<FlowId> = self
            .slots
            .iter()
            .filter(|(_, f)| {
                let idle = if f.replied { timeout } else { unreplied };
                now.saturating_duration_since(f.last_seen) > idle
                    || f.retired_at
                        .is_some_and(|at| now.saturating_duration_since(at) >= grace)
            })
            .map(|(id, _)| id)
            .collect();
        let gone: Vec<Flow<H>> = ids.into_iter().filter_map(|id| self.remove(id)).collect();
        let slots = &self.slots;
        self.unreplied
            .retain(|id| slots.get(*id).is_some_and(|f| !f.replied));
        gone
    }

    /// Retires every flow whose endpoint is not eligible in `snapshot`, if `snapshot` is a
    /// generation this table has not seen yet (see the module docs). Call it with each
    /// snapshot loaded before handling datagrams.
    pub fn sync(&mut self, snapshot: &Snapshot, now: Instant) {
        if self.seen_generation == Some(snapshot.generation()) {
            return;
        }
        self.seen_generation = Some(snapshot.generation());
        self.purge(snapshot, now);
    }

    /// Retires every flow whose endpoint is not eligible in `snapshot`.
    pub fn purge(&mut self, snapshot: &Snapshot, now: Instant) {
        for (id, flow) in self.slots.iter_mut() {
            let eligible = snapshot.serves(&flow.listener, flow.key.client.ip(), flow.endpoint);
            if eligible || flow.retired_at.is_some() {
                continue;
            }
            flow.retired_at = Some(now);
            if self.index.get(&flow.key) == Some(&id) {
                self.index.remove(&flow.key);
            }
        }
    }

    /// Number of flows.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no flows.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Every flow with its id.
    pub fn iter(&self) -> impl Iterator<Item = (FlowId, &Flow<H>)> {
        self.slots.iter()
    }

    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }
}
