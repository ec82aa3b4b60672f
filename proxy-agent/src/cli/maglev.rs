//! `proxy-agent maglev`: a Maglev table built by the agent's own code, or
//! the live table of a programmed frontend.

use std::{net::SocketAddrV4, path::PathBuf};

use proxy_agent::{maglev, model::Protocol};
use proxy_common::{ServiceKey, scope};

use super::{Output, PIN_ROOT};

#[derive(clap::Args)]
pub struct MaglevArgs {
    /// Table size, a prime [default: the smallest prime >= 100 x backends].
    #[arg(long, value_name = "M")]
    size: Option<u32>,
    /// A backend, repeatable; weight 1 unless given, 0 drains it.
    #[arg(long = "backend", value_name = "ADDR:PORT[=WEIGHT]")]
    backends: Vec<String>,
    /// Show the live table of this programmed frontend instead.
    #[arg(long, value_name = "ADDR:PORT[/tcp|udp]", conflicts_with_all = ["backends", "size"])]
    frontend: Option<String>,
    /// Pin root of the agent whose table to show (with --frontend).
    #[arg(long, value_name = "DIR", default_value = PIN_ROOT)]
    bpffs: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
}

fn parse_backend(arg: &str) -> anyhow::Result<(SocketAddrV4, u32)> {
    let (addr, weight) = match arg.split_once('=') {
        Some((a, w)) => (
            a,
            w.parse::<u32>()
                .map_err(|_| anyhow::anyhow!("--backend {arg}: weight {w:?} is not a number"))?,
        ),
        None => (arg, 1),
    };
    let addr = addr
        .parse::<SocketAddrV4>()
        .map_err(|_| anyhow::anyhow!("--backend {arg}: expected IPv4ADDR:PORT[=WEIGHT]"))?;
    Ok((addr, weight))
}

/// Parses `ADDR:PORT[/tcp|udp]` (TCP unless given): the ClusterIP key.
fn parse_frontend(arg: &str) -> anyhow::Result<ServiceKey> {
    let (addr, proto) = match arg.rsplit_once('/') {
        Some((a, p)) => (
            a,
            Protocol::from_cli(p).map_err(|e| anyhow::anyhow!("--frontend {arg}: {e}"))?,
        ),
        None => (arg, Protocol::Tcp),
    };
    let addr: SocketAddrV4 = addr
        .parse()
        .map_err(|_| anyhow::anyhow!("--frontend {arg}: expected ADDR:PORT[/tcp|udp]"))?;
    Ok(ServiceKey::new(addr, proto.number(), scope::INTERNAL))
}

#[derive(serde::Serialize)]
struct MaglevOut {
    size: u32,
    backends: Vec<String>,
    table: Vec<u16>,
}

fn print_maglev(out: &MaglevOut, weights: &[u32], output: Output) -> anyhow::Result<()> {
    if let Output::Json = output {
        println!("{}", serde_json::to_string(out)?);
        return Ok(());
    }
    let n = u32::try_from(out.backends.len())?;
    println!(
        "Maglev table: {} slots for {} backends; {} bytes in the datapath (2-byte entries)",
        out.size,
        n,
        proxy_common::sel_bytes(n, 0, out.size)
    );
    let mut slots = vec![0usize; out.backends.len()];
    for e in &out.table {
        slots[usize::from(*e)] += 1;
    }
    let total_weight: u32 = weights.iter().sum();
    println!(
        "{:<4} {:<22} {:>6} {:>7} {:>8} {:>8}",
        "IDX", "BACKEND", "WEIGHT", "SLOTS", "SHARE", "IDEAL"
    );
    for (i, b) in out.backends.iter().enumerate() {
        let share = 100.0 * slots[i] as f64 / f64::from(out.size.max(1));
        let ideal = 100.0 * f64::from(weights[i]) / f64::from(total_weight.max(1));
        println!(
            "{i:<4} {b:<22} {:>6} {:>7} {share:>7.2}% {ideal:>7.2}%",
            weights[i], slots[i]
        );
    }
    let head: Vec<String> = out.table.iter().take(32).map(ToString::to_string).collect();
    println!("slots 0..{}: {}", head.len(), head.join(" "));
    Ok(())
}

pub fn maglev(args: MaglevArgs) -> anyhow::Result<()> {
    if let Some(frontend) = &args.frontend {
        let key = parse_frontend(frontend)?;
        let programmed = proxy_agent::datapath::read_pinned(&args.bpffs).map_err(|e| {
            anyhow::anyhow!(
                "reading the pinned maps under {}: {e}",
                args.bpffs.display()
            )
        })?;
        // A ClusterIP, else an external frontend (NodePort, LoadBalancer, externalIP).
        let external = ServiceKey {
            scope: scope::EXTERNAL,
            ..key
        };
        let svc = programmed
            .services
            .get(&key)
            .or_else(|| programmed.services.get(&external))
            .ok_or_else(|| anyhow::anyhow!("{frontend} is not a programmed frontend"))?;
        let table = programmed.tables.get(&svc.svc_id).ok_or_else(|| {
            anyhow::anyhow!("{frontend}: svc {} has no selection table", svc.svc_id)
        })?;
        if table.table_size == 0 {
            anyhow::bail!(
                "{frontend}: this service has no Maglev table (random selection or no backends)"
            );
        }
        let backends = table
            .backends
            .iter()
            .map(|id| {
                programmed
                    .backends
                    .get(id)
                    .map(|b| b.addr().to_string())
                    .unwrap_or_else(|| format!("<missing backend {id}>"))
            })
            .collect();
        let out = MaglevOut {
            size: table.table_size,
            backends,
            table: table.entries.clone(),
        };
        return print_maglev(&out, &table.weights, args.output);
    }
    if args.backends.is_empty() {
        anyhow::bail!("give --backend ADDR:PORT[=WEIGHT] (repeatable) or --frontend ADDR:PORT");
    }
    let backends = args
        .backends
        .iter()
        .map(|b| parse_backend(b))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let eligible = backends.iter().filter(|(_, w)| *w > 0).count();
    let size = match args.size {
        Some(size) => {
            maglev::validate_size(size, maglev::MAX_TABLE_SIZE, eligible)
                .map_err(|e| anyhow::anyhow!("--size {size}: {e}"))?;
            size
        }
        None => maglev::default_size(eligible, maglev::DEFAULT_MAX_TABLE_SIZE),
    };
    let table = maglev::build(&backends, size).map_err(|e| anyhow::anyhow!("{e}"))?;
    let out = MaglevOut {
        size,
        backends: backends.iter().map(|(b, _)| b.to_string()).collect(),
        table,
    };
    let weights: Vec<u32> = backends.iter().map(|(_, w)| *w).collect();
    print_maglev(&out, &weights, args.output)
}
