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

    /// Keys only in `self`, keys only in `older`, and keys in both whose values differ by
    /// `same`. Compares just the shards the two do not share, so it is cheap when `self` was
    /// derived from `older` by a few changes. Both maps must descend from one map (same hasher).
    pub(crate) fn diff(&self, older: &Self, same: impl Fn(&V, &V) -> bool) -> KeyDiff<K> {
        let mut diff = KeyDiff {
            added: Vec::new(),
            removed: Vec::new(),
            changed: Vec::new(),
        };
        let find = |t: &'_ HashTable<(K, V)>, k: &K| -> Option<V> {
            t.find(self.hasher.hash_one(k), |(x, _)| x == k)
                .map(|(_, v)| v.clone())
        };
        for (new, old) in self.shards.iter().zip(older.shards.iter()) {
            if Arc::ptr_eq(new, old) {
                continue;
            }
            for (k, v) in new.iter() {
                match find(old, k) {
                    None => diff.added.push(k.clone()),
                    Some(o) if !same(v, &o) => diff.changed.push(k.clone()),
                    Some(_) => {}
                }
            }
            diff.removed.extend(
                old.iter()
                    .filter(|(k, _)| find(new, k).is_none())
                    .map(|(k, _)| k.clone()),
            );
        }
        diff
    }
}

/// What [`ShardedMap::diff`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct KeyDiff<K> {
    pub(crate) added: Vec<K>,
    pub(crate) removed: Vec<K>,
    pub(crate) changed: Vec<K>,
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
        let diff = b.diff(&a, |x, y| x == y);
        assert_eq!(
            (diff.added, diff.removed, diff.changed),
            (vec![], vec![8], vec![7])
        );
        let diff = a.diff(&b, |x, y| x == y);
        assert_eq!(
            (diff.added, diff.removed, diff.changed),
            (vec![8], vec![], vec![7])
        );
        // Only the shards of keys 7 and 8 were copied.
        let copied = b
            .shards
            .iter()
            .zip(a.shards.iter())
            .filter(|(x, y)| !Arc::ptr_eq(x, y));
        assert!((1..=2).contains(&copied.count()));
    }
}
