//! UDP forwarding: client datagrams arrive on the listener in batches, each is mapped to its
//! flow (created on the first datagram: pick an endpoint, open a socket connected to it), and
//! consecutive datagrams of one flow leave in one `sendmmsg`. Replies arrive on the flow's
//! socket and go back through the listener to the client, from the exact local address the
//! client sent to (reverse translation), also when the listener is bound to a wildcard.
//!
//! Before mapping a batch, the flow table is synced with the current snapshot, so a flow whose
//! endpoint stopped being eligible is gone before its client's next datagram is routed.

use std::io;
use std::time::Instant;

use svcproxy_core::engine::ListenerId;
use svcproxy_core::{FlowId, SlotId};
use svcproxy_sys::send_many;
use tracing::debug;

use crate::worker::{Work, Worker};

/// Batches taken from one socket before other work gets a turn.
const ROUNDS: usize = 8;

impl Worker {
    /// Forwards datagrams waiting on a UDP listener.
    pub(crate) fn udp_from_clients(&mut self, listener: ListenerId, now: Instant) {
        if self.io.udp_paused {
            return;
        }
        let mut routes: Vec<(FlowId, usize)> = Vec::with_capacity(self.io.batch.capacity());
        for _ in 0..ROUNDS {
            let Some(l) = self.engine.listener(listener) else {
                return;
            };
            let key = l.key;
            // A batch smaller than the buffers means the socket is empty: the next datagram
            // brings a new edge, so there is no need to ask again.
            let drained = match self.io.batch.recv(&l.io) {
                Ok(0) => return,
                Ok(n) => n < self.io.batch.capacity(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(%key, error = %e, "receive failed");
                    return;
                }
            };
            let snapshot = self.engine.udp_snapshot(now);
            routes.clear();
            for i in 0..self.io.batch.len() {
                let d = self.io.batch.get(i);
                let (Some(peer), false) = (d.peer, d.truncated) else {
                    continue;
                };
                let to = d.destination;
                if let Some(id) =
                    self.engine
                        .flow_for(&mut self.io, &snapshot, listener, peer, to, now)
                {
                    routes.push((id, i));
                }
            }
            self.send_runs(&routes);
            if drained {
                return;
            }
        }
        self.io.ready.push_back(Work::Udp(listener));
    }

    /// Sends each run of consecutive datagrams of one flow with one call.
    fn send_runs(&mut self, routes: &[(FlowId, usize)]) {
        let mut start = 0;
        while start < routes.len() {
            let id = routes[start].0;
            let end = start + routes[start..].iter().take_while(|(f, _)| *f == id).count();
            let payloads: Vec<&[u8]> = routes[start..end]
                .iter()
                .map(|&(_, i)| self.io.batch.get(i).data)
                .collect();
            if let Some(flow) = self.engine.flows().get(id) {
                let mut sent = 0;
                while sent < payloads.len() {
                    match send_many(&flow.handle, &payloads[sent..], None, None) {
                        Ok(n) => {
                            let bytes: usize =
                                payloads[sent..sent + n].iter().map(|p| p.len()).sum();
                            flow.tally.datagrams_in(n as u64, bytes as u64);
                            sent += n;
                        }
                        Err(e) => {
                            if e.kind() != io::ErrorKind::WouldBlock {
                                debug!(endpoint = %flow.endpoint, error = %e, "send to endpoint failed");
                            }
                            break;
                        }
                    }
                }
            }
            start = end;
        }
    }

    /// Forwards replies waiting on a flow's socket back to its client.
    pub(crate) fn udp_from_backend(&mut self, id: SlotId, now: Instant) {
        if self.io.udp_paused {
            return;
        }
        for _ in 0..ROUNDS {
            let Some(flow) = self.engine.flows().get(id) else {
                return;
            };
            let drained = match self.io.batch.recv(&flow.handle) {
                Ok(0) => return,
                Ok(n) => n < self.io.batch.capacity(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(endpoint = %flow.endpoint, error = %e, "receive from endpoint failed");
                    self.engine.flow_failed(&mut self.io, id);
                    return;
                }
            };
            let Some(listener) = self.engine.listener_for(&flow.listener) else {
                return;
            };
            let payloads: Vec<&[u8]> = (0..self.io.batch.len())
                .map(|i| self.io.batch.get(i))
                .filter(|d| !d.truncated)
                .map(|d| d.data)
                .collect();
            let (client, local) = (flow.key.client, flow.key.local.ip());
            let mut sent = 0;
            while sent < payloads.len() {
                match send_many(listener, &payloads[sent..], Some(client), Some(local)) {
                    Ok(n) => {
                        let bytes: usize = payloads[sent..sent + n].iter().map(|p| p.len()).sum();
                        flow.tally.datagrams_out(n as u64, bytes as u64);
                        sent += n;
                    }
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            debug!(%client, error = %e, "reply to client failed");
                        }
                        break;
                    }
                }
            }
            self.engine.flows_mut().replied(id, now);
            if drained {
                return;
            }
        }
        self.io.ready.push_back(Work::Replies(id));
    }
}
