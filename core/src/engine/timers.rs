//! A worker's deadlines, cancellable: every entry belongs to something alive (a connection,
//! a pause, the tick), and whoever armed it cancels it when that thing ends, so the number of
//! entries is bounded by the number of live things (a timer that is never cancelled is a
//! memory leak with a delay: with a one-hour idle timeout, an entry per closed connection
//! would live an hour).
//!
//! Entries are kept in order of their deadline (a B-tree keyed by deadline and a sequence
//! number): arming, cancelling and taking the next due entry are O(log n).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Names an armed timer; give it to [`Timers::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimerId {
    at: Instant,
    seq: u64,
}

impl TimerId {
    /// When the timer fires.
    pub fn at(&self) -> Instant {
        self.at
    }
}

/// Deadlines carrying a `T` each.
#[derive(Debug)]
pub struct Timers<T> {
    entries: BTreeMap<TimerId, T>,
    seq: u64,
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            seq: 0,
        }
    }
}

impl<T> Timers<T> {
    /// Arms a timer firing at `at`.
    pub fn add(&mut self, at: Instant, value: T) -> TimerId {
        let id = TimerId { at, seq: self.seq };
        self.seq += 1;
        self.entries.insert(id, value);
        id
    }

    /// Disarms a timer; a timer that already fired or was cancelled is ignored.
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        self.entries.remove(&id)
    }

    /// The earliest deadline, if any.
    pub fn next(&self) -> Option<Instant> {
        self.entries.first_key_value().map(|(id, _)| id.at)
    }

    /// Time from `now` until the earliest deadline (zero if it has passed).
    pub fn next_in(&self, now: Instant) -> Option<Duration> {
        self.next().map(|at| at.saturating_duration_since(now))
    }

    /// Removes and returns a timer whose deadline is at or before `now`, earliest first.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        let entry = self.entries.first_entry()?;
        (entry.key().at <= now).then(|| entry.remove())
    }

    /// Timers armed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no timer is armed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_timers_come_in_order_and_cancelled_ones_never() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let late = timers.add(t0 + Duration::from_secs(3), "late");
        let gone = timers.add(t0 + Duration::from_secs(1), "cancelled");
        timers.add(t0 + Duration::from_secs(2), "second");
        timers.add(t0 + Duration::from_secs(1), "first");
        assert_eq!(timers.cancel(gone), Some("cancelled"));
        assert_eq!(timers.cancel(gone), None, "cancelling twice is harmless");
        assert_eq!(timers.next(), Some(t0 + Duration::from_secs(1)));
        let now = t0 + Duration::from_secs(2);
        assert_eq!(timers.pop_due(now), Some("first"));
        assert_eq!(timers.pop_due(now), Some("second"));
        assert_eq!(timers.pop_due(now), None);
        assert_eq!(timers.next_in(now), Some(Duration::from_secs(1)));
        assert_eq!(late.at(), t0 + Duration::from_secs(3));
        assert_eq!(timers.len(), 1);
    }
}
