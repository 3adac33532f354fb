//! Exponential backoff for retrying what failed for lack of resources (accepting while out of
//! descriptors, binding a frontend): never spin, recover quickly once the resource is back.

use std::time::Duration;

/// Delays that double from `min` to `max` while failures repeat; a success resets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Backoff from `min` to `max`.
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// Records a failure; returns how long to wait before trying again.
    pub fn fail(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// Records a success.
    pub fn succeed(&mut self) {
        self.next = self.min;
    }
}

impl Default for Backoff {
    /// 10 ms to 1 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(10), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(35));
        let delays: Vec<u64> = (0..4).map(|_| b.fail().as_millis() as u64).collect();
        assert_eq!(delays, [10, 20, 35, 35]);
        b.succeed();
        assert_eq!(b.fail(), Duration::from_millis(10));
    }
}
