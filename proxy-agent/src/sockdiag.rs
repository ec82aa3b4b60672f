//! Telling sockets their backend is gone: connected UDP sockets that the
//! socket hooks gave a backend which then left its Service are aborted
//! (`SOCK_DESTROY` over `NETLINK_SOCK_DIAG`, which ends in the kernel's
//! `udp_abort`), so the application gets ECONNABORTED and reconnects instead
//! of sending into a black hole: kube-proxy's UDP conntrack flush, done for
//! sockets. (`bpf_sock_destroy` from a socket iterator does the same; aya
//! 0.14 has neither iterator programs nor kfunc calls.)
//!
//! Sockets live in the network namespace of their process (a pod's, or the
//! host's), and sock_diag sees one namespace at a time: each namespace with
//! a process in it is entered on a thread of its own.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::PathBuf,
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `TCP_ESTABLISHED`: a connected UDP socket's state.
const ESTABLISHED: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagReq {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    hdr: NlMsgHdr,
    req: DiagReq,
}

impl Request {
    /// A sock_diag request of `kind` about IPv4 UDP sockets in `states`
    /// (a bit per state), `id` naming one socket or zero for any.
    fn udp(kind: u16, flags: i32, states: u32, id: SockId) -> Self {
        Self {
            hdr: NlMsgHdr {
                len: size_of::<Self>() as u32,
                kind,
                flags: (libc::NLM_F_REQUEST | flags) as u16,
                seq: 1,
                pid: 0,
            },
            req: DiagReq {
                family: libc::AF_INET as u8,
                protocol: libc::IPPROTO_UDP as u8,
                states,
                id,
                ..DiagReq::default()
            },
        }
    }
}

impl SockId {
    fn dst(&self) -> SocketAddrV4 {
        SocketAddrV4::new(
            Ipv4Addr::from(self.dst[0].to_ne_bytes()),
            u16::from_be_bytes(self.dport),
        )
    }

    fn cookie(&self) -> u64 {
        (u64::from(self.cookie[1]) << 32) | u64::from(self.cookie[0])
    }
}

fn plain_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: `T` is a #[repr(C)] struct of integers without padding holes
    // that matter to the kernel (it reads them as bytes).
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
}

fn read_plain<T: Copy + Default>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: `T` is plain data; exactly size_of::<T>() bytes are copied.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            std::ptr::from_mut(&mut v).cast::<u8>(),
            size_of::<T>(),
        );
    }
    Some(v)
}

/// A NETLINK_SOCK_DIAG socket in the calling thread's network namespace.
fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created for us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, request: &Request) -> io::Result<()> {
    let bytes = plain_bytes(request);
    // SAFETY: sending bytes we own.
    let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receiving into a buffer we own.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// The messages of one netlink reply buffer: (type, payload).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while let Some(hdr) = buf.get(off..).and_then(read_plain::<NlMsgHdr>) {
        let len = hdr.len as usize;
        if len < size_of::<NlMsgHdr>() || off + len > buf.len() {
            break;
        }
        out.push((hdr.kind, &buf[off + size_of::<NlMsgHdr>()..off + len]));
        off += len.div_ceil(4) * 4;
    }
    out
}

/// Connected UDP sockets (IPv4) of the calling thread's network namespace.
fn connected_udp(fd: &OwnedFd) -> io::Result<Vec<SockId>> {
    send(
        fd,
        &Request::udp(
            SOCK_DIAG_BY_FAMILY,
            libc::NLM_F_DUMP,
            1 << ESTABLISHED,
            SockId::default(),
        ),
    )?;
    let mut sockets = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd, &mut buf)?;
        for (kind, payload) in messages(&buf[..n]) {
            match kind {
                NLMSG_DONE => return Ok(sockets),
                NLMSG_ERROR => {
                    let code = read_plain::<i32>(payload).unwrap_or(0);
                    return Err(io::Error::from_raw_os_error(-code));
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(msg) = read_plain::<DiagMsg>(payload) {
                        sockets.push(msg.id);
                    }
                }
                _ => {}
            }
        }
        if n == 0 {
            return Ok(sockets);
        }
    }
}

/// Aborts one UDP socket.
fn destroy(fd: &OwnedFd, id: SockId) -> io::Result<()> {
    send(
        fd,
        &Request::udp(SOCK_DESTROY, libc::NLM_F_ACK, u32::MAX, id),
    )?;
    let mut buf = vec![0u8; 4096];
    let n = recv(fd, &mut buf)?;
    for (kind, payload) in messages(&buf[..n]) {
        if kind == NLMSG_ERROR {
            let code = read_plain::<i32>(payload).unwrap_or(0);
            if code != 0 {
                return Err(io::Error::from_raw_os_error(-code));
            }
        }
    }
    Ok(())
}

/// Aborts, in the calling thread's namespace, the connected UDP sockets to
/// one of `targets` whose cookie is listed for that backend.
fn destroy_here(targets: &BTreeMap<SocketAddrV4, BTreeSet<u64>>) -> io::Result<usize> {
    let fd = diag_socket()?;
    let mut n = 0;
    for id in connected_udp(&fd)? {
        if targets
            .get(&id.dst())
            .is_some_and(|cookies| cookies.contains(&id.cookie()))
        {
            match destroy(&fd, id) {
                Ok(()) => n += 1,
                // Closed meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(n)
}

/// One path per network namespace that has a process in it.
fn namespaces() -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let path = p.path().join("ns/net");
        if let Ok(m) = std::fs::metadata(&path)
            && seen.insert((m.dev(), m.ino()))
        {
            out.push(path);
        }
    }
    out
}

/// Runs `f` on a thread inside the network namespace at `path`.
fn in_namespace<T: Send + 'static>(
    path: PathBuf,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    std::thread::spawn(move || {
        let ns = File::open(&path)?;
        // SAFETY: setns on a namespace fd we opened; affects only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?
}

/// Aborts the connected UDP sockets given a backend of `targets` (the
/// cookies per backend come from `SOCK_NAT`): in this process's namespace,
/// and, unless `host_only`, in every other one with a process in it.
/// Returns how many were aborted.
pub fn abort_udp(targets: BTreeMap<SocketAddrV4, BTreeSet<u64>>, host_only: bool) -> usize {
    if targets.is_empty() {
        return 0;
    }
    let mut total = match destroy_here(&targets) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("aborting UDP sockets of departed backends: {e}");
            0
        }
    };
    if host_only {
        return total;
    }
    let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let own = ino("/proc/self/ns/net");
    let targets = std::sync::Arc::new(targets);
    for path in namespaces() {
        if ino(&path.to_string_lossy()) == own {
            continue;
        }
        let t = std::sync::Arc::clone(&targets);
        match in_namespace(path.clone(), move || destroy_here(&t)) {
            Ok(n) => total += n,
            // The process (and maybe its namespace) went meanwhile.
            Err(e) => tracing::debug!(netns = %path.display(), "aborting UDP sockets: {e}"),
        }
    }
    total
}
