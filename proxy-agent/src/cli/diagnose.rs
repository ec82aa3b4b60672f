//! `proxy-agent diagnose`: the Service troubleshooting checklist.

use proxy_agent::{
    diagnose::{self, Status},
    inspect, manifests,
};

use super::{InspectArgs, NodeArgs, Output, SourceArgs, namespaced, print_json};

#[derive(clap::Args)]
pub struct DiagnoseArgs {
    /// NAMESPACE/NAME.
    name: String,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    args: InspectArgs,
}

pub fn diagnose(a: DiagnoseArgs) -> anyhow::Result<()> {
    let (ns, name) = namespaced(&a.name)?;
    let store = match &a.source.manifests {
        Some(dir) => {
            manifests::load_dir(dir)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", dir.display()))?
                .0
        }
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(diagnose::fetch(a.source.kubeconfig.as_ref(), ns, name))?,
    };
    let snapshot = inspect::Snapshot::read(&a.args.bpffs).ok();
    let checks = diagnose::diagnose(
        &store,
        &a.node.translate_options()?,
        snapshot.as_ref(),
        ns,
        name,
        &diagnose::tcp_reach,
    );
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if let Output::Json = a.args.output {
        print_json(&checks)?;
    } else {
        for c in &checks {
            let status = match c.status {
                Status::Pass => "PASS",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            println!("{status:<5} {:<20} {}", c.check, c.detail);
            if !c.hint.is_empty() {
                println!("      {:<20} → {}", "", c.hint);
            }
        }
    }
    if failed {
        anyhow::bail!("{}/{}: some checks failed", ns, name);
    }
    Ok(())
}
