//! Socket-level load balancing from userspace: the cgroup hooks attached,
//! adopted after a restart and detached, and `SOCK_NAT` entries of departed
//! backends removed.
//!
//! Each hook gets one cgroup link, pinned at
//! `<layout dir>/cgroup-links/<cgroup inode>-<hook>`, so the hooks outlive
//! the agent like the tcx links; a restarted agent swaps its program into
//! each pinned link (`BPF_LINK_UPDATE`). Links of another cgroup (the root
//! was changed) are unpinned, which detaches them. A cgroup link always
//! runs beside the cgroup's other programs (the kernel attaches links as
//! `BPF_F_ALLOW_MULTI`; `BPF_LINK_CREATE` takes no attach flags for them).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::SocketAddrV4,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{CgroupAttachMode, Program, ProgramError, ProgramFd, links::FdLink},
};
use proxy_common::{SockKey, SockValue, ct_dir, maps, maps::programs};

use super::{Datapath, DatapathError, batch, map_data, map_err, sys};

/// The directory of the cgroup link pins, under the layout directory.
const PIN_DIR: &str = "cgroup-links";

/// One socket hook: a `cgroup/sock_addr` program, or the
/// `cgroup/sock_release` one.
enum SockHook<'a> {
    Addr(&'a mut aya::programs::CgroupSockAddr),
    Sock(&'a mut aya::programs::CgroupSock),
}

impl SockHook<'_> {
    fn load(&mut self) -> Result<(), ProgramError> {
        match self {
            Self::Addr(p) => p.load(),
            Self::Sock(p) => p.load(),
        }
    }

    fn fd(&self) -> Result<&ProgramFd, ProgramError> {
        match self {
            Self::Addr(p) => p.fd(),
            Self::Sock(p) => p.fd(),
        }
    }

    /// Attaches to the cgroup `dir` with a link of its own.
    fn attach(&mut self, dir: &File) -> Result<FdLink, String> {
        // One link per program: a cgroup link runs beside the cgroup's
        // other programs whatever the mode says.
        let mode = CgroupAttachMode::Single;
        let link = match self {
            Self::Addr(p) => {
                let id = p.attach(dir, mode).map_err(|e| super::chain(&e))?;
                FdLink::try_from(p.take_link(id).map_err(|e| e.to_string())?)
            }
            Self::Sock(p) => {
                let id = p.attach(dir, mode).map_err(|e| super::chain(&e))?;
                FdLink::try_from(p.take_link(id).map_err(|e| e.to_string())?)
            }
        };
        link.map_err(|e| e.to_string())
    }
}

fn sock_hook<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &'static str,
) -> Result<SockHook<'a>, DatapathError> {
    match ebpf.program_mut(name) {
        Some(Program::CgroupSockAddr(p)) => Ok(SockHook::Addr(p)),
        Some(Program::CgroupSock(p)) => Ok(SockHook::Sock(p)),
        _ => Err(DatapathError::MissingProgram { name }),
    }
}

impl Datapath {
    /// Loads the socket hooks (attached by [`Datapath::attach_cgroup`]).
    pub(super) fn load_sock_programs(&mut self) -> Result<(), DatapathError> {
        for (name, _) in programs::SOCK_HOOKS {
            sock_hook(&mut self.ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(())
    }

    fn cgroup_pins(&self) -> Option<PathBuf> {
        self.layout_dir.as_ref().map(|d| d.join(PIN_DIR))
    }

    /// Attaches the socket hooks to the cgroup v2 directory `cgroup`,
    /// adopting the pinned links of an earlier run on the same cgroup and
    /// detaching those on any other.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let err = |message: String| DatapathError::Attach {
            iface: cgroup.display().to_string(),
            message,
        };
        let dir = File::open(cgroup).map_err(|e| err(e.to_string()))?;
        let ino = dir.metadata().map_err(|e| err(e.to_string()))?.ino();
        let pins = self.cgroup_pins();
        if let Some(pins) = &pins {
            super::bpffs::private_dir(pins).map_err(|e| err(e.to_string()))?;
            self.detach_cgroup_except(Some(ino));
        }
        for (name, hook) in programs::SOCK_HOOKS {
            let pin = pins.as_ref().map(|p| p.join(format!("{ino}-{hook}")));
            let mut prog = sock_hook(&mut self.ebpf, name)?;
            match &pin {
                Some(pin) if pin.exists() => {
                    let link = sys::obj_get(pin)
                        .map_err(|e| err(format!("opening {}: {e}", pin.display())))?;
                    let fd = prog.fd().map_err(|e| err(e.to_string()))?;
                    sys::link_update(link.as_fd(), fd.as_fd()).map_err(|e| {
                        err(format!("replacing the program in {}: {e}", pin.display()))
                    })?;
                    tracing::info!(cgroup = %cgroup.display(), hook, "adopted pinned link");
                }
                _ => {
                    let link = prog.attach(&dir).map_err(|e| err(format!("{hook}: {e}")))?;
                    // Without a pin the link lives as long as this process.
                    match &pin {
                        Some(pin) => drop(
                            link.pin(pin)
                                .map_err(|e| err(format!("pinning {}: {e}", pin.display())))?,
                        ),
                        None => self.sock_links.push(link),
                    }
                    tracing::info!(cgroup = %cgroup.display(), hook, "attached");
                }
            }
        }
        Ok(())
    }

    /// Detaches the socket hooks (`--socket-lb off`): their pinned links go.
    pub fn detach_cgroup(&mut self) {
        self.detach_cgroup_except(None);
    }

    /// Unpins (and so detaches) the cgroup links of every cgroup but `keep`.
    fn detach_cgroup_except(&mut self, keep: Option<u64>) {
        let Some(pins) = self.cgroup_pins() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(&pins) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ino = name
                .split_once('-')
                .and_then(|(i, _)| i.parse::<u64>().ok());
            if ino.is_some() && ino == keep {
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(link = %name, "socket hook detached"),
                Err(e) => tracing::warn!(link = %name, "cannot remove socket hook pin: {e}"),
            }
        }
    }

    /// A `SOCK_NAT` handle for another thread.
    pub fn sock_handle(&self) -> Result<SockHandle, DatapathError> {
        let name = maps::SOCK_NAT;
        let data = map_data(self.map(name)?).ok_or(DatapathError::MissingMap { name })?;
        Ok(SockHandle {
            nat: data.info().map_err(map_err(name))?.id(),
        })
    }
}

/// The socket hooks' links pinned under `layout_dir` (inspection): the hook
/// names, empty when socket-level load balancing is off.
pub fn pinned_sock_hooks(layout_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(layout_dir.join(PIN_DIR)) else {
        return Vec::new();
    };
    let mut hooks: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.split_once('-').map(|(_, hook)| hook.to_owned())
        })
        .collect();
    hooks.sort();
    hooks
}

/// A handle on `SOCK_NAT` that can live on another thread (by map id).
pub struct SockHandle {
    nat: u32,
}

impl SockHandle {
    /// Removes the `SOCK_NAT` entries that involve a backend of `departed`
    /// (unconnected sockets then pick anew), returning the cookies of
    /// sockets that were given one of them, by backend (connected UDP
    /// sockets among them are to be told).
    pub fn forget(
        &self,
        departed: &BTreeSet<SocketAddrV4>,
    ) -> Result<BTreeMap<SocketAddrV4, BTreeSet<u64>>, DatapathError> {
        let name = maps::SOCK_NAT;
        let data = MapData::from_id(self.nat).map_err(map_err(name))?;
        let entries: Vec<(SockKey, SockValue)> = batch::read_hash(data.fd().as_fd())
            .map_err(|source| DatapathError::Batch { name, source })?;
        let mut m: HashMap<_, SockKey, SockValue> =
            HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(name))?;
        let mut cookies: BTreeMap<SocketAddrV4, BTreeSet<u64>> = BTreeMap::new();
        for (k, v) in entries {
            let backend = if k.dir == ct_dir::REPLY {
                k.addr()
            } else {
                v.addr()
            };
            if !departed.contains(&backend) {
                continue;
            }
            if k.dir == ct_dir::REPLY {
                cookies.entry(backend).or_default().insert(k.cookie);
            }
            super::ignore_missing(m.remove(&k)).map_err(map_err(name))?;
        }
        Ok(cookies)
    }
}
