//! UDP forwarding: client datagrams arrive on the listener in batches, each is mapped to its
//! flow (created on the first datagram: pick an endpoint, open a socket connected to it), and
//! consecutive datagrams of one flow leave in one `sendmmsg`. Replies arrive on the flow's
//! socket and go back through the listener to the client, from the exact local address the
//! client sent to (reverse translation), also when the listener is bound to a wildcard.
//!
//! Before mapping a batch, the flow table is synced with the current snapshot, so a flow whose
//! endpoint stopped being eligible is gone before its client's next datagram is routed.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use rustix::event::epoll;
use socket2::Socket;
use svcproxy_core::{FlowId, FlowKey, Protocol, ServicePortKey, SlotId, Snapshot};
use svcproxy_sys::{connect, send_many};
use tracing::debug;

use crate::token::{Kind, Token, watch};
use crate::worker::{Work, Worker};

/// Batches taken from one socket before other work gets a turn.
const ROUNDS: usize = 8;

impl Worker {
    /// Forwards datagrams waiting on a UDP listener.
    pub(crate) fn udp_from_clients(&mut self, listener: SlotId, now: Instant) {
        let mut routes: Vec<(FlowId, usize)> = Vec::with_capacity(self.batch.capacity());
        for _ in 0..ROUNDS {
            let Some(l) = self.listener_slots.get(listener) else {
                return;
            };
            let key = l.key;
            // A batch smaller than the buffers means the socket is empty: the next datagram
            // brings a new edge, so there is no need to ask again.
            let drained = match self.batch.recv(&l.socket) {
                Ok(0) => return,
                Ok(n) => n < self.batch.capacity(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(%key, error = %e, "receive failed");
                    return;
                }
            };
            let snapshot = self.ctx.table().load_full();
            self.flows.sync(&snapshot, now);
            routes.clear();
            for i in 0..self.batch.len() {
                let d = self.batch.get(i);
                let Some(peer) = d.peer else { continue };
                if d.truncated {
                    continue;
                }
                let local = SocketAddr::new(d.local.unwrap_or(key.addr.ip()), key.addr.port());
                let flow_key = FlowKey {
                    client: peer,
                    local,
                };
                let id = match self.flows.lookup(&flow_key, now) {
                    Some(id) => Some(id),
                    None => self.new_flow(flow_key, key, &snapshot, now),
                };
                if let Some(id) = id {
                    routes.push((id, i));
                }
            }
            self.send_runs(&routes);
            if drained {
                return;
            }
        }
        self.ready.push_back(Work::Udp(listener));
    }

    /// Sends each run of consecutive datagrams of one flow with one call.
    fn send_runs(&mut self, routes: &[(FlowId, usize)]) {
        let mut start = 0;
        while start < routes.len() {
            let id = routes[start].0;
            let end = start + routes[start..].iter().take_while(|(f, _)| *f == id).count();
            let payloads: Vec<&[u8]> = routes[start..end]
                .iter()
                .map(|&(_, i)| self.batch.get(i).data)
                .collect();
            if let Some(flow) = self.flows.get(id) {
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

    /// Starts a flow: pick an endpoint, open a socket connected to it, watch it for replies.
    fn new_flow(
        &mut self,
        key: FlowKey,
        listener: ServicePortKey,
        snapshot: &Snapshot,
        now: Instant,
    ) -> Option<FlowId> {
        let config = self.ctx.config();
        let (preserve, max_flows) = (config.preserve_client_ip, config.max_udp_flows);
        let source = preserve.then_some(key.client);
        let epoll = &self.epoll;
        let opened = self
            .flows
            .open(key, listener, snapshot, now, max_flows, |id, endpoint| {
                let socket = connect(endpoint, Protocol::Udp, source, preserve)?;
                let flags = epoll::EventFlags::IN | epoll::EventFlags::ET;
                watch(epoll, &socket, Token::new(Kind::Flow, id), flags)?;
                Ok::<Socket, io::Error>(socket)
            });
        opened.unwrap_or_else(|(endpoint, e)| {
            debug!(%endpoint, error = %e, "cannot open flow");
            None
        })
    }

    /// Forwards replies waiting on a flow's socket back to its client.
    pub(crate) fn udp_from_backend(&mut self, id: FlowId, now: Instant) {
        for _ in 0..ROUNDS {
            let Some(flow) = self.flows.get(id) else {
                return;
            };
            let drained = match self.batch.recv(&flow.handle) {
                Ok(0) => return,
                Ok(n) => n < self.batch.capacity(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Typically ECONNREFUSED: the endpoint's port is closed. End the flow; the
                    // client's next datagram picks an endpoint again.
                    debug!(endpoint = %flow.endpoint, error = %e, "flow failed");
                    flow.tally.connect_error();
                    self.flows.remove(id);
                    return;
                }
            };
            let listener = self
                .listeners
                .get(&flow.listener)
                .and_then(|l| self.listener_slots.get(*l));
            let Some(listener) = listener else {
                return;
            };
            let payloads: Vec<&[u8]> = (0..self.batch.len())
                .map(|i| self.batch.get(i))
                .filter(|d| !d.truncated)
                .map(|d| d.data)
                .collect();
            let (client, local) = (flow.key.client, flow.key.local.ip());
            let mut sent = 0;
            while sent < payloads.len() {
                match send_many(
                    &listener.socket,
                    &payloads[sent..],
                    Some(client),
                    Some(local),
                ) {
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
            self.flows.touch(id, now);
            if drained {
                return;
            }
        }
        self.ready.push_back(Work::Replies(id));
    }
}
