//! Connections or flows per client IP address, for the per-client shares of the connection
//! and flow limits (so that one source cannot take every connection or flow of a worker); the
//! same counting per frontend tells a worker when a steered UDP frontend has no flow left.

use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use foldhash::fast::RandomState;
use hashbrown::HashMap;

/// How many connections or flows each key holds (a client address, or a frontend); keys
/// holding none take no room.
#[derive(Debug)]
pub struct KeyCounts<K>(HashMap<K, usize, RandomState>);

/// Connections or flows per client address.
pub type ClientCounts = KeyCounts<IpAddr>;

impl<K> Default for KeyCounts<K> {
    fn default() -> Self {
        Self(HashMap::default())
    }
}

impl<K: Hash + Eq + Copy> KeyCounts<K> {
    /// What `key` holds.
    #[inline]
    pub fn get(&self, key: K) -> usize {
        self.0.get(&key).copied().unwrap_or(0)
    }

    /// `key` holds one more.
    #[inline]
    pub fn add(&mut self, key: K) {
        *self.0.entry(key).or_insert(0) += 1;
    }

    /// `key` holds one fewer.
    #[inline]
    pub fn remove(&mut self, key: K) {
        if let Some(n) = self.0.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&key);
            }
        }
    }
}

/// [`ClientCounts`] shared by every worker of a proxy (sharded by address, so that workers
/// admitting different clients rarely meet on a lock).
#[derive(Debug)]
pub struct SharedClientCounts {
    shards: Box<[Mutex<ClientCounts>]>,
    hasher: RandomState,
}

/// One connection held by a client address; dropping it gives the address's share back
/// (also when a failing worker unwinds).
#[derive(Debug)]
pub struct ClientPermit {
    counts: Arc<SharedClientCounts>,
    ip: IpAddr,
}

const SHARDS: usize = 16;

impl Default for SharedClientCounts {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::default(),
        }
    }
}

impl SharedClientCounts {
    fn shard(&self, ip: IpAddr) -> MutexGuard<'_, ClientCounts> {
        let i = (self.hasher.hash_one(ip) as usize) % SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// One more connection for `ip`, if it holds fewer than `limit`.
    pub fn admit(counts: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<ClientPermit> {
        let mut shard = counts.shard(ip);
        if shard.get(ip) >= limit {
            return None;
        }
        shard.add(ip);
        Some(ClientPermit {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        self.counts.shard(self.ip).remove(self.ip);
    }
}
