//! The connection engine: one worker's state machine, shared by every data plane. It decides;
//! a [`Driver`] (the epoll or the io_uring backend) does the I/O.
//!
//! The engine owns, for one worker:
//! - **listeners**: the set the table wants (a frontend with an eligible endpoint is listened
//!   on, one without is closed so its clients get ECONNREFUSED at once), with bind failures
//!   reported to [`Control`](crate::Control) and retried every second. The log gets one
//!   warning per batch of new failures (a table change, or a retry round), with their count and
//!   the first one, and one line when failed frontends listen again: a failure that repeats
//!   is not logged again, so 10,000 frontends that cannot be bound log one line, not 10,000 a
//!   second. With steering ([`crate::steering`]), the frontends at service
//!   addresses are served by a transparent listener per family and protocol instead, open while
//!   it serves one, and a steered UDP frontend has a listener of its own only to reply from,
//!   while it has flows;
//! - **admission**: each TCP connection holds an [`Admission`]: its client address's share and
//!   a [`Permit`](crate::Permit) of the proxy-wide budget, handed to the driver when the
//!   connection closes and given back once its descriptors are;
//! - **TCP connections** ([`Connection`]): connect attempts with doubling deadlines, moving to
//!   the next endpoint when one fails, half-close per direction, resets, idle timeout, drain of
//!   connections to removed endpoints, and shutdown;
//! - **UDP flows**: the worker's [`FlowTable`], purged as the table changes and expired when
//!   idle;
//! - **timers**: cancellable ([`Timers`]); every entry belongs to a live connection, pause or
//!   tick, so closed connections leave none behind;
//! - **handover** ([`crate::handover`]): following the phase [`Control`](crate::Control)
//!   holds, it pauses UDP and exports the worker's sockets, resumes, or retires (accepts and
//!   receives nothing more, and at shutdown lets go of its sockets without ending them);
//!   started with an inheritance, it adopts the inherited listeners and flows.
//!
//! Its inputs are events, given by the driver as method calls: a client was accepted
//! ([`Engine::accepted`]), a connect completed or failed, EOF was read, bytes moved, an error,
//! the time ([`Engine::poll`], which also applies a newly published table and begins the
//! shutdown). Its outputs are the [`Driver`]'s methods: open or close a listener, start or
//! stop accepting, open a socket and connect, start forwarding, abort a connect, close a
//! connection, open or close a flow socket. The driver turns them into system calls or ring
//! operations, and keeps what only it knows how to move: bytes (splice pipes, provided
//! buffers) and operations in flight.
//!
//! Over budget, one behaviour for every driver: the worker first makes room by evicting its
//! connections idle longest (see [`EVICT_AFTER_IDLE`]); when none is idle enough, it stops
//! accepting, so further clients wait in the kernel's accept queue; a client already accepted
//! (a multishot accept can hand over a few before it is cancelled) waits in the engine's queue
//! *without* a budget unit, and is served first when one comes back (or, at the next tick,
//! when connections have become idle enough to evict). Out of descriptors (accepting or opening a backend
//! socket), accepting pauses with [`Backoff`] and the client waits in the same queue. At
//! shutdown the waiting clients are refused (reset).

mod tcp;
pub mod timers;
mod udp;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::clients::KeyCounts;
use crate::config::ProxyConfig;
use crate::control::WorkerContext;
use crate::flow::{FlowId, FlowTable};
use crate::handover::{HandedFlow, Phase, WorkerSockets};
use crate::loom::sync::Arc;
use crate::model::{Protocol, ServicePortKey};
use crate::session::Side;
use crate::slots::{SlotId, Slots};
use crate::steering::Steering;
use crate::table::Snapshot;

pub use tcp::{Admission, Connection, EVICT_AFTER_IDLE, Lifecycle};
pub use timers::{TimerId, Timers};

/// Names a connection of an [`Engine`].
pub type ConnId = SlotId;
/// Names a listener of an [`Engine`].
pub type ListenerId = SlotId;

/// How often flows are expired and failed binds retried.
pub const TICK: Duration = Duration::from_secs(1);

/// Why a socket could not be opened or connected.
#[derive(Debug)]
pub enum OpenError {
    /// Out of descriptors or socket memory: the client waits and accepting pauses.
    Exhausted(io::Error),
    /// Anything else (no route, address in use, ...): the endpoint counts a connect error and
    /// the next one is tried.
    Failed(io::Error),
}

/// The I/O half of a worker: what the [`Engine`] asks of a data plane. Every method is a
/// command; none calls back into the engine.
pub trait Driver {
    /// A listening socket and what the driver keeps beside it.
    type Listener;
    /// A connection's sockets and forwarding state, made by the driver when it accepts a
    /// client.
    type Conn;
    /// A UDP flow's backend-side socket.
    type Flow;

    /// Opens a listener for `key`: when `serving`, TCP listeners take clients and UDP
    /// listeners receive (else once [`Driver::accepting`] or [`Driver::listener_receiving`]
    /// says so). A
    /// `transparent` one (see [`crate::steering`]) is bound with `IP_TRANSPARENT`, and UDP
    /// ones report each datagram's original destination. (A steered UDP frontend's listener,
    /// opened to reply from, is transparent too: its address need not be local.) With
    /// `inherited`, a socket another process handed over for `key` is adopted instead of a
    /// new one being bound (it is checked to be bound there, with the right type).
    fn listen(
        &mut self,
        id: ListenerId,
        key: ServicePortKey,
        transparent: bool,
        serving: bool,
        inherited: Option<OwnedFd>,
    ) -> io::Result<Self::Listener>;

    /// The local address of an accepted client's socket: the frontend it connected to, when
    /// it was accepted by a transparent listener.
    fn local_addr(&self, conn: &Self::Conn) -> io::Result<SocketAddr>;

    /// Stops serving a listener; closing its socket is the driver's (now, or once the
    /// operations in flight on it have ended).
    fn unlisten(&mut self, id: ListenerId, listener: Self::Listener);

    /// Starts (`true`) or stops taking clients from a TCP listener.
    fn accepting(&mut self, id: ListenerId, listener: &mut Self::Listener, on: bool);

    /// The worker is out of descriptors or memory: let go of what can be given back (spare
    /// pipes).
    fn out_of_resources(&mut self);

    /// Opens a backend socket (replacing the previous attempt's, which has ended) and starts
    /// connecting it to `to`, from `source` when given (the client's address, transparent).
    fn connect(
        &mut self,
        id: ConnId,
        conn: &mut Self::Conn,
        to: SocketAddr,
        source: Option<SocketAddr>,
    ) -> Result<(), OpenError>;

    /// The attempt's deadline passed: end it. `true` when it has ended now; `false` when the
    /// driver will report [`Engine::connect_failed`] (or [`Engine::connected`]) later.
    fn abort_connect(&mut self, id: ConnId, conn: &mut Self::Conn) -> bool;

    /// Connected: start moving bytes both ways.
    fn forward(&mut self, id: ConnId, conn: &mut Connection<Self::Conn>);

    /// Closes a connection (`closed` is `None` for a client refused before it became one),
    /// resetting the socket of `reset` if given. Freeing it is the driver's (now, or once its
    /// operations in flight have ended), and so is dropping the connection's [`Admission`],
    /// right after its descriptors are closed.
    fn close(&mut self, closed: Option<(ConnId, Admission)>, conn: Self::Conn, reset: Option<Side>);

    /// Opens a socket for a UDP flow, connected to `endpoint`, from `source` when given, and
    /// starts receiving its replies.
    fn open_flow(
        &mut self,
        id: FlowId,
        endpoint: SocketAddr,
        source: Option<SocketAddr>,
    ) -> io::Result<Self::Flow>;

    /// Closes a flow's socket (now, or once the operations in flight on it have ended).
    fn close_flow(&mut self, flow: Self::Flow);

    /// Goes on with a flow socket another process handed over (checked to be connected to
    /// `endpoint`); receives its replies when `receiving` (else once
    /// [`Driver::flow_receiving`] says so).
    fn adopt_flow(
        &mut self,
        id: FlowId,
        socket: OwnedFd,
        endpoint: SocketAddr,
        receiving: bool,
    ) -> io::Result<Self::Flow>;

    /// A duplicate of the listener's socket, to hand over to another process.
    fn export_listener(&self, listener: &Self::Listener) -> io::Result<OwnedFd>;

    /// A duplicate of the flow's socket, to hand over to another process.
    fn export_flow(&self, flow: &Self::Flow) -> io::Result<OwnedFd>;

    /// Stops (`false`) or resumes receiving on every UDP socket of the worker: while stopped,
    /// datagrams wait in the sockets' buffers, and listeners and flows opened meanwhile do
    /// not receive. The engine then stops or resumes each socket it has
    /// ([`Driver::listener_receiving`], [`Driver::flow_receiving`]).
    fn udp_receiving(&mut self, on: bool);

    /// Stops (`false`) or resumes receiving datagrams on a UDP listener (after
    /// [`Driver::udp_receiving`]).
    fn listener_receiving(&mut self, id: ListenerId, listener: &mut Self::Listener, on: bool);

    /// Stops (`false`) or resumes receiving replies on a flow's socket, as
    /// [`Driver::listener_receiving`].
    fn flow_receiving(&mut self, id: FlowId, flow: &mut Self::Flow, on: bool);

    /// Whether nothing is being received or accepted on the listener any more (a receive or
    /// an accept in flight when it stopped has ended).
    fn listener_quiet(&self, listener: &Self::Listener) -> bool;

    /// Whether nothing is being received on the flow's socket any more.
    fn flow_quiet(&self, flow: &Self::Flow) -> bool;

    /// Another process serves this listener's socket now: stop using it and close this
    /// process's descriptor, without ending the socket (no `shutdown(2)`, which would end it
    /// for every process that holds it).
    fn release_listener(&mut self, id: ListenerId, listener: Self::Listener);

    /// Another process serves this flow's socket now: as [`Driver::release_listener`].
    fn release_flow(&mut self, flow: Self::Flow);
}

/// A listener of the engine: its frontend and the driver's socket.
#[derive(Debug)]
pub struct Listening<L> {
    /// The frontend (for a transparent listener: where it listens).
    pub key: ServicePortKey,
    /// A transparent listener, serving every steered frontend of its family and protocol.
    pub transparent: bool,
    /// The driver's listener.
    pub io: L,
}

/// Where a worker is in a handover ([`crate::handover`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handover {
    /// Serving as usual.
    Serving,
    /// Started with an inheritance: listening, not serving until the process that handed
    /// over has retired.
    Waiting,
    /// UDP receiving stopped; exporting once no receive is in flight.
    Pausing,
    /// Sockets exported; UDP stays paused until the handover ends.
    Exported,
    /// Another process serves the sockets: accepting stopped, waiting for the accepts in
    /// flight to end.
    Retiring,
    /// Another process serves the sockets; nothing of this worker's is in flight on them.
    Retired,
}

/// Why accepting is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pause {
    /// The budget is spent; accepting resumes once the waiting clients are served.
    Budget,
    /// Out of descriptors; accepting resumes when the backoff timer fires.
    Resources,
}

/// An accepted client waiting for a budget unit or descriptors.
#[derive(Debug)]
struct Waiting<C> {
    listener: ServicePortKey,
    peer: SocketAddr,
    io: C,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Connect(ConnId),
    Idle(ConnId),
    Drain(ConnId),
    AcceptResume,
    Tick,
    Shutdown,
}

/// One worker's engine; see the module docs.
pub struct Engine<D: Driver> {
    ctx: WorkerContext,
    config: ProxyConfig,
    applied: Option<Arc<Snapshot>>,
    listeners: Slots<Listening<D::Listener>>,
    by_key: HashMap<ServicePortKey, ListenerId>,
    failed_binds: BTreeSet<ServicePortKey>,
    /// Set when frontends are steered to transparent listeners.
    steering: Option<Steering>,
    /// The steered frontends with an eligible endpoint, and how many each transparent
    /// listener serves (it is open while it serves one).
    steered: HashSet<ServicePortKey>,
    steered_per_listener: KeyCounts<ServicePortKey>,
    /// Bind failures not logged yet (new since the last report), and the first one's error.
    unreported_binds: (usize, Option<(ServicePortKey, String)>),
    /// Frontends that had failed and listen now, not logged yet.
    recovered_binds: usize,
    conns: Slots<Connection<D::Conn>>,
    waiting: VecDeque<Waiting<D::Conn>>,
    paused: Option<Pause>,
    backoff: Backoff,
    flows: FlowTable<D::Flow>,
    timers: Timers<Timer>,
    stopping: bool,
    /// Inside [`Engine::serve_waiting`]: connections closed meanwhile leave the serving to it.
    serving: bool,
    handover: Handover,
}

impl<D: Driver> std::fmt::Debug for Engine<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("worker", &self.ctx.index)
            .field("listeners", &self.listeners.len())
            .field("connections", &self.conns.len())
            .field("waiting", &self.waiting.len())
            .field("flows", &self.flows.len())
            .field("timers", &self.timers.len())
            .field("stopping", &self.stopping)
            .finish_non_exhaustive()
    }
}

impl<D: Driver> Engine<D> {
    /// The engine of worker `ctx`.
    pub fn new(ctx: WorkerContext) -> Self {
        let config = *ctx.config();
        Self {
            ctx,
            config,
            applied: None,
            listeners: Slots::new(),
            by_key: HashMap::new(),
            failed_binds: BTreeSet::new(),
            steering: config.steering(),
            steered: HashSet::new(),
            steered_per_listener: KeyCounts::default(),
            unreported_binds: (0, None),
            recovered_binds: 0,
            conns: Slots::new(),
            waiting: VecDeque::new(),
            paused: None,
            backoff: Backoff::default(),
            flows: FlowTable::new(config.udp_idle_timeout),
            timers: Timers::default(),
            stopping: false,
            serving: false,
            handover: Handover::Serving,
        }
    }

    /// The worker's context.
    pub fn ctx(&self) -> &WorkerContext {
        &self.ctx
    }

    /// The settings.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Opens the current table's listeners (adopting inherited sockets), goes on with the
    /// inherited UDP flows, and starts the tick. Call once, first.
    pub fn start(&mut self, io: &mut D, now: Instant) {
        match self.ctx.control.phase() {
            Phase::Inheriting => self.handover = Handover::Waiting,
            // Restarted after its proxy retired: it opens nothing.
            Phase::Retired => {
                self.handover = Handover::Retired;
                self.ctx.control.report_retired(self.ctx.index);
            }
            Phase::Serving | Phase::Exporting => {}
        }
        let flows = self.ctx.control.take_inherited_flows(self.ctx.index);
        let generation = self.apply_table(io, now);
        if self.handover == Handover::Waiting {
            self.set_receiving(io, false);
        }
        self.adopt_flows(io, flows, now);
        // Reported once the inheritance is taken: the owner then closes what is left of it.
        self.ctx.control.report_applied(self.ctx.index, generation);
        self.timers.add(now + TICK, Timer::Tick);
    }

    /// Goes on with the UDP flows inherited from a process that handed over: those whose
    /// listener this worker has and whose endpoint still serves their client.
    fn adopt_flows(&mut self, io: &mut D, inherited: Vec<(HandedFlow, OwnedFd)>, now: Instant) {
        if inherited.is_empty() {
            return;
        }
        let snapshot = self.ctx.table().load_full();
        let (mut adopted, offered) = (0, inherited.len());
        let receiving = self.receiving();
        for (handed, socket) in inherited {
            // A steered frontend's flows need the listener they reply from.
            let steered = self.steering.is_some_and(|s| s.steers(&handed.listener));
            let listening = self.by_key.contains_key(&handed.listener)
                || steered && self.reply_listener(io, &snapshot, handed.listener);
            if !listening {
                continue;
            }
            match self.flows.adopt(&handed, &snapshot, now, |id| {
                io.adopt_flow(id, socket, handed.endpoint, receiving)
            }) {
                Ok(Some(_)) => adopted += 1,
                Ok(None) => {}
                Err(e) => debug!(client = %handed.key.client, error = %e, "cannot adopt a flow"),
            }
        }
        info!(
            worker = self.ctx.index,
            adopted, offered, "inherited UDP flows"
        );
    }

    /// Brings the engine up to `now`: begins the shutdown once it was asked for, runs the
    /// timers that are due and applies a newly published table. Call after each batch of
    /// events, and when [`Engine::next_deadline`] has passed.
    pub fn poll(&mut self, io: &mut D, now: Instant) {
        self.follow_handover(io, now);
        if !self.stopping && self.ctx.control.stopping() {
            self.begin_stop(io, now);
        }
        while let Some(timer) = self.timers.pop_due(now) {
            self.fire(io, timer, now);
        }
        let current = self.ctx.table().load().generation();
        if self
            .applied
            .as_ref()
            .is_none_or(|s| s.generation() != current)
        {
            let generation = self.apply_table(io, now);
            self.ctx.control.report_applied(self.ctx.index, generation);
        }
    }

    /// When [`Engine::poll`] must run next, at the latest.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// The shutdown has begun and every connection has ended.
    pub fn finished(&self) -> bool {
        self.stopping && self.conns.is_empty()
    }

    /// The worker was woken from another thread (a publish, the shutdown, or a budget unit
    /// that came back): serve waiting clients.
    pub fn woken(&mut self, io: &mut D, now: Instant) {
        self.serve_waiting(io, now);
    }

    /// Timers armed now (each belongs to a live connection, a pause or the tick).
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    /// Accepted clients waiting for a budget unit or descriptors.
    pub fn waiting_count(&self) -> usize {
        self.waiting.len()
    }

    /// A listener.
    pub fn listener(&self, id: ListenerId) -> Option<&Listening<D::Listener>> {
        self.listeners.get(id)
    }

    /// A listener, mutably.
    pub fn listener_mut(&mut self, id: ListenerId) -> Option<&mut Listening<D::Listener>> {
        self.listeners.get_mut(id)
    }

    /// The listener of a frontend.
    pub fn listener_for(&self, key: &ServicePortKey) -> Option<&D::Listener> {
        Some(&self.listeners.get(self.listener_id(key)?)?.io)
    }

    /// The id of a frontend's listener.
    pub fn listener_id(&self, key: &ServicePortKey) -> Option<ListenerId> {
        self.by_key.get(key).copied()
    }

    /// Whether TCP listeners should take clients now.
    pub fn may_accept(&self) -> bool {
        self.paused.is_none()
            && !self.stopping
            && !matches!(
                self.handover,
                Handover::Retiring | Handover::Retired | Handover::Waiting
            )
    }

    /// Whether UDP sockets should receive now.
    fn receiving(&self) -> bool {
        self.handover == Handover::Serving
    }

    /// Follows the handover phase the owner set (see [`crate::handover`]).
    fn follow_handover(&mut self, io: &mut D, now: Instant) {
        match (self.ctx.control.phase(), self.handover) {
            (Phase::Exporting, Handover::Serving) => {
                self.set_receiving(io, false);
                self.handover = Handover::Pausing;
                self.follow_handover(io, now);
            }
            (Phase::Exporting, Handover::Pausing) if self.quiet(io, Protocol::Udp) => {
                let sockets = self.export(io, now);
                info!(
                    worker = self.ctx.index,
                    listeners = sockets.listeners.len(),
                    flows = sockets.flows.len(),
                    "sockets exported for a handover"
                );
                self.ctx.control.deposit(self.ctx.index, sockets);
                self.handover = Handover::Exported;
            }
            (
                Phase::Retired,
                was @ (Handover::Serving | Handover::Pausing | Handover::Exported),
            ) => {
                if was == Handover::Serving {
                    self.set_receiving(io, false);
                }
                self.handover = Handover::Retiring;
                self.set_accepting(io, false);
                self.follow_handover(io, now);
            }
            (Phase::Retired, Handover::Retiring) if self.quiet(io, Protocol::Tcp) => {
                self.handover = Handover::Retired;
                self.ctx.control.report_retired(self.ctx.index);
            }
            (Phase::Serving, Handover::Waiting) => {
                self.handover = Handover::Serving;
                self.set_receiving(io, true);
                if self.may_accept() {
                    self.set_accepting(io, true);
                }
            }
            (
                Phase::Serving,
                was @ (Handover::Pausing
                | Handover::Exported
                | Handover::Retiring
                | Handover::Retired),
            ) => {
                info!(worker = self.ctx.index, "handover abandoned; serving again");
                self.handover = Handover::Serving;
                self.set_receiving(io, true);
                if matches!(was, Handover::Retiring | Handover::Retired) && self.may_accept() {
                    self.set_accepting(io, true);
                }
                // Frontends left unopened while the sockets were shared open now.
                self.applied = None;
            }
            _ => {}
        }
    }

    /// Stops or resumes receiving on every UDP listener and flow socket.
    fn set_receiving(&mut self, io: &mut D, on: bool) {
        io.udp_receiving(on);
        for (id, l) in self.listeners.iter_mut() {
            if l.key.protocol == Protocol::Udp {
                io.listener_receiving(id, &mut l.io, on);
            }
        }
        for id in self.flows.iter().map(|(id, _)| id).collect::<Vec<_>>() {
            if let Some(flow) = self.flows.get_mut(id) {
                io.flow_receiving(id, &mut flow.handle, on);
            }
        }
    }

    /// Whether nothing is received (and, with `Protocol::Tcp`, nothing accepted either) in
    /// flight on any listener or flow socket.
    fn quiet(&self, io: &D, upto: Protocol) -> bool {
        self.listeners
            .iter()
            .filter(|(_, l)| l.key.protocol == Protocol::Udp || upto == Protocol::Tcp)
            .all(|(_, l)| io.listener_quiet(&l.io))
            && self.flows.iter().all(|(_, f)| io.flow_quiet(&f.handle))
    }

    /// Duplicates of this worker's listening sockets and of its live flows' sockets, with
    /// their flows. A socket that cannot be duplicated (out of descriptors) is left out: the
    /// other process binds that frontend anew, or starts that flow anew.
    fn export(&self, io: &D, now: Instant) -> WorkerSockets {
        let mut sockets = WorkerSockets::default();
        for (_, l) in self.listeners.iter() {
            match io.export_listener(&l.io) {
                Ok(fd) => sockets.listeners.push((l.key, fd)),
                Err(e) => warn!(key = %l.key, error = %e, "cannot hand over a listener"),
            }
        }
        for (id, flow) in self.flows.iter().filter(|(_, f)| !f.is_retired()) {
            let Some(handed) = self.flows.handed(id, now) else {
                continue;
            };
            match io.export_flow(&flow.handle) {
                Ok(fd) => sockets.flows.push((handed, fd)),
                Err(e) => warn!(client = %handed.key.client, error = %e, "cannot hand over a flow"),
            }
        }
        sockets
    }

    fn fire(&mut self, io: &mut D, timer: Timer, now: Instant) {
        match timer {
            Timer::Connect(id) => self.connect_deadline(io, id, now),
            Timer::Idle(id) => self.idle_check(io, id, now),
            Timer::Drain(id) => {
                if let Some(conn) = self.conns.get_mut(id) {
                    conn.state.drain = None;
                    debug!(client = %conn.state.client, "closing a connection to a removed endpoint");
                    self.close(io, id, None);
                }
            }
            Timer::AcceptResume => {
                // Resume once the waiting clients are served (or pause again).
                self.paused = Some(Pause::Budget);
                self.serve_waiting(io, now);
            }
            Timer::Tick => {
                self.expire_flows(io, now);
                if self.paused == Some(Pause::Budget) {
                    // Connections that have become idle enough to evict make room.
                    self.serve_waiting(io, now);
                }
                let snapshot = self.ctx.table().load();
                let failed: Vec<ServicePortKey> = self.failed_binds.iter().copied().collect();
                for key in failed {
                    let wanted = self.wants_listener(&snapshot, &key);
                    self.set_listening(io, key, wanted);
                }
                self.report_binds();
                self.close_idle_replies(io);
                self.timers.add(now + TICK, Timer::Tick);
            }
            Timer::Shutdown => {
                for id in self.conns.ids() {
                    self.close(io, id, None);
                }
            }
        }
    }

    /// Brings listeners, flows and draining connections in line with the current table;
    /// returns its generation.
    fn apply_table(&mut self, io: &mut D, now: Instant) -> u64 {
        let snapshot = self.ctx.table().load_full();
        #[cfg(feature = "fault-injection")]
        crate::fault::at_apply(self.ctx.index, &snapshot);
        for (key, wanted) in snapshot.listener_changes(self.applied.as_deref()) {
            self.reconcile(io, key, wanted);
        }
        self.report_binds();
        self.flows.sync(&snapshot, now);
        if let Some(deadline) = self.config.tcp.drain_deadline(now) {
            for (id, conn) in self.conns.iter_mut() {
                let state = &mut conn.state;
                let served = state
                    .backend_addr()
                    .is_none_or(|b| snapshot.serves(&state.listener, state.client.ip(), b));
                if state.drain.is_none() && !served {
                    state.drain = Some(self.timers.add(deadline, Timer::Drain(id)));
                }
            }
        }
        let generation = snapshot.generation();
        self.applied = Some(snapshot);
        generation
    }

    /// Serves the frontend `key` (when `wanted`) or stops serving it: with its own listener,
    /// or, when it is steered, with the transparent listener of its family and protocol, open
    /// while that serves a frontend.
    fn reconcile(&mut self, io: &mut D, key: ServicePortKey, wanted: bool) {
        let Some(steering) = self.steering.filter(|s| s.steers(&key)) else {
            return self.set_listening(io, key, wanted);
        };
        let listener = steering.listener_for(&key);
        let changed = if wanted {
            self.steered.insert(key)
        } else {
            self.steered.remove(&key)
        };
        if changed {
            if wanted {
                self.steered_per_listener.add(listener);
            } else {
                self.steered_per_listener.remove(listener);
            }
            let serving = self.steered_per_listener.get(listener) > 0;
            self.set_listening(io, listener, serving);
        }
    }

    /// Whether `key` should be listened on: a transparent listener while it serves a steered
    /// frontend, any other frontend as [`Snapshot::wants_listener`] says.
    fn wants_listener(&self, snapshot: &Snapshot, key: &ServicePortKey) -> bool {
        match self.steering {
            Some(s) if s.is_listener(key) => self.steered_per_listener.get(*key) > 0,
            _ => snapshot.wants_listener(key),
        }
    }

    /// Opens or closes the listener of `key`.
    fn set_listening(&mut self, io: &mut D, key: ServicePortKey, wanted: bool) {
        let wanted = wanted && !self.stopping;
        match (wanted, self.by_key.get(&key).copied()) {
            (true, None) if self.frozen() => {}
            (true, None) => self.open_listener(io, key),
            (false, Some(_)) => self.remove_listener(io, &key),
            _ => {}
        }
        if !wanted && self.failed_binds.remove(&key) {
            self.ctx.control.set_bind_error(key, None);
        }
    }

    fn open_listener(&mut self, io: &mut D, key: ServicePortKey) {
        let transparent = self.steering.is_some_and(|s| s.is_listener(&key));
        match self.insert_listener(io, key, transparent) {
            Ok(()) => {
                self.ctx.control.set_bind_error(key, None);
                if self.failed_binds.remove(&key) {
                    self.recovered_binds += 1;
                }
                debug!(%key, "listening");
            }
            Err(e) => {
                if self.failed_binds.insert(key) {
                    let (count, first) = &mut self.unreported_binds;
                    *count += 1;
                    first.get_or_insert_with(|| (key, e.to_string()));
                }
                self.ctx.control.set_bind_error(key, Some(e.to_string()));
            }
        }
    }

    /// Opens a listener for `key` (see [`Driver::listen`]; `transparent`: its socket's
    /// `IP_TRANSPARENT`), serving if the worker serves, and indexes it.
    fn insert_listener(
        &mut self,
        io: &mut D,
        key: ServicePortKey,
        transparent: bool,
    ) -> io::Result<()> {
        let serving = match key.protocol {
            Protocol::Tcp => self.may_accept(),
            Protocol::Udp => self.receiving(),
        };
        let serves_steered = self.steering.is_some_and(|s| s.is_listener(&key));
        let inherited = self
            .ctx
            .control
            .take_inherited_listener(self.ctx.index, &key);
        let id = self.listeners.insert_with(|id| {
            io.listen(id, key, transparent, serving, inherited)
                .map(|l| Listening {
                    key,
                    transparent: serves_steered,
                    io: l,
                })
        })?;
        self.by_key.insert(key, id);
        Ok(())
    }

    /// Closes the listener of `key`, if it has one.
    fn remove_listener(&mut self, io: &mut D, key: &ServicePortKey) {
        if let Some(id) = self.by_key.remove(key)
            && let Some(l) = self.listeners.remove(id)
        {
            debug!(%key, "listener closed");
            self.end_listener(io, id, l.io);
        }
    }

    /// Whether this worker's sockets may be in another process's hands (exported or
    /// retired, or inherited and not served yet): they are let go of, never ended.
    fn shared(&self) -> bool {
        self.frozen() || self.handover == Handover::Waiting
    }

    /// Whether another process has this worker's sockets: it opens no new listener (one
    /// the other process would not know), until the handover is abandoned.
    fn frozen(&self) -> bool {
        matches!(
            self.handover,
            Handover::Exported | Handover::Retiring | Handover::Retired
        )
    }

    /// Closes a listener removed from the engine, or lets go of it if it is shared.
    fn end_listener(&mut self, io: &mut D, id: ListenerId, listener: D::Listener) {
        if self.shared() {
            io.release_listener(id, listener);
        } else {
            io.unlisten(id, listener);
        }
    }

    /// Closes a flow's socket removed from the flow table, or lets go of it if it is shared.
    fn end_flow(&mut self, io: &mut D, socket: D::Flow) {
        if self.shared() {
            io.release_flow(socket);
        } else {
            io.close_flow(socket);
        }
    }

    /// Logs the bind failures and recoveries since the last report, one line each.
    fn report_binds(&mut self) {
        if let (count, Some((key, error))) = std::mem::take(&mut self.unreported_binds) {
            warn!(
                frontends = count,
                first = %key,
                %error,
                failing = self.failed_binds.len(),
                "cannot listen; retrying every second"
            );
        }
        let recovered = std::mem::take(&mut self.recovered_binds);
        if recovered > 0 {
            info!(
                frontends = recovered,
                failing = self.failed_binds.len(),
                "listening again after failing"
            );
        }
    }

    /// Shutdown began: stop listening (clients are refused from now on), refuse waiting
    /// clients, close UDP flows, and give open connections until the deadline. A worker
    /// that handed its sockets over lets go of them instead: another process serves them.
    fn begin_stop(&mut self, io: &mut D, now: Instant) {
        self.stopping = true;
        self.by_key.clear();
        for id in self.listeners.ids() {
            if let Some(l) = self.listeners.remove(id) {
                self.end_listener(io, id, l.io);
            }
        }
        for key in std::mem::take(&mut self.failed_binds) {
            self.ctx.control.set_bind_error(key, None);
        }
        for w in std::mem::take(&mut self.waiting) {
            io.close(None, w.io, Some(Side::Client));
        }
        let ids: Vec<FlowId> = self.flows.iter().map(|(id, _)| id).collect();
        for id in ids {
            if let Some(flow) = self.flows.remove(id) {
                self.end_flow(io, flow.handle);
            }
        }
        if let Some(deadline) = self.ctx.control.deadline() {
            self.timers.add(deadline.max(now), Timer::Shutdown);
        }
    }

    /// Accepting failed for lack of descriptors or memory (`what` failed): pause it with
    /// backoff. Other accept errors are the driver's to log; they change nothing.
    pub fn out_of_resources(&mut self, io: &mut D, what: &str, error: &io::Error, now: Instant) {
        io.out_of_resources();
        if self.paused == Some(Pause::Resources) {
            return;
        }
        let delay = self.backoff.fail();
        warn!(%error, ?delay, "cannot {what}, out of resources; accepting paused");
        self.pause(io, Pause::Resources);
        self.timers.add(now + delay, Timer::AcceptResume);
    }

    fn pause(&mut self, io: &mut D, why: Pause) {
        let was = self.paused.replace(why);
        if was.is_none() {
            self.set_accepting(io, false);
        }
    }

    fn set_accepting(&mut self, io: &mut D, on: bool) {
        for (id, l) in self.listeners.iter_mut() {
            if l.key.protocol == Protocol::Tcp {
                io.accepting(id, &mut l.io, on);
            }
        }
    }

    /// A client was accepted on `listener`, as `conn` (its socket in the driver's state).
    pub fn accepted(
        &mut self,
        io: &mut D,
        listener: ListenerId,
        conn: D::Conn,
        peer: SocketAddr,
        now: Instant,
    ) {
        let key = match self.listeners.get(listener) {
            Some(l) if !self.stopping && !l.transparent => l.key,
            Some(_) if !self.stopping => match io.local_addr(&conn) {
                // The frontend the client connected to.
                Ok(local) => ServicePortKey::new(local, Protocol::Tcp),
                Err(e) => {
                    debug!(error = %e, "accepted a client without a local address");
                    return io.close(None, conn, Some(Side::Client));
                }
            },
            _ => return io.close(None, conn, Some(Side::Client)),
        };
        let waiting = Waiting {
            listener: key,
            peer,
            io: conn,
        };
        if !self.waiting.is_empty() {
            // Others came first.
            self.waiting.push_back(waiting);
            return;
        }
        match self.admit(io, now) {
            Some(permit) => {
                if let Err(w) = self.start_connection(io, waiting, permit, now) {
                    self.waiting.push_back(w);
                }
            }
            None => {
                self.waiting.push_back(waiting);
                self.pause(io, Pause::Budget);
            }
        }
    }

    /// Serves waiting clients while budget and descriptors allow; then accepting resumes if it
    /// was paused for the budget.
    fn serve_waiting(&mut self, io: &mut D, now: Instant) {
        if self.paused == Some(Pause::Resources) || self.serving {
            return;
        }
        self.serving = true;
        let served = self.serve_queue(io, now);
        self.serving = false;
        if served && self.paused == Some(Pause::Budget) && !self.stopping {
            self.paused = None;
            // Not while a handover keeps this worker from accepting.
            if self.may_accept() {
                self.set_accepting(io, true);
            }
        }
    }

    /// Starts waiting clients in order; false when one has to wait on.
    fn serve_queue(&mut self, io: &mut D, now: Instant) -> bool {
        while let Some(w) = self.waiting.pop_front() {
            let Some(permit) = self.admit(io, now) else {
                self.waiting.push_front(w);
                self.pause(io, Pause::Budget);
                return false;
            };
            if let Err(w) = self.start_connection(io, w, permit, now) {
                // Out of descriptors again: it stays first in line.
                self.waiting.push_front(w);
                return false;
            }
        }
        true
    }

    /// Closes a connection, resetting the socket of `reset` if given; its budget unit goes
    /// back (once the driver has closed its descriptors), and waiting clients are served.
    pub fn close(&mut self, io: &mut D, id: ConnId, reset: Option<Side>) {
        let Some(conn) = self.conns.remove(id) else {
            return;
        };
        let Connection { io: sockets, state } = conn;
        for timer in [state.timer, state.drain].into_iter().flatten() {
            self.timers.cancel(timer);
        }
        let admission = state.end();
        io.close(Some((id, admission)), sockets, reset);
        if !self.waiting.is_empty() {
            self.serve_waiting(io, Instant::now());
        }
    }

    /// A connection.
    pub fn conn(&self, id: ConnId) -> Option<&Connection<D::Conn>> {
        self.conns.get(id)
    }

    /// A connection, mutably.
    pub fn conn_mut(&mut self, id: ConnId) -> Option<&mut Connection<D::Conn>> {
        self.conns.get_mut(id)
    }

    /// Every connection, with its id.
    pub fn connections(&self) -> impl Iterator<Item = (ConnId, &Connection<D::Conn>)> {
        self.conns.iter()
    }

    /// Connections open now.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }
}
