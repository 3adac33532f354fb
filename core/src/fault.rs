//! Fault injection for tests of supervision (compiled only with the `fault-injection`
//! feature, which test builds enable; release builds have none of it).
//!
//! A worker applying a table that holds a service named `fault-injection/panic-W-N` panics,
//! if it is worker `W` and fewer than `N` such panics have happened in this process (`N`
//! absent: every time). So a test can make a worker fail once, or for good, by publishing a
//! service, through any interface that publishes one.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::table::Snapshot;

/// The name prefix of the services that inject a panic.
pub const PANIC_PREFIX: &str = "fault-injection/panic-";

static PANICS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

/// Panics if `snapshot` asks worker `worker` to (see the module docs).
pub fn at_apply(worker: usize, snapshot: &Snapshot) {
    for service in snapshot.services() {
        let Some(spec) = service.name().strip_prefix(PANIC_PREFIX) else {
            continue;
        };
        let mut parts = spec.split('-');
        if parts.next().and_then(|w| w.parse().ok()) != Some(worker) {
            continue;
        }
        let limit = parts
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX);
        let fire = {
            let mut panics = PANICS.lock().unwrap_or_else(PoisonError::into_inner);
            let count = panics
                .get_or_insert_with(HashMap::new)
                .entry(service.name().to_string())
                .or_insert(0);
            *count < limit && {
                *count += 1;
                true
            }
        };
        if fire {
            panic!("fault injected by service {}", service.name());
        }
    }
}
