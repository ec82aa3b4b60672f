//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), the default backend
//! selection.
//!
//! Population as in the paper: each backend has a preference list
//! `offset + j·skip (mod M)` with `offset = h1(id) mod M` and
//! `skip = h2(id) mod (M − 1) + 1` (M prime, so every list visits every slot);
//! backends take turns claiming their next preferred free slot until all M
//! slots are filled. Weights change only whose turn it is: every round each
//! backend adds its weight to a credit and takes a turn each time its credit
//! reaches the largest weight, so slot counts are proportional to weights
//! (equal weights: plain round-robin turns, counts differ by at most one).
//! Weight 0 means no slots: no new flows (drain).
//!
//! Determinism: `id` is the backend's address and port (6 bytes, network
//! order), h1/h2 are MurmurHash3 with seeds fixed in `proxy_common::hash`, and
//! turns are taken in the order of that identity, not in the order backends
//! were given. The same backend set therefore yields the same table on every
//! node, in every process, whatever order the EndpointSlices listed it in.

use std::net::SocketAddrV4;

use proxy_common::{
    hash::{MAGLEV_OFFSET_SEED, MAGLEV_SKIP_SEED, murmur3_32},
    selection::Table,
};

/// Largest table size the datapath can hold (entries are indices < 2^16 and
/// the verifier-friendly lookup assumes M < 2^17).
pub const MAX_TABLE_SIZE: u32 = 131_071;
/// Default `--maglev-max-table-size`.
pub const DEFAULT_MAX_TABLE_SIZE: u32 = 131_071;
/// Slots per backend the default size aims for: M ≥ 100·N keeps every
/// backend's share within about 1% of the ideal.
pub const SLOTS_PER_BACKEND: u32 = 100;
/// Smallest table the default size picks.
pub const MIN_DEFAULT_TABLE_SIZE: u32 = 101;
/// Largest weight accepted.
pub const MAX_WEIGHT: u32 = 10_000;
/// Most backends one table can index (entries are `u16`).
pub const MAX_BACKENDS: usize = u16::MAX as usize;

/// Why a table cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("table size {0} is not prime")]
    NotPrime(u32),
    #[error("table size {size} is outside 2..={max}")]
    OutOfRange { size: u32, max: u32 },
    #[error("table size {size} is smaller than the {backends} backends it must hold")]
    TooSmall { size: u32, backends: usize },
    #[error("{0} backends exceed the {MAX_BACKENDS} one table can index")]
    TooManyBackends(usize),
    #[error("weight {0} is above the maximum {MAX_WEIGHT}")]
    WeightTooLarge(u32),
}

/// Whether `n` is prime (trial division; n ≤ 2^32).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Smallest prime ≥ `n`.
pub fn next_prime(n: u32) -> u32 {
    let mut c = n.max(2);
    while !is_prime(c) {
        c += 1;
    }
    c
}

/// Largest prime ≤ `n`.
pub fn prev_prime(n: u32) -> u32 {
    let mut c = n;
    while c > 2 && !is_prime(c) {
        c -= 1;
    }
    c
}

/// Checks a requested table size against `max` and the backend count.
pub fn validate_size(size: u32, max: u32, backends: usize) -> Result<(), MaglevError> {
    if !(2..=max.min(MAX_TABLE_SIZE)).contains(&size) {
        return Err(MaglevError::OutOfRange {
            size,
            max: max.min(MAX_TABLE_SIZE),
        });
    }
    if !is_prime(size) {
        return Err(MaglevError::NotPrime(size));
    }
    if (size as usize) < backends {
        return Err(MaglevError::TooSmall { size, backends });
    }
    Ok(())
}

/// The default table size for `backends` backends: the smallest prime ≥
/// 100·N (at least 101), capped at the largest prime ≤ `max`.
pub fn default_size(backends: usize, max: u32) -> u32 {
    let want = u32::try_from(backends)
        .unwrap_or(u32::MAX)
        .saturating_mul(SLOTS_PER_BACKEND)
        .max(MIN_DEFAULT_TABLE_SIZE);
    let cap = prev_prime(max.min(MAX_TABLE_SIZE));
    if want >= cap { cap } else { next_prime(want) }
}

/// The hash a new flow's Maglev slot comes from (`hash % table_size`), for
/// a Maglev table; `None` otherwise. Mirrors `proxy-ebpf/src/select.rs`
/// with the same hash functions.
pub fn flow_hash(table: &Table, src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> Option<u32> {
    if table.algorithm != proxy_common::algorithm::MAGLEV || table.table_size == 0 {
        return None;
    }
    Some(if table.hash_mode == proxy_common::hash_mode::SOURCE {
        proxy_common::hash::source_hash(u32::from(*src.ip()))
    } else {
        proxy_common::hash::flow_hash(
            u32::from(*src.ip()),
            u32::from(*dst.ip()),
            src.port(),
            dst.port(),
            proto,
        )
    })
}

/// The backend id the datapath picks for a new flow from `src` to `dst`
/// with `table`, when the choice is deterministic (Maglev); `None` for the
/// other algorithms or an empty table.
pub fn predict(table: &Table, src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> Option<u32> {
    let hash = flow_hash(table, src, dst, proto)?;
    let entry = table.entries.get((hash % table.table_size) as usize)?;
    table.backends.get(usize::from(*entry)).copied()
}

/// The identity hashed for a backend: address and port, network order.
fn identity(backend: &SocketAddrV4) -> [u8; 6] {
    let mut id = [0u8; 6];
    id[..4].copy_from_slice(&backend.ip().octets());
    id[4..].copy_from_slice(&backend.port().to_be_bytes());
    id
}

/// A backend's (offset, skip) in a table of `size` slots.
pub fn permutation(backend: &SocketAddrV4, size: u32) -> (u32, u32) {
    let id = identity(backend);
    let offset = murmur3_32(&id, MAGLEV_OFFSET_SEED) % size;
    let skip = murmur3_32(&id, MAGLEV_SKIP_SEED) % (size - 1) + 1;
    (offset, skip)
}

/// Builds a table of `size` slots. Each entry is an index into `backends` (in
/// the order given); backends with weight 0 get no slot. With no backend of
/// positive weight, the table is empty (`Ok(vec![])`).
pub fn build(backends: &[(SocketAddrV4, u32)], size: u32) -> Result<Vec<u16>, MaglevError> {
    if backends.len() > MAX_BACKENDS {
        return Err(MaglevError::TooManyBackends(backends.len()));
    }
    if let Some((_, w)) = backends.iter().find(|(_, w)| *w > MAX_WEIGHT) {
        return Err(MaglevError::WeightTooLarge(*w));
    }
    let mut turns: Vec<usize> = (0..backends.len()).filter(|i| backends[*i].1 > 0).collect();
    if turns.is_empty() {
        return Ok(Vec::new());
    }
    validate_size(size, MAX_TABLE_SIZE, turns.len())?;
    turns.sort_by_key(|i| identity(&backends[*i].0));

    const EMPTY: u16 = u16::MAX;
    // Each backend walks its preference list offset, offset + skip, … (mod M):
    // `pos` is where it stands; adding `skip` < M needs at most one subtraction.
    let (mut pos, skips): (Vec<u32>, Vec<u32>) = turns
        .iter()
        .map(|i| permutation(&backends[*i].0, size))
        .unzip();
    let max_weight = turns.iter().map(|i| backends[*i].1).max().unwrap_or(1);
    let mut credit = vec![0u32; turns.len()];
    let mut table = vec![EMPTY; size as usize];
    let mut filled = 0usize;
    loop {
        for (t, &i) in turns.iter().enumerate() {
            credit[t] += backends[i].1;
            if credit[t] < max_weight {
                continue;
            }
            credit[t] -= max_weight;
            let slot = loop {
                let c = pos[t];
                pos[t] += skips[t];
                if pos[t] >= size {
                    pos[t] -= size;
                }
                if table[c as usize] == EMPTY {
                    break c as usize;
                }
            };
            // `i` < MAX_BACKENDS, checked above.
            table[slot] = i as u16;
            filled += 1;
            if filled == table.len() {
                return Ok(table);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use super::*;

    fn backends(n: u32) -> Vec<(SocketAddrV4, u32)> {
        (0..n)
            .map(|i| {
                let ip = Ipv4Addr::from(0x0af4_0000 + i);
                (SocketAddrV4::new(ip, 8080), 1)
            })
            .collect()
    }

    fn counts(table: &[u16]) -> BTreeMap<u16, usize> {
        let mut c = BTreeMap::new();
        for e in table {
            *c.entry(*e).or_insert(0) += 1;
        }
        c
    }

    #[test]
    fn primes() {
        assert!(is_prime(2) && is_prime(3) && is_prime(16_381) && is_prime(65_537));
        assert!(is_prime(131_071) && is_prime(1009) && is_prime(10_007) && is_prime(100_003));
        assert!(!is_prime(0) && !is_prime(1) && !is_prime(16_384) && !is_prime(65_535));
        assert_eq!(next_prime(1000), 1009);
        assert_eq!(prev_prime(131_072), 131_071);
    }

    #[test]
    fn default_sizes_follow_backend_count() {
        assert_eq!(default_size(1, DEFAULT_MAX_TABLE_SIZE), 101);
        assert_eq!(default_size(10, DEFAULT_MAX_TABLE_SIZE), 1009);
        assert_eq!(default_size(100, DEFAULT_MAX_TABLE_SIZE), 10_007);
        assert_eq!(default_size(1000, DEFAULT_MAX_TABLE_SIZE), 100_003);
        assert_eq!(default_size(5000, DEFAULT_MAX_TABLE_SIZE), 131_071);
        assert_eq!(default_size(1000, 16_384), 16_381);
    }

    #[test]
    fn sizes_are_validated() {
        assert_eq!(
            validate_size(16_384, DEFAULT_MAX_TABLE_SIZE, 1),
            Err(MaglevError::NotPrime(16_384))
        );
        assert!(matches!(
            validate_size(262_147, DEFAULT_MAX_TABLE_SIZE, 1),
            Err(MaglevError::OutOfRange { .. })
        ));
        assert!(matches!(
            validate_size(7, 100, 10),
            Err(MaglevError::TooSmall { .. })
        ));
        assert_eq!(validate_size(16_381, DEFAULT_MAX_TABLE_SIZE, 100), Ok(()));
        assert!(build(&backends(3), 16_384).is_err());
    }

    #[test]
    fn every_slot_filled_and_equal_weights_differ_by_at_most_one() {
        for (n, m) in [
            (1, 101),
            (3, 1009),
            (10, 1009),
            (100, 16_381),
            (1000, 65_537),
        ] {
            let t = build(&backends(n), m).unwrap();
            assert_eq!(t.len(), m as usize);
            let c = counts(&t);
            assert_eq!(c.len(), n as usize, "every backend has slots");
            let (lo, hi) = (c.values().min().unwrap(), c.values().max().unwrap());
            assert!(hi - lo <= 1, "n={n} m={m}: {lo}..{hi}");
        }
    }

    #[test]
    fn weighted_counts_are_proportional_within_one_percent_of_m() {
        let m = 16_381u32;
        let mut b = backends(6);
        for (i, w) in [1u32, 2, 3, 5, 0, 10].into_iter().enumerate() {
            b[i].1 = w;
        }
        let t = build(&b, m).unwrap();
        let c = counts(&t);
        let total: u32 = b.iter().map(|(_, w)| w).sum();
        for (i, (_, w)) in b.iter().enumerate() {
            let got = c.get(&(i as u16)).copied().unwrap_or(0) as f64;
            let want = f64::from(m) * f64::from(*w) / f64::from(total);
            assert!(
                (got - want).abs() <= f64::from(m) * 0.01,
                "backend {i} weight {w}: {got} slots, want {want:.0}"
            );
        }
        assert!(!c.contains_key(&4), "weight 0 gets no slot");
    }

    #[test]
    fn removing_one_of_100_changes_few_slots_and_adding_it_back_restores() {
        let m = 16_381;
        let all = backends(100);
        let before = build(&all, m).unwrap();
        let mut fewer = all.clone();
        let gone = fewer.remove(42);
        let after = build(&fewer, m).unwrap();
        // Compare backend identities, not indices (indices shift by one).
        let ident = |b: &[(SocketAddrV4, u32)], t: &[u16]| -> Vec<SocketAddrV4> {
            t.iter().map(|i| b[*i as usize].0).collect()
        };
        let (x, y) = (ident(&all, &before), ident(&fewer, &after));
        let changed = x.iter().zip(&y).filter(|(a, b)| a != b).count();
        let owned = x.iter().filter(|a| **a == gone.0).count();
        // The removed backend's own slots must move (~1%); the rest should mostly stay.
        assert!(changed >= owned);
        assert!(
            changed as f64 <= f64::from(m) * 0.03,
            "{changed} of {m} slots changed ({:.2}%)",
            changed as f64 * 100.0 / f64::from(m)
        );
        let restored = build(&all, m).unwrap();
        assert_eq!(
            restored, before,
            "adding it back restores the table exactly"
        );
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let b = backends(37);
        let t = build(&b, 4_099).unwrap();
        let mut rev = b.clone();
        rev.reverse();
        let r = build(&rev, 4_099).unwrap();
        let by_addr = |bs: &[(SocketAddrV4, u32)], t: &[u16]| -> Vec<SocketAddrV4> {
            t.iter().map(|i| bs[*i as usize].0).collect()
        };
        assert_eq!(by_addr(&b, &t), by_addr(&rev, &r));
    }

    #[test]
    fn all_drained_means_no_table() {
        let mut b = backends(3);
        for x in &mut b {
            x.1 = 0;
        }
        assert_eq!(build(&b, 101).unwrap(), Vec::<u16>::new());
    }
}
