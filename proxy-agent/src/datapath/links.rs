//! tcx attachments, pinned so they outlive the agent.
//!
//! Each (interface, hook) gets one tcx link, pinned at
//! `<layout dir>/links/<ifindex>-<ifname>-<hook>`. A restarted agent finds the
//! pin and swaps its freshly loaded program into the existing link
//! (`BPF_LINK_UPDATE`): there is no moment without a program, and traffic never
//! notices. Without a pin root (tests), links live as long as the agent.

use std::{collections::BTreeSet, path::PathBuf};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::XdpLink,
};
use proxy_common::maps::programs;

use super::{Datapath, DatapathError, Hook, classifier, xdp};

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
            self.attach_tc(ifindex, ifname, hook, program)?;
        }
        self.attached.insert(key);
        Ok(true)
    }

    /// Attaches one TC program to a hook of `ifname`, first in the tcx
    /// chain, adopting (and updating) a pinned link from an earlier run.
    fn attach_tc(
        &mut self,
        ifindex: u32,
        ifname: &str,
        hook: Hook,
        program: &'static str,
    ) -> Result<(), DatapathError> {
        let pin = self.link_pin(ifindex, ifname, hook);
        let attach_err = |message: String| DatapathError::Attach {
            iface: ifname.to_owned(),
            message,
        };
        let prog = classifier(&mut self.ebpf, program)?;
        match &pin {
            Some(pin) if pin.exists() => {
                adopt(pin, |link| {
                    let link = SchedClassifierLink::try_from(link).map_err(|e| e.to_string())?;
                    let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
                    // The pin keeps the link; our handle can go.
                    drop(prog.take_link(id));
                    Ok(())
                })
                .map_err(attach_err)?;
                tracing::info!(iface = ifname, hook = hook.name(), "adopted pinned link");
            }
            _ => {
                let id = attach(prog, ifname, hook).map_err(|e| attach_err(super::chain(&e)))?;
                if let Some(pin) = &pin {
                    let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
                    let fd_link = FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?;
                    fd_link
                        .pin(pin)
                        .map_err(|e| attach_err(format!("pinning {}: {e}", pin.display())))?;
                }
                tracing::info!(iface = ifname, hook = hook.name(), "attached");
            }
        }
        Ok(())
    }

    /// Attaches the external programs to `ifname`: `tc_ext_ingress`, and
    /// `xdp_ext` in native (driver) mode where the driver supports it,
    /// generic mode otherwise, said in the log (without XDP, TC does the
    /// whole job). Pinned links from an earlier run are adopted. Returns
    /// false if this interface was already handled.
    pub fn attach_ext_interface(
        &mut self,
        ifindex: u32,
        ifname: &str,
    ) -> Result<bool, DatapathError> {
        let key = (ifindex, ifname.to_owned());
        if self.attached.contains(&key) {
            return Ok(false);
        }
        self.attach_tc(ifindex, ifname, Hook::Ingress, programs::TC_EXT_INGRESS)?;
        if let Err(e) = self.attach_xdp(ifindex, ifname) {
            tracing::warn!(
                iface = ifname,
                "XDP cannot attach ({e}); TC serves external traffic on this interface alone"
            );
        }
        self.attached.insert(key);
        Ok(true)
    }

    /// Attaches `xdp_pass` (native mode) to `ifindex` for as long as this
    /// datapath lives: the far end of a veth whose near end runs `xdp_ext`
    /// must have an XDP program to receive what XDP sends into the veth.
    pub fn attach_xdp_pass(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        xdp(&mut self.ebpf, programs::XDP_PASS)?
            .attach_to_if_index(ifindex, XdpMode::Driver)
            .map(drop)
            .map_err(|e| DatapathError::Attach {
                iface: ifindex.to_string(),
                message: super::chain(&e),
            })
    }

    fn attach_xdp(&mut self, ifindex: u32, ifname: &str) -> Result<(), DatapathError> {
        let attach_err = |message: String| DatapathError::Attach {
            iface: ifname.to_owned(),
            message,
        };
        let pin = self
            .layout_dir
            .as_ref()
            .map(|d| d.join("links").join(format!("{ifindex}-{ifname}-xdp")));
        let prog = xdp(&mut self.ebpf, programs::XDP_EXT)?;
        match &pin {
            Some(pin) if pin.exists() => {
                adopt(pin, |link| {
                    let link = XdpLink::try_from(link).map_err(|e| e.to_string())?;
                    let id = prog.attach_to_link(link).map_err(|e| e.to_string())?;
                    drop(prog.take_link(id));
                    Ok(())
                })
                .map_err(attach_err)?;
                tracing::info!(iface = ifname, hook = "xdp", "adopted pinned link");
            }
            _ => {
                let (id, mode) = match prog.attach_to_if_index(ifindex, XdpMode::Driver) {
                    Ok(id) => (id, "native"),
                    Err(native) => {
                        let id = prog
                            .attach_to_if_index(ifindex, XdpMode::Skb)
                            .map_err(|e| {
                                attach_err(format!("XDP: native: {native}; generic: {e}"))
                            })?;
                        tracing::warn!(
                            iface = ifname,
                            "the driver has no native XDP ({native}); using generic XDP, which runs after the skb is built"
                        );
                        (id, "generic")
                    }
                };
                if let Some(pin) = &pin {
                    let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
                    let fd_link = FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?;
                    fd_link
                        .pin(pin)
                        .map_err(|e| attach_err(format!("pinning {}: {e}", pin.display())))?;
                }
                tracing::info!(iface = ifname, hook = "xdp", mode, "attached");
            }
        }
        Ok(())
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

/// Opens the link pinned at `pin` and hands it to `replace`, which swaps our
/// freshly loaded program into it (`BPF_LINK_UPDATE`).
fn adopt(
    pin: &std::path::Path,
    replace: impl FnOnce(FdLink) -> Result<(), String>,
) -> Result<(), String> {
    let link = PinnedLink::from_pin(pin).map_err(|e| format!("opening {}: {e}", pin.display()))?;
    replace(FdLink::from(link))
        .map_err(|e| format!("replacing the program in {}: {e}", pin.display()))
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
