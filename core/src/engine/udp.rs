//! UDP flows of the engine: mapping a client datagram to its flow (started on the first
//! datagram: the port's policy picks the endpoint, the driver opens a socket connected to it),
//! ending flows whose endpoint's port refuses, and expiring idle ones. Purge follows publishes:
//! [`Engine::udp_snapshot`] syncs the flow table with the table it loads, so a flow whose
//! endpoint stopped being eligible is out of the index before the next datagram is mapped
//! (see [`crate::flow`]).

use std::net::SocketAddr;
use std::time::Instant;

use tracing::debug;

use super::{Driver, Engine, ListenerId};
use crate::flow::{Destination, FlowId, FlowKey, FlowLimits, FlowTable};
use crate::loom::sync::Arc;
use crate::model::{Protocol, ServicePortKey};
use crate::table::Snapshot;

impl<D: Driver> Engine<D> {
    /// The current table, with the flows synced to it. Load it once per batch of client
    /// datagrams and map the batch against it.
    pub fn udp_snapshot(&mut self, now: Instant) -> Arc<Snapshot> {
        let snapshot = self.ctx.table().load_full();
        self.flows.sync(&snapshot, now);
        snapshot
    }

    /// The flow of a datagram from `client` to `to` (as the listener's socket reported it: the
    /// local address, at the listener's port, or for a transparent listener the original
    /// destination) on `listener`: the existing one, or one started now (at the flow limit, after evicting
    /// the oldest flow no reply came back on). `None`: the datagram is dropped (no eligible
    /// endpoint, the flow limit with every flow replied, or no socket could be had).
    ///
    /// A flow started through a transparent listener needs a listener on its frontend to
    /// send the replies from (see [`crate::steering`]); it is opened here if the worker has
    /// none yet.
    pub fn flow_for(
        &mut self,
        io: &mut D,
        snapshot: &Snapshot,
        listener: ListenerId,
        client: SocketAddr,
        to: Destination,
        now: Instant,
    ) -> Option<FlowId> {
        let l = self.listeners.get(listener)?;
        let (frontend, local) = if l.transparent {
            let original = to.original?;
            (ServicePortKey::new(original, Protocol::Udp), original)
        } else {
            let ip = to.local.unwrap_or(l.key.addr.ip());
            (l.key, SocketAddr::new(ip, l.key.addr.port()))
        };
        let key = FlowKey { client, local };
        if let Some(id) = self.flows.lookup(&key, now) {
            return Some(id);
        }
        if l.transparent && !self.reply_listener(io, snapshot, frontend) {
            return None;
        }
        let source = self.config.preserve_client_ip.then_some(client);
        let limits = FlowLimits {
            total: self.config.max_udp_flows,
            per_client: self.config.udp_flows_per_client(),
        };
        if self.flows.len() >= limits.total
            && let Some(old) = self.flows.evict_oldest_unreplied()
        {
            debug!(client = %old.key.client, "flow evicted to make room: no reply came back on it");
            old.tally.evicted();
            self.end_flow(io, old.handle);
        }
        self.flows
            .open(key, frontend, snapshot, now, limits, |id, endpoint| {
                io.open_flow(id, endpoint, source)
            })
            .unwrap_or_else(|(endpoint, e)| {
                debug!(%endpoint, error = %e, "cannot open flow");
                None
            })
    }

    /// Makes sure the steered UDP frontend `frontend`, if it is served, has a listener to send
    /// replies from; false when it is not served or the listener cannot be opened.
    pub(super) fn reply_listener(
        &mut self,
        io: &mut D,
        snapshot: &Snapshot,
        frontend: ServicePortKey,
    ) -> bool {
        if self.by_key.contains_key(&frontend) {
            return true;
        }
        if !snapshot.wants_listener(&frontend) {
            return false;
        }
        // Transparent: the service address is not necessarily one of this host's.
        match self.insert_listener(io, frontend, true) {
            Ok(()) => true,
            Err(e) => {
                debug!(%frontend, error = %e, "cannot open a listener to reply from");
                false
            }
        }
    }

    /// Closes the listeners opened to reply from (see [`Engine::flow_for`]) whose frontend has
    /// no flow left.
    pub(super) fn close_idle_replies(&mut self, io: &mut D) {
        let Some(steering) = self.steering else {
            return;
        };
        let idle: Vec<ServicePortKey> = self
            .listeners
            .iter()
            .map(|(_, l)| l.key)
            .filter(|key| {
                key.protocol == Protocol::Udp
                    && steering.steers(key)
                    && self.flows.frontend_flows(key) == 0
            })
            .collect();
        for key in idle {
            self.remove_listener(io, &key);
        }
    }

    /// The worker's flows.
    pub fn flows(&self) -> &FlowTable<D::Flow> {
        &self.flows
    }

    /// The worker's flows, mutably (to mark them used, or change the driver's handles).
    pub fn flows_mut(&mut self) -> &mut FlowTable<D::Flow> {
        &mut self.flows
    }

    /// Receiving on the flow's socket failed (typically ECONNREFUSED: the endpoint's port is
    /// closed): the flow ends, and its client's next datagram picks an endpoint again.
    pub fn flow_failed(&mut self, io: &mut D, id: FlowId) {
        if let Some(flow) = self.flows.remove(id) {
            debug!(endpoint = %flow.endpoint, "flow failed");
            flow.tally.connect_error();
            self.end_flow(io, flow.handle);
        }
    }

    pub(super) fn expire_flows(&mut self, io: &mut D, now: Instant) {
        for flow in self.flows.expire(now) {
            self.end_flow(io, flow.handle);
        }
    }
}
