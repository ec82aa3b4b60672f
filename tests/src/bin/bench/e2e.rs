//! End to end in namespaces: a client pod to a Service with 10 backend pods
//! on one node, through our datapath (per packet, and with the socket
//! hooks), straight to the pod IPs (the floor), and through kube-proxy's
//! iptables and nftables rule sets. The client of every round is a process
//! of its own (the bench binary with `--client`), as the socket hooks act on
//! a process by its cgroup.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use std::fmt::Write as _;

use anyhow::{Context as _, Result, bail};
use proxy_tests::{
    cluster::{Agent, Cluster},
    fake_api::FakeApi,
    netns::TestCgroup,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    Report,
    control_plane::agent_for,
    median, plot,
    programming::timed_restore,
    rules::{self, KubeSvc},
    thousands,
};

/// Request and response size, bytes.
pub const MESSAGE: usize = 64;
/// Client connections, each with one request in flight.
pub const CLIENTS: usize = 16;
/// Backend pods of the Service under test.
pub const BACKENDS: u8 = 10;
/// Port the backends serve on.
const BACKEND_PORT: u16 = 8080;
/// Measured rounds per metric (the median is reported).
pub const ROUNDS: usize = 7;
/// Warm-up before each round, not counted.
pub const WARMUP: Duration = Duration::from_millis(300);
/// Length of a measured round.
pub const ROUND: Duration = Duration::from_secs(1);

/// A rule loader: program, arguments, and the rule text it reads on stdin.
pub type Loader = (
    &'static str,
    &'static [&'static str],
    fn(&[KubeSvc]) -> String,
);

/// How client traffic reaches the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Straight to the pod IPs, round robin in the client: no translation.
    PodIp,
    /// Through the ClusterIP with our agent on the node, per packet (TC).
    Ours,
    /// As `Ours`, with the socket hooks on the client's cgroup: connect()
    /// picks the backend, nothing is translated per packet.
    OursSocket,
    /// Through the ClusterIP with kube-proxy's iptables rules, loaded by
    /// `iptables-restore` (the nf_tables backend on this distribution).
    Iptables,
    /// As `Iptables`, with `iptables-legacy-restore` (the x_tables backend).
    IptablesLegacy,
    /// Through the ClusterIP with kube-proxy's nftables rules (`nft -f`).
    Nft,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::PodIp,
        Mode::Ours,
        Mode::OursSocket,
        Mode::Iptables,
        Mode::IptablesLegacy,
        Mode::Nft,
    ];

    /// For kube-proxy's modes: the loader, its arguments, and the rule set
    /// it loads.
    pub fn loader(self) -> Option<Loader> {
        match self {
            Mode::PodIp | Mode::Ours | Mode::OursSocket => None,
            Mode::Iptables => Some(("iptables-restore", &["-w"], rules::iptables)),
            Mode::IptablesLegacy => Some(("iptables-legacy-restore", &["-w"], rules::iptables)),
            Mode::Nft => Some(("nft", &["-f", "-"], rules::nft)),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Mode::PodIp => "pod IP (floor)",
            Mode::Ours => "ours",
            Mode::OursSocket => "ours (socket LB)",
            Mode::Iptables => "iptables (nf_tables)",
            Mode::IptablesLegacy => "iptables (legacy)",
            Mode::Nft => "nftables",
        }
    }
}

/// Requests per second over one measured round, and failed attempts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rate {
    pub per_sec: f64,
    pub errors: u64,
}

/// One mode at one size: how long programming took and both rates.
#[derive(Clone, Debug)]
pub struct Run {
    pub mode: Mode,
    pub services: u32,
    /// Rules loaded or agent synced, seconds (none for the floor).
    pub program_s: Option<f64>,
    /// One request per connection: connect, request, response, close.
    pub short: Rate,
    /// Requests on long-lived connections, one per client thread.
    pub keep_alive: Rate,
    /// Every round's rates in the order they ran (for the range; round i
    /// of every mode ran back to back).
    pub short_rounds: Vec<f64>,
    pub keep_alive_rounds: Vec<f64>,
    /// CPU the agent used while this size's traffic ran (all beds), as a
    /// share of one core.
    pub agent_cpu: Option<f64>,
    /// Ours: (program, runs, mean ns per run) under one extra round of each
    /// kind, with the kernel's run-time statistics on.
    pub program_costs: Vec<(&'static str, u64, f64)>,
}

/// Our programs on the pod interfaces.
const POD_PROGRAMS: [&str; 2] = [
    proxy_common::maps::programs::TC_POD_INGRESS,
    proxy_common::maps::programs::TC_POD_EGRESS,
];

/// What our programs cost per run under real traffic: one more round of
/// each kind on `bed`, with run-time statistics switched on only for it
/// (they add two clock reads per run, so the measured rounds go without).
fn program_costs(bed: &Bed, mode: Mode) -> Result<Vec<(&'static str, u64, f64)>> {
    use proxy_agent::datapath::{enable_run_stats, program_run_stats};
    let mut programs = POD_PROGRAMS.to_vec();
    if mode == Mode::OursSocket {
        programs.push(proxy_common::maps::programs::SOCK_CONNECT4);
    }
    let stats = enable_run_stats()?;
    let before = programs
        .iter()
        .map(|p| program_run_stats(p))
        .collect::<Result<Vec<_>, _>>()?;
    bed.round(false)?;
    bed.round(true)?;
    let mut costs = Vec::new();
    for (p, (runs0, time0)) in programs.iter().zip(before) {
        let (runs, time) = program_run_stats(p)?;
        let n = runs.saturating_sub(runs0);
        costs.push((*p, n, (time - time0).as_nanos() as f64 / n.max(1) as f64));
    }
    drop(stats);
    Ok(costs)
}

/// Echo servers for every backend pod: one tokio runtime serving all their
/// listeners (the sockets were created inside the pods' namespaces).
struct Servers {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Servers {
    fn start(cluster: &Cluster, roles: &[String]) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_io()
            .build()?;
        for role in roles {
            let pod = cluster.pod(role)?;
            let listener = pod.ns.run(|| {
                let l = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?;
            runtime.spawn(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                while let Ok((mut conn, _)) = listener.accept().await {
                    let _ = conn.set_nodelay(true);
                    tokio::spawn(async move {
                        let mut buf = [0u8; MESSAGE];
                        while conn.read_exact(&mut buf).await.is_ok() {
                            if conn.write_all(&buf).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
        Ok(Self {
            runtime: Some(runtime),
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A node with a client pod and the backend pods, programmed for one mode.
struct Bed {
    cluster: Cluster,
    targets: Vec<SocketAddrV4>,
    program_s: Option<f64>,
    // Dropped before the cluster: the agent and servers live in its namespaces.
    agent: Option<(FakeApi, Agent)>,
    _servers: Servers,
    /// The client's cgroup, where the socket hooks attach (socket LB only).
    cgroup: Option<TestCgroup>,
}

/// The Services programmed at size `n`: the synthetic set with the one at
/// `n / 2` pointing at `backends`.
fn services(n: u32, backends: &[Ipv4Addr]) -> (Vec<KubeSvc>, SocketAddrV4) {
    let mut svcs = rules::services(n, u32::from(BACKENDS));
    let under_test = &mut svcs[(n / 2) as usize];
    under_test.endpoints = backends
        .iter()
        .map(|ip| SocketAddrV4::new(*ip, BACKEND_PORT))
        .collect();
    let vip = under_test.vip;
    (svcs, vip)
}

impl Bed {
    fn new(mode: Mode, n: u32) -> Result<Self> {
        let mut cluster = Cluster::new()?;
        let client = cluster.add_pod("client", Ipv4Addr::new(10, 244, 0, 2))?;
        // Many short connections from one pod: every ephemeral port, and
        // TIME_WAIT ports reused as soon as TCP allows.
        client
            .ns
            .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        client.ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        let mut roles = Vec::new();
        let mut backends = Vec::new();
        for i in 1..=BACKENDS {
            let ip = Ipv4Addr::new(10, 244, 1, i);
            let role = format!("backend{i}");
            cluster.add_pod(&role, ip)?;
            roles.push(role);
            backends.push(ip);
        }
        let servers = Servers::start(&cluster, &roles)?;
        let (svcs, vip) = services(n, &backends);
        let mut agent = None;
        let cgroup = if mode == Mode::OursSocket {
            Some(TestCgroup::new(&cluster.prefix)?)
        } else {
            None
        };
        let program_s = match mode {
            Mode::PodIp => None,
            Mode::Ours | Mode::OursSocket => {
                let root = cgroup
                    .as_ref()
                    .map(|c| c.path.to_string_lossy().into_owned());
                let extra: Vec<&str> = root
                    .as_deref()
                    .map(|r| vec!["--cgroup-root", r])
                    .unwrap_or_default();
                let (api, mut a, started) = agent_for(&cluster, &svcs, &extra)?;
                a.wait_for_log("kind=\"full\"", Duration::from_secs(300))?;
                let took = started.elapsed().as_secs_f64();
                agent = Some((api, a));
                Some(took)
            }
            Mode::Iptables | Mode::IptablesLegacy | Mode::Nft => {
                let (program, args, rules) = mode.loader().context("a rules mode")?;
                Some(timed_restore(&cluster.node, program, args, &rules(&svcs))?)
            }
        };
        let targets = if mode == Mode::PodIp {
            backends
                .iter()
                .map(|ip| SocketAddrV4::new(*ip, BACKEND_PORT))
                .collect()
        } else {
            vec![vip]
        };
        Ok(Self {
            cluster,
            targets,
            program_s,
            agent,
            _servers: servers,
            cgroup,
        })
    }

    /// CPU seconds the agent has used so far, if there is one.
    fn agent_cpu_s(&self) -> Option<f64> {
        let (_, agent) = self.agent.as_ref()?;
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", agent.process.child.id())).ok()?;
        // Fields after the parenthesised command name; utime and stime are
        // the 12th and 13th of them, in clock ticks.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Some(ticks / hz)
    }

    /// One round: a client process in the client pod (in the hooks'
    /// cgroup for socket LB) with `CLIENTS` requests in flight for
    /// `WARMUP + ROUND`, counting what completes in the last `ROUND`.
    fn round(&self, keep_alive: bool) -> Result<Rate> {
        let ns = &self.cluster.pod("client")?.ns;
        let exe = std::env::current_exe()?;
        let targets: Vec<String> = self.targets.iter().map(ToString::to_string).collect();
        let targets = targets.join(",");
        let mut args = vec!["--client", targets.as_str()];
        if keep_alive {
            args.push("--keep-alive");
        }
        let out = match &self.cgroup {
            Some(cgroup) => cgroup.exec(ns, &exe, &args)?,
            None => ns.exec(&exe.to_string_lossy(), &args)?,
        };
        let mut fields = out.split_whitespace();
        match (
            fields.next().map(str::parse::<f64>),
            fields.next().map(str::parse::<u64>),
        ) {
            (Some(Ok(per_sec)), Some(Ok(errors))) => Ok(Rate { per_sec, errors }),
            _ => bail!("the client process said {out:?}"),
        }
    }
}

/// `bench --client`: one round from this process, in the namespace (and
/// cgroup) it was started in; prints "requests/s errors".
pub fn client_round(targets: &[SocketAddrV4], keep_alive: bool) -> Result<Rate> {
    if targets.is_empty() {
        bail!("--client needs targets");
    }
    let targets = targets.to_vec();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let start = tokio::time::Instant::now();
        let count_from = start + WARMUP;
        let until = count_from + ROUND;
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let targets = targets.clone();
                tokio::spawn(client(t, targets, keep_alive, count_from, until))
            })
            .collect();
        let mut total = Rate::default();
        for t in tasks {
            let (ok, errors) = t.await?;
            total.per_sec += ok as f64 / ROUND.as_secs_f64();
            total.errors += errors;
        }
        Ok(total)
    })
}

/// One client: (requests answered in the counted window, failures).
async fn client(
    t: usize,
    targets: Vec<SocketAddrV4>,
    keep_alive: bool,
    count_from: tokio::time::Instant,
    until: tokio::time::Instant,
) -> (u64, u64) {
    let request = [0x61u8; MESSAGE];
    let mut response = [0u8; MESSAGE];
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut next = t;
    let mut conn: Option<tokio::net::TcpStream> = None;
    loop {
        let now = tokio::time::Instant::now();
        if now >= until {
            break;
        }
        let result = tokio::time::timeout(Duration::from_secs(1), async {
            if conn.is_none() {
                let target = targets[next % targets.len()];
                next += 1;
                let s = tokio::net::TcpStream::connect(target).await?;
                s.set_nodelay(true)?;
                conn = Some(s);
            }
            let s = conn.as_mut().ok_or(std::io::ErrorKind::NotConnected)?;
            s.write_all(&request).await?;
            s.read_exact(&mut response).await?;
            Ok::<(), std::io::Error>(())
        })
        .await;
        match result {
            Ok(Ok(())) if now >= count_from => ok += 1,
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => {
                errors += u64::from(now >= count_from);
                conn = None;
                continue;
            }
        }
        if !keep_alive {
            conn = None; // close: the client sends FIN first
        }
    }
    (ok, errors)
}

/// Every mode at `n` Services. All beds are built first, then the
/// rounds interleave (each round visits every bed, starting one further
/// along each time), so slow drifts of this shared VM fall on every mode
/// alike instead of on whichever ran last.
pub fn at(n: u32) -> Result<Vec<Run>> {
    // Let the previous size's namespaces finish dying (the kernel frees
    // their conntrack entries and sockets in the background).
    std::thread::sleep(Duration::from_secs(3));
    let mut beds = Vec::new();
    for mode in Mode::ALL {
        let bed = Bed::new(mode, n).with_context(|| format!("{} at {n}", mode.label()))?;
        beds.push((mode, bed));
    }
    let cpu_before: Vec<Option<f64>> = beds.iter().map(|(_, b)| b.agent_cpu_s()).collect();
    let traffic_started = std::time::Instant::now();
    // rates[keep_alive][bed]
    let mut rates = [vec![Vec::new(); beds.len()], vec![Vec::new(); beds.len()]];
    let mut errors = [vec![0u64; beds.len()], vec![0u64; beds.len()]];
    for (k, keep_alive) in [false, true].into_iter().enumerate() {
        for round in 0..ROUNDS {
            for j in 0..beds.len() {
                let i = (j + round) % beds.len();
                let r = beds[i].1.round(keep_alive)?;
                rates[k][i].push(r.per_sec);
                errors[k][i] += r.errors;
            }
        }
    }
    // The agent runs all along (its conntrack collection too), not only
    // while its own bed carries traffic: its share of a core over it all.
    let wall = traffic_started.elapsed().as_secs_f64();
    let mut runs = Vec::new();
    for (i, (mode, bed)) in beds.iter().enumerate() {
        let short_rounds = std::mem::take(&mut rates[0][i]);
        let keep_alive_rounds = std::mem::take(&mut rates[1][i]);
        let short = Rate {
            per_sec: median(&mut short_rounds.clone()),
            errors: errors[0][i],
        };
        let keep_alive = Rate {
            per_sec: median(&mut keep_alive_rounds.clone()),
            errors: errors[1][i],
        };
        let agent_cpu = cpu_before[i]
            .zip(bed.agent_cpu_s())
            .map(|(a, b)| (b - a) / wall);
        eprintln!(
            "e2e {n} {}: program {:?} s, short {:.0}/s ({} errors), keep-alive {:.0}/s ({} errors)",
            mode.label(),
            bed.program_s,
            short.per_sec,
            short.errors,
            keep_alive.per_sec,
            keep_alive.errors
        );
        let program_costs = if matches!(mode, Mode::Ours | Mode::OursSocket) {
            program_costs(bed, *mode)?
        } else {
            Vec::new()
        };
        runs.push(Run {
            mode: *mode,
            services: n,
            program_s: bed.program_s,
            short,
            keep_alive,
            short_rounds,
            keep_alive_rounds,
            agent_cpu,
            program_costs,
        });
    }
    Ok(runs)
}
/// Client pod → Service with 10 backends, every mode at every size.
pub fn section(report: &mut Report, sizes: &[u32]) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for &n in sizes {
        runs.extend(at(n)?);
    }
    let md = &mut report.md;
    writeln!(
        md,
        "\n## End to end: client pod → Service with 10 backends\n"
    )?;
    writeln!(
        md,
        "One node namespace, a client pod and {} backend pods joined to it by veth pairs (as in the \
         integration tests). Each backend echoes {}-byte requests (tokio, 2 worker threads for all \
         backends); the client is a process of its own per round (started in the client pod before its \
         warm-up), one tokio thread with {} connections in flight. **Short-lived**: \
         connect, request, response, close (the client closes first), so the rate is new connections \
         per second. **Keep-alive**: requests on {} long-lived connections. Each figure is the median of \
         {} rounds of {} ms after {} ms of warm-up (the range shows all rounds); failed attempts are counted. \
         All {} beds of a size exist at once and the rounds interleave, so the VM's drifts fall on every \
         mode alike. *Programmed in*: rules loaded, or agent start → first full sync written (listing and \
         translation included). *Agent CPU*: the agent's CPU time while the size's rounds ran (all beds \
         take turns, so its own bed carried a {} of that traffic), as a share of one core; mostly \
         conntrack garbage collection every 10 s. The Service under test sits \
         in the middle of N Services with 10 endpoints each (iptables walks its KUBE-SERVICES list linearly \
         for every new connection). **pod IP**: the client connects to the backends' addresses in turn, \
         nothing translates (the floor). **ours**: the agent watching a fake API server with the N Services, \
         translating per packet in TC (socket hooks off). **ours (socket LB)**: the same agent with its socket \
         hooks on a cgroup holding the client process: connect() picks the backend, no packet is translated \
         (the TC programs still see each packet and pass it: a lookup miss each way). \
         **iptables** / **nftables**: kube-proxy's rule sets from the programming section with this \
         Service's endpoints, loaded into the node namespace. Client, servers and the node's packet \
         processing share the machine's two cores, so a cheaper datapath shows as more requests per second.\n",
        BACKENDS,
        MESSAGE,
        CLIENTS,
        CLIENTS,
        ROUNDS,
        ROUND.as_millis(),
        WARMUP.as_millis(),
        Mode::ALL.len(),
        ["", "", "", "", "fourth", "fifth", "sixth", "seventh"]
            .get(Mode::ALL.len())
            .copied()
            .unwrap_or("share")
    )?;
    writeln!(
        md,
        "| Services | path | new connections/s | range | ÷ floor | errors | keep-alive requests/s | range | ÷ floor | errors | programmed in | agent CPU |"
    )?;
    writeln!(
        md,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for r in &runs {
        let floor = runs
            .iter()
            .find(|f| f.services == r.services && f.mode == Mode::PodIp)
            .context("floor run")?;
        let range = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::MAX, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            format!("{lo:.0}–{hi:.0}")
        };
        writeln!(
            md,
            "| {} | {} | {:.0} | {} | {:.2} | {} | {:.0} | {} | {:.2} | {} | {} | {} |",
            thousands(r.services),
            r.mode.label(),
            r.short.per_sec,
            range(&r.short_rounds),
            r.short.per_sec / floor.short.per_sec,
            r.short.errors,
            r.keep_alive.per_sec,
            range(&r.keep_alive_rounds),
            r.keep_alive.per_sec / floor.keep_alive.per_sec,
            r.keep_alive.errors,
            r.program_s
                .map(|s| format!("{s:.2} s"))
                .unwrap_or_else(|| "—".into()),
            r.agent_cpu
                .map(|c| format!("{:.1}%", c * 100.0))
                .unwrap_or_else(|| "—".into()),
        )?;
    }
    for r in runs.iter().filter(|r| !r.program_costs.is_empty()) {
        let costs: Vec<String> = r
            .program_costs
            .iter()
            .map(|(p, n, ns)| format!("`{p}` {ns:.0} ns/run over {n} runs"))
            .collect();
        writeln!(
            md,
            "\nOur programs under this traffic at {} Services (one more round of each kind with the kernel's \
             run-time statistics on): {}.",
            thousands(r.services),
            costs.join(", ")
        )?;
    }
    writeln!(
        md,
        "\nOurs against each (new connections/s ratio, keep-alive ratio; medians):\n"
    )?;
    writeln!(
        md,
        "| Services | ours | ÷ floor | ÷ iptables (nf_tables) | ÷ iptables (legacy) | ÷ nftables |"
    )?;
    writeln!(md, "|---:|---|---:|---:|---:|---:|")?;
    for &n in sizes {
        let get = |m: Mode| runs.iter().find(|r| r.services == n && r.mode == m);
        for mine in [Mode::Ours, Mode::OursSocket] {
            let Some(ours) = get(mine) else {
                continue;
            };
            let mut line = format!("| {} | {} |", thousands(n), mine.label());
            for m in [Mode::PodIp, Mode::Iptables, Mode::IptablesLegacy, Mode::Nft] {
                if let Some(o) = get(m) {
                    let _ = write!(
                        line,
                        " {:.2} / {:.2} |",
                        ours.short.per_sec / o.short.per_sec,
                        ours.keep_alive.per_sec / o.keep_alive.per_sec
                    );
                }
            }
            writeln!(md, "{line}")?;
        }
    }
    let labels: Vec<String> = Mode::ALL.iter().map(|m| m.label().to_owned()).collect();
    for (file, title, axis, pick) in [
        (
            "e2e-connections.svg",
            "New connections per second, client pod → Service with 10 backends",
            "connections/s",
            (|r: &Run| r.short.per_sec) as fn(&Run) -> f64,
        ),
        (
            "e2e-keepalive.svg",
            "Requests per second on keep-alive connections",
            "requests/s",
            |r: &Run| r.keep_alive.per_sec,
        ),
    ] {
        let values: Vec<Vec<f64>> = sizes
            .iter()
            .map(|n| {
                Mode::ALL
                    .iter()
                    .map(|m| {
                        runs.iter()
                            .find(|r| r.services == *n && r.mode == *m)
                            .map_or(f64::NAN, pick)
                    })
                    .collect()
            })
            .collect();
        report.plot(plot::Plot {
            file: file.into(),
            title: title.into(),
            svg: plot::grouped_bars(
                title,
                axis,
                &sizes
                    .iter()
                    .map(|n| format!("{} Services", thousands(*n)))
                    .collect::<Vec<_>>(),
                &labels,
                &values,
                plot::Scale::Linear,
            ),
        })?;
    }
    Ok(runs)
}
