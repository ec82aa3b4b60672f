//! The agent of an earlier pin layout, built from the repository's own
//! history, for upgrade tests: the real previous release, not a variant.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// The last commit whose agent pins layout 7 (before `CT_NEW`).
pub const LAYOUT_7_COMMIT: &str = "95ad2400caffd534fe7559088ed81dd1e79cb8b8";

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

/// The layout-7 agent binary, built once under `target/old-layout/` from
/// `git archive` of [`LAYOUT_7_COMMIT`] (its eBPF object and its agent, in
/// a target directory of their own that later runs reuse).
pub fn agent_of_layout_7() -> Result<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let base = repo.join("target/old-layout");
    let bin = base.join("target/debug/proxy-agent");
    let marker = base.join("built-from");
    if bin.exists() && std::fs::read_to_string(&marker).is_ok_and(|c| c == LAYOUT_7_COMMIT) {
        return Ok(bin);
    }
    let have = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["cat-file", "-e", &format!("{LAYOUT_7_COMMIT}^{{commit}}")])
        .status()
        .context("running git")?;
    if !have.success() {
        bail!(
            "the upgrade test builds the layout-7 agent from commit {LAYOUT_7_COMMIT}, which this clone lacks (a shallow clone?): run `git fetch --unshallow`"
        );
    }
    let src = base.join("src");
    if src.exists() {
        std::fs::remove_dir_all(&src)?;
    }
    std::fs::create_dir_all(&src)?;
    run(
        Command::new("sh").arg("-c").arg(format!(
            "git -C '{}' archive {LAYOUT_7_COMMIT} | tar -x -C '{}'",
            repo.display(),
            src.display()
        )),
        "git archive of the layout-7 commit",
    )?;
    run(
        Command::new("cargo")
            .args(["xtask", "build-ebpf"])
            .current_dir(&src)
            .env_remove("CARGO_TARGET_DIR"),
        "building the layout-7 eBPF object",
    )?;
    run(
        Command::new("cargo")
            .args(["build", "-p", "proxy-agent"])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", base.join("target")),
        "building the layout-7 agent",
    )?;
    std::fs::write(&marker, LAYOUT_7_COMMIT)?;
    Ok(bin)
}
