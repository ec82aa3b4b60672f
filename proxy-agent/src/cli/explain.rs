//! `proxy-agent explain`: what the datapath does with a packet.

use std::net::SocketAddrV4;

use proxy_agent::{conntrack, datapath, inspect, model::Protocol};

use super::{InspectArgs, Output, print_json};

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// Client address:port.
    #[arg(long, value_name = "IP:PORT")]
    src: SocketAddrV4,
    /// Destination address:port (a frontend, for something to explain).
    #[arg(long, value_name = "IP:PORT")]
    dst: SocketAddrV4,
    /// Protocol.
    #[arg(long, value_name = "tcp|udp", default_value = "tcp", value_parser = Protocol::from_cli)]
    proto: Protocol,
    #[command(flatten)]
    args: InspectArgs,
}

pub fn explain(a: ExplainArgs) -> anyhow::Result<()> {
    let snapshot = inspect::Snapshot::read(&a.args.bpffs)?;
    let entries = datapath::read_pinned_conntrack(&a.args.bpffs)?;
    let e = inspect::explain(
        &snapshot,
        &entries,
        a.src,
        a.dst,
        a.proto.number(),
        conntrack::monotonic_ns(),
    );
    if let Output::Json = a.args.output {
        return print_json(&e);
    }
    println!(
        "packet     {} -> {} {}",
        e.source, e.destination, e.protocol
    );
    let show = |label: &str, v: Option<String>| {
        if let Some(v) = v {
            println!("{label:<10} {v}");
        }
    };
    show("frontend", e.frontend.clone());
    show("sockets", e.socket_level.map(str::to_owned));
    show(
        "service",
        e.service
            .clone()
            .map(|n| format!("{n} (svc id {})", e.svc_id.unwrap_or(0))),
    );
    show("flags", (!e.flags.is_empty()).then(|| e.flags.join(", ")));
    show(
        "algorithm",
        e.algorithm
            .map(|a| format!("{a}, hash {}", e.hash.unwrap_or("-"))),
    );
    show(
        "slot",
        e.slot.map(|s| {
            format!(
                "{s} of {} (flow hash {:#010x})",
                e.table_size.unwrap_or(0),
                e.flow_hash.unwrap_or(0)
            )
        }),
    );
    show("new flow", e.new_flow_backend.clone());
    show(
        "tracked",
        e.conntrack.as_ref().map(|c| {
            format!(
                "to {} ({}, idle {}s)",
                c.translated_to, c.state, c.idle_seconds
            )
        }),
    );
    println!("{:<10} {}", "verdict", e.verdict);
    show("reply", e.reply.clone());
    Ok(())
}
