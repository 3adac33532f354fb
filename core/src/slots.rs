//! A slab whose ids carry a generation: an id kept after its entry was removed never reaches
//! a later entry in the same slot (until 2^28 reuses of that slot). Backends tag their epoll
//! tokens and io_uring user data with these ids, so a completion or event for something that
//! has since been closed is recognised and ignored.

use slab::Slab;

/// Names an entry of a [`Slots`]. Packs into the low 60 bits of a `u64`, leaving 4 bits for a
/// caller's tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId {
    index: u32,
    generation: u32,
}

impl SlotId {
    /// Bits of the generation.
    pub const GENERATION_BITS: u32 = 28;
    const GENERATION_MASK: u32 = (1 << Self::GENERATION_BITS) - 1;

    /// Packs the id into the low 60 bits.
    #[inline]
    pub fn to_u64(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    /// Unpacks [`SlotId::to_u64`]; bits above the low 60 are ignored.
    #[inline]
    pub fn from_u64(v: u64) -> Self {
        Self {
            index: v as u32,
            generation: ((v >> 32) as u32) & Self::GENERATION_MASK,
        }
    }
}

/// Entries addressed by generation-checked [`SlotId`]s.
#[derive(Debug)]
pub struct Slots<T> {
    slab: Slab<(u32, T)>,
    next_generation: u32,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Slots<T> {
    /// No entries.
    pub fn new() -> Self {
        Self {
            slab: Slab::new(),
            next_generation: 0,
        }
    }

    /// Adds an entry.
    pub fn insert(&mut self, value: T) -> SlotId {
        match self.insert_with(|_| Ok::<T, std::convert::Infallible>(value)) {
            Ok(id) => id,
            Err(never) => match never {},
        }
    }

    /// Adds the entry `make` builds knowing its id; nothing is added if `make` fails.
    pub fn insert_with<E>(
        &mut self,
        make: impl FnOnce(SlotId) -> Result<T, E>,
    ) -> Result<SlotId, E> {
        let entry = self.slab.vacant_entry();
        let id = SlotId {
            index: entry.key() as u32,
            generation: self.next_generation,
        };
        let value = make(id)?;
        entry.insert((id.generation, value));
        self.next_generation = (self.next_generation + 1) & SlotId::GENERATION_MASK;
        Ok(id)
    }

    /// The entry named by `id`, if it is still there.
    #[inline]
    pub fn get(&self, id: SlotId) -> Option<&T> {
        match self.slab.get(id.index as usize) {
            Some((generation, value)) if *generation == id.generation => Some(value),
            _ => None,
        }
    }

    /// The entry named by `id`, mutably.
    #[inline]
    pub fn get_mut(&mut self, id: SlotId) -> Option<&mut T> {
        match self.slab.get_mut(id.index as usize) {
            Some((generation, value)) if *generation == id.generation => Some(value),
            _ => None,
        }
    }

    /// Removes the entry named by `id`.
    pub fn remove(&mut self, id: SlotId) -> Option<T> {
        self.get(id)?;
        Some(self.slab.remove(id.index as usize).1)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Every entry with its id.
    pub fn iter(&self) -> impl Iterator<Item = (SlotId, &T)> {
        self.slab.iter().map(|(index, (generation, value))| {
            let id = SlotId {
                index: index as u32,
                generation: *generation,
            };
            (id, value)
        })
    }

    /// Every entry with its id, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (SlotId, &mut T)> {
        self.slab.iter_mut().map(|(index, (generation, value))| {
            let id = SlotId {
                index: index as u32,
                generation: *generation,
            };
            (id, value)
        })
    }

    /// Every id.
    pub fn ids(&self) -> Vec<SlotId> {
        self.iter().map(|(id, _)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_ids_miss_and_ids_round_trip() {
        let mut s = Slots::new();
        let a = s.insert("a");
        assert_eq!(s.remove(a), Some("a"));
        let b = s.insert("b");
        assert_eq!(s.get(a), None, "same slot, new generation");
        assert_eq!(
            s.get(SlotId::from_u64(b.to_u64() | (0xF << 60))),
            Some(&"b")
        );
        assert!(b.to_u64() < 1 << 60);
        let r: Result<SlotId, &str> = s.insert_with(|_| Err("no"));
        assert!(r.is_err());
        assert_eq!(s.len(), 1);
    }
}
