//! ClientIP session affinity: client IP -> endpoint, until the client has been idle longer
//! than the service's timeout.
//!
//! The map is shared by every worker, so it is split into mutex-guarded shards keyed by a hash
//! of the IP; one lookup holds one shard lock for a few nanoseconds. It survives table
//! publishes: when a service port is rebuilt, entries whose endpoint is no longer eligible are
//! dropped at once (kubernetes #110302), and a lookup re-checks eligibility too. Expired entries
//! are replaced on lookup and swept from a shard every [`SWEEP_EVERY`] inserts into it, which
//! bounds memory to the clients seen within one timeout.

use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use hashbrown::HashMap;

use crate::loom::lock;
use crate::loom::sync::Mutex;

const SHARDS: usize = 16;
/// Inserts into one shard between two sweeps of its expired entries.
pub(crate) const SWEEP_EVERY: u32 = 256;

struct Sticky {
    endpoint: SocketAddr,
    last_used: Instant,
}

struct Shard {
    entries: HashMap<IpAddr, Sticky, RandomState>,
    inserts: u32,
}

pub(crate) struct Affinity {
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl Affinity {
    pub(crate) fn new() -> Self {
        let hasher = RandomState::default();
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    entries: HashMap::with_hasher(hasher.clone()),
                    inserts: 0,
                })
            })
            .collect();
        Self { hasher, shards }
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<Shard> {
        &self.shards[self.hasher.hash_one(ip) as usize % SHARDS]
    }

    /// The client's endpoint if it has one that is still valid, else the one `choose` returns,
    /// remembered from now on. `valid` says whether an endpoint is still eligible.
    pub(crate) fn get_or_choose(
        &self,
        ip: IpAddr,
        now: Instant,
        timeout: Duration,
        valid: impl Fn(SocketAddr) -> bool,
        choose: impl FnOnce() -> SocketAddr,
    ) -> SocketAddr {
        let mut shard = lock(self.shard(&ip));
        if let Some(sticky) = shard.entries.get_mut(&ip) {
            let fresh = now.saturating_duration_since(sticky.last_used) <= timeout;
            if fresh && valid(sticky.endpoint) {
                sticky.last_used = now;
                return sticky.endpoint;
            }
        }
        let endpoint = choose();
        shard.insert(ip, endpoint, now, timeout);
        endpoint
    }

    /// Points the client at `endpoint` (after a failed connect moved it elsewhere).
    pub(crate) fn set(&self, ip: IpAddr, endpoint: SocketAddr, now: Instant, timeout: Duration) {
        lock(self.shard(&ip)).insert(ip, endpoint, now, timeout);
    }

    /// Drops every entry whose endpoint `keep` rejects.
    pub(crate) fn retain(&self, keep: impl Fn(SocketAddr) -> bool) {
        for shard in self.shards.iter() {
            lock(shard).entries.retain(|_, s| keep(s.endpoint));
        }
    }

    /// Number of clients remembered (expired ones included until swept).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).entries.len()).sum()
    }
}

impl Shard {
    fn insert(&mut self, ip: IpAddr, endpoint: SocketAddr, now: Instant, timeout: Duration) {
        self.entries.insert(
            ip,
            Sticky {
                endpoint,
                last_used: now,
            },
        );
        self.inserts += 1;
        if self.inserts >= SWEEP_EVERY {
            self.inserts = 0;
            self.entries
                .retain(|_, s| now.saturating_duration_since(s.last_used) <= timeout);
        }
    }
}
