//! Hash functions shared by the kernel and userspace, so the agent (and its
//! CLI) can predict and explain every backend choice the datapath makes.
//!
//! All hashes are MurmurHash3 (x86, 32-bit) with seeds fixed here: never per
//! process, so every node computes the same values.

/// Seed of the per-packet flow hash.
pub const FLOW_SEED: u32 = 0x6b70_7278;
/// Seed of Maglev's `offset` hash of a backend.
pub const MAGLEV_OFFSET_SEED: u32 = 0x4d47_4f46;
/// Seed of Maglev's `skip` hash of a backend.
pub const MAGLEV_SKIP_SEED: u32 = 0x4d47_534b;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn mix_k(k: u32) -> u32 {
    k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2)
}

#[inline(always)]
fn mix_block(h: u32, k: u32) -> u32 {
    (h ^ mix_k(k))
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// MurmurHash3_x86_32 of `data`.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    let mut h = seed;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        h = mix_block(h, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, b) in tail.iter().enumerate() {
            k |= u32::from(*b) << (8 * i);
        }
        h ^= mix_k(k);
    }
    fmix(h ^ data.len() as u32)
}

/// The flow hash of a 5-tuple, addresses and ports in host order: MurmurHash3
/// of the words `[saddr, daddr, sport << 16 | dport, proto]` (16 bytes).
#[inline(always)]
pub fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = mix_block(FLOW_SEED, saddr);
    h = mix_block(h, daddr);
    h = mix_block(h, (u32::from(sport) << 16) | u32::from(dport));
    h = mix_block(h, u32::from(proto));
    fmix(h ^ 16)
}

/// The hash used instead of [`flow_hash`] when session affinity pins a client
/// to a backend: the source address alone (4 bytes).
#[inline(always)]
pub fn source_hash(saddr: u32) -> u32 {
    fmix(mix_block(FLOW_SEED, saddr) ^ 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_reference_vectors() {
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(&[0, 0, 0, 0], 0), 0x2362_f9de);
        assert_eq!(murmur3_32(b"aaaa", 0x9747_b28c), 0x5a97_808a);
        assert_eq!(murmur3_32(b"Hello, world!", 0x9747_b28c), 0x2488_4cba);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0x9747_b28c),
            0x2fa8_26cd
        );
    }

    #[test]
    fn flow_hash_is_murmur3_of_its_words() {
        let (s, d, sp, dp, p): (u32, u32, u16, u16, u8) = (0x0af4_0102, 0x0a60_000a, 40000, 80, 6);
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&s.to_le_bytes());
        bytes[4..8].copy_from_slice(&d.to_le_bytes());
        bytes[8..12].copy_from_slice(&((u32::from(sp) << 16) | u32::from(dp)).to_le_bytes());
        bytes[12..16].copy_from_slice(&u32::from(p).to_le_bytes());
        assert_eq!(flow_hash(s, d, sp, dp, p), murmur3_32(&bytes, FLOW_SEED));
        assert_eq!(source_hash(s), murmur3_32(&s.to_le_bytes(), FLOW_SEED));
    }
}
