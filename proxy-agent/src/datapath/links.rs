//! tcx attachments, pinned so they outlive the agent.
//!
//! Each (interface, hook) gets one tcx link, pinned at
//! `<layout dir>/links/<ifindex>-<ifname>-<hook>`. A restarted agent finds the
//! pin and swaps its freshly loaded program into the existing link
//! (`BPF_LINK_UPDATE`): there is no moment without a program, and traffic never
//! notices. Without a pin root (tests), links live as long as the agent.

use std::{collections::BTreeSet, path::PathBuf};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
};
use proxy_common::maps::programs;

use super::{Datapath, DatapathError, Hook, classifier};

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }
}

/// The programs attached to pod-facing interfaces, per hook.
const POD_PROGRAMS: [(Hook, &str); 2] = [
    (Hook::Ingress, programs::TC_POD_INGRESS),
    (Hook::Egress, programs::TC_POD_EGRESS),
];

impl Datapath {
    fn link_pin(&self, ifindex: u32, ifname: &str, hook: Hook) -> Option<PathBuf> {
        self.layout_dir.as_ref().map(|d| {
            d.join("links")
                .join(format!("{ifindex}-{ifname}-{}", hook.name()))
        })
    }

    /// Attaches the pod programs to `ifname`, adopting pinned links from an
    /// earlier run. Returns false if this interface was already handled.
    pub fn attach_pod_interface(
        &mut self,
        ifindex: u32,
        ifname: &str,
    ) -> Result<bool, DatapathError> {
        let key = (ifindex, ifname.to_owned());
        if self.attached.contains(&key) {
            return Ok(false);
        }
        for (hook, program) in POD_PROGRAMS {
            let pin = self.link_pin(ifindex, ifname, hook);
            let attach_err = |message: String| DatapathError::Attach {
                iface: ifname.to_owned(),
                message,
            };
            let prog = classifier(&mut self.ebpf, program)?;
            match &pin {
                Some(pin) if pin.exists() => {
                    let link = PinnedLink::from_pin(pin)
                        .map_err(|e| attach_err(format!("opening {}: {e}", pin.display())))?;
                    let link = SchedClassifierLink::try_from(FdLink::from(link))
                        .map_err(|e| attach_err(format!("adopting {}: {e}", pin.display())))?;
                    let id = prog.attach_to_link(link).map_err(|e| {
                        attach_err(format!("replacing the program in {}: {e}", pin.display()))
                    })?;
                    // The pin keeps the link; our handle can go.
                    drop(prog.take_link(id));
                    tracing::info!(iface = ifname, hook = hook.name(), "adopted pinned link");
                }
                _ => {
                    let id = attach(prog, ifname, hook).map_err(|e| attach_err(e.to_string()))?;
                    if let Some(pin) = &pin {
                        let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
                        let fd_link =
                            FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?;
                        fd_link
                            .pin(pin)
                            .map_err(|e| attach_err(format!("pinning {}: {e}", pin.display())))?;
                    }
                    tracing::info!(iface = ifname, hook = hook.name(), "attached");
                }
            }
        }
        self.attached.insert(key);
        Ok(true)
    }

    /// Forgets interfaces not in `keep` and removes their pinned links (gone,
    /// or no longer matching): unpinning detaches them if still attached.
    pub fn prune_links(&mut self, keep: &BTreeSet<(u32, String)>) {
        self.attached.retain(|k| keep.contains(k));
        let Some(dir) = self.layout_dir.as_ref().map(|d| d.join("links")) else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let wanted = name
                .split_once('-')
                .and_then(|(index, rest)| {
                    let (ifname, _hook) = rest.rsplit_once('-')?;
                    Some((index.parse::<u32>().ok()?, ifname.to_owned()))
                })
                .is_some_and(|key| keep.contains(&key));
            if !wanted {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        tracing::info!(link = %name, "removed link of a vanished or unmatched interface")
                    }
                    Err(e) => tracing::warn!(link = %name, "cannot remove stale link pin: {e}"),
                }
            }
        }
    }
}

fn attach(
    prog: &mut SchedClassifier,
    ifname: &str,
    hook: Hook,
) -> Result<aya::programs::tc::SchedClassifierLinkId, aya::programs::ProgramError> {
    // First in the chain: services are translated before other programs (a
    // CNI's) see the packet, as kube-proxy's DNAT happens before routing.
    prog.attach_with_options(
        ifname,
        hook.attach_type(),
        TcAttachOptions::TcxOrder(LinkOrder::first()),
    )
}
