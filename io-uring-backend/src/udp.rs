//! UDP on the ring. Each UDP listener runs a multishot `recvmsg` into the worker's UDP buffer
//! ring, which reports each datagram's sender and the local address it was sent to. The
//! datagram is mapped to its flow (core flow table; a new flow picks an endpoint and opens a
//! socket connected to it, with a multishot receive for replies) and sent on the flow's socket
//! straight from the buffer. Replies are sent back with `sendmsg` through the listener, from
//! the exact local address the client used. Buffers return to the ring when their send has
//! completed; a socket that finds the ring empty waits until one does.
//!
//! The flow table is synced with the snapshot before each datagram is mapped, so a flow whose
//! endpoint stopped being eligible is gone before its client's next datagram.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Instant;

use io_uring::types::RecvMsgOut;
use socket2::Socket;
use svcproxy_core::{FlowId, FlowKey, Protocol, ServicePortKey, SlotId, Snapshot};
use svcproxy_sys::ancillary::{parse_pktinfo, parse_sockaddr};
use svcproxy_sys::connect;
use tracing::debug;

use crate::ring::{Completion, RECVMSG_CONTROL, RECVMSG_NAME};
use crate::token::{self, Op};
use crate::worker::Worker;

/// A flow's socket, and whether its multishot receive is in flight.
pub(crate) struct FlowSocket {
    socket: Socket,
    id: FlowId,
    armed: bool,
}

/// A datagram send in flight: the buffer it is sent from.
pub(crate) struct UdpOp {
    bid: u16,
}

/// The layout a multishot `recvmsg` result is parsed with (only the two lengths matter).
fn recvmsg_layout() -> libc::msghdr {
    let mut h = crate::ring::zeroed_msghdr();
    h.msg_namelen = RECVMSG_NAME as libc::socklen_t;
    h.msg_controllen = RECVMSG_CONTROL;
    h
}

impl Worker {
    /// A completion of a UDP listener's multishot `recvmsg`.
    pub(crate) fn on_listener_recv(&mut self, id: SlotId, c: Completion, now: Instant) {
        if let Some(bid) = c.buffer() {
            let forwarded = c.result > 0 && self.client_datagram(id, bid, c.result as usize, now);
            if !forwarded {
                self.udp_buffers.recycle(bid);
            }
        } else if c.result == -libc::ENOBUFS
            && let Some(l) = self.listener_slots.get_mut(id)
        {
            l.starved = true;
            self.udp_starved.push((Op::ListenerRecv, id));
        }
        if !c.more() {
            self.listener_disarmed(id);
        }
    }

    /// Forwards a client datagram held in buffer `bid`; false if it was dropped.
    fn client_datagram(&mut self, listener_id: SlotId, bid: u16, len: usize, now: Instant) -> bool {
        let Some(listener) = self.listener_slots.get(listener_id).map(|l| l.key) else {
            return false;
        };
        let layout = recvmsg_layout();
        let buffer = self.udp_buffers.bytes(bid, len);
        let Ok(out) = RecvMsgOut::parse(buffer, &layout) else {
            return false;
        };
        if out.is_payload_truncated() || out.is_name_data_truncated() {
            return false;
        }
        let Some(peer) = parse_sockaddr(out.name_data()) else {
            return false;
        };
        let local = parse_pktinfo(out.control_data()).unwrap_or(listener.addr.ip());
        let payload = out.payload_data();
        let offset = payload.as_ptr() as usize - buffer.as_ptr() as usize;
        let payload_len = payload.len();
        let key = FlowKey {
            client: peer,
            local: SocketAddr::new(local, listener.addr.port()),
        };
        let snapshot = self.ctx.table().load_full();
        self.flows.sync(&snapshot, now);
        let flow_id = match self.flows.lookup(&key, now) {
            Some(id) => id,
            None => match self.new_flow(key, listener, &snapshot, now) {
                Some(id) => id,
                None => return false,
            },
        };
        let Some(flow) = self.flows.get(flow_id) else {
            return false;
        };
        let fd = flow.handle.socket.as_raw_fd();
        let span = self.udp_buffers.span(bid, offset, payload_len);
        let op = self.udp_ops.insert(UdpOp { bid });
        if self
            .ring
            .send_bytes(fd, span, token::user_data(Op::UdpSend, op))
            .is_err()
        {
            self.udp_ops.remove(op);
            return false;
        }
        flow.tally.datagrams_in(1, payload_len as u64);
        true
    }

    /// Starts a flow: pick an endpoint, open a socket connected to it, receive its replies.
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
        let opened = self
            .flows
            .open(key, listener, snapshot, now, max_flows, |id, endpoint| {
                let socket = connect(endpoint, Protocol::Udp, source, preserve)?;
                Ok::<_, io::Error>(FlowSocket {
                    socket,
                    id,
                    armed: false,
                })
            });
        let id = opened.unwrap_or_else(|(endpoint, e)| {
            debug!(%endpoint, error = %e, "cannot open flow");
            None
        })?;
        self.arm_flow(id);
        Some(id)
    }

    fn arm_flow(&mut self, id: FlowId) {
        let group = self.udp_buffers.group();
        let Some(flow) = self.flows.get(id) else {
            return;
        };
        if flow.handle.armed {
            return;
        }
        let fd = flow.handle.socket.as_raw_fd();
        if self
            .ring
            .recv_multi(fd, group, token::user_data(Op::FlowRecv, id))
            .is_ok()
            && let Some(flow) = self.flows.get_mut(id)
        {
            flow.handle.armed = true;
        }
    }

    /// A completion of a flow socket's multishot receive: a reply to send back.
    pub(crate) fn on_flow_recv(&mut self, id: FlowId, c: Completion, now: Instant) {
        if self.flows.get(id).is_none() {
            // The flow ended; its socket waits for this last completion.
            if let Some(bid) = c.buffer() {
                self.udp_buffers.recycle(bid);
            }
            if !c.more() {
                self.closing_flows.remove(&id);
            }
            return;
        }
        let mut keep_armed = c.more();
        if let Some(bid) = c.buffer() {
            if !(c.result > 0 && self.reply(id, bid, c.result as usize, now)) {
                self.udp_buffers.recycle(bid);
            }
        } else if c.result == -libc::ENOBUFS {
            self.udp_starved.push((Op::FlowRecv, id));
            keep_armed = false;
        } else if c.result < 0 && c.result != -libc::ECANCELED {
            // Typically ECONNREFUSED: the endpoint's port is closed. End the flow; the
            // client's next datagram picks an endpoint again.
            if let Some(mut flow) = self.flows.remove(id) {
                debug!(endpoint = %flow.endpoint, error = c.result, "flow failed");
                flow.tally.connect_error();
                flow.handle.armed = c.more();
                self.close_flow_socket(flow.handle);
            }
            return;
        }
        if let Some(flow) = self.flows.get_mut(id) {
            flow.handle.armed = keep_armed;
        }
        if !c.more() && c.result != -libc::ENOBUFS {
            self.arm_flow(id);
        }
    }

    /// Sends a reply held in buffer `bid` back to the flow's client; false if dropped.
    fn reply(&mut self, id: FlowId, bid: u16, len: usize, now: Instant) -> bool {
        let Some(flow) = self.flows.get(id) else {
            return false;
        };
        let Some(listener) = self.listener_socket(&flow.listener) else {
            return false;
        };
        let fd = listener.as_raw_fd();
        let (client, local) = (flow.key.client, flow.key.local.ip());
        let span = self.udp_buffers.span(bid, 0, len);
        let op = self.udp_ops.insert(UdpOp { bid });
        if self
            .ring
            .sendmsg(fd, span, client, local, token::user_data(Op::UdpSend, op))
            .is_err()
        {
            self.udp_ops.remove(op);
            return false;
        }
        flow.tally.datagrams_out(1, len as u64);
        self.flows.touch(id, now);
        true
    }

    /// A datagram send completed: its buffer goes back to the ring.
    pub(crate) fn on_udp_send(&mut self, id: SlotId, c: Completion) {
        if c.result < 0 && c.result != -libc::ECANCELED {
            debug!(error = c.result, "datagram send failed");
        }
        if let Some(op) = self.udp_ops.remove(id) {
            self.udp_buffers.recycle(op.bid);
            self.wake_udp_starved();
        }
    }

    /// Re-arms UDP receives that found the buffer ring empty.
    fn wake_udp_starved(&mut self) {
        for (op, id) in std::mem::take(&mut self.udp_starved) {
            match op {
                Op::ListenerRecv => {
                    if let Some(l) = self.listener_slots.get_mut(id) {
                        l.starved = false;
                    }
                    self.arm_listener(id);
                }
                _ => self.arm_flow(id),
            }
        }
    }

    /// Closes the socket of an ended flow once its receive in flight has ended.
    pub(crate) fn close_flow_socket(&mut self, handle: FlowSocket) {
        if handle.armed {
            let fd = handle.socket.as_raw_fd();
            let _ = self
                .ring
                .cancel_fd(fd, token::user_data(Op::Ignore, handle.id));
            self.closing_flows.insert(handle.id, handle.socket);
        }
    }
}
