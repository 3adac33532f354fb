//! Model-checked connection budget (loom). Run with:
//! `RUSTFLAGS="--cfg loom" cargo test -p svcproxy-core --release --test loom_budget`
//!
//! Checks the admission protocol of `core/src/budget.rs` under every interleaving: never more
//! permits out than the budget, every unit back when the permits are dropped, and no lost
//! wake-up: a worker refused while another releases either gets a unit on its own second look
//! or is woken.
#![cfg(loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use svcproxy_core::Budget;

#[test]
fn a_refused_worker_is_never_forgotten() {
    loom::model(|| {
        let budget = Arc::new(Budget::new(1, 2));
        let woken = Arc::new(AtomicUsize::new(0));
        {
            let woken = woken.clone();
            budget.set_waker(move |i| {
                assert_eq!(i, 1, "only worker 1 waits");
                woken.fetch_add(1, Ordering::SeqCst);
            });
        }
        let held = Budget::admit(&budget, 0).expect("the only unit");
        let releaser = thread::spawn(move || drop(held));
        let second = Budget::admit(&budget, 1);
        releaser.join().unwrap();
        match second {
            Some(permit) => {
                assert_eq!(budget.taken(), 1);
                drop(permit);
            }
            None => assert_eq!(woken.load(Ordering::SeqCst), 1, "refused but not woken"),
        }
        assert_eq!(budget.taken(), 0, "every unit is back");
    });
}

#[test]
fn concurrent_admits_never_exceed_the_budget() {
    loom::model(|| {
        let budget = Arc::new(Budget::new(1, 2));
        let other = {
            let budget = budget.clone();
            thread::spawn(move || Budget::admit(&budget, 1).map(|p| (p, budget.taken())))
        };
        let mine = Budget::admit(&budget, 0);
        let theirs = other.join().unwrap();
        assert!(
            mine.is_some() != theirs.is_some(),
            "exactly one of two workers gets the single unit"
        );
        if let Some((_, taken)) = &theirs {
            assert_eq!(*taken, 1);
        }
        drop(mine);
        drop(theirs);
        assert_eq!(budget.taken(), 0);
    });
}
