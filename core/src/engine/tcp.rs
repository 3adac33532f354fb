//! TCP connections of the engine: what a connection is in ([`Lifecycle`]) and the events that
//! move it.
//!
//! - Connect: each attempt has a deadline (`connect_timeout`, doubled per attempt). A failed,
//!   refused or timed-out attempt moves to the next endpoint the policy gives that has not
//!   been tried, up to `connect_attempts`; then the client is reset. An attempt that cannot
//!   even open its socket counts a connect error on its endpoint and moves on at once, except
//!   for lack of descriptors on the first attempt: then the client waits (module docs).
//! - Connected: the idle timer runs. It is checked, not re-armed, on activity: when it fires
//!   the connection closes if it has been quiet for `idle_timeout`, else the timer is set for
//!   the end of the quiet period.
//! - Half-close ([`Lifecycle::read_eof`], [`Lifecycle::drained`]): EOF read in one direction
//!   shuts down the write side of the other socket once every byte read before it has been
//!   written; when both directions are shut, the connection is finished.
//! - Errors ([`Engine::failed`]): an error on one side resets the other, and both close.
//! - Drain: connections to an endpoint that left the table are closed after the drain policy's
//!   grace (or kept, by default).
//!
//! - Eviction: with the budget spent, a worker closes its connections idle longest (idle at
//!   least [`EVICT_AFTER_IDLE`], a sixteenth of its connections at a time) to admit new
//!   clients, as an idle timeout come early: without it, a flood of idle connections from many
//!   addresses would keep every new client waiting until the idle timeout (an hour by
//!   default). Connections still connecting are not evicted (their deadline ends them).
//!
//! Every timer a connection arms is cancelled when it closes, and its budget unit goes back.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::debug;

use super::{ConnId, Driver, Engine, OpenError, Timer, TimerId, Timers, Waiting};
use crate::budget::Permit;
use crate::clients::ClientPermit;
use crate::model::ServicePortKey;
use crate::select::{Backend, PortState, Routed};
use crate::session::{Direction, Side, Step, TcpSession};
use crate::slots::Slots;
use crate::stats::Opened;

/// With the budget spent, connections idle (no byte moved either way) this long may be
/// closed to admit new clients; those active more recently never are.
pub const EVICT_AFTER_IDLE: Duration = Duration::from_secs(1);

/// One connection: the driver's sockets and the engine's state.
#[derive(Debug)]
pub struct Connection<C> {
    /// The driver's sockets and forwarding state.
    pub io: C,
    /// Where the connection is in its life.
    pub state: Lifecycle,
}

/// The engine's part of a connection.
#[derive(Debug)]
pub struct Lifecycle {
    pub(super) listener: ServicePortKey,
    pub(super) client: SocketAddr,
    /// The counters of the endpoint of the attempt under way (or connected), which counts it
    /// as opened; the endpoint is the session's last one tried.
    backend: Option<Opened>,
    session: TcpSession,
    connected: bool,
    last_activity: Instant,
    /// The connect deadline while connecting, the idle check once connected.
    pub(super) timer: Option<TimerId>,
    pub(super) drain: Option<TimerId>,
    admission: Admission,
}

/// What a connection holds of the proxy's limits: its client address's share and its budget
/// unit. When the engine closes the connection it hands them to the driver, which drops them
/// once the connection's descriptors are closed (at once, or when the operations in flight on
/// them have ended), so that a burst of closes cannot let new connections take descriptors the
/// closed ones still hold. Dropped in this order: a worker woken by the unit must find the
/// share back already.
#[derive(Debug)]
pub struct Admission {
    _client: ClientPermit,
    _unit: Permit,
}

impl Lifecycle {
    fn new(
        listener: ServicePortKey,
        client: SocketAddr,
        admission: Admission,
        now: Instant,
    ) -> Self {
        Self {
            listener,
            client,
            backend: None,
            session: TcpSession::new(),
            connected: false,
            last_activity: now,
            timer: None,
            drain: None,
            admission,
        }
    }

    /// Ends the connection: counts it closed and gives back what it holds of the limits.
    pub(super) fn end(self) -> Admission {
        self.admission
    }

    /// The endpoint being connected to, or connected.
    pub fn backend_addr(&self) -> Option<SocketAddr> {
        self.backend.as_ref().and(self.session.last_tried())
    }

    /// Whether the backend socket is connected.
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Bytes moved at `now` (postpones the idle timeout).
    #[inline]
    pub fn active(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// Counts `n` bytes delivered in `dir`.
    #[inline]
    pub fn delivered(&self, dir: Direction, n: usize) {
        if let Some(tally) = &self.backend {
            match dir {
                Direction::Upstream => tally.bytes_in(n as u64),
                Direction::Downstream => tally.bytes_out(n as u64),
            }
        }
    }

    /// EOF was read in `dir`; `pending` says whether bytes read before it still wait to be
    /// written. The driver carries out the step: [`Step::Shutdown`] by shutting down that
    /// socket's write side, [`Step::ShutdownAndFinish`] by closing the connection.
    pub fn read_eof(&mut self, dir: Direction, pending: bool) -> Step {
        self.session.read_eof(dir, pending)
    }

    /// Every byte read in `dir` has been written; a step as for [`Lifecycle::read_eof`].
    pub fn drained(&mut self, dir: Direction) -> Step {
        self.session.drained(dir)
    }

    /// Whether EOF has been read in `dir`.
    pub fn eof_seen(&self, dir: Direction) -> bool {
        self.session.eof_seen(dir)
    }
}

/// The connection `id` if its connect attempt was under way, with the attempt's deadline
/// disarmed.
fn attempt_ended<'c, C>(
    conns: &'c mut Slots<Connection<C>>,
    timers: &mut Timers<Timer>,
    id: ConnId,
) -> Option<&'c mut Connection<C>> {
    let conn = conns.get_mut(id).filter(|c| !c.state.connected)?;
    if let Some(timer) = conn.state.timer.take() {
        timers.cancel(timer);
    }
    Some(conn)
}

/// How starting a connect attempt went.
enum Attempt {
    Connecting,
    /// Out of descriptors on the first attempt: the client waits.
    Exhausted(std::io::Error),
    /// Every endpoint allowed failed at once.
    Failed,
}

impl<D: Driver> Engine<D> {
    /// A budget unit for a new client: a free one, or one made free by evicting idle
    /// connections.
    pub(super) fn admit(&mut self, io: &mut D, now: Instant) -> Option<Permit> {
        let worker = self.ctx.index;
        if let Some(permit) = self.ctx.control.admit(worker) {
            return Some(permit);
        }
        if self.evict_idle(io, now) == 0 {
            return None;
        }
        self.ctx.control.admit(worker)
    }

    /// Closes the connections idle longest, up to a sixteenth of this worker's (at least one),
    /// of those idle at least [`EVICT_AFTER_IDLE`]; returns how many it closed.
    fn evict_idle(&mut self, io: &mut D, now: Instant) -> usize {
        let mut idle: Vec<(Instant, ConnId)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state.connected
                    && now.saturating_duration_since(c.state.last_activity) >= EVICT_AFTER_IDLE
            })
            .map(|(id, c)| (c.state.last_activity, id))
            .collect();
        let n = (self.conns.len() / 16).max(1);
        if idle.len() > n {
            idle.select_nth_unstable(n);
            idle.truncate(n);
        }
        for &(_, id) in &idle {
            if let Some(conn) = self.conns.get(id) {
                debug!(client = %conn.state.client, "idle connection evicted to make room");
                if let Some(tally) = &conn.state.backend {
                    tally.evicted();
                }
            }
            self.close(io, id, None);
        }
        idle.len()
    }

    /// Starts serving a client holding `permit`. `Err` gives the client back to wait, when no
    /// backend socket can be opened for lack of descriptors (its budget unit goes back).
    pub(super) fn start_connection(
        &mut self,
        io: &mut D,
        w: Waiting<D::Conn>,
        permit: Permit,
        now: Instant,
    ) -> Result<(), Waiting<D::Conn>> {
        let snapshot = self.ctx.table().load();
        let port = match snapshot.route(&w.listener, w.peer.ip()) {
            Some(Routed::Serve(port)) => port,
            Some(Routed::Denied(port)) => {
                port.counters().add_refused();
                io.close(None, w.io, Some(Side::Client));
                return Ok(());
            }
            None => {
                io.close(None, w.io, Some(Side::Client));
                return Ok(());
            }
        };
        let Some(share) = self.ctx.control.admit_client(w.peer.ip()) else {
            port.counters().add_limited();
            io.close(None, w.io, Some(Side::Client));
            return Ok(());
        };
        let Some(first) = port.select(w.peer, now) else {
            port.counters().add_refused();
            io.close(None, w.io, Some(Side::Client));
            return Ok(());
        };
        let (listener, peer) = (w.listener, w.peer);
        let id = self.conns.insert(Connection {
            io: w.io,
            state: Lifecycle::new(
                listener,
                peer,
                Admission {
                    _client: share,
                    _unit: permit,
                },
                now,
            ),
        });
        match self.attempt(io, id, port, first, true, now) {
            Attempt::Connecting => {
                self.backoff.succeed();
                Ok(())
            }
            Attempt::Failed => {
                self.close(io, id, Some(Side::Client));
                Ok(())
            }
            Attempt::Exhausted(e) => {
                let conn = self.conns.remove(id).expect("inserted above");
                self.out_of_resources(io, "open a backend socket", &e, now);
                Err(Waiting {
                    listener,
                    peer,
                    io: conn.io,
                })
            }
        }
    }

    /// Starts connecting to `first` or, after immediate failures, the next endpoints allowed.
    fn attempt(
        &mut self,
        io: &mut D,
        id: ConnId,
        port: &PortState,
        first: &Backend,
        may_wait: bool,
        now: Instant,
    ) -> Attempt {
        let policy = self.config.tcp;
        let preserve = self.config.preserve_client_ip;
        let Some(conn) = self.conns.get_mut(id) else {
            return Attempt::Failed;
        };
        let client = conn.state.client;
        let source = preserve.then(|| SocketAddr::new(client.ip(), 0));
        let mut next = Some(first);
        while let Some(backend) = next {
            let timeout = conn.state.session.connecting(&policy, backend.addr());
            match io.connect(id, &mut conn.io, backend.addr(), source) {
                Ok(()) => {
                    conn.state.backend = Some(backend.tally().open());
                    conn.state.timer = now
                        .checked_add(timeout)
                        .map(|at| self.timers.add(at, Timer::Connect(id)));
                    return Attempt::Connecting;
                }
                Err(OpenError::Exhausted(e)) if may_wait => return Attempt::Exhausted(e),
                Err(OpenError::Exhausted(e) | OpenError::Failed(e)) => {
                    debug!(backend = %backend.addr(), error = %e, "cannot connect");
                    backend.tally().connect_error();
                    next = conn.state.session.next_backend(&policy, port, client, now);
                }
            }
        }
        Attempt::Failed
    }

    /// The backend socket of `id` connected.
    pub fn connected(&mut self, io: &mut D, id: ConnId, now: Instant) {
        let Some(conn) = attempt_ended(&mut self.conns, &mut self.timers, id) else {
            return;
        };
        conn.state.connected = true;
        conn.state.last_activity = now;
        conn.state.timer = self
            .config
            .tcp
            .idle_timeout
            .and_then(|idle| now.checked_add(idle))
            .map(|at| self.timers.add(at, Timer::Idle(id)));
        io.forward(id, conn);
    }

    /// The attempt of `id` failed (refused, unreachable, aborted after its deadline): the next
    /// endpoint, or the client is reset.
    pub fn connect_failed(&mut self, io: &mut D, id: ConnId, now: Instant) {
        let policy = self.config.tcp;
        let Some(conn) = attempt_ended(&mut self.conns, &mut self.timers, id) else {
            return;
        };
        if let Some(tally) = conn.state.backend.take() {
            tally.connect_error();
        }
        let snapshot = self.ctx.table().load();
        let route = snapshot.route(&conn.state.listener, conn.state.client.ip());
        let next = route.and_then(Routed::serving).and_then(|port| {
            let next = conn
                .state
                .session
                .next_backend(&policy, port, conn.state.client, now);
            next.map(|backend| (port, backend))
        });
        let started = next.is_some_and(|(port, backend)| {
            matches!(
                self.attempt(io, id, port, backend, false, now),
                Attempt::Connecting
            )
        });
        if !started {
            self.close(io, id, Some(Side::Client));
        }
    }

    /// An error on `side` of `id` (a reset, or any other): the other side is reset and both
    /// are closed.
    pub fn failed(&mut self, io: &mut D, id: ConnId, side: Side) {
        self.close(io, id, Some(side.other()));
    }

    pub(super) fn connect_deadline(&mut self, io: &mut D, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        conn.state.timer = None;
        if conn.state.connected {
            return;
        }
        debug!(backend = ?conn.state.backend_addr(), "connect timed out");
        if io.abort_connect(id, &mut conn.io) {
            self.connect_failed(io, id, now);
        }
    }

    pub(super) fn idle_check(&mut self, io: &mut D, id: ConnId, now: Instant) {
        let (Some(conn), Some(idle)) = (self.conns.get_mut(id), self.config.tcp.idle_timeout)
        else {
            return;
        };
        conn.state.timer = None;
        match conn.state.last_activity.checked_add(idle) {
            Some(quiet_until) if quiet_until > now => {
                conn.state.timer = Some(self.timers.add(quiet_until, Timer::Idle(id)));
            }
            Some(_) => {
                debug!(client = %conn.state.client, "idle timeout");
                self.close(io, id, None);
            }
            // So far away it never comes.
            None => {}
        }
    }
}
