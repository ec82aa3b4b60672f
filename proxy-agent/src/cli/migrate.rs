//! `proxy-agent migrate-from-kube-proxy`: once the agent serves the node's
//! Services, remove kube-proxy's iptables chains and nftables tables (and
//! nothing else), so no stale rule of kube-proxy's ever matches again.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use proxy_agent::kube_proxy::{plan_iptables, plan_nft};

use super::PIN_ROOT;

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// Pin root of the agent that must be serving the node's Services first.
    #[arg(long, value_name = "DIR", default_value = PIN_ROOT)]
    bpffs: PathBuf,
    /// Print what would be removed, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Remove kube-proxy's rules even if the agent has not synced (the node
    /// then has no Services until it does).
    #[arg(long)]
    force: bool,
}

/// iptables variants kube-proxy may have written through: each save
/// command with its restore command.
const IPTABLES: [(&str, &str); 4] = [
    ("iptables-legacy-save", "iptables-legacy-restore"),
    ("iptables-nft-save", "iptables-nft-restore"),
    ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
    ("ip6tables-nft-save", "ip6tables-nft-restore"),
];

/// Runs `program args`; `None` when it is not installed.
fn output(program: &str, args: &[&str]) -> anyhow::Result<Option<String>> {
    match Command::new(program).args(args).output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("running {program}")),
        Ok(out) if !out.status.success() => bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Ok(out) => Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned())),
    }
}

/// Feeds `script` to `program --noflush`.
fn restore(program: &str, script: &str) -> anyhow::Result<()> {
    let mut child = Command::new(program)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} --noflush: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    if !args.force {
        let programmed = proxy_agent::datapath::read_pinned(&args.bpffs).with_context(|| {
            format!(
                "no agent state at {}: start the agent first (or pass --force)",
                args.bpffs.display()
            )
        })?;
        if programmed.services.is_empty() {
            bail!(
                "the agent at {} has not programmed any Service yet: removing kube-proxy's rules now would leave the node without Services (wait for it, or pass --force)",
                args.bpffs.display()
            );
        }
    }
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    let mut removed = 0;
    for (save, restore_cmd) in IPTABLES {
        let Some(dump) = output(save, &[])? else {
            continue;
        };
        for plan in plan_iptables(&dump) {
            println!(
                "{save}: table {}: {verb} {} jumps and {} chains ({})",
                plan.table,
                plan.jumps.len(),
                plan.chains.len(),
                plan.chains.join(" ")
            );
            let script = plan.restore_script();
            if args.dry_run {
                print!("{script}");
            } else {
                restore(restore_cmd, &script)
                    .with_context(|| format!("removing kube-proxy's {} rules", plan.table))?;
            }
            removed += 1;
        }
    }
    if let Some(tables) = output("nft", &["list", "tables"])? {
        for table in plan_nft(&tables) {
            println!("nft: {verb} table {table}");
            if !args.dry_run {
                let words: Vec<&str> = ["delete", "table"]
                    .into_iter()
                    .chain(table.split_whitespace())
                    .collect();
                output("nft", &words)?;
            }
            removed += 1;
        }
    }
    if removed == 0 {
        println!("no kube-proxy rules found");
    }
    Ok(())
}
