//! The connection budget shared by a proxy's workers: at most `max` TCP connections open at
//! once, over all workers.
//!
//! [`Budget::admit`] hands out a [`Permit`], one unit of the budget, which goes back when the
//! permit is dropped: it cannot be returned twice or forgotten. A worker that finds the budget
//! spent is registered as waiting and woken (through the function given to
//! [`Budget::set_waker`]) once a unit anywhere comes back. The protocol has no lost wake-up:
//! a refused worker registers, then looks again with a read-modify-write of the count (one
//! that writes even when it takes nothing); a release decrements the count, then looks for
//! registrations. Both touch the count by read-modify-write, so one comes first in its
//! modification order: if the release does, the second look takes its unit; if the second
//! look does, the release reads from it (acquire from release) and so sees the registration.
//! This needs no ordering stronger than acquire/release, and `tests/loom_budget.rs` checks it
//! under every interleaving.

use std::sync::OnceLock;

use crate::loom::sync::Arc;
use crate::loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

type Wake = Box<dyn Fn(usize) + Send + Sync>;

/// At most `max` units out at once, shared by `workers` workers.
pub struct Budget {
    max: usize,
    taken: AtomicUsize,
    /// Workers waiting for a unit, and how many of them there are.
    waiting: Box<[AtomicBool]>,
    waiting_count: AtomicUsize,
    wake: OnceLock<Wake>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("max", &self.max)
            .field("taken", &self.taken())
            .finish_non_exhaustive()
    }
}

/// One unit of a [`Budget`]; dropping it gives the unit back.
#[derive(Debug)]
#[must_use = "dropping a permit gives its unit back at once"]
pub struct Permit {
    budget: Arc<Budget>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.release();
    }
}

impl Budget {
    /// `max` units for `workers` workers.
    pub fn new(max: usize, workers: usize) -> Self {
        Self {
            max,
            taken: AtomicUsize::new(0),
            waiting: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            waiting_count: AtomicUsize::new(0),
            wake: OnceLock::new(),
        }
    }

    /// Sets how to wake worker `i` (once, before the workers start).
    pub fn set_waker(&self, wake: impl Fn(usize) + Send + Sync + 'static) {
        let _ = self.wake.set(Box::new(wake));
    }

    /// A unit of `budget` for `worker`, or `None` when all are out; then `worker` is woken
    /// once a unit comes back.
    #[inline]
    pub fn admit(budget: &Arc<Self>, worker: usize) -> Option<Permit> {
        if budget.try_take() {
            return Some(Self::permit(budget));
        }
        // Register first, then look again: a release either sees the registration or
        // happened before the second look.
        if !budget.waiting[worker].swap(true, Ordering::SeqCst) {
            budget.waiting_count.fetch_add(1, Ordering::SeqCst);
        }
        budget.look_again().then(|| Self::permit(budget))
    }

    fn permit(budget: &Arc<Self>) -> Permit {
        Permit {
            budget: budget.clone(),
        }
    }

    fn try_take(&self) -> bool {
        self.taken
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Takes a unit if one is free, by a read-modify-write that writes even when none is (see
    /// the module docs for why).
    fn look_again(&self) -> bool {
        let prev = self
            .taken
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(if n < self.max { n + 1 } else { n })
            })
            .unwrap_or_else(|n| n);
        prev < self.max
    }

    fn release(&self) {
        self.taken.fetch_sub(1, Ordering::SeqCst);
        if self.waiting_count.load(Ordering::SeqCst) == 0 {
            return;
        }
        for (i, flag) in self.waiting.iter().enumerate() {
            if flag.swap(false, Ordering::SeqCst) {
                self.waiting_count.fetch_sub(1, Ordering::SeqCst);
                if let Some(wake) = self.wake.get() {
                    wake(i);
                }
            }
        }
    }

    /// Units out now.
    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::SeqCst)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn permits_are_exact_and_waiters_are_woken_once() {
        let budget = Arc::new(Budget::new(2, 2));
        let woken = Arc::new(Mutex::new(Vec::new()));
        let w = woken.clone();
        budget.set_waker(move |i| w.lock().unwrap().push(i));
        let a = Budget::admit(&budget, 0).expect("first unit");
        let b = Budget::admit(&budget, 0).expect("second unit");
        assert!(Budget::admit(&budget, 1).is_none(), "over the budget");
        drop(a);
        assert_eq!(
            *woken.lock().unwrap(),
            vec![1],
            "the waiting worker is woken"
        );
        let c = Budget::admit(&budget, 1).expect("a unit came back");
        assert_eq!(budget.taken(), 2);
        drop(b);
        drop(c);
        assert_eq!(budget.taken(), 0);
        assert_eq!(
            woken.lock().unwrap().len(),
            1,
            "nobody waits: nobody is woken"
        );
    }
}
