//! Socket-level load balancing in the loop: where the hooks attach (or why
//! they do not), and telling sockets whose backend left.

use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    path::{Path, PathBuf},
};

use crate::{datapath::Datapath, host, model::SocketLb, sockdiag};

/// Attaches (or adopts, or detaches) the socket hooks for `mode` on the
/// cgroup `root` (default: the host's hierarchy). Returns the mode in effect:
/// `Off` when the hooks cannot be attached (said in the log; the packet path
/// still serves pods).
pub fn start(dp: &mut Datapath, mode: SocketLb, root: Option<&Path>) -> SocketLb {
    if mode == SocketLb::Off {
        dp.detach_cgroup();
        tracing::info!("socket-level load balancing off (--socket-lb off)");
        return SocketLb::Off;
    }
    let attached = cgroup_root(root).and_then(|cgroup| {
        dp.attach_cgroup(&cgroup)
            .map(|()| cgroup)
            .map_err(|e| e.to_string())
    });
    match attached {
        Ok(cgroup) => {
            tracing::info!(?mode, cgroup = %cgroup.display(), "socket-level load balancing");
            mode
        }
        Err(e) => {
            dp.detach_cgroup();
            tracing::error!(
                "socket-level load balancing unavailable: {e}; pods are served per packet, host processes not at all"
            );
            SocketLb::Off
        }
    }
}

/// The cgroup the hooks attach to: `--cgroup-root`, else the host's cgroup2
/// mount (mounted if missing).
fn cgroup_root(root: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(root) = root {
        if !host::is_cgroup2(root) {
            return Err(format!(
                "--cgroup-root {}: not a cgroup v2 directory",
                root.display()
            ));
        }
        return Ok(root.to_path_buf());
    }
    // The default is the whole machine. Outside the host's network namespace
    // (a test, a nested setup) that would translate every process's sockets:
    // it must be asked for.
    if !host::in_host_netns() {
        return Err(
            "the agent is not in the host's network namespace, and the default cgroup is the whole machine's: give --cgroup-root (the cgroup of the processes to serve) or --socket-lb off"
                .into(),
        );
    }
    let path = match host::cgroup2_mount() {
        Some(path) => path,
        None => host::mount_cgroup2().map_err(|e| {
            format!(
                "no cgroup2 mount, and mounting one at {}: {e}",
                host::FALLBACK_CGROUP_MOUNT
            )
        })?,
    };
    // In a container with a cgroup namespace of its own, the mount shows
    // the container's cgroup: hooks there would serve the agent alone.
    if !host::is_cgroup_root(&path) {
        return Err(format!(
            "the cgroup2 mount at {} is not the machine's root cgroup (a container's cgroup namespace?): mount the host's cgroup2 hierarchy into the pod and give it as --cgroup-root",
            path.display()
        ));
    }
    Ok(path)
}

/// After a sync (off the loop): the socket-level entries of `departed`
/// backends go (an unconnected UDP socket picks anew), and connected UDP
/// sockets given one of them are aborted, so applications reconnect instead
/// of sending into a black hole.
pub fn forget(dp: &Datapath, mode: SocketLb, departed: BTreeSet<SocketAddrV4>) {
    if mode == SocketLb::Off || departed.is_empty() {
        return;
    }
    let handle = match dp.sock_handle() {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("forgetting socket translations: {e}");
            return;
        }
    };
    tokio::task::spawn_blocking(move || match handle.forget(&departed) {
        Ok(cookies) => {
            let aborted = sockdiag::abort_udp(cookies, mode == SocketLb::HostOnly);
            if aborted > 0 {
                tracing::info!(
                    sockets = aborted,
                    "aborted connected UDP sockets of departed backends"
                );
            }
        }
        Err(e) => tracing::warn!("forgetting socket translations: {e}"),
    });
}
