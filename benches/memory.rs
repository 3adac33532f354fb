//! Memory of a table of 10,000 services and 100,000 endpoints: bytes allocated and still live
//! after building it, counted by a wrapping global allocator. Prints one line.
//! Run: `cargo bench --bench memory`.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use svcproxy::core::{Policy, Table};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, passed through.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn main() {
    let table = Table::default();
    let before = LIVE.load(Ordering::Relaxed);
    // The batch's service and endpoint definitions end up owned by the table: count them too.
    table
        .apply(common::batch(10_000, 10, Policy::RoundRobin))
        .unwrap();
    let after = LIVE.load(Ordering::Relaxed);
    let bytes = (after - before) as f64;
    let snap = table.load();
    println!(
        "table memory: {:.1} MiB for {} services, {} frontends, 100000 endpoints ({:.0} bytes per endpoint)",
        bytes / (1024.0 * 1024.0),
        snap.service_count(),
        snap.frontend_count(),
        bytes / 100_000.0
    );
}
