//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size `M`
//! filled by letting each endpoint claim slots along its own permutation
//! `(offset + j * skip) mod M`, in turns. Every endpoint owns about `M/N` slots, and removing one
//! endpoint reassigns mostly the slots it owned, so about `1/N` of the clients move.
//!
//! Permutations come from the endpoint address hashed with fixed seeds, so every proxy instance
//! (and every restart) builds the same table for the same endpoints.

use std::hash::{BuildHasher, Hash};
use std::net::SocketAddr;

use foldhash::fast::FixedState;

const OFFSET_SEED: u64 = 0x5356_4350_524f_5859;
const SKIP_SEED: u64 = 0x6d61_676c_6576_2121;
const CLIENT_SEED: u64 = 0x636c_6965_6e74_2121;

/// Builds the table for `endpoints` (non-empty) with `size` slots (prime): endpoint indices.
pub(crate) fn build(endpoints: &[SocketAddr], size: u32) -> Vec<u32> {
    let m = u64::from(size);
    let perms: Vec<(u64, u64)> = endpoints
        .iter()
        .map(|addr| {
            let offset = hash(addr, OFFSET_SEED) % m;
            let skip = hash(addr, SKIP_SEED) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; endpoints.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            let mut slot = (offset + next[i] * skip) % m;
            while table[slot as usize] != u32::MAX {
                next[i] += 1;
                slot = (offset + next[i] * skip) % m;
            }
            table[slot as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    table
}

/// The table slot for a client address.
#[inline]
pub(crate) fn slot(client: &SocketAddr, size: usize) -> usize {
    (hash(client, CLIENT_SEED) % size as u64) as usize
}

fn hash<T: Hash>(value: &T, seed: u64) -> u64 {
    FixedState::with_seed(seed).hash_one(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([198, 18, (i >> 8) as u8, i as u8], 8080)))
            .collect()
    }

    #[test]
    fn every_endpoint_owns_about_its_share() {
        // The production size, or a small prime under Miri (minutes otherwise): the property
        // does not depend on the size.
        const SIZE: u32 = if cfg!(miri) { 1_009 } else { 65_537 };
        let table = build(&addrs(10), SIZE);
        let share = SIZE as usize / 10;
        for i in 0..10u32 {
            let owned = table.iter().filter(|&&x| x == i).count();
            // Turns are taken in order, so shares differ by at most one slot.
            assert!(
                (share..=share + 1).contains(&owned),
                "endpoint {i} owns {owned}"
            );
        }
    }

    #[test]
    fn same_endpoints_same_table() {
        assert_eq!(build(&addrs(7), 1_009), build(&addrs(7), 1_009));
    }
}
