//! Forwarding a TCP connection's two byte streams from readiness: the pump both backends use
//! for splice forwarding (the epoll backend always; the io_uring backend in
//! [`Forwarding::Splice`](svcproxy_core::config::Forwarding) mode, its readiness coming from ring
//! polls).
//!
//! A driver keeps each socket's [`Ready`] flags: it sets them from readiness events and the pump
//! clears them only on `WouldBlock` (or a short read), so edge-triggered readiness never loses
//! an edge. A direction moves bytes source -> pipe -> destination. The pipe is taken from the
//! pool when the source has data and given back once it is empty and the source is drained, so
//! idle connections hold none.
//!
//! Small transfers are copied (a read into a stack buffer and a write: two system calls, no
//! pipe), streams are spliced (zero copy): a read that fills the 16 KiB copy buffer switches a
//! direction to splice until it next goes idle, like HAProxy's `splice-auto`. Bytes a copy
//! could not write at once wait in a heap buffer that exists only while it holds them. When no
//! pipe can be had (out of descriptors), streams are copied too, so connections keep moving.
//!
//! The "pipe full or socket empty" trap: splicing into a pipe that already holds bytes can fail
//! with `WouldBlock` because the pipe ran out of slots, not because the socket is empty. A
//! direction therefore reads only when it holds nothing (it drains first, and waits for the
//! destination if that blocks), so `WouldBlock` from the source always means the socket is
//! drained, and clearing "readable" never loses an edge.
//!
//! Half-close is carried out here too: the [`Lifecycle`] decides, the pump shuts down the write
//! side it names.

use std::io::{self, Read, Write};
use std::time::Instant;

use rustix::net::Shutdown;
use socket2::Socket;
use svcproxy_core::Lifecycle;
use svcproxy_core::session::{Direction, Side, Step};

use crate::{Pipe, PipePool};

/// Bytes one pump call moves at most, so that one busy connection cannot hold up the others
/// (other work gets a turn);
/// a pump that stops for it returns [`Pumped::Budget`] and should be called again soon.
pub const PUMP_BUDGET: usize = 1 << 20;

/// Readiness of one socket, as last reported by the driver's events and not yet consumed.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ready {
    /// Bytes (or an end of stream, or an error) may be read.
    pub readable: bool,
    /// Bytes may be written.
    pub writable: bool,
    /// The peer has shut down its side (RDHUP/HUP seen): read to the end, since no further
    /// edge will announce the end of the stream.
    pub peer_closed: bool,
}

/// One direction of a connection. Bytes in flight are in the pipe (`held` of them) or, in
/// the copy fallback, in `spill`.
#[derive(Debug, Default)]
struct Half {
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

/// Spare pipes a worker keeps.
const SPARE_PIPES: usize = 64;

/// Bytes read per call when copying; a read this large marks a stream (spliced from then on).
const COPY_CHUNK: usize = 16 << 10;

/// A worker's forwarding buffers: its pipe pool, and the one copy buffer its connections share
/// (a connection never holds it between calls).
#[derive(Debug)]
pub struct Buffers {
    /// Spare pipes.
    pub pipes: PipePool,
    scratch: Box<[u8]>,
}

impl Buffers {
    /// Buffers with pipes of `pipe_size` bytes.
    pub fn new(pipe_size: usize) -> Self {
        Self {
            pipes: PipePool::new(pipe_size, SPARE_PIPES),
            scratch: vec![0; COPY_CHUNK].into_boxed_slice(),
        }
    }
}

/// How a pump ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pumped {
    /// Both sockets would block (or the direction is done): wait for events.
    Idle,
    /// The byte budget ran out with more to move.
    Budget,
    /// Both directions are shut down: close the connection.
    Finished,
}

/// The connection failed on `Side`: close both, resetting the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failed(pub Side);

/// A connection's forwarding state: the readiness of its two sockets (client, backend) and its
/// two directions.
#[derive(Debug, Default)]
pub struct Streams {
    ready: [Ready; 2],
    halves: [Half; 2],
}

/// What one direction waits for after a pump returned [`Pumped::Idle`] (for a driver without
/// edge-triggered readiness, which must ask for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Its source is drained: bytes to read.
    Readable,
    /// It holds bytes and its destination is full: room to write.
    Writable,
    /// Nothing: it has read its end of stream and written everything.
    Done,
}

impl Streams {
    /// The readiness of `side`'s socket, for the driver to set from its events.
    pub fn ready_mut(&mut self, side: Side) -> &mut Ready {
        &mut self.ready[side.index()]
    }

    /// Gives empty pipes back to the pool (pipes holding bytes are closed with the connection).
    pub fn release_pipes(&mut self, pool: &mut PipePool) {
        for half in &mut self.halves {
            if let Some(pipe) = half.pipe.take()
                && half.held == 0
            {
                pool.give(pipe);
            }
        }
    }

    /// What `dir` waits for before it can move again.
    pub fn wait(&self, dir: Direction, state: &Lifecycle) -> Wait {
        if self.halves[dir.index()].pending() {
            Wait::Writable
        } else if state.eof_seen(dir) {
            Wait::Done
        } else {
            Wait::Readable
        }
    }

    /// Marks `dir` as a stream: its next reads are spliced, not copied, and it is readable
    /// (its driver knows bytes wait, say from a read that filled its buffer).
    pub fn stream(&mut self, dir: Direction) {
        self.halves[dir.index()].streaming = true;
        self.ready[dir.from().index()].readable = true;
    }

    /// Moves bytes both ways until sockets would block, the budget is spent, or the connection
    /// ends. `sockets` are the client's and the backend's, `budget` the bytes it may move (see
    /// [`PUMP_BUDGET`]).
    pub fn pump(
        &mut self,
        sockets: [&Socket; 2],
        state: &mut Lifecycle,
        buffers: &mut Buffers,
        budget: &mut usize,
        now: Instant,
    ) -> Result<Pumped, Failed> {
        let mut result = Pumped::Idle;
        for dir in Direction::BOTH {
            match self.pump_dir(dir, sockets, state, buffers, budget, now)? {
                Pumped::Finished => return Ok(Pumped::Finished),
                Pumped::Idle => {}
                other => result = other,
            }
        }
        Ok(result)
    }

    /// As [`Streams::pump`], in `dir` only.
    pub fn pump_dir(
        &mut self,
        dir: Direction,
        sockets: [&Socket; 2],
        state: &mut Lifecycle,
        buffers: &mut Buffers,
        budget: &mut usize,
        now: Instant,
    ) -> Result<Pumped, Failed> {
        let Buffers {
            pipes: pool,
            scratch,
        } = buffers;
        let (src, dst) = (dir.from(), dir.to());
        let (si, di) = (src.index(), dst.index());
        let (from, to) = (sockets[si], sockets[di]);
        let ready = &mut self.ready;
        let half = &mut self.halves[dir.index()];
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
}

/// Counts `n` bytes delivered in `dir` against the counters and the budget.
fn count(state: &Lifecycle, dir: Direction, n: usize, budget: &mut usize) {
    *budget = budget.saturating_sub(n);
    state.delivered(dir, n);
}

/// Carries out a half-close step on `sockets` (client, backend); true when the connection is
/// finished.
fn finish(step: Step, sockets: [&Socket; 2]) -> bool {
    match step {
        Step::Continue => false,
        Step::Shutdown(side) => {
            let _ = rustix::net::shutdown(sockets[side.index()], Shutdown::Write);
            false
        }
        Step::ShutdownAndFinish(side) => {
            let _ = rustix::net::shutdown(sockets[side.index()], Shutdown::Write);
            true
        }
    }
}
