//! Internet checksum arithmetic (RFC 1071, RFC 1624): all of it, for every
//! caller. Headers the datapath builds itself (`reject.rs`, `dsr.rs`) sum
//! their words; rewrites in XDP (`ctx.rs`) and of ICMP quotes (`icmp.rs`)
//! update checksums incrementally; the reject's quote gets its fixed point.
//!
//! Rewrites of existing packets in TC use the kernel's incremental helpers
//! instead (`bpf_l3_csum_replace`/`bpf_l4_csum_replace`, see `nat.rs`): those
//! also keep `CHECKSUM_PARTIAL` and `CHECKSUM_COMPLETE` skbs consistent.
//!
//! Words are summed in the byte order they have in memory; the folded result,
//! stored back the same way, is correct on either endianness.

/// Folds a 32-bit one's-complement sum to 16 bits and complements it.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// A checksum after one 16-bit word it covers changed from `old` to `new`
/// (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')). Raw (in-packet) byte order.
#[inline(always)]
pub fn update16(csum: u16, old: u16, new: u16) -> u16 {
    fold(u32::from(!csum) + u32::from(!old) + u32::from(new))
}

/// The two 16-bit words of a raw 32-bit value, in packet order.
#[inline(always)]
pub fn halves(v: u32) -> [u16; 2] {
    let b = v.to_ne_bytes();
    [
        u16::from_ne_bytes([b[0], b[1]]),
        u16::from_ne_bytes([b[2], b[3]]),
    ]
}

/// A checksum after the 32-bit value it covers changed from `old` to `new`.
#[inline(always)]
pub fn update32(csum: u16, old: u32, new: u32) -> u16 {
    let (o, n) = (halves(old), halves(new));
    update16(update16(csum, o[0], n[0]), o[1], n[1])
}

/// A checksum after a 16-bit (`size` 2) or 32-bit (`size` 4) value it covers
/// changed from `from` to `to` (raw values, as `bpf_l{3,4}_csum_replace`
/// take them), in one fold.
#[inline(always)]
pub fn replace(csum: u16, from: u64, to: u64, size: u64) -> u16 {
    let words = |v: u64| -> u32 {
        if size == 4 {
            u32::from(v as u16) + u32::from((v >> 16) as u16)
        } else {
            u32::from(v as u16)
        }
    };
    let not_words = |v: u64| -> u32 {
        if size == 4 {
            u32::from(!(v as u16)) + u32::from(!((v >> 16) as u16))
        } else {
            u32::from(!(v as u16))
        }
    };
    fold(u32::from(!csum) + not_words(from) + words(to))
}

/// The value F a checksum field must hold so that computing the checksum
/// over the data with F in place writes F again: F = ~(S + F), with `sum`
/// the data's sum including the field's current value `current`. (F + F = ~S
/// in ones' complement, so F is ~S rotated right by one; ~S = 0 is written
/// 0xffff, as the kernel writes it.)
#[inline(always)]
pub fn fixed_point(sum: u32, current: u16) -> u16 {
    // Ones' complement subtraction of the field: S = sum - field.
    let t = fold(sum + u32::from(!current));
    if t == 0 { 0xffff } else { t.rotate_right(1) }
}

/// Adds the 16-bit words of `bytes` (even length) to `sum`.
#[inline(always)]
pub fn add_words<const N: usize>(mut sum: u32, bytes: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_ne_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// Sums up to `max_words` 16-bit words of packet data in `[start, end)` from `start`,
/// stopping at `len` bytes; an odd last byte is padded with zero as RFC 1071 says.
#[inline(always)]
#[expect(
    clippy::int_plus_one,
    reason = "`p + 1 <= end` keeps the one-byte bound the verifier needs (see the odd byte)"
)]
pub fn add_packet_words(mut sum: u32, start: usize, end: usize, len: usize) -> u32 {
    // Bounded loop: the verifier sees at most MAX_SAMPLE_WORDS iterations.
    let mut i = 0usize;
    while i < MAX_SAMPLE_WORDS {
        let off = i * 2;
        if off >= len {
            break;
        }
        if start + off + 2 > end || off + 2 > len {
            // An odd last byte, read as the second of the pair ending with
            // it (a one-byte read bounded as `p < end` gives the verifier
            // no range when `p`'s offset is variable).
            if off > 0 && start + off + 1 <= end {
                // SAFETY: the two bytes at start+off-1 are inside the packet.
                let w = unsafe { *((start + off - 1) as *const [u8; 2]) };
                sum += u32::from(u16::from_ne_bytes([w[1], 0]));
            }
            break;
        }
        // SAFETY: two bytes at start+off are inside the packet.
        let w = unsafe { *((start + off) as *const [u8; 2]) };
        sum += u32::from(u16::from_ne_bytes(w));
        i += 1;
    }
    sum
}

/// Largest quote of the offending packet an ICMP error carries, in 16-bit
/// words: a 60-byte IPv4 header plus a whole 20-byte TCP header.
pub const MAX_SAMPLE_WORDS: usize = 40;
