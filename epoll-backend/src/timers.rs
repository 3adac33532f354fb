//! Deadlines of one worker, in a min-heap. Entries are never cancelled: when one fires, the
//! worker checks that it still applies (the connection exists, is in the same attempt, has
//! really been idle), which keeps arming a timer O(log n) and cancelling free.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use svcproxy_core::SlotId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// A connect attempt's deadline.
    Connect { conn: SlotId, attempt: u32 },
    /// Check whether a connection has been idle too long.
    Idle(SlotId),
    /// Close a connection whose endpoint was removed.
    Drain(SlotId),
    /// Accepting was paused for lack of descriptors.
    AcceptResume,
    /// Once a second: expire UDP flows, retry failed binds.
    Tick,
    /// The shutdown deadline.
    Shutdown,
}

#[derive(Debug, Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, Timer)>>,
}

impl Timers {
    pub(crate) fn add(&mut self, at: Instant, timer: Timer) {
        self.heap.push(Reverse((at, timer)));
    }

    /// Time until the next deadline (zero if one has passed), if any.
    pub(crate) fn next_in(&self, now: Instant) -> Option<Duration> {
        self.heap
            .peek()
            .map(|Reverse((at, _))| at.saturating_duration_since(now))
    }

    /// Removes and returns a timer whose deadline has passed.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse((_, t))| t),
            _ => None,
        }
    }
}
