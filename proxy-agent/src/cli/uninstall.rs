//! `proxy-agent uninstall`: remove everything the agent pinned.

use std::path::PathBuf;

use super::PIN_ROOT;

#[derive(clap::Args)]
pub struct UninstallArgs {
    /// Pin root to remove.
    #[arg(long, value_name = "DIR", default_value = PIN_ROOT)]
    pub bpffs: PathBuf,
}

/// Removes every pin under `root`: unpinning the links detaches the
/// programs; maps go when nothing holds them any more.
pub fn uninstall(root: &std::path::Path) -> anyhow::Result<()> {
    if !root.exists() {
        println!("{} does not exist: nothing to remove", root.display());
        return Ok(());
    }
    let count = |dir: &str| {
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|v| std::fs::read_dir(v.path().join(dir)).ok())
            .flatten()
            .flatten()
            .count()
    };
    let (links, hooks) = (count("links"), count("cgroup-links"));
    std::fs::remove_dir_all(root)
        .map_err(|e| anyhow::anyhow!("removing {}: {e}", root.display()))?;
    println!(
        "removed {} ({links} interface links and {hooks} socket hooks detached, maps and conntrack released); Services are no longer translated on this node",
        root.display()
    );
    Ok(())
}
