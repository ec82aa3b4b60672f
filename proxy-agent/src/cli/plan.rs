//! `proxy-agent plan`: the desired state of a manifest directory, without
//! touching the kernel.

use std::path::PathBuf;

use proxy_agent::{manifests, model::DesiredState, translate};

use super::{NodeArgs, Output};

#[derive(clap::Args)]
pub struct PlanArgs {
    /// Directory of Service, EndpointSlice and Node manifests (*.yaml, *.yml, *.json).
    #[arg(long, value_name = "DIR")]
    manifests: PathBuf,
    #[command(flatten)]
    node: NodeArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
}

fn print_plan(desired: &DesiredState, output: Output) -> anyhow::Result<()> {
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(desired)?);
        return Ok(());
    }
    println!(
        "{:<40} {:<8} {:<24} {:<14} BACKENDS",
        "SERVICE", "PROTOCOL", "FRONTENDS", "SELECTION"
    );
    for s in &desired.services {
        let mut name = format!("{}/{}", s.id.namespace, s.id.name);
        if !s.id.port_name.is_empty() {
            name = format!("{name}:{}", s.id.port_name);
        }
        let frontends: Vec<String> = s
            .frontends
            .iter()
            .map(|f| format!("{}:{}", f.address, f.port))
            .collect();
        let backends: Vec<String> = s
            .internal_backends
            .iter()
            .map(|b| match s.weight(b) {
                1 => b.to_string(),
                w => format!("{b}={w}"),
            })
            .chain(s.draining_backends.iter().map(|b| format!("{b}=0")))
            .collect();
        let algorithm = s.algorithm.name();
        let selection = match s.maglev_table_size {
            Some(m) => format!("{algorithm}/{m}"),
            None => algorithm.to_owned(),
        };
        println!(
            "{:<40} {:<8} {:<24} {:<14} {}",
            name,
            s.id.protocol.to_string(),
            frontends.join(","),
            selection,
            if backends.is_empty() {
                "<none: rejected>".to_owned()
            } else {
                backends.join(",")
            }
        );
    }
    Ok(())
}

pub fn plan(args: PlanArgs) -> anyhow::Result<()> {
    let (store, mut errors) = manifests::load_dir(&args.manifests)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", args.manifests.display()))?;
    let t = translate::translate(&store, &args.node.translate_options()?);
    errors.extend(t.errors);
    for e in &errors {
        tracing::warn!("{e}");
    }
    print_plan(&t.desired, args.output)
}
