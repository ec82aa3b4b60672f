//! `proxy-agent service list|get`: the programmed Service ports.

use clap::Subcommand;
use proxy_agent::inspect;

use super::{InspectArgs, Output, namespaced, print_json};

#[derive(clap::Args)]
pub struct ServiceCmd {
    #[command(subcommand)]
    action: ServiceAction,
}

#[derive(Subcommand)]
enum ServiceAction {
    /// Every programmed Service port: frontends, backends, algorithm, traffic.
    List(InspectArgs),
    /// One Service in detail: frontends, backends and their state, selection table.
    Get {
        /// NAMESPACE/NAME.
        name: String,
        #[command(flatten)]
        args: InspectArgs,
    },
}

pub fn service(cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd.action {
        ServiceAction::List(args) => {
            let rows = inspect::services(&inspect::Snapshot::read(&args.bpffs)?);
            if let Output::Json = args.output {
                return print_json(&rows);
            }
            println!(
                "{:<36} {:<10} {:<8} {:<9} {:>8} {:<24} {:>10} {:>9}  FRONTENDS",
                "NAMESPACE/NAME",
                "PORT",
                "PROTOCOL",
                "TABLE",
                "BACKENDS",
                "ALGORITHM",
                "PACKETS",
                "NEW-CONNS"
            );
            for r in rows {
                println!(
                    "{:<36} {:<10} {:<8} {:<9} {:>8} {:<24} {:>10} {:>9}  {}",
                    format!("{}/{}", r.namespace, r.name),
                    if r.port.is_empty() { "-" } else { &r.port },
                    r.protocol,
                    r.table,
                    r.backends,
                    r.algorithm,
                    r.packets,
                    r.new_connections,
                    r.frontends.join(", ")
                );
            }
            Ok(())
        }
        ServiceAction::Get { name, args } => {
            let (ns, n) = namespaced(&name)?;
            let detail = inspect::service(&inspect::Snapshot::read(&args.bpffs)?, ns, n);
            if detail.is_empty() {
                anyhow::bail!(
                    "{name}: no programmed Service of that name (see `proxy-agent service list`)"
                );
            }
            if let Output::Json = args.output {
                return print_json(&detail);
            }
            for d in detail {
                let s = &d.summary;
                println!(
                    "{}/{} port {:?} {} (svc id {}, {} table)",
                    s.namespace, s.name, s.port, s.protocol, s.svc_id, s.table
                );
                println!("  frontends:  {}", s.frontends.join(", "));
                println!(
                    "  selection:  {}, hash {}, Maglev size {}, affinity {}s{}",
                    s.algorithm,
                    d.hash,
                    d.maglev_table_size,
                    d.affinity_timeout_seconds,
                    if d.drop_when_empty {
                        ", drops when empty"
                    } else {
                        ""
                    }
                );
                if !d.source_ranges.is_empty() {
                    println!("  source ranges: {}", d.source_ranges.join(", "));
                }
                if let Some(how) = d.socket_level {
                    println!("  socket-level: {how}");
                }
                println!(
                    "  traffic:    {} packets, {} bytes, {} new connections, {} rejected",
                    s.packets, s.bytes, s.new_connections, s.rejected
                );
                println!(
                    "  {:<24} {:>6} {:<9} {:>6} {:>7} {:>6}",
                    "BACKEND", "ID", "STATE", "LOCAL", "WEIGHT", "SLOTS"
                );
                for b in &d.backend_list {
                    println!(
                        "  {:<24} {:>6} {:<9} {:>6} {:>7} {:>5.1}%",
                        b.address, b.backend_id, b.state, b.local, b.weight, b.slot_share_percent
                    );
                }
            }
            Ok(())
        }
    }
}
