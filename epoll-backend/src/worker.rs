//! One worker: its epoll loop, listeners, TCP connections and timers. UDP lives in
//! [`crate::udp`], forwarding of one connection in [`crate::tcp`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{Timespec, epoll};
use socket2::Socket;
use svcproxy_core::session::Side;
use svcproxy_core::{
    Backend, Backoff, DrainPolicy, FlowTable, PortState, Protocol, ServicePortKey, SlotId, Slots,
    Snapshot, Tally, TcpSession, WorkerContext,
};
use svcproxy_sys::dgram::MAX_DATAGRAM;
use svcproxy_sys::socket::is_resource_exhaustion;
use svcproxy_sys::{ListenOptions, PipePool, RecvBatch, Waker, accept, connect, listen, reset};
use tracing::{debug, warn};

use crate::tcp::{Buffers, Conn, Failed, Pumped};
use crate::timers::{Timer, Timers};
use crate::token::{Kind, Token, watch};

/// Connections accepted per listener before other work gets a turn.
const ACCEPT_BATCH: usize = 64;
/// Bytes one connection forwards before other work gets a turn.
const PUMP_BUDGET: usize = 1 << 20;
/// epoll events per wait.
const EVENTS: usize = 256;
/// Spare pipes kept per worker.
const SPARE_PIPES: usize = 64;
/// What connection sockets are watched for (edge-triggered).
const CONN_EVENTS: epoll::EventFlags = epoll::EventFlags::IN
    .union(epoll::EventFlags::OUT)
    .union(epoll::EventFlags::RDHUP)
    .union(epoll::EventFlags::ET);

/// A connect attempt that has started.
struct Attempt {
    socket: Socket,
    backend: SocketAddr,
    tally: Tally,
    timeout: Duration,
}

pub(crate) struct Listener {
    pub(crate) key: ServicePortKey,
    pub(crate) socket: Socket,
}

/// Work that was cut short to let other work run, continued next turn.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Work {
    Accept(SlotId),
    Pump(SlotId),
    Udp(SlotId),
    Replies(SlotId),
}

pub(crate) struct Worker {
    pub(crate) ctx: WorkerContext,
    pub(crate) epoll: OwnedFd,
    waker: Arc<Waker>,
    applied: Option<Arc<Snapshot>>,
    pub(crate) listeners: HashMap<ServicePortKey, SlotId>,
    pub(crate) listener_slots: Slots<Listener>,
    failed_binds: BTreeSet<ServicePortKey>,
    conns: Slots<Conn>,
    pub(crate) flows: FlowTable<Socket>,
    timers: Timers,
    buffers: Buffers,
    pub(crate) batch: RecvBatch,
    pub(crate) ready: VecDeque<Work>,
    accept_backoff: Backoff,
    accept_paused: bool,
    accept_blocked: BTreeSet<SlotId>,
    /// Accepted clients whose backend socket could not be created (out of descriptors):
    /// retried when accepting resumes, so they wait instead of being reset.
    parked: VecDeque<(ServicePortKey, Socket, SocketAddr)>,
    stopping: bool,
    listen_options: ListenOptions,
}

impl Worker {
    pub(crate) fn new(ctx: WorkerContext, waker: Arc<Waker>) -> io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        watch(&epoll, waker.as_fd(), Token::WAKER, epoll::EventFlags::IN)?;
        let config = *ctx.config();
        Ok(Self {
            epoll,
            waker,
            applied: None,
            listeners: HashMap::new(),
            listener_slots: Slots::new(),
            failed_binds: BTreeSet::new(),
            conns: Slots::new(),
            flows: FlowTable::new(config.udp_idle_timeout),
            timers: Timers::default(),
            buffers: Buffers::new(PipePool::new(config.pipe_size, SPARE_PIPES)),
            batch: RecvBatch::new(config.udp_batch, MAX_DATAGRAM + 1),
            ready: VecDeque::new(),
            accept_backoff: Backoff::default(),
            accept_paused: false,
            accept_blocked: BTreeSet::new(),
            parked: VecDeque::new(),
            stopping: false,
            listen_options: ListenOptions {
                backlog: config.listen_backlog as i32,
                transparent: false,
                ..ListenOptions::default()
            },
            ctx,
        })
    }

    pub(crate) fn run(&mut self) -> io::Result<()> {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(EVENTS);
        let now = Instant::now();
        self.apply_table(now);
        self.timers.add(now + Duration::from_secs(1), Timer::Tick);
        loop {
            let now = Instant::now();
            if self.ctx.control.stopping() && !self.stopping {
                self.begin_stop(now);
            }
            if self.stopping && self.conns.is_empty() {
                return Ok(());
            }
            let timeout = if self.ready.is_empty() {
                self.timers.next_in(now)
            } else {
                Some(Duration::ZERO)
            };
            let timeout = timeout.map(|d| Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: i64::from(d.subsec_nanos()),
            });
            events.clear();
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                timeout.as_ref(),
            ) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let now = Instant::now();
            for event in &events {
                let (flags, data) = (event.flags, event.data);
                self.dispatch(Token(data.u64()), flags, now);
            }
            for _ in 0..self.ready.len() {
                match self.ready.pop_front() {
                    Some(Work::Accept(id)) => self.accept(id, now),
                    Some(Work::Pump(id)) => self.pump(id, now),
                    Some(Work::Udp(id)) => self.udp_from_clients(id, now),
                    Some(Work::Replies(id)) => self.udp_from_backend(id, now),
                    None => break,
                }
            }
            while let Some(timer) = self.timers.pop_due(now) {
                if self.fire(timer, now) {
                    return Ok(());
                }
            }
            let current = self.ctx.table().load().generation();
            if self
                .applied
                .as_ref()
                .is_none_or(|s| s.generation() != current)
            {
                self.apply_table(now);
            }
        }
    }

    fn dispatch(&mut self, token: Token, flags: epoll::EventFlags, now: Instant) {
        match token.kind() {
            Some(Kind::Waker) => {
                // A publish, shutdown, or connection budget freed by another worker.
                self.waker.reset();
                self.unblock_accepts();
            }
            Some(Kind::TcpListener) => self.accept(token.id(), now),
            Some(Kind::UdpListener) => self.udp_from_clients(token.id(), now),
            Some(Kind::Flow) => self.udp_from_backend(token.id(), now),
            Some(kind @ (Kind::Client | Kind::Backend)) => {
                let id = token.id();
                let Some(conn) = self.conns.get_mut(id) else {
                    return;
                };
                let side = if kind == Kind::Client {
                    Side::Client
                } else {
                    Side::Backend
                };
                let trouble = flags.intersects(epoll::EventFlags::ERR | epoll::EventFlags::HUP);
                let ready = conn.ready_mut(side);
                ready.readable |=
                    trouble || flags.intersects(epoll::EventFlags::IN | epoll::EventFlags::RDHUP);
                ready.writable |= trouble || flags.contains(epoll::EventFlags::OUT);
                ready.peer_closed |= trouble || flags.contains(epoll::EventFlags::RDHUP);
                if !conn.connected && side == Side::Backend {
                    if trouble || flags.contains(epoll::EventFlags::OUT) {
                        self.connect_done(id, trouble, now);
                    }
                } else {
                    self.pump(id, now);
                }
            }
            None => {}
        }
    }

    /// Runs a timer; true when the worker must exit now.
    fn fire(&mut self, timer: Timer, now: Instant) -> bool {
        match timer {
            Timer::Connect { conn, attempt } => {
                if let Some(c) = self.conns.get(conn)
                    && !c.connected
                    && c.attempt == attempt
                {
                    debug!(backend = %c.backend_addr, "connect timed out");
                    self.connect_failed(conn, now);
                }
            }
            Timer::Idle(id) => {
                if let (Some(c), Some(idle)) =
                    (self.conns.get(id), self.ctx.config().tcp.idle_timeout)
                {
                    let quiet_until = c.last_activity + idle;
                    if now >= quiet_until {
                        debug!(client = %c.client_addr, "idle timeout");
                        self.close(id, None);
                    } else {
                        self.timers.add(quiet_until, Timer::Idle(id));
                    }
                }
            }
            Timer::Drain(id) => {
                if self.conns.get(id).is_some() {
                    self.close(id, None);
                }
            }
            Timer::AcceptResume => {
                self.accept_paused = false;
                while !self.accept_paused {
                    let Some((listener, client, peer)) = self.parked.pop_front() else {
                        break;
                    };
                    self.start(listener, client, peer, now);
                }
                let ids: Vec<SlotId> = self.listener_slots.ids();
                self.ready.extend(ids.into_iter().map(Work::Accept));
            }
            Timer::Tick => {
                for flow in self.flows.expire(now) {
                    drop(flow.handle);
                }
                let snapshot = self.ctx.table().load();
                for key in std::mem::take(&mut self.failed_binds) {
                    self.reconcile(key, snapshot.wants_listener(&key));
                }
                self.timers.add(now + Duration::from_secs(1), Timer::Tick);
            }
            Timer::Shutdown => {
                for id in self.conns.ids() {
                    self.close(id, None);
                }
                return true;
            }
        }
        false
    }

    /// Brings listeners, flows and draining connections in line with the current table.
    fn apply_table(&mut self, now: Instant) {
        let snapshot = self.ctx.table().load_full();
        for (key, wanted) in snapshot.listener_changes(self.applied.as_deref()) {
            self.reconcile(key, wanted);
        }
        self.flows.sync(&snapshot, now);
        if let DrainPolicy::CloseAfter(grace) = self.ctx.config().tcp.drain {
            let mut doomed = Vec::new();
            for (id, c) in self.conns.iter() {
                if !c.draining && !snapshot.serves(&c.listener, c.backend_addr) {
                    doomed.push(id);
                }
            }
            for id in doomed {
                if let Some(c) = self.conns.get_mut(id) {
                    c.draining = true;
                }
                self.timers.add(now + grace, Timer::Drain(id));
            }
        }
        let generation = snapshot.generation();
        self.applied = Some(snapshot);
        self.ctx.control.report_applied(self.ctx.index, generation);
    }

    /// Opens or closes the listener of `key`.
    fn reconcile(&mut self, key: ServicePortKey, wanted: bool) {
        let wanted = wanted && !self.stopping;
        match (wanted, self.listeners.get(&key).copied()) {
            (true, None) => self.open_listener(key),
            (false, Some(id)) => {
                self.listeners.remove(&key);
                self.listener_slots.remove(id);
                debug!(%key, "listener closed");
            }
            _ => {}
        }
        if !wanted && self.failed_binds.remove(&key) {
            self.ctx.control.set_bind_error(key, None);
        }
    }

    fn open_listener(&mut self, key: ServicePortKey) {
        let options = self.listen_options;
        let result = listen(key, &options).and_then(|socket| {
            let kind = match key.protocol {
                Protocol::Tcp => Kind::TcpListener,
                Protocol::Udp => Kind::UdpListener,
            };
            let epoll = &self.epoll;
            self.listener_slots.insert_with(|id| {
                let flags = epoll::EventFlags::IN | epoll::EventFlags::ET;
                watch(epoll, &socket, Token::new(kind, id), flags)?;
                Ok::<_, io::Error>(Listener { key, socket })
            })
        });
        match result {
            Ok(id) => {
                self.listeners.insert(key, id);
                self.ctx.control.set_bind_error(key, None);
                debug!(%key, "listening");
                self.ready.push_back(match key.protocol {
                    Protocol::Tcp => Work::Accept(id),
                    Protocol::Udp => Work::Udp(id),
                });
            }
            Err(e) => {
                if self.failed_binds.insert(key) {
                    warn!(%key, error = %e, "cannot listen; retrying every second");
                }
                self.ctx.control.set_bind_error(key, Some(e.to_string()));
            }
        }
    }

    /// Shutdown began: stop listening (clients are refused from now on), close UDP flows, and
    /// give open connections until the deadline.
    fn begin_stop(&mut self, now: Instant) {
        self.stopping = true;
        self.listeners.clear();
        for id in self.listener_slots.ids() {
            self.listener_slots.remove(id);
        }
        for key in std::mem::take(&mut self.failed_binds) {
            self.ctx.control.set_bind_error(key, None);
        }
        for (_, client, _) in std::mem::take(&mut self.parked) {
            self.refuse(client);
        }
        for (id, _) in self
            .flows
            .iter()
            .map(|(id, f)| (id, f.key))
            .collect::<Vec<_>>()
        {
            self.flows.remove(id);
        }
        let deadline = self.ctx.control.deadline().unwrap_or(now);
        self.timers.add(deadline, Timer::Shutdown);
    }

    fn accept(&mut self, listener: SlotId, now: Instant) {
        if self.stopping || self.accept_paused {
            return;
        }
        for _ in 0..ACCEPT_BATCH {
            let Some(l) = self.listener_slots.get(listener) else {
                return;
            };
            if !self.ctx.control.admit(self.ctx.index) {
                self.accept_blocked.insert(listener);
                return;
            }
            match accept(&l.socket) {
                Ok((socket, peer)) => {
                    self.accept_backoff.succeed();
                    let key = l.key;
                    self.start(key, socket, peer, now);
                }
                Err(e) => {
                    self.ctx.control.release();
                    if e.kind() == io::ErrorKind::WouldBlock {
                        return;
                    }
                    if is_resource_exhaustion(&e) {
                        self.pause_accepting("accept", &e, now);
                        return;
                    }
                    debug!(error = %e, "accept failed");
                }
            }
        }
        self.ready.push_back(Work::Accept(listener));
    }

    /// Starts proxying an accepted client (which holds one unit of the connection budget).
    fn start(&mut self, listener: ServicePortKey, client: Socket, peer: SocketAddr, now: Instant) {
        let snapshot = self.ctx.table().load();
        let Some(port) = snapshot.lookup(&listener) else {
            self.refuse(client);
            return;
        };
        let Some(first) = port.select(peer, now) else {
            port.counters().add_refused();
            self.refuse(client);
            return;
        };
        let mut session = TcpSession::new();
        match self.attempt(&mut session, port, Some(first), peer, now) {
            Ok(Some(attempt)) => {
                let conn = Conn::new(
                    client,
                    attempt.socket,
                    peer,
                    listener,
                    attempt.backend,
                    attempt.tally,
                    session,
                    now,
                );
                self.insert(conn, now + attempt.timeout);
            }
            Ok(None) => self.refuse(client),
            Err(e) => {
                self.parked.push_back((listener, client, peer));
                self.pause_accepting("open a backend socket", &e, now);
            }
        }
    }

    /// Starts connecting to `first`, or after immediate failures to the next endpoints the
    /// session policy allows. `Ok(None)` when every allowed endpoint failed; `Err` when the
    /// proxy is out of descriptors.
    fn attempt(
        &self,
        session: &mut TcpSession,
        port: &PortState,
        first: Option<&Backend>,
        client: SocketAddr,
        now: Instant,
    ) -> io::Result<Option<Attempt>> {
        let policy = self.ctx.config().tcp;
        let preserve = self.ctx.config().preserve_client_ip;
        let source = preserve.then(|| SocketAddr::new(client.ip(), 0));
        let opened = session.open(
            &policy,
            port,
            first,
            client,
            now,
            |b| connect(b.addr(), Protocol::Tcp, source, preserve),
            is_resource_exhaustion,
        )?;
        Ok(opened.map(|o| Attempt {
            socket: o.value,
            backend: o.backend.addr(),
            tally: o.backend.tally().clone(),
            timeout: o.timeout,
        }))
    }

    /// Out of descriptors (or socket memory): stop accepting for a while, and let go of spare
    /// pipes so that open connections can keep going.
    fn pause_accepting(&mut self, what: &str, error: &io::Error, now: Instant) {
        self.buffers.pipes.clear();
        if !self.accept_paused {
            let delay = self.accept_backoff.fail();
            warn!(%error, ?delay, "cannot {what}, out of resources; accepting paused");
            self.accept_paused = true;
            self.timers.add(now + delay, Timer::AcceptResume);
        }
    }

    fn refuse(&mut self, client: Socket) {
        reset(client);
        self.ctx.control.release();
        self.unblock_accepts();
    }

    fn insert(&mut self, conn: Conn, connect_deadline: Instant) {
        let epoll = &self.epoll;
        let result = self.conns.insert_with(|id| {
            let add = |fd: &Socket, kind| watch(epoll, fd, Token::new(kind, id), CONN_EVENTS);
            match add(&conn.client, Kind::Client).and_then(|()| add(&conn.backend, Kind::Backend)) {
                Ok(()) => Ok(conn),
                Err(e) => Err((e, Box::new(conn))),
            }
        });
        match result {
            Ok(id) => self.timers.add(
                connect_deadline,
                Timer::Connect {
                    conn: id,
                    attempt: 1,
                },
            ),
            Err((e, conn)) => {
                warn!(error = %e, "cannot register connection");
                conn.tally.closed();
                self.refuse(conn.client);
            }
        }
    }

    /// The backend socket of a connecting connection turned writable (connected) or reported
    /// trouble (the connect failed; the socket error says why).
    fn connect_done(&mut self, id: SlotId, trouble: bool, now: Instant) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if trouble {
            let error = match conn.backend.take_error() {
                Ok(Some(e)) | Err(e) => e,
                Ok(None) => io::Error::other("hang-up while connecting"),
            };
            debug!(backend = %conn.backend_addr, %error, "connect failed");
            self.connect_failed(id, now);
            return;
        }
        conn.connected = true;
        conn.last_activity = now;
        if let Some(idle) = self.ctx.config().tcp.idle_timeout {
            self.timers.add(now + idle, Timer::Idle(id));
        }
        self.pump(id, now);
    }

    /// The current attempt failed (refused, unreachable, timed out): try the next endpoint the
    /// session policy allows, or reset the client.
    fn connect_failed(&mut self, id: SlotId, now: Instant) {
        let snapshot = self.ctx.table().load();
        let policy = self.ctx.config().tcp;
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        conn.tally.connect_error();
        conn.tally.closed();
        let mut session = conn.session.clone();
        let client = conn.client_addr;
        let port = snapshot.lookup(&conn.listener);
        let attempt = port.and_then(|p| {
            let first = session.next_backend(&policy, p, client, now);
            self.attempt(&mut session, p, first, client, now)
                .ok()
                .flatten()
        });
        let conn = self.conns.get_mut(id).expect("present above");
        conn.session = session;
        let Some(attempt) = attempt else {
            let mut conn = self.conns.remove(id).expect("present above");
            conn.release_pipes(&mut self.buffers.pipes);
            self.refuse(conn.client);
            return;
        };
        conn.attempt += 1;
        conn.backend = attempt.socket;
        conn.backend_addr = attempt.backend;
        conn.tally = attempt.tally;
        *conn.ready_mut(Side::Backend) = Default::default();
        match watch(
            &self.epoll,
            &conn.backend,
            Token::new(Kind::Backend, id),
            CONN_EVENTS,
        ) {
            Ok(()) => {
                let timer = Timer::Connect {
                    conn: id,
                    attempt: conn.attempt,
                };
                self.timers.add(now + attempt.timeout, timer);
            }
            Err(e) => {
                warn!(error = %e, "cannot register connection");
                self.close(id, Some(Side::Client));
            }
        }
    }

    fn pump(&mut self, id: SlotId, now: Instant) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        if !conn.connected {
            return;
        }
        let mut budget = PUMP_BUDGET;
        match conn.pump(&mut self.buffers, &mut budget, now) {
            Ok(Pumped::Idle) => {}
            Ok(Pumped::Budget) => self.ready.push_back(Work::Pump(id)),
            Ok(Pumped::Finished) => self.close(id, None),
            Err(Failed(side)) => self.close(id, Some(side.other())),
        }
    }

    /// Closes a connection, resetting `reset` (if any) and closing the other side normally.
    fn close(&mut self, id: SlotId, reset_side: Option<Side>) {
        let Some(mut conn) = self.conns.remove(id) else {
            return;
        };
        conn.release_pipes(&mut self.buffers.pipes);
        conn.tally.closed();
        match reset_side {
            Some(Side::Client) => reset(conn.client),
            Some(Side::Backend) => reset(conn.backend),
            None => {}
        }
        self.ctx.control.release();
        self.unblock_accepts();
    }

    fn unblock_accepts(&mut self) {
        if !self.accept_blocked.is_empty() {
            let blocked = std::mem::take(&mut self.accept_blocked);
            self.ready.extend(blocked.into_iter().map(Work::Accept));
        }
    }
}
