//! Batched map access (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_LOOKUP_BATCH`), which
//! aya 0.14 does not wrap: one syscall for thousands of elements where a
//! Service sync would otherwise make one per element.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Elements per syscall: bounded so the kernel's per-call work stays short.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    super::sys::bpf(cmd, attr).map(drop)
}

/// Writes `keys[i] → values[i·cpus .. (i+1)·cpus]` for every i: for per-CPU
/// maps, one value per possible CPU (`V` a multiple of 8 bytes, as the
/// kernel lays them out); `cpus` = 1 for other maps.
pub fn update<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    cpus: usize,
) -> io::Result<()> {
    if cpus == 0 || keys.len() * cpus != values.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "values are not one (per CPU) for every key",
        ));
    }
    for (k, v) in keys.chunks(CHUNK).zip(values.chunks(CHUNK * cpus)) {
        let mut attr = BatchAttr {
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: u32::try_from(k.len()).unwrap_or(u32::MAX),
            map_fd: u32::try_from(map.as_raw_fd()).unwrap_or(u32::MAX),
            ..BatchAttr::default()
        };
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
        if attr.count as usize != k.len() {
            return Err(io::Error::other(format!(
                "batch update wrote {} of {} elements",
                attr.count,
                k.len()
            )));
        }
    }
    Ok(())
}

/// One `BPF_MAP_LOOKUP_BATCH` call of up to `want` entries into `keys` and
/// `values`, continuing after `token_in` (none: from the start) and leaving
/// the next token in `token_out`: (entries read, whether the map is done).
/// Array maps' tokens are indexes, hash maps' bucket numbers; both u32.
fn lookup_chunk<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    token_in: Option<&u32>,
    token_out: &mut u32,
    keys: &mut [K],
    values: &mut [V],
    want: usize,
) -> io::Result<(usize, bool)> {
    let want = want.min(keys.len()).min(values.len());
    let mut attr = BatchAttr {
        in_batch: token_in.map_or(0, |t| std::ptr::from_ref(t) as u64),
        out_batch: std::ptr::from_mut(token_out) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: u32::try_from(want).unwrap_or(u32::MAX),
        map_fd: u32::try_from(map.as_raw_fd()).unwrap_or(u32::MAX),
        ..BatchAttr::default()
    };
    let done = match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
        Err(e) => return Err(e),
    };
    Ok(((attr.count as usize).min(want), done))
}

/// Reads `count` consecutive elements of an array map from index `start`.
pub fn read_array<V: Pod + Default + Clone>(
    map: BorrowedFd<'_>,
    start: u32,
    count: u32,
) -> io::Result<Vec<V>> {
    let mut out: Vec<V> = Vec::with_capacity(count as usize);
    let mut keys = vec![0u32; CHUNK];
    let mut values = vec![V::default(); CHUNK];
    // The kernel continues after the key in `in_batch`; none means "from the start".
    let mut cursor: u32 = start.wrapping_sub(1);
    let mut from_start = start == 0;
    while out.len() < count as usize {
        let want = count as usize - out.len();
        let token = cursor;
        let (n, done) = lookup_chunk(
            map,
            (!from_start).then_some(&token),
            &mut cursor,
            &mut keys,
            &mut values,
            want,
        )?;
        out.extend_from_slice(&values[..n]);
        from_start = false;
        if done || n == 0 {
            break;
        }
    }
    Ok(out)
}

/// Every entry of a hash map (keys `K`, values `V`), thousands per syscall
/// instead of two syscalls per entry. Entries added or removed meanwhile may
/// be missed or seen, as with a key-by-key walk.
pub fn read_hash<K: Pod + Default, V: Pod + Default>(
    map: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut keys = vec![K::default(); CHUNK];
    let mut values = vec![V::default(); CHUNK];
    let mut token: Option<u32> = None;
    loop {
        let mut next = 0;
        let (n, done) = lookup_chunk(
            map,
            token.as_ref(),
            &mut next,
            &mut keys,
            &mut values,
            CHUNK,
        )?;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if done {
            return Ok(out);
        }
        token = Some(next);
    }
}
