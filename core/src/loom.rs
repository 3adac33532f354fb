//! Concurrency primitives behind one name, so the same code builds against `std` or, under
//! `RUSTFLAGS="--cfg loom"`, against loom's model-checked versions (the tokio pattern).
//!
//! [`SwapCell`] is the publication point of the service table. In normal builds it is an
//! [`arc_swap::ArcSwap`]: readers never lock and never allocate. arc-swap has no loom support,
//! so under loom the cell is a loom mutex around a loom `Arc`: the loom tests check svcproxy's
//! own publish protocol (writer serialisation, snapshot consistency, reclamation, flow purge),
//! not arc-swap's internals, which that crate tests itself. Loom's `Arc` reports any snapshot
//! that is never freed.

#[cfg(not(loom))]
pub(crate) mod sync {
    pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

    pub(crate) mod atomic {
        pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    }

    /// The published value: an `ArcSwap`.
    pub(crate) struct SwapCell<T>(arc_swap::ArcSwap<T>);

    /// What [`SwapCell::load`] hands out: a cheap, lock-free guard.
    pub type Guard<T> = arc_swap::Guard<Arc<T>>;

    impl<T> SwapCell<T> {
        pub(crate) fn new(value: Arc<T>) -> Self {
            Self(arc_swap::ArcSwap::new(value))
        }

        #[inline]
        pub(crate) fn load(&self) -> Guard<T> {
            self.0.load()
        }

        pub(crate) fn load_full(&self) -> Arc<T> {
            self.0.load_full()
        }

        pub(crate) fn store(&self, value: Arc<T>) {
            self.0.store(value)
        }
    }
}

#[cfg(loom)]
pub(crate) mod sync {
    pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

    pub(crate) mod atomic {
        pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    }

    /// Under loom: a mutex around the published `Arc` (see the module docs).
    pub(crate) struct SwapCell<T>(Mutex<Arc<T>>);

    /// Under loom the guard is a plain `Arc` clone.
    pub type Guard<T> = Arc<T>;

    impl<T> SwapCell<T> {
        pub(crate) fn new(value: Arc<T>) -> Self {
            Self(Mutex::new(value))
        }

        pub(crate) fn load(&self) -> Guard<T> {
            self.0.lock().unwrap().clone()
        }

        pub(crate) fn load_full(&self) -> Arc<T> {
            self.load()
        }

        pub(crate) fn store(&self, value: Arc<T>) {
            let old = std::mem::replace(&mut *self.0.lock().unwrap(), value);
            drop(old);
        }
    }
}

/// Locks `mutex`, ignoring poisoning: every critical section in this crate leaves its data
/// consistent before anything that could panic, so a poisoned lock still holds valid data.
pub(crate) fn lock<T>(mutex: &sync::Mutex<T>) -> sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
