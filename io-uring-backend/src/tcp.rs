//! TCP connections on the ring.
//!
//! A connection connects with a `Connect` (its deadline is the engine's: when it passes, the
//! connect is cancelled and its completion reports the failure), then forwards each direction
//! on its own, in one of two ways at a time:
//! - received: a receive picks a buffer from the worker's provided-buffer ring, the bytes are
//!   sent from that buffer, and the buffer goes back to the ring when the send has completed.
//!   One send is in flight per direction (so bytes stay in order) and at most [`MAX_QUEUED`]
//!   filled buffers wait per direction, so a slow reader holds back its writer instead of
//!   draining the ring; a receive that finds the ring empty waits until a buffer comes back
//!   (backpressure, as in liburing's `examples/proxy.c`). No system call per message.
//! - pumped: [`svcproxy_sys::stream`]'s pump, the one the epoll backend uses (splice(2)
//!   through a pipe for streams, a copy for small transfers), called inline, with the ring's
//!   polls for readiness: a poll for the source's readability when the pump found it drained,
//!   for the destination's writability when it found it full, at most one of each in flight.
//!   `IORING_OP_SPLICE` is not used: io_uring hands every splice to an io-wq thread, a
//!   wake-up and context switches per splice.
//!
//! With buffers forwarding (the default) a direction is received until a receive fills a
//! whole buffer: it is a stream then, pumped (zero copy) once its queued buffers are sent,
//! and received again when the pump finds its source drained, like HAProxy's `splice-auto`.
//! With splice forwarding every direction is always pumped.
//!
//! Half-close, resets, retries, idle and drain are the engine's. When it closes a connection,
//! every operation on both sockets is cancelled and the sockets are closed only when the last
//! completion is in, so no FIN is lost to an operation still holding a socket.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

use socket2::Socket;
use svcproxy_core::config::Forwarding;
use svcproxy_core::engine::{Admission, ConnId};
use svcproxy_core::session::{Direction, Side, Step};
use svcproxy_core::{Connection, OpenError, Protocol};
use svcproxy_sys::outbound;
use svcproxy_sys::socket::{is_resource_exhaustion, open_error};
use svcproxy_sys::stream::{Failed, PUMP_BUDGET, Pumped, Streams, Wait};
use tracing::debug;

use crate::ring::{Completion, Group, Span};
use crate::token::{self, Op};
use crate::worker::{Io, Worker};

/// Filled buffers that may wait per direction before receiving pauses.
pub(crate) const MAX_QUEUED: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Chunk {
    bid: u16,
    len: u32,
    sent: u32,
}

/// One direction of a connection.
#[derive(Debug, Default)]
struct Dir {
    /// A receive, or (`polling_in`) a poll for readability, is in flight on the source.
    recv_armed: bool,
    polling_in: bool,
    /// A send, or (`polling_out`) a poll for writability, is in flight on the destination.
    send_armed: bool,
    polling_out: bool,
    /// Moved by the pump (see the module docs), not by receives.
    pumped: bool,
    /// Waiting for a buffer to come back to the ring.
    starved: bool,
    /// Received buffers, oldest first.
    queue: VecDeque<Chunk>,
}

impl Dir {
    /// Received bytes wait to be sent.
    fn pending(&self) -> bool {
        self.send_armed || !self.queue.is_empty()
    }
}

/// A connection's sockets and forwarding state (the engine keeps the rest).
pub(crate) struct Conn {
    pub(crate) client: Socket,
    /// The socket of the connect attempt under way, or connected.
    backend: Option<Socket>,
    dirs: [Dir; 2],
    /// The pump's state: the sockets' readiness and the pumped directions' pipes.
    streams: Streams,
    /// Operations in flight on this connection's sockets.
    inflight: u32,
}

/// A direction's receives, and its polls for its source's readability, carry this tag.
fn recv_op(dir: Direction) -> Op {
    match dir {
        Direction::Upstream => Op::RecvUp,
        Direction::Downstream => Op::RecvDown,
    }
}

/// A direction's sends, and its polls for its destination's writability, carry this tag.
fn send_op(dir: Direction) -> Op {
    match dir {
        Direction::Upstream => Op::SendUp,
        Direction::Downstream => Op::SendDown,
    }
}

impl Conn {
    pub(crate) fn new(client: Socket) -> Self {
        Self {
            client,
            backend: None,
            dirs: [Dir::default(), Dir::default()],
            streams: Streams::default(),
            inflight: 0,
        }
    }

    fn socket(&self, side: Side) -> Option<&Socket> {
        match side {
            Side::Client => Some(&self.client),
            Side::Backend => self.backend.as_ref(),
        }
    }

    /// Direction `dir`'s state, its source and destination sockets, and the count of
    /// operations in flight, borrowed apart.
    fn direction(&mut self, dir: Direction) -> Directed<'_> {
        let Conn {
            client,
            backend,
            dirs,
            inflight,
            ..
        } = self;
        let (client, backend) = (&*client, &*backend);
        let fd = move |side| match side {
            Side::Client => Some(client.as_fd()),
            Side::Backend => backend.as_ref().map(AsFd::as_fd),
        };
        Directed {
            state: &mut dirs[dir.index()],
            from: fd(dir.from()),
            to: fd(dir.to()),
            inflight,
        }
    }
}

/// What [`Conn::direction`] lends.
struct Directed<'c> {
    state: &'c mut Dir,
    from: Option<BorrowedFd<'c>>,
    to: Option<BorrowedFd<'c>>,
    inflight: &'c mut u32,
}

impl Io {
    /// Opens a backend socket for `conn` and queues its connect.
    pub(crate) fn start_connect(
        &mut self,
        id: ConnId,
        conn: &mut Conn,
        to: SocketAddr,
        source: Option<SocketAddr>,
    ) -> Result<(), OpenError> {
        // The previous attempt's socket has no operation left.
        conn.backend = None;
        let open = || outbound(to, Protocol::Tcp, source, source.is_some(), false);
        let socket = match open() {
            Err(e) if is_resource_exhaustion(&e) && self.reserve.is_some() => {
                self.reserve = None;
                open()
            }
            other => other,
        }
        .map_err(open_error)?;
        self.ring
            .connect(socket.as_fd(), to, token::user_data(Op::Connect, id))
            .map_err(OpenError::Failed)?;
        conn.inflight += 1;
        conn.backend = Some(socket);
        Ok(())
    }

    /// Cancels the connect in flight; its completion reports the failure.
    pub(crate) fn cancel_connect(&mut self, conn: &Conn) {
        if let Some(backend) = &conn.backend {
            self.cancel(backend);
        }
    }

    pub(crate) fn start_forwarding(&mut self, id: ConnId, conn: &mut Connection<Conn>) {
        for side in [Side::Client, Side::Backend] {
            // Connected sockets take bytes; whether bytes wait is for receives or polls to say.
            conn.io.streams.ready_mut(side).writable = true;
        }
        for dir in Direction::BOTH {
            if self.forwarding == Forwarding::Splice {
                conn.io.dirs[dir.index()].pumped = true;
                self.pump_wait(id, conn, dir);
            } else {
                self.arm_recv(id, conn, dir);
            }
        }
    }

    /// Starts receiving in `dir` if it should: received (not pumped), not at EOF, not starved,
    /// with room.
    fn arm_recv(&mut self, id: ConnId, conn: &mut Connection<Conn>, dir: Direction) {
        let eof = conn.state.eof_seen(dir);
        let Directed {
            state: d,
            from,
            inflight,
            ..
        } = conn.io.direction(dir);
        if d.pumped || d.recv_armed || eof || d.starved || d.queue.len() >= MAX_QUEUED {
            return;
        }
        let Some(src) = from else {
            return;
        };
        if self
            .ring
            .recv(src, Group::Tcp, token::user_data(recv_op(dir), id))
            .is_ok()
        {
            d.recv_armed = true;
            *inflight += 1;
        }
    }

    /// Sends the oldest received buffer of `dir`, if no send is in flight.
    fn kick_send(&mut self, id: ConnId, conn: &mut Conn, dir: Direction) {
        let Directed {
            state: d,
            to,
            inflight,
            ..
        } = conn.direction(dir);
        let (Some(dst), false, Some(chunk)) = (to, d.send_armed, d.queue.front()) else {
            return;
        };
        let span = Span {
            group: Group::Tcp,
            bid: chunk.bid,
            offset: chunk.sent as usize,
            len: (chunk.len - chunk.sent) as usize,
        };
        if self
            .ring
            .send(dst, span, true, token::user_data(send_op(dir), id))
            .is_ok()
        {
            d.send_armed = true;
            *inflight += 1;
        }
    }

    /// A pumped direction is idle: polls for what it waits for, or, a stream of buffers
    /// forwarding whose source is drained, goes back to receiving.
    fn pump_wait(&mut self, id: ConnId, conn: &mut Connection<Conn>, dir: Direction) {
        let wait = conn.io.streams.wait(dir, &conn.state);
        if wait == Wait::Readable && self.forwarding == Forwarding::Buffers {
            conn.io.dirs[dir.index()].pumped = false;
            return self.arm_recv(id, conn, dir);
        }
        let Directed {
            state: d,
            from,
            to,
            inflight,
        } = conn.io.direction(dir);
        let (socket, events, op, armed, polling) = match wait {
            Wait::Done => return,
            Wait::Readable => (
                from,
                libc::POLLIN | libc::POLLRDHUP,
                recv_op(dir),
                &mut d.recv_armed,
                &mut d.polling_in,
            ),
            Wait::Writable => (
                to,
                libc::POLLOUT,
                send_op(dir),
                &mut d.send_armed,
                &mut d.polling_out,
            ),
        };
        let Some(socket) = socket else {
            return;
        };
        if *armed {
            return;
        }
        let tag = token::user_data(op, id);
        if self.ring.poll(socket, events as u32, tag).is_ok() {
            *armed = true;
            *polling = true;
            *inflight += 1;
        }
    }

    /// Closes a connection the engine has ended: resets `reset`'s socket if given, cancels
    /// what is in flight; one with operations in flight waits in `closing_conns`, holding its
    /// admission, until the last has completed.
    pub(crate) fn close_conn(
        &mut self,
        closed: Option<(ConnId, Admission)>,
        conn: Conn,
        reset: Option<Side>,
    ) {
        if let Some(socket) = reset.and_then(|side| conn.socket(side)) {
            let _ = socket.set_linger(Some(std::time::Duration::ZERO));
        }
        match closed {
            Some((id, admission)) if conn.inflight > 0 => {
                for side in [Side::Client, Side::Backend] {
                    if let Some(socket) = conn.socket(side) {
                        self.cancel(socket);
                    }
                }
                self.closing_conns.insert(id, (conn, admission));
            }
            closed => {
                self.free_conn(conn);
                drop(closed);
            }
        }
    }

    /// Frees a connection with nothing in flight: buffers and empty pipes back, sockets closed.
    fn free_conn(&mut self, mut conn: Conn) {
        for d in &mut conn.dirs {
            for chunk in d.queue.drain(..) {
                self.ring.recycle(Group::Tcp, chunk.bid);
                self.recycled = true;
            }
        }
        conn.streams.release_pipes(&mut self.buffers.pipes);
        drop(conn);
        if self.reserve.is_none() {
            self.reserve = std::fs::File::open("/dev/null").ok();
        }
    }

    /// A completion for a connection the engine has closed.
    fn closing_completion(&mut self, id: ConnId, c: Completion) {
        if let Some(bid) = c.buffer() {
            self.ring.recycle(Group::Tcp, bid);
            self.recycled = true;
        }
        let Some((conn, _)) = self.closing_conns.get_mut(&id) else {
            return;
        };
        conn.inflight -= 1;
        if conn.inflight == 0
            && let Some((conn, admission)) = self.closing_conns.remove(&id)
        {
            self.free_conn(conn);
            // The descriptors are closed: the admission may go.
            drop(admission);
        }
    }
}

impl Worker {
    /// A completion of one of a connection's operations.
    pub(crate) fn on_conn(&mut self, op: Op, id: ConnId, c: Completion, now: Instant) {
        let Some(conn) = self.engine.conn_mut(id) else {
            self.io.closing_completion(id, c);
            return;
        };
        conn.io.inflight -= 1;
        match op {
            Op::Connect if c.result == 0 => self.engine.connected(&mut self.io, id, now),
            Op::Connect => {
                let error = io::Error::from_raw_os_error(-c.result);
                debug!(backend = ?conn.state.backend_addr(), %error, "connect failed");
                self.engine.connect_failed(&mut self.io, id, now);
            }
            Op::RecvUp => self.on_recv(id, Direction::Upstream, c, now),
            Op::RecvDown => self.on_recv(id, Direction::Downstream, c, now),
            Op::SendUp => self.on_send(id, Direction::Upstream, c, now),
            Op::SendDown => self.on_send(id, Direction::Downstream, c, now),
            _ => {}
        }
    }

    fn on_recv(&mut self, id: ConnId, dir: Direction, c: Completion, now: Instant) {
        let Some(conn) = self.engine.conn_mut(id) else {
            return;
        };
        let io = &mut self.io;
        let d = &mut conn.io.dirs[dir.index()];
        d.recv_armed = false;
        if std::mem::take(&mut d.polling_in) {
            return self.on_ready(id, dir, dir.from(), c, now);
        }
        match c.result {
            n if n > 0 => {
                conn.state.active(now);
                if let Some(bid) = c.buffer() {
                    d.queue.push_back(Chunk {
                        bid,
                        len: n as u32,
                        sent: 0,
                    });
                }
                if n as u32 == io.buffer_size {
                    // A full buffer: a stream, pumped once what was received is sent.
                    d.pumped = true;
                    conn.io.streams.stream(dir);
                }
                io.kick_send(id, &mut conn.io, dir);
                io.arm_recv(id, conn, dir);
            }
            0 => {
                let pending = d.pending();
                let step = conn.state.read_eof(dir, pending);
                self.step(id, step);
            }
            e if e == -libc::ENOBUFS => {
                d.starved = true;
                io.starved.push(id);
            }
            e if e == -libc::EAGAIN => io.arm_recv(id, conn, dir),
            e if e == -libc::ECANCELED => {}
            _ => self.engine.failed(&mut self.io, id, dir.from()),
        }
    }

    fn on_send(&mut self, id: ConnId, dir: Direction, c: Completion, now: Instant) {
        let Some(conn) = self.engine.conn_mut(id) else {
            return;
        };
        let io = &mut self.io;
        let Directed {
            state: d,
            to,
            inflight,
            ..
        } = conn.io.direction(dir);
        d.send_armed = false;
        if std::mem::take(&mut d.polling_out) {
            if d.pumped && d.queue.is_empty() {
                return self.on_ready(id, dir, dir.to(), c, now);
            }
            if c.result < 0 {
                if c.result != -libc::ECANCELED {
                    self.engine.failed(&mut self.io, id, dir.to());
                }
                return;
            }
            io.kick_send(id, &mut conn.io, dir);
            return;
        }
        if c.result == -libc::EAGAIN {
            // The destination is full: wait until it takes more.
            let ud = token::user_data(send_op(dir), id);
            let Some(dst) = to else {
                return;
            };
            if io.ring.poll(dst, libc::POLLOUT as u32, ud).is_ok() {
                d.send_armed = true;
                d.polling_out = true;
                *inflight += 1;
            }
            return;
        }
        if c.result < 0 {
            if c.result != -libc::ECANCELED {
                // The destination failed: the source's side is reset.
                self.engine.failed(&mut self.io, id, dir.to());
            }
            return;
        }
        let n = c.result as u32;
        conn.state.active(now);
        conn.state.delivered(dir, n as usize);
        let mut recycled = None;
        if let Some(chunk) = d.queue.front_mut() {
            chunk.sent += n;
            if chunk.sent >= chunk.len {
                recycled = d.queue.pop_front().map(|c| c.bid);
            }
        }
        let done = !d.pending();
        let pumped = d.pumped;
        if let Some(bid) = recycled {
            io.ring.recycle(Group::Tcp, bid);
            io.recycled = true;
        }
        io.kick_send(id, &mut conn.io, dir);
        if done && conn.state.eof_seen(dir) {
            let step = conn.state.drained(dir);
            self.step(id, step);
        } else if done && pumped {
            self.pump(id, dir, now);
        } else {
            io.arm_recv(id, conn, dir);
        }
    }

    /// A poll of `side`'s socket for pumped `dir` completed: notes what it reports and pumps.
    /// (The other direction through the socket has a poll of its own if it waits for it.)
    fn on_ready(&mut self, id: ConnId, dir: Direction, side: Side, c: Completion, now: Instant) {
        let Some(conn) = self.engine.conn_mut(id) else {
            return;
        };
        match c.result {
            e if e == -libc::ECANCELED => return,
            e if e < 0 => return self.engine.failed(&mut self.io, id, side),
            _ => {}
        }
        let mask = c.result as i16;
        let trouble = mask & (libc::POLLERR | libc::POLLHUP) != 0;
        let ready = conn.io.streams.ready_mut(side);
        ready.readable |= trouble || mask & (libc::POLLIN | libc::POLLRDHUP) != 0;
        ready.writable |= trouble || mask & libc::POLLOUT != 0;
        ready.peer_closed |= trouble || mask & libc::POLLRDHUP != 0;
        self.pump(id, dir, now);
    }

    /// Pumps `dir`, then waits for what it needs next.
    pub(crate) fn pump(&mut self, id: ConnId, dir: Direction, now: Instant) {
        let Some(conn) = self.engine.conn_mut(id) else {
            return;
        };
        let Connection { io: c, state } = conn;
        let Some(backend) = &c.backend else {
            return;
        };
        let mut budget = PUMP_BUDGET;
        let sockets = [&c.client, backend];
        match c
            .streams
            .pump_dir(dir, sockets, state, &mut self.io.buffers, &mut budget, now)
        {
            Ok(Pumped::Idle) => self.io.pump_wait(id, conn, dir),
            Ok(Pumped::Budget) => self.io.again.push((id, dir)),
            Ok(Pumped::Finished) => self.engine.close(&mut self.io, id, None),
            Err(Failed(side)) => self.engine.failed(&mut self.io, id, side),
        }
    }

    /// Carries out a half-close step.
    fn step(&mut self, id: ConnId, step: Step) {
        match step {
            Step::Continue => {}
            // A direct call, not a ring operation: io_uring always hands IORING_OP_SHUTDOWN to
            // an io-wq thread, a wake-up and two context switches per connection, while
            // shutdown(2) of a TCP socket never blocks. Everything queued for the socket has
            // been sent when the engine asks for this step.
            Step::Shutdown(side) => {
                if let Some(socket) = self.engine.conn(id).and_then(|c| c.io.socket(side)) {
                    let _ = socket.shutdown(std::net::Shutdown::Write);
                }
            }
            // Closing both sockets sends the last FIN.
            Step::ShutdownAndFinish(_) => self.engine.close(&mut self.io, id, None),
        }
    }

    /// Re-arms receives that found the buffer ring empty, now that buffers came back.
    pub(crate) fn wake_starved(&mut self) {
        for id in std::mem::take(&mut self.io.starved) {
            if let Some(conn) = self.engine.conn_mut(id) {
                for d in &mut conn.io.dirs {
                    d.starved = false;
                }
                for dir in Direction::BOTH {
                    self.io.arm_recv(id, conn, dir);
                }
            }
        }
    }
}
