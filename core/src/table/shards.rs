//! A hash map split into a fixed number of independently shared shards: the structure behind
//! a snapshot. Cloning the map copies only the shard pointers, and changing a key copies only
//! its shard, so a one-service change to a 10,000-service table copies a few dozen entries,
//! not ten thousand. A lookup hashes the key once and finds it in one `hashbrown` table.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use foldhash::fast::RandomState;
use hashbrown::HashTable;

const SHARD_BITS: u32 = 8;
const SHARDS: usize = 1 << SHARD_BITS;

type Shard<K, V> = Arc<HashTable<(K, V)>>;

#[derive(Clone)]
pub(crate) struct ShardedMap<K, V> {
    hasher: RandomState,
    shards: Box<[Shard<K, V>]>,
    len: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> ShardedMap<K, V> {
    pub(crate) fn new(hasher: RandomState) -> Self {
        let empty = Arc::new(HashTable::new());
        Self {
            hasher,
            shards: vec![empty; SHARDS].into_boxed_slice(),
            len: 0,
        }
    }

    #[inline]
    fn locate<Q: Hash + ?Sized>(&self, key: &Q) -> (u64, usize) {
        let hash = self.hasher.hash_one(key);
        (hash, (hash >> (64 - SHARD_BITS)) as usize)
    }

    #[inline]
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (hash, shard) = self.locate(key);
        self.shards[shard]
            .find(hash, |(k, _)| k.borrow() == key)
            .map(|(_, v)| v)
    }

    /// Inserts or replaces; returns the previous value.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let (hash, shard) = self.locate(&key);
        let hasher = &self.hasher;
        let table = Arc::make_mut(&mut self.shards[shard]);
        match table.find_mut(hash, |(k, _)| *k == key) {
            Some(slot) => Some(std::mem::replace(&mut slot.1, value)),
            None => {
                table.insert_unique(hash, (key, value), |(k, _)| hasher.hash_one(k));
                self.len += 1;
                None
            }
        }
    }

    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (hash, shard) = self.locate(key);
        self.shards[shard].find(hash, |(k, _)| k.borrow() == key)?;
        let table = Arc::make_mut(&mut self.shards[shard]);
        let entry = table.find_entry(hash, |(k, _)| k.borrow() == key).ok()?;
        self.len -= 1;
        Some(entry.remove().0.1)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards
            .iter()
            .flat_map(|s| s.iter().map(|(k, v)| (k, v)))
    }

    /// Keys only in `self` and keys only in `older`. Compares just the shards the two do not
    /// share, so it is cheap when `self` was derived from `older` by a few changes. Both maps
    /// must descend from one map (same hasher).
    pub(crate) fn key_changes(&self, older: &Self) -> (Vec<K>, Vec<K>) {
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        let only_in = |a: &HashTable<(K, V)>, b: &HashTable<(K, V)>, out: &mut Vec<K>| {
            let keys = a.iter().map(|(k, _)| k);
            out.extend(
                keys.filter(|k| b.find(self.hasher.hash_one(*k), |(x, _)| x == *k).is_none())
                    .cloned(),
            );
        };
        for (new, old) in self.shards.iter().zip(older.shards.iter()) {
            if !Arc::ptr_eq(new, old) {
                only_in(new, old, &mut added);
                only_in(old, new, &mut removed);
            }
        }
        (added, removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_remove_and_sharing() {
        let mut a: ShardedMap<u32, u32> = ShardedMap::new(RandomState::default());
        for i in 0..1000 {
            assert_eq!(a.insert(i, i * 2), None);
        }
        assert_eq!(a.len(), 1000);
        let mut b = a.clone();
        assert_eq!(b.insert(7, 70), Some(14));
        assert_eq!(b.remove(&8), Some(16));
        assert_eq!(b.remove(&8), None);
        assert_eq!((a.get(&7), b.get(&7)), (Some(&14), Some(&70)));
        assert_eq!(b.len(), 999);
        assert_eq!(b.iter().count(), 999);
        assert_eq!(b.key_changes(&a), (vec![], vec![8]));
        assert_eq!(a.key_changes(&b), (vec![8], vec![]));
        // Only the shards of keys 7 and 8 were copied.
        let copied = b
            .shards
            .iter()
            .zip(a.shards.iter())
            .filter(|(x, y)| !Arc::ptr_eq(x, y));
        assert!((1..=2).contains(&copied.count()));
    }
}
