//! TCP policy (timeouts, attempts, drain) and the per-connection record of connect attempts
//! and half-close ([`TcpSession`]), sans I/O. The connection engine
//! ([`crate::engine`]) drives them; see its docs for the whole lifecycle.
//!
//! - Connect: each attempt has a timeout (`connect_timeout`, doubled per attempt); a failed
//!   or timed-out attempt moves to the next endpoint the policy gives that has not been tried,
//!   up to `connect_attempts`.
//! - Half-close: EOF read from one side shuts down the write side of the other once every byte
//!   read before it has been written; the other direction keeps running. When both directions
//!   are shut, the session is finished.
//! - Endpoint removal: [`DrainPolicy`] keeps the connection or closes it after a grace period.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use crate::select::{Backend, PortState};

/// Largest number of connect attempts per connection.
pub const MAX_CONNECT_ATTEMPTS: u32 = 8;
/// The range of [`TcpPolicy::connect_timeout`]: 1 ms to 10 minutes.
pub const CONNECT_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(600);
/// The range of [`TcpPolicy::idle_timeout`] when set: 1 ms to 365 days.
pub const IDLE_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(365 * 86_400);
/// The range of a [`DrainPolicy::CloseAfter`] grace: up to 1 day.
pub const DRAIN_RANGE: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(86_400);

/// Checks that `field` (a duration) lies in `range`; the error names the field and range.
pub fn check_duration(
    field: &str,
    got: Duration,
    range: RangeInclusive<Duration>,
) -> Result<(), String> {
    if range.contains(&got) {
        Ok(())
    } else {
        Err(format!(
            "{field} is {got:?}, must be between {:?} and {:?}",
            range.start(),
            range.end()
        ))
    }
}

/// What happens to open connections when their endpoint is no longer eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DrainPolicy {
    /// They run until either side closes (Kubernetes' behaviour).
    #[default]
    Keep,
    /// They are closed after this grace period.
    CloseAfter(Duration),
}

/// TCP timeouts and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpPolicy {
    /// Timeout of the first connect attempt; each further attempt gets twice the one before.
    pub connect_timeout: Duration,
    /// Endpoints tried per connection, 1 to [`MAX_CONNECT_ATTEMPTS`].
    pub connect_attempts: u32,
    /// Close connections with no bytes either way for this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// What to do with connections to removed endpoints.
    pub drain: DrainPolicy,
}

impl Default for TcpPolicy {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            connect_attempts: 3,
            idle_timeout: Some(Duration::from_secs(3600)),
            drain: DrainPolicy::Keep,
        }
    }
}

impl TcpPolicy {
    /// Checks the values against the documented ranges; names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        check_duration(
            "connect_timeout",
            self.connect_timeout,
            CONNECT_TIMEOUT_RANGE,
        )?;
        if !(1..=MAX_CONNECT_ATTEMPTS).contains(&self.connect_attempts) {
            return Err(format!(
                "connect_attempts is {}, must be between 1 and {MAX_CONNECT_ATTEMPTS}",
                self.connect_attempts
            ));
        }
        if let Some(idle) = self.idle_timeout {
            check_duration("idle_timeout", idle, IDLE_TIMEOUT_RANGE)?;
        }
        if let DrainPolicy::CloseAfter(grace) = self.drain {
            check_duration("drain", grace, DRAIN_RANGE)?;
        }
        Ok(())
    }

    /// Timeout of attempt `n` (0-based).
    pub fn attempt_timeout(&self, n: u32) -> Duration {
        self.connect_timeout.saturating_mul(1 << n.min(16))
    }

    /// When a connection whose endpoint was removed at `now` must be closed, if ever (a grace
    /// too long to represent is never).
    pub fn drain_deadline(&self, now: Instant) -> Option<Instant> {
        match self.drain {
            DrainPolicy::Keep => None,
            DrainPolicy::CloseAfter(grace) => now.checked_add(grace),
        }
    }
}

/// One side of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client's connection to the proxy.
    Client,
    /// The proxy's connection to the endpoint.
    Backend,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

    /// 0 for the client, 1 for the backend: the index of arrays kept per side.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A direction of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to backend.
    Upstream,
    /// Backend to client.
    Downstream,
}

impl Direction {
    /// Both directions.
    pub const BOTH: [Direction; 2] = [Direction::Upstream, Direction::Downstream];

    /// Where the data comes from.
    pub fn from(self) -> Side {
        match self {
            Direction::Upstream => Side::Client,
            Direction::Downstream => Side::Backend,
        }
    }

    /// Where the data goes.
    pub fn to(self) -> Side {
        self.from().other()
    }

    /// 0 upstream, 1 downstream: the index of arrays kept per direction.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// What to do after a half-close event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing yet.
    Continue,
    /// Shut down the write side of this socket (send FIN); the session continues.
    Shutdown(Side),
    /// Shut down the write side of this socket; then both directions are done: close both.
    ShutdownAndFinish(Side),
}

/// Per-connection policy state.
#[derive(Debug, Clone)]
pub struct TcpSession {
    /// The first endpoint tried (kept inline: most connections never retry).
    first: Option<SocketAddr>,
    /// Endpoints tried after it.
    retried: Vec<SocketAddr>,
    attempts: u32,
    eof: [bool; 2],
    shut: [bool; 2],
}

impl Default for TcpSession {
    fn default() -> Self {
        Self::new()
    }
}

impl TcpSession {
    /// A session before its first connect attempt.
    pub fn new() -> Self {
        Self {
            first: None,
            retried: Vec::new(),
            attempts: 0,
            eof: [false; 2],
            shut: [false; 2],
        }
    }

    /// Records a connect attempt to `backend`; returns its timeout.
    pub fn connecting(&mut self, policy: &TcpPolicy, backend: SocketAddr) -> Duration {
        let n = self.attempts;
        if self.first.is_none() {
            self.first = Some(backend);
        } else {
            self.retried.push(backend);
        }
        self.attempts += 1;
        policy.attempt_timeout(n)
    }

    /// The endpoint of the last attempt.
    pub fn last_tried(&self) -> Option<SocketAddr> {
        self.retried.last().copied().or(self.first)
    }

    /// Endpoints tried so far.
    pub fn tried(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.first.iter().chain(self.retried.iter()).copied()
    }

    /// After the last attempt failed (refused, unreachable, timed out): the next backend to
    /// try, or `None` when the client must be reset. The caller counts the failure on the
    /// failed backend's tally.
    pub fn next_backend<'p>(
        &self,
        policy: &TcpPolicy,
        port: &'p PortState,
        client: SocketAddr,
        now: Instant,
    ) -> Option<&'p Backend> {
        if self.attempts >= policy.connect_attempts.min(MAX_CONNECT_ATTEMPTS) {
            return None;
        }
        let tried: Vec<SocketAddr> = self.tried().collect();
        port.retry(client, &tried, now)
    }

    /// EOF was read in `dir`; `pending` says whether bytes read before it are still waiting
    /// to be written.
    pub fn read_eof(&mut self, dir: Direction, pending: bool) -> Step {
        self.eof[dir.index()] = true;
        if pending {
            Step::Continue
        } else {
            self.shut(dir)
        }
    }

    /// Every byte read in `dir` has been written.
    pub fn drained(&mut self, dir: Direction) -> Step {
        if self.eof[dir.index()] && !self.shut[dir.index()] {
            self.shut(dir)
        } else {
            Step::Continue
        }
    }

    fn shut(&mut self, dir: Direction) -> Step {
        if self.shut[dir.index()] {
            return Step::Continue;
        }
        self.shut[dir.index()] = true;
        if self.shut.iter().all(|&s| s) {
            Step::ShutdownAndFinish(dir.to())
        } else {
            Step::Shutdown(dir.to())
        }
    }

    /// Whether EOF has been seen in `dir`.
    pub fn eof_seen(&self, dir: Direction) -> bool {
        self.eof[dir.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_close_each_way_then_finish() {
        let mut s = TcpSession::new();
        assert_eq!(s.read_eof(Direction::Upstream, true), Step::Continue);
        assert_eq!(
            s.drained(Direction::Upstream),
            Step::Shutdown(Side::Backend)
        );
        assert_eq!(s.drained(Direction::Upstream), Step::Continue);
        assert_eq!(
            s.read_eof(Direction::Downstream, false),
            Step::ShutdownAndFinish(Side::Client)
        );
    }

    #[test]
    fn drained_without_eof_does_nothing() {
        let mut s = TcpSession::new();
        assert_eq!(s.drained(Direction::Downstream), Step::Continue);
        assert!(!s.eof_seen(Direction::Downstream));
    }

    #[test]
    fn attempt_timeouts_double() {
        let p = TcpPolicy::default();
        let mut s = TcpSession::new();
        let a = "127.0.0.1:1".parse().unwrap();
        assert_eq!(s.connecting(&p, a), Duration::from_secs(1));
        assert_eq!(s.connecting(&p, a), Duration::from_secs(2));
        assert_eq!(s.tried().count(), 2);
    }

    #[test]
    fn policy_validation_names_the_field() {
        let p = TcpPolicy {
            connect_attempts: 0,
            ..TcpPolicy::default()
        };
        assert!(p.validate().unwrap_err().contains("connect_attempts"));
        let p = TcpPolicy {
            connect_timeout: Duration::ZERO,
            ..TcpPolicy::default()
        };
        assert!(p.validate().unwrap_err().contains("connect_timeout"));
    }
}
