//! One worker: its ring, listeners, timers and the table it applies. TCP connections are in
//! [`crate::tcp`], UDP in [`crate::udp`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;
use svcproxy_core::config::Forwarding;
use svcproxy_core::{
    Backoff, FlowId, FlowTable, Protocol, ServicePortKey, SlotId, Slots, Snapshot, WorkerContext,
};
use svcproxy_sys::socket::is_resource_exhaustion;
use svcproxy_sys::{ListenOptions, PipePool, Waker, listen};
use tracing::{debug, warn};

use crate::ring::{BufRing, Completion, Ring, RingOptions};
use crate::tcp::Conn;
use crate::token::{self, Op, Timer};
use crate::udp::{FlowSocket, UdpOp};

/// Buffer group of TCP buffers.
const TCP_GROUP: u16 = 1;
/// Buffer group of UDP buffers.
const UDP_GROUP: u16 = 2;
/// UDP buffers per worker.
const UDP_BUFFERS: u16 = 256;
/// A UDP buffer holds the largest datagram plus the recvmsg header, address and control data.
const UDP_BUFFER_SIZE: usize = 65_536 + 512;
/// Spare pipes kept per worker (splice forwarding).
const SPARE_PIPES: usize = 64;

pub(crate) struct Listener {
    pub(crate) key: ServicePortKey,
    pub(crate) socket: Socket,
    /// The multishot accept or recvmsg is in flight.
    pub(crate) armed: bool,
    /// Closing: the socket is dropped once the operation in flight has ended.
    pub(crate) closing: bool,
    /// A UDP listener waiting for buffers to come back to the ring.
    pub(crate) starved: bool,
}

pub(crate) struct Worker {
    // Field order matters: the ring is dropped (and its operations torn down) before the
    // buffer rings whose memory they use.
    pub(crate) ring: Ring,
    pub(crate) tcp_buffers: BufRing,
    pub(crate) udp_buffers: BufRing,
    pub(crate) ctx: WorkerContext,
    waker: Arc<Waker>,
    applied: Option<Arc<Snapshot>>,
    pub(crate) listeners: HashMap<ServicePortKey, SlotId>,
    pub(crate) listener_slots: Slots<Listener>,
    failed_binds: BTreeSet<ServicePortKey>,
    pub(crate) conns: Slots<Conn>,
    pub(crate) flows: FlowTable<FlowSocket>,
    /// Sockets of ended flows whose receive is still in flight, by the flow's old id.
    pub(crate) closing_flows: HashMap<FlowId, Socket>,
    pub(crate) udp_ops: Slots<UdpOp>,
    /// Directions of connections that found the TCP buffer ring empty.
    pub(crate) starved: Vec<SlotId>,
    /// UDP sockets that found the UDP buffer ring empty: listeners and flows.
    pub(crate) udp_starved: Vec<(Op, SlotId)>,
    pub(crate) pipes: PipePool,
    pub(crate) forwarding: Forwarding,
    accept_backoff: Backoff,
    accept_paused: bool,
    /// Accepted clients waiting for the connection budget or for descriptors.
    pub(crate) parked: VecDeque<(ServicePortKey, Socket)>,
    /// A descriptor held in reserve: multishot accept can take every descriptor before a
    /// backend socket is opened, so when none is left one parked client is served with this
    /// one (then the next as connections end), instead of all waiting forever.
    pub(crate) reserve: Option<std::fs::File>,
    pub(crate) stopping: bool,
    listen_options: ListenOptions,
    completions: Vec<Completion>,
}

impl Worker {
    pub(crate) fn new(ctx: WorkerContext, waker: Arc<Waker>) -> io::Result<Self> {
        let config = *ctx.config();
        let ring = Ring::new(RingOptions {
            entries: config.io_uring.entries,
            sqpoll: config.io_uring.sqpoll,
        })?;
        let tcp_buffers = BufRing::new(
            ring.raw(),
            TCP_GROUP,
            config.io_uring.buffers,
            config.io_uring.buffer_size as usize,
        )?;
        let udp_buffers = BufRing::new(ring.raw(), UDP_GROUP, UDP_BUFFERS, UDP_BUFFER_SIZE)?;
        Ok(Self {
            ring,
            tcp_buffers,
            udp_buffers,
            waker,
            applied: None,
            listeners: HashMap::new(),
            listener_slots: Slots::new(),
            failed_binds: BTreeSet::new(),
            conns: Slots::new(),
            flows: FlowTable::new(config.udp_idle_timeout),
            closing_flows: HashMap::new(),
            udp_ops: Slots::new(),
            starved: Vec::new(),
            udp_starved: Vec::new(),
            pipes: PipePool::new(config.pipe_size, SPARE_PIPES),
            forwarding: config.io_uring.forwarding,
            accept_backoff: Backoff::default(),
            accept_paused: false,
            parked: VecDeque::new(),
            reserve: std::fs::File::open("/dev/null").ok(),
            stopping: false,
            listen_options: ListenOptions {
                backlog: config.listen_backlog as i32,
                transparent: false,
                ..ListenOptions::default()
            },
            completions: Vec::new(),
            ctx,
        })
    }

    pub(crate) fn run(&mut self) -> io::Result<()> {
        let now = Instant::now();
        self.ring.read_eventfd(
            self.waker.as_fd().as_raw_fd(),
            token::user_data(Op::Wake, SlotId::from_u64(0)),
        )?;
        self.ring.timeout(
            Duration::from_secs(1),
            token::user_data(Op::Tick, SlotId::from_u64(0)),
        )?;
        self.apply_table(now);
        let mut completions = std::mem::take(&mut self.completions);
        let result = loop {
            if self.ctx.control.stopping() && !self.stopping {
                self.begin_stop(Instant::now());
            }
            if self.stopping && self.conns.is_empty() && self.settled() {
                break Ok(());
            }
            if let Err(e) = self.ring.submit_and_wait() {
                break Err(e);
            }
            self.ring.completions(&mut completions);
            let now = Instant::now();
            for c in &completions {
                self.dispatch(*c, now);
            }
            let current = self.ctx.table().load().generation();
            if self
                .applied
                .as_ref()
                .is_none_or(|s| s.generation() != current)
            {
                self.apply_table(now);
            }
        };
        self.tcp_buffers.unregister(self.ring.raw());
        self.udp_buffers.unregister(self.ring.raw());
        result
    }

    /// No listener or flow socket is still waiting for its last completion.
    fn settled(&self) -> bool {
        self.listener_slots.is_empty() && self.closing_flows.is_empty()
    }

    fn dispatch(&mut self, c: Completion, now: Instant) {
        let id = token::id(c.user_data);
        match token::op(c.user_data) {
            Some(Op::Wake) => {
                let _ = self
                    .ring
                    .read_eventfd(self.waker.as_fd().as_raw_fd(), c.user_data);
                self.resume_parked(now);
            }
            Some(Op::Tick) => {
                self.tick(now);
                let _ = self.ring.timeout(Duration::from_secs(1), c.user_data);
            }
            Some(Op::Timer) => match token::which_timer(c.user_data) {
                Some(Timer::Shutdown) => {
                    for id in self.conns.ids() {
                        self.teardown(id, None);
                    }
                }
                Some(Timer::AcceptResume) => {
                    self.accept_paused = false;
                    self.resume_parked(now);
                    self.arm_all_accepts();
                }
                None => {}
            },
            Some(Op::Accept) => self.on_accept(id, c, now),
            Some(
                op @ (Op::Connect
                | Op::ConnectTimeout
                | Op::RecvUp
                | Op::RecvDown
                | Op::SendUp
                | Op::SendDown),
            ) => self.on_conn(op, id, c, now),
            Some(Op::ListenerRecv) => self.on_listener_recv(id, c, now),
            Some(Op::FlowRecv) => self.on_flow_recv(id, c, now),
            Some(Op::UdpSend) => self.on_udp_send(id, c),
            Some(Op::Ignore) | None => {}
        }
    }

    /// Once a second: idle and draining connections, idle flows, failed binds.
    fn tick(&mut self, now: Instant) {
        let config = *self.ctx.config();
        let mut doomed = Vec::new();
        for (id, conn) in self.conns.iter() {
            let idle = config.tcp.idle_timeout.is_some_and(|t| {
                conn.connected && now.saturating_duration_since(conn.last_activity) >= t
            });
            let drained = conn.drain_at.is_some_and(|at| now >= at);
            if (idle || drained) && !conn.closing {
                doomed.push(id);
            }
        }
        for id in doomed {
            debug!("closing an idle or drained connection");
            self.teardown(id, None);
        }
        for flow in self.flows.expire(now) {
            self.close_flow_socket(flow.handle);
        }
        let snapshot = self.ctx.table().load();
        for key in std::mem::take(&mut self.failed_binds) {
            self.reconcile(key, snapshot.wants_listener(&key));
        }
    }

    /// Brings listeners, flows and draining connections in line with the current table.
    fn apply_table(&mut self, now: Instant) {
        let snapshot = self.ctx.table().load_full();
        for (key, wanted) in snapshot.listener_changes(self.applied.as_deref()) {
            self.reconcile(key, wanted);
        }
        self.flows.sync(&snapshot, now);
        if let Some(deadline) = self.ctx.config().tcp.drain_deadline(now) {
            for (_, conn) in self.conns.iter_mut() {
                if conn.drain_at.is_none() && !snapshot.serves(&conn.listener, conn.backend_addr) {
                    conn.drain_at = Some(deadline);
                }
            }
        }
        let generation = snapshot.generation();
        self.applied = Some(snapshot);
        self.ctx.control.report_applied(self.ctx.index, generation);
    }

    fn reconcile(&mut self, key: ServicePortKey, wanted: bool) {
        let wanted = wanted && !self.stopping;
        match (wanted, self.listeners.get(&key).copied()) {
            (true, None) => self.open_listener(key),
            (false, Some(id)) => self.close_listener(id),
            _ => {}
        }
        if !wanted && self.failed_binds.remove(&key) {
            self.ctx.control.set_bind_error(key, None);
        }
    }

    fn open_listener(&mut self, key: ServicePortKey) {
        match listen(key, &self.listen_options) {
            Ok(socket) => {
                let id = self.listener_slots.insert(Listener {
                    key,
                    socket,
                    armed: false,
                    closing: false,
                    starved: false,
                });
                self.listeners.insert(key, id);
                self.ctx.control.set_bind_error(key, None);
                debug!(%key, "listening");
                self.arm_listener(id);
            }
            Err(e) => {
                if self.failed_binds.insert(key) {
                    warn!(%key, error = %e, "cannot listen; retrying every second");
                }
                self.ctx.control.set_bind_error(key, Some(e.to_string()));
            }
        }
    }

    /// Starts the listener's multishot operation if it is not running and should.
    pub(crate) fn arm_listener(&mut self, id: SlotId) {
        let paused = self.accept_paused;
        let Some(l) = self.listener_slots.get_mut(id) else {
            return;
        };
        if l.armed || l.closing || l.starved || self.stopping {
            return;
        }
        let fd = l.socket.as_raw_fd();
        let result = match l.key.protocol {
            Protocol::Tcp if paused => return,
            Protocol::Tcp => self.ring.accept(fd, token::user_data(Op::Accept, id)),
            Protocol::Udp => {
                self.ring
                    .recvmsg_multi(fd, UDP_GROUP, token::user_data(Op::ListenerRecv, id))
            }
        };
        match result {
            Ok(()) => l.armed = true,
            Err(e) => warn!(key = %l.key, error = %e, "cannot arm listener"),
        }
    }

    fn arm_all_accepts(&mut self) {
        for id in self.listener_slots.ids() {
            self.arm_listener(id);
        }
    }

    /// Stops listening: cancels the operation in flight; the socket goes with its last
    /// completion.
    fn close_listener(&mut self, id: SlotId) {
        let Some(l) = self.listener_slots.get_mut(id) else {
            return;
        };
        self.listeners.remove(&l.key);
        l.closing = true;
        debug!(key = %l.key, "listener closing");
        // A TCP listener stops taking connections now (clients get ECONNREFUSED at once), not
        // when its cancelled accept has completed.
        if l.key.protocol == Protocol::Tcp {
            let _ = l.socket.shutdown(std::net::Shutdown::Both);
        }
        if l.armed {
            let _ = self
                .ring
                .cancel_fd(l.socket.as_raw_fd(), token::user_data(Op::Ignore, id));
        } else {
            self.listener_slots.remove(id);
        }
    }

    /// The listener's multishot operation ended.
    pub(crate) fn listener_disarmed(&mut self, id: SlotId) {
        let Some(l) = self.listener_slots.get_mut(id) else {
            return;
        };
        l.armed = false;
        if l.closing {
            self.listener_slots.remove(id);
        } else {
            self.arm_listener(id);
        }
    }

    fn on_accept(&mut self, id: SlotId, c: Completion, now: Instant) {
        let key = match self.listener_slots.get(id) {
            Some(l) => l.key,
            None => return,
        };
        if c.result >= 0 {
            let socket = crate::ring::accepted(c.result);
            if self.stopping {
                drop(socket);
            } else {
                self.accepted(key, socket, now);
            }
        } else if c.result != -libc::ECANCELED {
            let e = io::Error::from_raw_os_error(-c.result);
            if is_resource_exhaustion(&e) {
                self.pause_accepting("accept", &e);
            } else {
                debug!(%key, error = %e, "accept failed");
            }
        }
        if !c.more() {
            self.listener_disarmed(id);
        }
    }

    /// A client was accepted: take it into the budget, or park it until there is room.
    fn accepted(&mut self, key: ServicePortKey, socket: Socket, now: Instant) {
        if !self.parked.is_empty() || !self.ctx.control.admit(self.ctx.index) {
            // Over the budget: hold it, and stop accepting more until a connection ends.
            self.parked.push_back((key, socket));
            self.stop_accepting();
            return;
        }
        if let Err(socket) = self.start(key, socket, now) {
            self.parked.push_back((key, socket));
        }
    }

    /// Cancels every multishot accept (they are re-armed when there is room again).
    fn stop_accepting(&mut self) {
        for (id, l) in self.listener_slots.iter() {
            if l.key.protocol == Protocol::Tcp && l.armed {
                let _ = self
                    .ring
                    .cancel_fd(l.socket.as_raw_fd(), token::user_data(Op::Ignore, id));
            }
        }
        self.accept_paused = true;
    }

    /// Starts parked clients while the budget and descriptors allow, then accepts again.
    pub(crate) fn resume_parked(&mut self, now: Instant) {
        while let Some((key, socket)) = self.parked.pop_front() {
            if !self.ctx.control.admit(self.ctx.index) {
                self.parked.push_front((key, socket));
                return;
            }
            if let Err(socket) = self.start(key, socket, now) {
                // Out of descriptors again: it stays first in line.
                self.parked.push_front((key, socket));
                return;
            }
        }
        if self.accept_paused {
            self.accept_paused = false;
            self.arm_all_accepts();
        }
    }

    /// Out of descriptors (or socket memory): stop accepting for a while.
    pub(crate) fn pause_accepting(&mut self, what: &str, error: &io::Error) {
        self.pipes.clear();
        if self.accept_paused {
            return;
        }
        let delay = self.accept_backoff.fail();
        warn!(%error, ?delay, "cannot {what}, out of resources; accepting paused");
        self.stop_accepting();
        let _ = self.ring.timeout(delay, token::timer(Timer::AcceptResume));
    }

    /// Accepting worked again.
    pub(crate) fn accept_succeeded(&mut self) {
        self.accept_backoff.succeed();
    }

    fn begin_stop(&mut self, now: Instant) {
        self.stopping = true;
        for id in self.listener_slots.ids() {
            self.close_listener(id);
        }
        for key in std::mem::take(&mut self.failed_binds) {
            self.ctx.control.set_bind_error(key, None);
        }
        for (_, socket) in std::mem::take(&mut self.parked) {
            svcproxy_sys::reset(socket);
            self.ctx.control.release();
        }
        let ids: Vec<FlowId> = self.flows.iter().map(|(id, _)| id).collect();
        for id in ids {
            if let Some(flow) = self.flows.remove(id) {
                self.close_flow_socket(flow.handle);
            }
        }
        let deadline = self.ctx.control.deadline().unwrap_or(now);
        let _ = self.ring.timeout(
            deadline.saturating_duration_since(now),
            token::timer(Timer::Shutdown),
        );
    }

    pub(crate) fn listener_socket(&self, key: &ServicePortKey) -> Option<&Socket> {
        let id = self.listeners.get(key)?;
        Some(&self.listener_slots.get(*id)?.socket)
    }
}
