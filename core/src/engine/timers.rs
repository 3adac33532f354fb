//! A worker's deadlines, cancellable: every entry belongs to something alive (a connection,
//! a pause, the tick), and whoever armed it cancels it when that thing ends, so the number of
//! entries is bounded by the number of live things (a timer that is never cancelled is a
//! memory leak with a delay: with a one-hour idle timeout, an entry per closed connection
//! would live an hour).
//!
//! A binary min-heap of slab keys, ordered by deadline; each slab entry knows its place in the
//! heap, so cancelling is O(log n) like arming, and a [`TimerId`] is 8 bytes (the slab key and
//! the entry's generation, so an id kept after its timer fired never cancels a later one).

use std::num::NonZeroU32;
use std::time::Instant;

use slab::Slab;

/// Names an armed timer; give it to [`Timers::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerId {
    key: u32,
    generation: NonZeroU32,
}

#[derive(Debug)]
struct Entry<T> {
    at: Instant,
    generation: NonZeroU32,
    /// Index of this entry's key in the heap.
    position: u32,
    value: T,
}

/// Deadlines carrying a `T` each.
#[derive(Debug)]
pub struct Timers<T> {
    entries: Slab<Entry<T>>,
    heap: Vec<u32>,
    generation: NonZeroU32,
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Self {
            entries: Slab::new(),
            heap: Vec::new(),
            generation: NonZeroU32::MIN,
        }
    }
}

impl<T> Timers<T> {
    /// Arms a timer firing at `at`.
    pub fn add(&mut self, at: Instant, value: T) -> TimerId {
        let generation = self.generation;
        self.generation = self.generation.checked_add(1).unwrap_or(NonZeroU32::MIN);
        let position = self.heap.len();
        let key = self.entries.insert(Entry {
            at,
            generation,
            position: position as u32,
            value,
        }) as u32;
        self.heap.push(key);
        self.sift_up(position);
        TimerId { key, generation }
    }

    /// Disarms a timer; a timer that already fired or was cancelled is ignored.
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        let entry = self.entries.get(id.key as usize)?;
        if entry.generation != id.generation {
            return None;
        }
        Some(self.remove_at(entry.position as usize))
    }

    /// The earliest deadline, if any.
    pub fn next(&self) -> Option<Instant> {
        self.heap.first().map(|&key| self.entries[key as usize].at)
    }

    /// Removes and returns a timer whose deadline is at or before `now`, earliest first.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        (self.next()? <= now).then(|| self.remove_at(0))
    }

    /// Timers armed.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no timer is armed.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Removes the timer at heap position `position`.
    fn remove_at(&mut self, position: usize) -> T {
        let last = self.heap.len() - 1;
        self.swap(position, last);
        let key = self.heap.pop().expect("a timer at `position`");
        if position < self.heap.len() {
            self.sift_down(position);
            self.sift_up(position);
        }
        self.entries.remove(key as usize).value
    }

    fn at(&self, position: usize) -> Instant {
        self.entries[self.heap[position] as usize].at
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.entries[self.heap[a] as usize].position = a as u32;
        self.entries[self.heap[b] as usize].position = b as u32;
    }

    fn sift_up(&mut self, mut position: usize) {
        while position > 0 {
            let parent = (position - 1) / 2;
            if self.at(parent) <= self.at(position) {
                break;
            }
            self.swap(parent, position);
            position = parent;
        }
    }

    fn sift_down(&mut self, mut position: usize) {
        loop {
            let (left, right) = (2 * position + 1, 2 * position + 2);
            let mut smallest = position;
            if left < self.heap.len() && self.at(left) < self.at(smallest) {
                smallest = left;
            }
            if right < self.heap.len() && self.at(right) < self.at(smallest) {
                smallest = right;
            }
            if smallest == position {
                return;
            }
            self.swap(position, smallest);
            position = smallest;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn due_timers_come_in_order_and_cancelled_ones_never() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let late = timers.add(t0 + Duration::from_secs(3), "late");
        let gone = timers.add(t0 + Duration::from_secs(1), "cancelled");
        timers.add(t0 + Duration::from_secs(2), "second");
        timers.add(t0 + Duration::from_millis(1500), "first");
        assert_eq!(timers.cancel(gone), Some("cancelled"));
        assert_eq!(timers.cancel(gone), None, "cancelling twice is harmless");
        assert_eq!(timers.next(), Some(t0 + Duration::from_millis(1500)));
        let now = t0 + Duration::from_secs(2);
        assert_eq!(timers.pop_due(now), Some("first"));
        assert_eq!(timers.pop_due(now), Some("second"));
        assert_eq!(timers.pop_due(now), None);
        assert_eq!(timers.next(), Some(t0 + Duration::from_secs(3)));
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.cancel(late), Some("late"));
        assert!(timers.is_empty());
    }

    #[test]
    fn an_id_kept_after_its_timer_fired_cancels_nothing_later() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let fired = timers.add(t0, 1);
        assert_eq!(timers.pop_due(t0), Some(1));
        let later = timers.add(t0, 2);
        assert_eq!(timers.cancel(fired), None, "same slot, other generation");
        assert_eq!(timers.cancel(later), Some(2));
    }

    #[test]
    fn random_arms_and_cancels_keep_the_heap_in_order() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        let mut live: Vec<(TimerId, u64)> = Vec::new();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..if cfg!(miri) { 200 } else { 5_000 } {
            if live.is_empty() || rng.u8(..3) > 0 {
                let ms = rng.u64(..10_000);
                live.push((timers.add(t0 + Duration::from_millis(ms), ms), ms));
            } else {
                let (id, ms) = live.swap_remove(rng.usize(..live.len()));
                assert_eq!(timers.cancel(id), Some(ms));
            }
        }
        let mut expected: Vec<u64> = live.iter().map(|&(_, ms)| ms).collect();
        expected.sort_unstable();
        let mut got = Vec::new();
        while let Some(ms) = timers.pop_due(t0 + Duration::from_secs(10)) {
            got.push(ms);
        }
        assert_eq!(got, expected);
    }
}
