//! One proxied TCP connection and its forwarding through splice pipes.
//!
//! Readiness is edge-triggered, so each socket's "readable" and "writable" flags are kept
//! here: set by events, cleared only by `WouldBlock`. A direction moves bytes
//! source -> pipe -> destination. The pipe is taken from the pool when the source has data and
//! given back once it is empty and the source is drained, so idle connections hold none.
//!
//! When no pipe can be had (the process is out of descriptors), a direction falls back to
//! copying through a small heap buffer that exists only while it holds bytes, so connections
//! keep moving instead of stalling until descriptors come back.
//!
//! The "pipe full or socket empty" trap (DESIGN-NOTES section 3): splicing into a pipe that
//! already holds bytes can fail with `WouldBlock` because the pipe ran out of slots, not
//! because the socket is empty. A direction therefore reads only when it holds nothing (it
//! drains first, and waits for the destination if that blocks), so `WouldBlock` from the
//! source always means the socket is drained, and clearing "readable" never loses an edge.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use rustix::net::Shutdown;
use socket2::Socket;
use svcproxy_core::session::{Direction, Side, Step};
use svcproxy_core::{ServicePortKey, Tally, TcpSession};
use svcproxy_sys::{Pipe, PipePool};

/// Readiness of one socket, as last reported by epoll and not yet consumed.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Ready {
    pub(crate) readable: bool,
    pub(crate) writable: bool,
}

/// One direction of a connection. Bytes in flight are in the pipe (`held` of them) or, in
/// the copy fallback, in `spill`.
#[derive(Debug, Default)]
pub(crate) struct Half {
    pipe: Option<Pipe>,
    held: usize,
    spill: Vec<u8>,
    eof: bool,
}

impl Half {
    fn pending(&self) -> bool {
        self.held > 0 || !self.spill.is_empty()
    }
}

/// Bytes read per call in the copy fallback.
const SPILL_CHUNK: usize = 16 << 10;

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

#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) client: Socket,
    pub(crate) backend: Socket,
    pub(crate) client_addr: SocketAddr,
    pub(crate) listener: ServicePortKey,
    pub(crate) backend_addr: SocketAddr,
    pub(crate) tally: Tally,
    pub(crate) session: TcpSession,
    pub(crate) connected: bool,
    pub(crate) attempt: u32,
    pub(crate) ready: [Ready; 2],
    halves: [Half; 2],
    pub(crate) last_activity: Instant,
    pub(crate) draining: bool,
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
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        client: Socket,
        backend: Socket,
        client_addr: SocketAddr,
        listener: ServicePortKey,
        backend_addr: SocketAddr,
        tally: Tally,
        session: TcpSession,
        now: Instant,
    ) -> Self {
        Self {
            client,
            backend,
            client_addr,
            listener,
            backend_addr,
            tally,
            session,
            connected: false,
            attempt: 1,
            ready: [Ready::default(); 2],
            halves: [Half::default(), Half::default()],
            last_activity: now,
            draining: false,
        }
    }

    pub(crate) fn socket(&self, side: Side) -> &Socket {
        match side {
            Side::Client => &self.client,
            Side::Backend => &self.backend,
        }
    }

    pub(crate) fn ready_mut(&mut self, side: Side) -> &mut Ready {
        &mut self.ready[side_index(side)]
    }

    /// Moves bytes both ways until sockets would block, the budget is spent, or the connection
    /// ends.
    pub(crate) fn pump(
        &mut self,
        pool: &mut PipePool,
        budget: &mut usize,
        now: Instant,
    ) -> Result<Pumped, Failed> {
        let mut result = Pumped::Idle;
        for dir in Direction::BOTH {
            match self.pump_one(dir, pool, budget, now)? {
                Pumped::Finished => return Ok(Pumped::Finished),
                Pumped::Idle => {}
                other => result = other,
            }
        }
        Ok(result)
    }

    fn pump_one(
        &mut self,
        dir: Direction,
        pool: &mut PipePool,
        budget: &mut usize,
        now: Instant,
    ) -> Result<Pumped, Failed> {
        let (src, dst) = (dir.from(), dir.to());
        let (si, di, hi) = (side_index(src), side_index(dst), dir_index(dir));
        let mut outcome = Pumped::Idle;
        loop {
            // First empty what is held into the destination.
            if self.halves[hi].pending() {
                if !self.ready[di].writable {
                    break;
                }
                let to = if dst == Side::Client {
                    &self.client
                } else {
                    &self.backend
                };
                let half = &mut self.halves[hi];
                let written = if half.held > 0 {
                    let pipe = half.pipe.as_ref().expect("bytes held imply a pipe");
                    pipe.drain(to, half.held)
                } else {
                    (&*to).write(&half.spill)
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
                        *budget = budget.saturating_sub(n);
                        self.last_activity = now;
                        match dir {
                            Direction::Upstream => self.tally.bytes_in(n as u64),
                            Direction::Downstream => self.tally.bytes_out(n as u64),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.ready[di].writable = false;
                        break;
                    }
                    Err(_) => return Err(Failed(dst)),
                }
                if self.halves[hi].pending() {
                    continue;
                }
                if self.halves[hi].eof {
                    let step = self.session.drained(dir);
                    if self.apply(step) {
                        return Ok(Pumped::Finished);
                    }
                }
            }
            // Then read from the source; nothing is held at this point.
            if self.halves[hi].eof || !self.ready[si].readable {
                break;
            }
            if *budget == 0 {
                outcome = Pumped::Budget;
                break;
            }
            if self.halves[hi].pipe.is_none()
                && let Ok(p) = pool.take()
            {
                self.halves[hi].pipe = Some(p);
            }
            let from = if src == Side::Client {
                &self.client
            } else {
                &self.backend
            };
            let half = &mut self.halves[hi];
            let read = match &half.pipe {
                Some(pipe) => {
                    let room = pipe.capacity() - half.held;
                    if room == 0 {
                        break;
                    }
                    pipe.fill(from, room).inspect(|&n| half.held += n)
                }
                None => {
                    let mut chunk = [0u8; SPILL_CHUNK];
                    (&*from)
                        .read(&mut chunk)
                        .inspect(|&n| half.spill.extend_from_slice(&chunk[..n]))
                }
            };
            match read {
                Ok(0) => {
                    let pending = self.halves[hi].pending();
                    self.halves[hi].eof = true;
                    let step = self.session.read_eof(dir, pending);
                    if self.apply(step) {
                        return Ok(Pumped::Finished);
                    }
                }
                Ok(_) => self.last_activity = now,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing is held when reading, so this means the socket is drained.
                    self.ready[si].readable = false;
                    break;
                }
                Err(_) => return Err(Failed(src)),
            }
        }
        let half = &mut self.halves[hi];
        if half.held == 0
            && (half.eof || !self.ready[si].readable)
            && let Some(pipe) = half.pipe.take()
        {
            pool.give(pipe);
        }
        Ok(outcome)
    }

    /// Carries out a half-close step; true when the connection is finished.
    fn apply(&mut self, step: Step) -> bool {
        match step {
            Step::Continue => false,
            Step::Shutdown(side) => {
                let _ = rustix::net::shutdown(self.socket(side), Shutdown::Write);
                false
            }
            Step::ShutdownAndFinish(side) => {
                let _ = rustix::net::shutdown(self.socket(side), Shutdown::Write);
                true
            }
        }
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
