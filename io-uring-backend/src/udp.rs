//! UDP on the ring. Each UDP listener runs a multishot `recvmsg` into the worker's UDP buffer
//! ring, which reports each datagram's sender and the local address it was sent to. The
//! datagram is mapped to its flow (core flow table; a new flow picks an endpoint and opens a
//! socket connected to it, with a multishot receive for replies) and sent on the flow's socket
//! straight from the buffer. Replies are sent back with `sendmsg` through the listener, from
//! the exact local address the client used. Buffers return to the ring when their send has
//! completed; a socket that finds the ring empty waits until one does.
//!
//! Flow and listener sockets count the operations queued on them, and one the engine has
//! closed is dropped with its last one ([`crate::inflight`]).
//!
//! The flow table is synced with the snapshot before each datagram is mapped, so a flow whose
//! endpoint stopped being eligible is gone before its client's next datagram.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

use io_uring::types::RecvMsgOut;
use socket2::Socket;
use svcproxy_core::engine::ListenerId;
use svcproxy_core::{FlowId, Protocol, SlotId};
use svcproxy_sys::ancillary::{parse_destination, parse_sockaddr};
use svcproxy_sys::connect;
use tracing::debug;

use crate::inflight::InFlight;
use crate::ring::{Completion, Group, Span, recvmsg_layout};
use crate::token::{self, Op};
use crate::worker::{Io, Worker};

/// A flow's socket, with its multishot receive and its sends in flight.
pub(crate) struct FlowSocket {
    socket: Socket,
    id: FlowId,
    ops: InFlight,
}

impl AsMut<InFlight> for FlowSocket {
    fn as_mut(&mut self) -> &mut InFlight {
        &mut self.ops
    }
}

impl AsFd for FlowSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl FlowSocket {
    /// No receive is in flight on it.
    pub(crate) fn quiet(&self) -> bool {
        !self.ops.armed
    }
}

/// Which socket a datagram send is queued on.
#[derive(Debug, Clone, Copy)]
enum Sender {
    Flow(FlowId),
    Listener(ListenerId),
}

/// A datagram send in flight: the buffer it is sent from and the socket it is queued on.
pub(crate) struct UdpOp {
    bid: u16,
    on: Sender,
}

impl Io {
    pub(crate) fn start_flow(
        &mut self,
        id: FlowId,
        endpoint: SocketAddr,
        source: Option<SocketAddr>,
    ) -> io::Result<FlowSocket> {
        let socket = connect(endpoint, Protocol::Udp, source, source.is_some())?;
        Ok(self.continue_flow(id, socket, true))
    }

    /// A flow on `socket` (connected to its endpoint), receiving its replies when
    /// `receiving` (and receiving is not paused).
    pub(crate) fn continue_flow(
        &mut self,
        id: FlowId,
        socket: Socket,
        receiving: bool,
    ) -> FlowSocket {
        let mut flow = FlowSocket {
            socket,
            id,
            ops: InFlight::default(),
        };
        if receiving {
            self.arm_flow(&mut flow);
        }
        flow
    }

    /// Stops (`false`, once the cancelled receive ends) or resumes receiving a flow's replies.
    pub(crate) fn flow_receiving(&mut self, flow: &mut FlowSocket, on: bool) {
        if on {
            self.arm_flow(flow);
        } else if flow.ops.armed {
            self.cancel(&flow.socket);
        }
    }

    fn arm_flow(&mut self, flow: &mut FlowSocket) {
        if flow.ops.armed || self.udp_paused {
            return;
        }
        let ud = token::user_data(Op::FlowRecv, flow.id);
        if self
            .ring
            .recv_multi(flow.socket.as_fd(), Group::Udp, ud)
            .is_ok()
        {
            flow.ops.armed = true;
        }
    }

    /// Closes the socket of an ended flow once nothing is queued on it.
    pub(crate) fn end_flow(&mut self, flow: FlowSocket) {
        if flow.ops.armed {
            self.cancel(&flow.socket);
        }
        self.closing_flows.hold(flow.id, flow);
    }

    /// Queues a send of `len` bytes of UDP buffer `bid` from `offset` on `socket`: to the
    /// connected peer, or to `to` from local address `from`. False (nothing queued) on failure.
    fn queue_send(
        &mut self,
        socket: BorrowedFd<'_>,
        on: Sender,
        bid: u16,
        (offset, len): (usize, usize),
        to: Option<(SocketAddr, std::net::IpAddr)>,
    ) -> bool {
        let span = Span {
            group: Group::Udp,
            bid,
            offset,
            len,
        };
        let op = self.udp_ops.insert(UdpOp { bid, on });
        let ud = token::user_data(Op::UdpSend, op);
        let queued = match to {
            Some((client, local)) => self.ring.sendmsg(socket, span, client, local, ud),
            None => self.ring.send(socket, span, false, ud),
        };
        if queued.is_err() {
            self.udp_ops.remove(op);
        }
        queued.is_ok()
    }
}

impl Worker {
    /// A completion of a UDP listener's multishot `recvmsg`.
    pub(crate) fn on_listener_recv(&mut self, id: ListenerId, c: Completion, now: Instant) {
        if let Some(bid) = c.buffer() {
            let forwarded = c.result > 0 && self.client_datagram(id, bid, c.result as usize, now);
            if !forwarded {
                self.io.ring.recycle(Group::Udp, bid);
            }
        } else if c.result == -libc::ENOBUFS
            && let Some(l) = self.engine.listener_mut(id)
        {
            l.io.starved = true;
            self.io.udp_starved.push((Op::ListenerRecv, id));
        }
        if !c.more() {
            self.listener_disarmed(id);
        }
    }

    /// Forwards a client datagram held in buffer `bid`; false if it was dropped.
    fn client_datagram(
        &mut self,
        listener: ListenerId,
        bid: u16,
        len: usize,
        now: Instant,
    ) -> bool {
        let layout = recvmsg_layout();
        let buffer = self.io.ring.bytes(Group::Udp, bid, len);
        let Ok(out) = RecvMsgOut::parse(buffer, &layout) else {
            return false;
        };
        if out.is_payload_truncated() || out.is_name_data_truncated() {
            return false;
        }
        let Some(peer) = parse_sockaddr(out.name_data()) else {
            return false;
        };
        let to = parse_destination(out.control_data());
        let payload = out.payload_data();
        let span = (
            payload.as_ptr() as usize - buffer.as_ptr() as usize,
            payload.len(),
        );
        let snapshot = self.engine.udp_snapshot(now);
        let Some(flow_id) = self
            .engine
            .flow_for(&mut self.io, &snapshot, listener, peer, to, now)
        else {
            return false;
        };
        let Some(flow) = self.engine.flows_mut().get_mut(flow_id) else {
            return false;
        };
        let fd = flow.handle.socket.as_fd();
        if !self
            .io
            .queue_send(fd, Sender::Flow(flow_id), bid, span, None)
        {
            return false;
        }
        flow.handle.ops.sends += 1;
        flow.tally.datagrams_in(1, span.1 as u64);
        true
    }

    /// A completion of a flow socket's multishot receive: a reply to send back.
    pub(crate) fn on_flow_recv(&mut self, id: FlowId, c: Completion, now: Instant) {
        if self.engine.flows().get(id).is_none() {
            // The flow ended; its socket waits for its last operations.
            if let Some(bid) = c.buffer() {
                self.io.ring.recycle(Group::Udp, bid);
                self.io.recycled = true;
            }
            if !c.more() {
                self.io.closing_flows.ended(id, true);
            }
            return;
        }
        if let Some(bid) = c.buffer() {
            if !(c.result > 0 && self.reply(id, bid, c.result as usize, now)) {
                self.io.ring.recycle(Group::Udp, bid);
                self.io.recycled = true;
            }
        } else if c.result == -libc::ENOBUFS {
            self.io.udp_starved.push((Op::FlowRecv, id));
        } else if c.result < 0 && c.result != -libc::ECANCELED {
            // Typically ECONNREFUSED: the endpoint's port is closed.
            if let Some(flow) = self.engine.flows_mut().get_mut(id) {
                flow.handle.ops.armed = c.more();
            }
            self.engine.flow_failed(&mut self.io, id);
            return;
        }
        if !c.more()
            && let Some(flow) = self.engine.flows_mut().get_mut(id)
        {
            flow.handle.ops.armed = false;
            if c.result != -libc::ENOBUFS {
                self.io.arm_flow(&mut flow.handle);
            }
        }
    }

    /// Sends a reply held in buffer `bid` back to the flow's client; false if dropped.
    fn reply(&mut self, id: FlowId, bid: u16, len: usize, now: Instant) -> bool {
        let Some(flow) = self.engine.flows().get(id) else {
            return false;
        };
        let Some(listener) = self.engine.listener_id(&flow.listener) else {
            return false;
        };
        let (client, local) = (flow.key.client, flow.key.local.ip());
        let Some(l) = self.engine.listener_mut(listener) else {
            return false;
        };
        let fd = l.io.socket.as_fd();
        if !self.io.queue_send(
            fd,
            Sender::Listener(listener),
            bid,
            (0, len),
            Some((client, local)),
        ) {
            return false;
        }
        l.io.ops.sends += 1;
        if let Some(flow) = self.engine.flows().get(id) {
            flow.tally.datagrams_out(1, len as u64);
        }
        self.engine.flows_mut().replied(id, now);
        true
    }

    /// A datagram send completed: its buffer goes back to the ring, its socket counts it done.
    pub(crate) fn on_udp_send(&mut self, id: SlotId, c: Completion) {
        if c.result < 0 && c.result != -libc::ECANCELED {
            debug!(error = c.result, "datagram send failed");
        }
        let Some(op) = self.io.udp_ops.remove(id) else {
            return;
        };
        self.io.ring.recycle(Group::Udp, op.bid);
        self.io.recycled = true;
        match op.on {
            Sender::Flow(flow) => match self.engine.flows_mut().get_mut(flow) {
                Some(f) => f.handle.ops.sends -= 1,
                None => self.io.closing_flows.ended(flow, false),
            },
            Sender::Listener(l) => match self.engine.listener_mut(l) {
                Some(l) => l.io.ops.sends -= 1,
                None => self.io.closing_listeners.ended(l, false),
            },
        }
    }

    /// Re-arms UDP receives that found the buffer ring empty.
    pub(crate) fn wake_udp_starved(&mut self) {
        for (op, id) in std::mem::take(&mut self.io.udp_starved) {
            match op {
                Op::ListenerRecv => {
                    if let Some(l) = self.engine.listener_mut(id) {
                        l.io.starved = false;
                        self.io.arm_listener(id, &mut l.io);
                    }
                }
                _ => {
                    if let Some(flow) = self.engine.flows_mut().get_mut(id) {
                        self.io.arm_flow(&mut flow.handle);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;
    use std::time::Duration;

    use svcproxy_core::{Control, ProxyConfig, Table, WorkerContext};
    use svcproxy_sys::Waker;

    use super::*;

    fn worker() -> Option<Worker> {
        if let Err(why) = crate::probe() {
            assert!(std::env::var_os("CI").is_none(), "no io_uring in CI: {why}");
            println!("skipped: io_uring is not available ({why})");
            return None;
        }
        let control = Arc::new(Control::new(
            Arc::new(Table::default()),
            ProxyConfig::default(),
            1,
        ));
        let waker = Arc::new(Waker::new().unwrap());
        Some(Worker::new(WorkerContext { index: 0, control }, waker).unwrap())
    }

    /// Waits for a completion of `op` for which `done` holds (others are dropped).
    fn complete(w: &mut Worker, op: Op, done: impl Fn(&Completion) -> bool) -> Completion {
        let mut completions = Vec::new();
        for _ in 0..100 {
            w.io.ring
                .submit_and_wait(Some(Duration::from_millis(100)))
                .unwrap();
            w.io.ring.completions(&mut completions);
            if let Some(i) = completions
                .iter()
                .position(|c| token::op(c.tag) == Some(op) && done(c))
            {
                return completions.swap_remove(i);
            }
        }
        panic!("no completion of {op:?}");
    }

    /// What descriptor `fd` is now (`socket:[inode]`), if it is open. Tests run in parallel
    /// threads, so a closed number can be reused at once: compare identities, not numbers.
    fn identity(fd: i32) -> Option<std::path::PathBuf> {
        std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()
    }

    /// A flow whose multishot receive has ended, so that nothing but what the test queues
    /// holds its socket; with a buffer of ours holding `payload`, sent by the endpoint.
    fn quiet_flow(w: &mut Worker, endpoint: &UdpSocket, payload: &[u8]) -> (FlowSocket, u16) {
        let id = FlowId::from_u64(7);
        let mut flow =
            w.io.start_flow(id, endpoint.local_addr().unwrap(), None)
                .unwrap();
        let flow_addr = flow.socket.local_addr().unwrap().as_socket().unwrap();
        endpoint.send_to(payload, flow_addr).unwrap();
        let reply = complete(w, Op::FlowRecv, |c| c.result > 0);
        w.io.cancel(&flow.socket);
        complete(w, Op::FlowRecv, |c| !c.more());
        flow.ops.armed = false;
        (flow, reply.buffer().unwrap())
    }

    #[test]
    fn a_flow_socket_with_a_send_queued_outlives_its_flow() {
        let Some(mut w) = worker() else { return };
        let endpoint = UdpSocket::bind("127.0.0.1:0").unwrap();
        endpoint
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (mut flow, bid) = quiet_flow(&mut w, &endpoint, b"ping");
        let (id, fd) = (flow.id, flow.socket.as_raw_fd());
        let socket = identity(fd);
        let flow_addr = flow.socket.local_addr().unwrap().as_socket().unwrap();
        // A send is queued, not yet submitted, when the flow ends.
        assert!(w.io.queue_send(flow.socket.as_fd(), Sender::Flow(id), bid, (0, 4), None));
        flow.ops.sends += 1;
        w.io.end_flow(flow);
        assert_eq!(identity(fd), socket, "closed under a queued send");
        assert!(w.io.closing_flows.holds(id));
        // The send goes out through the flow's own socket; then the socket is closed.
        let send = complete(&mut w, Op::UdpSend, |_| true);
        assert_eq!(send.result, 4, "the send itself succeeded");
        w.on_udp_send(token::id(send.tag), send);
        let mut got = [0u8; 16];
        let (n, from) = endpoint.recv_from(&mut got).unwrap();
        assert_eq!((&got[..n], from), (&b"ping"[..], flow_addr));
        assert!(
            w.io.closing_flows.is_empty(),
            "closed with its last operation"
        );
        assert_ne!(identity(fd), socket, "closed");
        assert_eq!(
            w.io.ring.in_flight(),
            0,
            "each operation ended with its completion"
        );
    }

    #[test]
    fn a_flow_socket_with_nothing_queued_closes_at_once() {
        let Some(mut w) = worker() else { return };
        let endpoint = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (flow, bid) = quiet_flow(&mut w, &endpoint, b"ping");
        w.io.ring.recycle(Group::Udp, bid);
        let fd = flow.socket.as_raw_fd();
        let socket = identity(fd);
        w.io.end_flow(flow);
        assert_ne!(identity(fd), socket, "closed at once");
        assert!(w.io.closing_flows.is_empty());
    }
}
