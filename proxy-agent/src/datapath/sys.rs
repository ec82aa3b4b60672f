//! The few `bpf(2)` commands aya 0.14 does not wrap, as raw system calls:
//! batched map access (`batch.rs`), opening a pinned link, and swapping the
//! program of a link that aya cannot hand back to us (cgroup links).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `bpf(cmd, attr)`; `attr` is a prefix of `union bpf_attr` for `cmd`.
pub fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<A>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The `obj_get` member of `union bpf_attr`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `BPF_F_RDONLY`: a descriptor the holder can read the map through, not write.
const BPF_F_RDONLY: u32 = 1 << 3;

/// Opens the object (map, program, link) pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    obj_get_flags(path, 0)
}

/// Opens the map pinned at `path` for reading only (inspection).
pub fn obj_get_read_only(path: &Path) -> io::Result<OwnedFd> {
    obj_get_flags(path, BPF_F_RDONLY)
}

fn obj_get_flags(path: &Path, file_flags: u32) -> io::Result<OwnedFd> {
    let name = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The `link_update` member of `union bpf_attr`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Makes `link` run `program` from now on (`BPF_LINK_UPDATE`): no moment
/// without a program.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: raw(link),
        new_prog_fd: raw(program),
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The `map_elem` member of `union bpf_attr` (lookup, update, next key).
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// Copies every entry of map `from` into map `to` as raw bytes (the two
/// must have the same key and value layouts), each with update `flags`
/// (`BPF_ANY`, `BPF_NOEXIST`, ...). `value_len` is what one lookup returns
/// (for per-CPU maps, the value rounded up to 8 bytes times the possible
/// CPUs). Returns (copied, refused): entries the destination did not take
/// (already there under `BPF_NOEXIST`, full, out of its range) are counted,
/// not errors.
pub fn copy_map(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    key_len: usize,
    value_len: usize,
    flags: u64,
) -> io::Result<(usize, usize)> {
    let (mut key, mut next) = (vec![0u8; key_len], vec![0u8; key_len]);
    let mut value = vec![0u8; value_len];
    let (mut copied, mut refused) = (0, 0);
    // A null key asks for the first one.
    let mut at = 0;
    loop {
        match map_elem(BPF_MAP_GET_NEXT_KEY, from, at, next.as_mut_ptr() as u64, 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        key.copy_from_slice(&next);
        at = key.as_ptr() as u64;
        match map_elem(BPF_MAP_LOOKUP_ELEM, from, at, value.as_mut_ptr() as u64, 0) {
            Ok(()) => {}
            // Gone since: an LRU evicted it, or the datapath removed it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        }
        match map_elem(BPF_MAP_UPDATE_ELEM, to, at, value.as_ptr() as u64, flags) {
            Ok(()) => copied += 1,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EEXIST | libc::E2BIG | libc::ENOMEM | libc::ENOSPC)
                ) =>
            {
                refused += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok((copied, refused))
}

/// One element command (`cmd`) on `map`: `key` and `value_or_next_key`
/// are user addresses of buffers of the map's sizes (0: none).
fn map_elem(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: raw(map),
        _pad: 0,
        key,
        value_or_next_key,
        flags,
    };
    bpf(cmd, &mut attr).map(|_| ())
}

/// A descriptor as `union bpf_attr` holds it.
fn raw(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}
