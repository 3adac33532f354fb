//! Connections or flows per client IP address, for the per-client shares of the connection
//! and flow limits (so that one source cannot take every connection or flow of a worker).

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use foldhash::fast::RandomState;
use hashbrown::HashMap;

/// How many connections or flows each client address holds; addresses holding none take no
/// room.
#[derive(Debug, Default)]
pub struct ClientCounts(HashMap<IpAddr, usize, RandomState>);

impl ClientCounts {
    /// What `ip` holds.
    #[inline]
    pub fn get(&self, ip: IpAddr) -> usize {
        self.0.get(&ip).copied().unwrap_or(0)
    }

    /// `ip` holds one more.
    #[inline]
    pub fn add(&mut self, ip: IpAddr) {
        *self.0.entry(ip).or_insert(0) += 1;
    }

    /// `ip` holds one fewer.
    #[inline]
    pub fn remove(&mut self, ip: IpAddr) {
        if let Some(n) = self.0.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&ip);
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
