//! One proxied TCP connection and its forwarding through splice pipes.
//!
//! Readiness is edge-triggered, so each socket's "readable" and "writable" flags are kept
//! here: set by events, cleared only by `WouldBlock`. A direction moves bytes
//! source -> pipe -> destination. The pipe is taken from the pool when the source has data and
//! given back once it is empty and the source is drained, so idle connections hold none.
//!
//! The "pipe full or socket empty" trap (DESIGN-NOTES section 3): splicing into a pipe that
//! already holds bytes can fail with `WouldBlock` because the pipe ran out of slots, not
//! because the socket is empty. So "readable" is cleared only when the pipe was empty; with
//! bytes held, the pipe is drained first and the read retried.

use std::io;
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

/// One direction of a connection.
#[derive(Debug, Default)]
pub(crate) struct Half {
    pipe: Option<Pipe>,
    held: usize,
    eof: bool,
}

/// How a pump ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pumped {
    /// Both sockets would block (or the direction is done): wait for events.
    Idle,
    /// The byte budget ran out with more to move.
    Budget,
    /// A pipe could not be had (out of descriptors): retry later.
    NoPipe,
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
            // First empty the pipe into the destination.
            if self.halves[hi].held > 0 {
                if !self.ready[di].writable {
                    break;
                }
                let to = if dst == Side::Client {
                    &self.client
                } else {
                    &self.backend
                };
                let half = &mut self.halves[hi];
                let pipe = half.pipe.as_ref().expect("bytes held imply a pipe");
                match pipe.drain(to, half.held) {
                    Ok(n) => {
                        half.held -= n;
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
                if self.halves[hi].held > 0 {
                    continue;
                }
                if self.halves[hi].eof {
                    let step = self.session.drained(dir);
                    if self.apply(step) {
                        return Ok(Pumped::Finished);
                    }
                }
            }
            // Then fill it from the source.
            let half = &self.halves[hi];
            if half.eof || !self.ready[si].readable {
                break;
            }
            if *budget == 0 {
                outcome = Pumped::Budget;
                break;
            }
            if self.halves[hi].pipe.is_none() {
                match pool.take() {
                    Ok(p) => self.halves[hi].pipe = Some(p),
                    Err(_) => {
                        outcome = Pumped::NoPipe;
                        break;
                    }
                }
            }
            let half = &self.halves[hi];
            let pipe = half.pipe.as_ref().expect("taken above");
            let room = pipe.capacity() - half.held;
            if room == 0 {
                break;
            }
            match pipe.fill(self.socket(src), room) {
                Ok(0) => {
                    let held = self.halves[hi].held;
                    self.halves[hi].eof = true;
                    let step = self.session.read_eof(dir, held > 0);
                    if self.apply(step) {
                        return Ok(Pumped::Finished);
                    }
                }
                Ok(n) => {
                    self.halves[hi].held += n;
                    self.last_activity = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.halves[hi].held == 0 {
                        // An empty pipe: the socket really is drained.
                        self.ready[si].readable = false;
                        break;
                    }
                    // Maybe the pipe is out of slots: drain it, then read again.
                    if !self.ready[di].writable {
                        break;
                    }
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
