//! `proxy-agent ct list`: connection tracking entries.

use clap::Subcommand;
use proxy_agent::{conntrack, datapath, inspect, model::Protocol};

use super::{InspectArgs, Output, print_json};

#[derive(clap::Args)]
pub struct CtCmd {
    #[command(subcommand)]
    action: CtAction,
}

#[derive(Subcommand)]
enum CtAction {
    /// Conntrack entries, both directions of every flow.
    List {
        /// Only flows of this Service (NAMESPACE/NAME).
        #[arg(long, value_name = "NS/NAME")]
        service: Option<String>,
        /// Only entries with this address (or ADDR:PORT) on either side or as translation.
        #[arg(long, value_name = "ADDR[:PORT]")]
        address: Option<String>,
        /// Only this protocol.
        #[arg(long, value_name = "tcp|udp", value_parser = Protocol::from_cli)]
        proto: Option<Protocol>,
        #[command(flatten)]
        args: InspectArgs,
    },
}

pub fn ct(cmd: CtCmd) -> anyhow::Result<()> {
    let CtAction::List {
        service,
        address,
        proto,
        args,
    } = cmd.action;
    let protocol = proto.map(Protocol::number);
    let snapshot = inspect::Snapshot::read(&args.bpffs)?;
    let entries = datapath::read_pinned_conntrack(&args.bpffs)?;
    let rows = inspect::conntrack(
        &snapshot,
        &entries,
        &inspect::CtFilter {
            service,
            address,
            protocol,
        },
        conntrack::monotonic_ns(),
    );
    if let Output::Json = args.output {
        return print_json(&rows);
    }
    println!(
        "{:<8} {:<4} {:<22} {:<22} {:<22} {:<12} {:>6}  {:<28} FLAGS",
        "DIR", "PROTO", "SOURCE", "DESTINATION", "TRANSLATED-TO", "STATE", "IDLE", "SERVICE"
    );
    for r in rows {
        println!(
            "{:<8} {:<4} {:<22} {:<22} {:<22} {:<12} {:>5}s  {:<28} {}",
            r.direction,
            r.protocol,
            r.source,
            r.destination,
            r.translated_to,
            r.state,
            r.idle_seconds,
            r.service,
            r.flags.join(",")
        );
    }
    Ok(())
}
