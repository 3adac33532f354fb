//! One proxied TCP connection and its forwarding through splice pipes.
//!
//! Readiness is edge-triggered, so each socket's "readable" and "writable" flags are kept
//! here: set by events, cleared only by `WouldBlock`. A direction moves bytes
//! source -> pipe -> destination. The pipe is taken from the pool when the source has data and
//! given back once it is empty and the source is drained, so idle connections hold none.
//!
//! Small transfers are copied (a read into a stack buffer and a write: two system calls, no
//! pipe), streams are spliced (zero copy): a read that fills the 16 KiB copy buffer switches a
//! direction to splice until it next goes idle, like HAProxy's `splice-auto`. Bytes a copy
//! could not write at once wait in a heap buffer that exists only while it holds them. When no
//! pipe can be had (out of descriptors), streams are copied too, so connections keep moving.
//!
//! The "pipe full or socket empty" trap: splicing into a pipe that already holds bytes can fail with `WouldBlock` because the pipe ran out of slots, not
//! because the socket is empty. A direction therefore reads only when it holds nothing (it
//! drains first, and waits for the destination if that blocks), so `WouldBlock` from the
//! source always means the socket is drained, and clearing "readable" never loses an edge.

use std::io::{self, Read, Write};
use std::time::Instant;

use rustix::net::Shutdown;
use socket2::Socket;
use svcproxy_core::Connection;
use svcproxy_core::session::{Direction, Side, Step};
use svcproxy_sys::{Pipe, PipePool};

/// Readiness of one socket, as last reported by epoll and not yet consumed.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Ready {
    pub(crate) readable: bool,
    pub(crate) writable: bool,
    /// The peer has shut down its side (RDHUP/HUP seen): read to the end, since no further
    /// edge will announce the end of the stream.
    pub(crate) peer_closed: bool,
}

/// One direction of a connection. Bytes in flight are in the pipe (`held` of them) or, in
/// the copy fallback, in `spill`.
#[derive(Debug, Default)]
pub(crate) struct Half {
    pipe: Option<Pipe>,
    held: usize,
    spill: Vec<u8>,
    /// Large reads lately: splice instead of copying.
    streaming: bool,
}

impl Half {
    fn pending(&self) -> bool {
        self.held > 0 || !self.spill.is_empty()
    }
}

/// Bytes read per call when copying; a read this large marks a stream (spliced from then on).
const COPY_CHUNK: usize = 16 << 10;

/// A worker's forwarding buffers: its pipe pool, and the one copy buffer its connections share
/// (a connection never holds it between calls).
#[derive(Debug)]
pub(crate) struct Buffers {
    pub(crate) pipes: PipePool,
    scratch: Box<[u8]>,
}

impl Buffers {
    pub(crate) fn new(pipes: PipePool) -> Self {
        Self {
            pipes,
            scratch: vec![0; COPY_CHUNK].into_boxed_slice(),
        }
    }
}

/// How a pump ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pumped {
    /// Both sockets would block (or the direction is done): wait for events.
    Idle,
    /// The byte budget ran out with more to move.
    Budget,
    /// Both directions are shut down: close the connection.
    Finished,
}

/// The connection failed on `Side`: close both, resetting the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failed(pub(crate) Side);

/// A connection's sockets and forwarding state (the engine keeps the rest).
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) client: Socket,
    /// The socket of the connect attempt under way, or connected.
    pub(crate) backend: Option<Socket>,
    ready: [Ready; 2],
    halves: [Half; 2],
    /// The client could not be watched: the connection ends at its first pump.
    pub(crate) broken: bool,
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

fn dir_index(dir: Direction) -> usize {
    match dir {
        Direction::Upstream => 0,
        Direction::Downstream => 1,
    }
}

impl Conn {
    pub(crate) fn new(client: Socket) -> Self {
        Self {
            client,
            backend: None,
            ready: [Ready::default(); 2],
            halves: [Half::default(), Half::default()],
            broken: false,
        }
    }

    pub(crate) fn ready_mut(&mut self, side: Side) -> &mut Ready {
        &mut self.ready[side_index(side)]
    }

    /// Gives empty pipes back to the pool (pipes holding bytes are closed with the connection).
    pub(crate) fn release_pipes(&mut self, pool: &mut PipePool) {
        for half in &mut self.halves {
            if let Some(pipe) = half.pipe.take()
                && half.held == 0
            {
                pool.give(pipe);
            }
        }
    }
}

/// Moves bytes both ways until sockets would block, the budget is spent, or the connection
/// ends.
pub(crate) fn pump(
    conn: &mut Connection<Conn>,
    buffers: &mut Buffers,
    budget: &mut usize,
    now: Instant,
) -> Result<Pumped, Failed> {
    if conn.io.broken {
        return Err(Failed(Side::Client));
    }
    let mut result = Pumped::Idle;
    for dir in Direction::BOTH {
        match pump_one(conn, dir, buffers, budget, now)? {
            Pumped::Finished => return Ok(Pumped::Finished),
            Pumped::Idle => {}
            other => result = other,
        }
    }
    Ok(result)
}

fn pump_one(
    conn: &mut Connection<Conn>,
    dir: Direction,
    buffers: &mut Buffers,
    budget: &mut usize,
    now: Instant,
) -> Result<Pumped, Failed> {
    let Connection { io, state } = conn;
    let Some(backend) = io.backend.as_ref() else {
        return Ok(Pumped::Idle);
    };
    let sockets = [&io.client, backend];
    let Buffers {
        pipes: pool,
        scratch,
    } = buffers;
    let (src, dst) = (dir.from(), dir.to());
    let (si, di) = (side_index(src), side_index(dst));
    let (from, to) = (sockets[si], sockets[di]);
    let ready = &mut io.ready;
    let half = &mut io.halves[dir_index(dir)];
    let mut outcome = Pumped::Idle;
    loop {
        // First empty what is held into the destination.
        if half.pending() {
            if !ready[di].writable {
                break;
            }
            let written = match &half.pipe {
                Some(pipe) if half.held > 0 => pipe.drain(to, half.held),
                _ => (&*to).write(&half.spill),
            };
            match written {
                Ok(n) => {
                    if half.held > 0 {
                        half.held -= n;
                    } else {
                        half.spill.drain(..n);
                        if half.spill.is_empty() {
                            half.spill = Vec::new();
                        }
                    }
                    state.active(now);
                    count(state, dir, n, budget);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready[di].writable = false;
                    break;
                }
                Err(_) => return Err(Failed(dst)),
            }
            if half.pending() {
                continue;
            }
            if state.eof_seen(dir) && finish(state.drained(dir), sockets) {
                return Ok(Pumped::Finished);
            }
        }
        // Then read from the source; nothing is held at this point. Small transfers are
        // copied through a stack buffer (one read and one write cost less than two splices
        // for a few bytes); a read that fills the buffer marks the direction as streaming,
        // and streams are spliced through a pipe until the direction next goes idle.
        if state.eof_seen(dir) || !ready[si].readable {
            break;
        }
        if *budget == 0 {
            outcome = Pumped::Budget;
            break;
        }
        if half.streaming
            && half.pipe.is_none()
            && let Ok(p) = pool.take()
        {
            half.pipe = Some(p);
        }
        let mut written = 0;
        let mut drained = false;
        let read = match (&half.pipe, half.streaming) {
            (Some(pipe), true) => {
                let room = pipe.capacity() - half.held;
                pipe.fill(from, room).inspect(|&n| half.held += n)
            }
            _ => {
                let chunk = &mut scratch[..];
                let read = (&*from).read(chunk);
                if let Ok(n @ 1..) = read {
                    half.streaming = n == COPY_CHUNK;
                    // A short read emptied the socket: the next bytes bring a new edge (but
                    // an end of stream already announced does not: read on to it).
                    drained = n < COPY_CHUNK && !ready[si].peer_closed;
                    if ready[di].writable {
                        match (&*to).write(&chunk[..n]) {
                            Ok(w) => written = w,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                ready[di].writable = false;
                            }
                            Err(_) => return Err(Failed(dst)),
                        }
                    }
                    half.spill.extend_from_slice(&chunk[written..n]);
                }
                read
            }
        };
        match read {
            Ok(0) => {
                if finish(state.read_eof(dir, half.pending()), sockets) {
                    return Ok(Pumped::Finished);
                }
            }
            Ok(_) => {
                state.active(now);
                if written > 0 {
                    count(state, dir, written, budget);
                }
                if drained {
                    ready[si].readable = false;
                    if !half.pending() {
                        break;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing is held when reading, so this means the socket is drained.
                ready[si].readable = false;
                break;
            }
            Err(_) => return Err(Failed(src)),
        }
    }
    if half.held == 0 && (state.eof_seen(dir) || !ready[si].readable) {
        half.streaming = false;
        if let Some(pipe) = half.pipe.take() {
            pool.give(pipe);
        }
    }
    Ok(outcome)
}

/// Counts `n` bytes delivered in `dir` against the counters and the budget.
fn count(state: &svcproxy_core::Lifecycle, dir: Direction, n: usize, budget: &mut usize) {
    *budget = budget.saturating_sub(n);
    state.delivered(dir, n);
}

/// Carries out a half-close step on `sockets` (client, backend); true when the connection is
/// finished.
fn finish(step: Step, sockets: [&Socket; 2]) -> bool {
    match step {
        Step::Continue => false,
        Step::Shutdown(side) => {
            let _ = rustix::net::shutdown(sockets[side_index(side)], Shutdown::Write);
            false
        }
        Step::ShutdownAndFinish(side) => {
            let _ = rustix::net::shutdown(sockets[side_index(side)], Shutdown::Write);
            true
        }
    }
}
