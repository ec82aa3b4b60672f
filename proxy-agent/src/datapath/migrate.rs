//! Upgrading from an older pin layout without losing a flow.
//!
//! A layout bump (`PIN_LAYOUT_VERSION`) gives the new agent maps of its own
//! under `<root>/v<N>/`. When an older layout's pins are there too, the
//! agent carries them over in two steps around attaching its programs:
//!
//! 1. [`Datapath::migrate_start`], right after loading: every map of the
//!    old layout is copied into the new map of the same name whose key and
//!    value layouts match ([`carried`]): the service maps (so the new agent
//!    adopts the same svc and backend ids its flows refer to), conntrack,
//!    affinity, the socket maps, the counters. Maps the datapath writes are
//!    copied with `BPF_NOEXIST`, so a repeated migration (after a crash)
//!    never puts older flow state over newer. The old link pins move into
//!    the new layout, where attaching adopts them: one `BPF_LINK_UPDATE`
//!    swaps the new program in, with no moment without a program.
//! 2. [`Datapath::migrate_finish`], once the links run the new programs:
//!    the flows the old programs recorded between the copy and the swap
//!    are copied again (`BPF_NOEXIST`), then the old layout's pins are
//!    removed, which releases its maps.
//!
//! Each layout bump says in [`carried`] how its maps convert; a map whose
//! layout changed and has no conversion starts empty (logged).

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapType};
use proxy_common::{PIN_LAYOUT_VERSION, maps};

use super::{Datapath, DatapathError, map_data, sys};

/// `BPF_ANY` / `BPF_NOEXIST` update flags.
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// Maps the datapath writes: never overwritten by a copy.
const FLOW_STATE: [&str; 5] = [
    maps::CONNTRACK,
    maps::CT_NEW,
    maps::AFFINITY,
    maps::SOCK_NAT,
    maps::SOCK_PEER,
];

/// What each older layout this agent carries over copies as it is (same
/// key and value layout in both): every map but the ones added since
/// (`CT_NEW` in 8, `FRAGMENTS` in 9; in 10 `ROUTES` and `ROUTE_GEN`, a
/// cache that starts empty, and the slow programs' arrays, which the agent
/// fills). `CONFIG` gained a field in its padding in 8 (zero until the
/// agent writes `CONFIG`, which it does at its first sync); in 10 `CT_NEW`
/// gained a key form (`ct_dir::CLIENT`) beside the FORWARD and REPLY
/// entries older layouts wrote, which keep their meaning. `None`: a layout
/// this agent cannot carry over.
pub fn carried(version: u32) -> Option<Vec<&'static str>> {
    const SINCE_7: &[&str] = &[
        maps::SERVICES,
        maps::SELECTION,
        maps::SVC_TABLE,
        maps::BACKENDS,
        maps::CONNTRACK,
        maps::STATS,
        maps::SVC_STATS,
        maps::CONFIG,
        maps::SOURCE_RANGES,
        maps::AFFINITY,
        maps::BACKEND_CONNS,
        maps::BACKEND_REAPED,
        maps::SVC_NAMES,
        maps::SOCK_NAT,
        maps::SOCK_PEER,
    ];
    match version {
        7 => Some(SINCE_7.to_vec()),
        8 => Some([SINCE_7, &[maps::CT_NEW]].concat()),
        9 => Some([SINCE_7, &[maps::CT_NEW, maps::FRAGMENTS]].concat()),
        _ => None,
    }
}

/// An older layout being carried over.
#[derive(Debug)]
pub struct Migration {
    pub from: u32,
    dir: PathBuf,
}

/// The older layout directories under `root` (`v<N>`, N below ours), by version.
fn older_layouts(root: &Path) -> Vec<(u32, PathBuf)> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let n: u32 = name.to_str()?.strip_prefix('v')?.parse().ok()?;
            (n < PIN_LAYOUT_VERSION).then(|| (n, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Bytes one lookup of `data` returns.
fn value_len(data: &MapData) -> Result<usize, String> {
    let info = data.info().map_err(|e| e.to_string())?;
    let size = info.value_size() as usize;
    let per_cpu = matches!(
        info.map_type(),
        Ok(MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash)
    );
    if !per_cpu {
        return Ok(size);
    }
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| format!("{what}: {e}"))?;
    Ok(size.div_ceil(8) * 8 * cpus)
}

impl Datapath {
    /// Copies map `name` of the old layout at `dir` into ours; returns
    /// (copied, refused).
    fn copy_from(&self, dir: &Path, name: &'static str) -> Result<(usize, usize), String> {
        let old = MapData::from_pin(dir.join("maps").join(name)).map_err(|e| e.to_string())?;
        let new = map_data(self.map(name).map_err(|e| e.to_string())?)
            .ok_or_else(|| format!("{name}: not a map aya can copy"))?;
        let (oi, ni) = (
            old.info().map_err(|e| e.to_string())?,
            new.info().map_err(|e| e.to_string())?,
        );
        if (oi.key_size(), oi.value_size()) != (ni.key_size(), ni.value_size()) {
            return Err(format!(
                "key/value sizes {}/{} in the old layout, {}/{} now",
                oi.key_size(),
                oi.value_size(),
                ni.key_size(),
                ni.value_size()
            ));
        }
        let flags = if FLOW_STATE.contains(&name) {
            BPF_NOEXIST
        } else {
            BPF_ANY
        };
        sys::copy_map(
            old.fd().as_fd(),
            new.fd().as_fd(),
            oi.key_size() as usize,
            value_len(&old)?,
            flags,
        )
        .map_err(|e| e.to_string())
    }

    /// Step 1 (see the module doc): carries the newest older layout's maps
    /// over and moves its link pins into ours. `None` when there is none.
    pub fn migrate_start(&mut self) -> Result<Option<Migration>, DatapathError> {
        let Some(layout) = self.layout_dir.clone() else {
            return Ok(None);
        };
        let Some(root) = layout.parent() else {
            return Ok(None);
        };
        let Some((from, dir)) = older_layouts(root).pop() else {
            return Ok(None);
        };
        let Some(names) = carried(from) else {
            tracing::warn!(
                old = %dir.display(),
                "pins of layout {from} found; this agent carries over layouts 7 and 8 only: its flows are not kept (the old pins stay until removed)"
            );
            return Ok(None);
        };
        tracing::info!(old = %dir.display(), "carrying layout {from} over to {PIN_LAYOUT_VERSION}");
        for name in names {
            match self.copy_from(&dir, name) {
                Ok((copied, refused)) => {
                    tracing::info!(map = name, copied, refused, "carried over");
                }
                Err(e) => tracing::warn!(map = name, "not carried over, starts empty: {e}"),
            }
        }
        for sub in ["links", "cgroup-links"] {
            let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
                continue;
            };
            let to = layout.join(sub);
            super::bpffs::private_dir(&to).map_err(|source| DatapathError::PinRoot {
                path: to.clone(),
                source,
            })?;
            for e in entries.flatten() {
                let target = to.join(e.file_name());
                if target.exists() {
                    continue;
                }
                if let Err(err) = std::fs::rename(e.path(), &target) {
                    tracing::warn!(pin = %e.path().display(), "not moved: {err}");
                }
            }
        }
        Ok(Some(Migration { from, dir }))
    }

    /// Step 2 (see the module doc): after the links run our programs, the
    /// flows recorded in between are copied again and the old layout goes.
    pub fn migrate_finish(&mut self, m: Migration) -> Result<(), DatapathError> {
        let names = carried(m.from).unwrap_or_default();
        for name in FLOW_STATE.iter().filter(|n| names.contains(n)) {
            match self.copy_from(&m.dir, name) {
                Ok((copied, _)) if copied > 0 => {
                    tracing::info!(
                        map = name,
                        copied,
                        "flows recorded during the swap carried over"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(map = name, "not carried over: {e}"),
            }
        }
        std::fs::remove_dir_all(&m.dir).map_err(|source| DatapathError::PinRoot {
            path: m.dir.clone(),
            source,
        })?;
        tracing::info!(old = %m.dir.display(), "layout {} carried over and removed", m.from);
        Ok(())
    }
}
