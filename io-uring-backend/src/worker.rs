//! One worker: the ring loop that drives the core's connection engine. [`Io`] is the driver
//! (the engine's commands become ring operations); the loop turns completions into the
//! engine's events and waits for the next completion or the engine's next deadline, whichever
//! comes first. TCP forwarding is in [`crate::tcp`], UDP in [`crate::udp`].
//!
//! What the engine has closed may still have operations in flight: such connections,
//! listeners and flow sockets wait in `Io`'s closing maps, their operations cancelled, and are
//! dropped with their last completion, so no descriptor is closed under a queued operation and
//! no completion reaches a reused slot.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use socket2::Socket;
use svcproxy_core::config::Forwarding;
use svcproxy_core::engine::{Admission, ConnId, ListenerId};
use svcproxy_core::session::Direction;
use svcproxy_core::{
    Control, Engine, FlowId, Protocol, ServicePortKey, SlotId, Slots, WorkerContext,
};
use svcproxy_sys::socket::is_resource_exhaustion;
use svcproxy_sys::stream::Buffers;
use svcproxy_sys::{ListenOptions, Waker, adopt_flow, listen_or_adopt};
use tracing::{debug, warn};

use crate::inflight::{Closing, InFlight};
use crate::ring::{Completion, Group, Ring, RingOptions};
use crate::tcp::Conn;
use crate::token::{self, Op};
use crate::udp::{FlowSocket, UdpOp};

/// UDP buffers per worker.
const UDP_BUFFERS: u16 = 256;
/// A UDP buffer holds the largest datagram plus the recvmsg header, address and control data.
const UDP_BUFFER_SIZE: usize = 65_536 + 512;

pub(crate) struct Listener {
    pub(crate) key: ServicePortKey,
    pub(crate) socket: Socket,
    /// Its accept or multishot `recvmsg`, and (UDP) the replies queued on it.
    pub(crate) ops: InFlight,
    /// A UDP listener waiting for buffers to come back to the ring.
    pub(crate) starved: bool,
}

impl AsMut<InFlight> for Listener {
    fn as_mut(&mut self) -> &mut InFlight {
        &mut self.ops
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// The driver: the ring, its buffers, and what waits for its last completions.
pub(crate) struct Io {
    pub(crate) ring: Ring,
    /// The pump's pipes and copy buffer.
    pub(crate) buffers: Buffers,
    pub(crate) forwarding: Forwarding,
    /// The size of a TCP buffer: a receive that fills one marks a stream.
    pub(crate) buffer_size: u32,
    /// Pumped directions that stopped at their byte budget, to pump again after this round of
    /// completions.
    pub(crate) again: Vec<(ConnId, Direction)>,
    pub(crate) udp_ops: Slots<UdpOp>,
    /// Connections that found the TCP buffer ring empty.
    pub(crate) starved: Vec<ConnId>,
    /// UDP sockets that found the UDP buffer ring empty: listeners and flows.
    pub(crate) udp_starved: Vec<(Op, SlotId)>,
    /// Buffers went back to a ring since starved receives were last re-armed.
    pub(crate) recycled: bool,
    /// Closed by the engine, waiting for their last completions.
    pub(crate) closing_conns: HashMap<ConnId, (Conn, Admission)>,
    pub(crate) closing_listeners: Closing<Listener>,
    pub(crate) closing_flows: Closing<FlowSocket>,
    /// A descriptor held in reserve: multishot accept can take every descriptor before a
    /// backend socket is opened, so when none is left one waiting client is served with this
    /// one (then the next as connections end), instead of all waiting forever.
    pub(crate) reserve: Option<std::fs::File>,
    pub(crate) listen_options: ListenOptions,
    /// The proxy's connection budget, read to choose how listeners accept.
    control: Arc<Control>,
    /// UDP receiving is paused for a handover: no multishot receive is armed on a UDP
    /// listener or flow, and datagrams wait in the sockets.
    pub(crate) udp_paused: bool,
}

pub(crate) struct Worker {
    pub(crate) io: Io,
    pub(crate) engine: Engine<Io>,
    waker: Arc<Waker>,
    /// The timeout operation in flight for the engine's next deadline: when it fires, and its
    /// sequence number (only the latest one's completion counts).
    armed: Option<(Instant, u64)>,
    armed_seq: u64,
}

impl Io {
    /// Nothing closed is still waiting for a completion.
    fn settled(&self) -> bool {
        self.closing_conns.is_empty()
            && self.closing_listeners.is_empty()
            && self.closing_flows.is_empty()
    }

    /// Whether a TCP listener may accept with a multishot accept. One takes a whole accept
    /// queue at once (each client a descriptor, waiting for a budget unit if none is free), so
    /// it runs only while a full queue fits in the budget; closer to the budget, one client is
    /// accepted at a time and the rest wait in the kernel's queue, holding no descriptor.
    fn accept_many(&self) -> bool {
        let backlog = usize::try_from(self.listen_options.backlog).unwrap_or(0);
        self.control.has_room_for(backlog)
    }

    /// Starts the listener's accept (or multishot `recvmsg`) if it is not running.
    pub(crate) fn arm_listener(&mut self, id: ListenerId, l: &mut Listener) {
        if l.ops.armed || l.starved || (self.udp_paused && l.key.protocol == Protocol::Udp) {
            return;
        }
        let many = self.accept_many();
        let fd = l.socket.as_fd();
        let result = match l.key.protocol {
            Protocol::Tcp => self.ring.accept(fd, many, token::user_data(Op::Accept, id)),
            Protocol::Udp => {
                self.ring
                    .recvmsg_multi(fd, Group::Udp, token::user_data(Op::ListenerRecv, id))
            }
        };
        match result {
            Ok(()) => l.ops.armed = true,
            Err(e) => warn!(key = %l.key, error = %e, "cannot arm listener"),
        }
    }

    /// Cancels every operation on `socket`.
    pub(crate) fn cancel(&mut self, socket: &impl AsFd) {
        let _ = self.ring.cancel_fd(socket.as_fd());
    }
}

impl Worker {
    pub(crate) fn new(ctx: WorkerContext, waker: Arc<Waker>) -> io::Result<Self> {
        let config = *ctx.config();
        let ring = Ring::new(RingOptions {
            entries: config.io_uring.entries,
            sqpoll: config.io_uring.sqpoll,
            tcp_buffers: (
                config.io_uring.buffers,
                config.io_uring.buffer_size as usize,
            ),
            udp_buffers: (UDP_BUFFERS, UDP_BUFFER_SIZE),
        })?;
        Ok(Self {
            io: Io {
                ring,
                buffers: Buffers::new(config.pipe_size),
                forwarding: config.io_uring.forwarding,
                buffer_size: config.io_uring.buffer_size,
                again: Vec::new(),
                udp_ops: Slots::new(),
                starved: Vec::new(),
                udp_starved: Vec::new(),
                recycled: false,
                closing_conns: HashMap::new(),
                closing_listeners: Closing::default(),
                closing_flows: Closing::default(),
                reserve: std::fs::File::open("/dev/null").ok(),
                listen_options: ListenOptions {
                    backlog: config.listen_backlog as i32,
                    ..ListenOptions::default()
                },
                control: ctx.control.clone(),
                udp_paused: false,
            },
            engine: Engine::new(ctx),
            waker,
            armed: None,
            armed_seq: 0,
        })
    }

    pub(crate) fn run(&mut self) -> io::Result<()> {
        self.io.ring.read_eventfd(
            self.waker.as_fd(),
            token::user_data(Op::Wake, SlotId::from_u64(0)),
        )?;
        self.engine.start(&mut self.io, Instant::now());
        let mut completions = Vec::new();
        loop {
            let now = Instant::now();
            self.engine.poll(&mut self.io, now);
            if self.engine.finished() && self.io.settled() {
                return Ok(());
            }
            self.arm_deadline(now)?;
            let again = std::mem::take(&mut self.io.again);
            if again.is_empty() {
                self.io.ring.submit_and_wait(None)?;
            } else {
                self.io.ring.submit()?;
            }
            self.io.ring.completions(&mut completions);
            let now = Instant::now();
            for c in completions.drain(..) {
                self.dispatch(c, now);
            }
            for (id, dir) in again {
                self.pump(id, dir, now);
            }
            if std::mem::take(&mut self.io.recycled) {
                self.wake_starved();
                self.wake_udp_starved();
            }
        }
    }

    /// Keeps a timeout operation in flight for the engine's next deadline, so that the wait
    /// ends by then. A wait with a timeout of its own would arm and cancel a kernel timer on
    /// every wait (about a tenth of the UDP rate with two workers); this one is re-armed only
    /// when the next deadline comes earlier than the armed one (the tick, a connect deadline),
    /// and one that fires early (its timer was cancelled) only costs a wake-up.
    fn arm_deadline(&mut self, now: Instant) -> io::Result<()> {
        let Some(next) = self.engine.next_deadline() else {
            return Ok(());
        };
        if self.armed.is_some_and(|(at, _)| at <= next) {
            return Ok(());
        }
        self.armed_seq += 1;
        let tag = token::user_data(Op::Deadline, SlotId::from_u64(self.armed_seq));
        self.io
            .ring
            .timeout(next.saturating_duration_since(now), tag)?;
        self.armed = Some((next, self.armed_seq));
        Ok(())
    }

    fn dispatch(&mut self, c: Completion, now: Instant) {
        let id = token::id(c.tag);
        match token::op(c.tag) {
            Some(Op::Wake) => {
                let _ = self.io.ring.read_eventfd(self.waker.as_fd(), c.tag);
                self.engine.woken(&mut self.io, now);
            }
            Some(Op::Accept) => self.on_accept(id, c, now),
            Some(op @ (Op::Connect | Op::RecvUp | Op::RecvDown | Op::SendUp | Op::SendDown)) => {
                self.on_conn(op, id, c, now)
            }
            Some(Op::ListenerRecv) => self.on_listener_recv(id, c, now),
            Some(Op::FlowRecv) => self.on_flow_recv(id, c, now),
            Some(Op::UdpSend) => self.on_udp_send(id, c),
            Some(Op::Deadline)
                if self
                    .armed
                    .is_some_and(|(_, seq)| SlotId::from_u64(seq) == id) =>
            {
                self.armed = None;
            }
            Some(Op::Deadline) => {}
            None => {}
        }
    }

    fn on_accept(&mut self, id: ListenerId, mut c: Completion, now: Instant) {
        let client = c.take_accepted();
        if self.engine.listener(id).is_none() {
            // Closed: the client (if any) is dropped, the socket goes with the last completion.
            drop(client);
            if !c.more() {
                self.io.closing_listeners.ended(id, true);
            }
            return;
        }
        match client {
            Some(socket) => match socket.peer_addr().ok().and_then(|a| a.as_socket()) {
                Some(peer) => {
                    self.engine
                        .accepted(&mut self.io, id, Conn::new(socket), peer, now);
                }
                None => svcproxy_sys::reset(socket),
            },
            None if c.result == -libc::ECANCELED => {}
            None => {
                let e = io::Error::from_raw_os_error(-c.result);
                if is_resource_exhaustion(&e) {
                    self.engine
                        .out_of_resources(&mut self.io, "accept", &e, now);
                } else {
                    debug!(error = %e, "accept failed");
                }
            }
        }
        if !c.more() {
            self.listener_disarmed(id);
        }
    }

    /// The listener's multishot operation ended: start it again if it should run.
    pub(crate) fn listener_disarmed(&mut self, id: ListenerId) {
        let accepting = self.engine.may_accept();
        let Some(l) = self.engine.listener_mut(id) else {
            self.io.closing_listeners.ended(id, true);
            return;
        };
        l.io.ops.armed = false;
        if accepting || l.key.protocol == Protocol::Udp {
            self.io.arm_listener(id, &mut l.io);
        }
    }
}

impl svcproxy_core::Driver for Io {
    type Listener = Listener;
    type Conn = Conn;
    type Flow = FlowSocket;

    fn listen(
        &mut self,
        id: ListenerId,
        key: ServicePortKey,
        transparent: bool,
        serving: bool,
        inherited: Option<OwnedFd>,
    ) -> io::Result<Listener> {
        let socket = listen_or_adopt(key, &self.listen_options, transparent, inherited)?;
        let mut l = Listener {
            key,
            socket,
            ops: InFlight::default(),
            starved: false,
        };
        if serving {
            self.arm_listener(id, &mut l);
        }
        Ok(l)
    }

    fn local_addr(&self, conn: &Conn) -> io::Result<SocketAddr> {
        svcproxy_sys::local_addr(&conn.client)
    }

    fn unlisten(&mut self, id: ListenerId, l: Listener) {
        // A TCP listener stops taking connections now (clients get ECONNREFUSED at once), not
        // when its cancelled accept has completed.
        if l.key.protocol == Protocol::Tcp {
            let _ = l.socket.shutdown(std::net::Shutdown::Both);
        }
        if l.ops.armed {
            self.cancel(&l.socket);
        }
        self.closing_listeners.hold(id, l);
    }

    fn accepting(&mut self, id: ListenerId, l: &mut Listener, on: bool) {
        if on {
            self.arm_listener(id, l);
        } else if l.ops.armed {
            // It stays armed until the cancelled accept's last completion.
            self.cancel(&l.socket);
        }
    }

    fn out_of_resources(&mut self) {
        self.buffers.pipes.clear();
    }

    fn connect(
        &mut self,
        id: ConnId,
        conn: &mut Conn,
        to: SocketAddr,
        source: Option<SocketAddr>,
    ) -> Result<(), svcproxy_core::OpenError> {
        self.start_connect(id, conn, to, source)
    }

    fn abort_connect(&mut self, _: ConnId, conn: &mut Conn) -> bool {
        self.cancel_connect(conn);
        false
    }

    fn forward(&mut self, id: ConnId, conn: &mut svcproxy_core::Connection<Conn>) {
        self.start_forwarding(id, conn);
    }

    fn close(
        &mut self,
        closed: Option<(ConnId, Admission)>,
        conn: Conn,
        reset: Option<svcproxy_core::session::Side>,
    ) {
        self.close_conn(closed, conn, reset);
    }

    fn open_flow(
        &mut self,
        id: FlowId,
        endpoint: SocketAddr,
        source: Option<SocketAddr>,
    ) -> io::Result<FlowSocket> {
        self.start_flow(id, endpoint, source)
    }

    fn close_flow(&mut self, flow: FlowSocket) {
        self.end_flow(flow);
    }

    fn adopt_flow(
        &mut self,
        id: FlowId,
        socket: OwnedFd,
        endpoint: SocketAddr,
        receiving: bool,
    ) -> io::Result<FlowSocket> {
        Ok(self.continue_flow(id, adopt_flow(socket, endpoint)?, receiving))
    }

    fn export_listener(&self, l: &Listener) -> io::Result<OwnedFd> {
        l.as_fd().try_clone_to_owned()
    }

    fn export_flow(&self, flow: &FlowSocket) -> io::Result<OwnedFd> {
        flow.as_fd().try_clone_to_owned()
    }

    fn udp_receiving(&mut self, on: bool) {
        self.udp_paused = !on;
    }

    fn listener_receiving(&mut self, id: ListenerId, l: &mut Listener, on: bool) {
        if on {
            self.arm_listener(id, l);
        } else if l.ops.armed {
            // Armed until the cancelled receive's last completion (`listener_quiet`).
            self.cancel(&l.socket);
        }
    }

    fn flow_receiving(&mut self, _: FlowId, flow: &mut FlowSocket, on: bool) {
        self.flow_receiving(flow, on);
    }

    fn listener_quiet(&self, l: &Listener) -> bool {
        !l.ops.armed
    }

    fn flow_quiet(&self, flow: &FlowSocket) -> bool {
        flow.quiet()
    }

    fn release_listener(&mut self, id: ListenerId, l: Listener) {
        // As `unlisten`, without the shutdown: the socket is another process's too.
        if l.ops.armed {
            self.cancel(&l.socket);
        }
        self.closing_listeners.hold(id, l);
    }

    fn release_flow(&mut self, flow: FlowSocket) {
        self.end_flow(flow);
    }
}
