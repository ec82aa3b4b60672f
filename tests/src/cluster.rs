//! A one-node "cluster" in network namespaces: a node namespace, pod
//! namespaces joined to it by veth pairs (Calico-style /32 routes and a
//! link-local gateway with static neighbours, so no ARP and no default route),
//! real TCP/UDP servers in the pods, clients, and the agent as a process.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::{BpffsMount, KillOnDrop, Netns, sweep_stale, unique_prefix};

/// Gateway address every pod routes through (answered by the node's veth end).
pub const GATEWAY: &str = "169.254.1.1";

/// A pod: a namespace with `eth0` whose peer lives in the node namespace.
#[derive(Debug)]
pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// Name of the node-side veth end.
    pub host_if: String,
}

/// The node namespace and its pods.
pub struct Cluster {
    pub prefix: String,
    pub pods: BTreeMap<String, Pod>,
    // Declared after the pods so it is dropped after them.
    pub node: Netns,
    pub bpffs: BpffsMount,
}

impl Cluster {
    /// Creates the node namespace (forwarding on) and a bpffs for pins.
    pub fn new() -> Result<Self> {
        crate::netns::require_root()?;
        sweep_stale();
        let prefix = unique_prefix();
        let node = Netns::new(&format!("{prefix}-node"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        let bpffs = BpffsMount::new(&prefix)?;
        Ok(Self {
            prefix,
            pods: BTreeMap::new(),
            node,
            bpffs,
        })
    }

    /// Adds a pod with address `ip`, connected to the node by `veth<N>`.
    pub fn add_pod(&mut self, role: &str, ip: Ipv4Addr) -> Result<&Pod> {
        let index = self.pods.len() + 1;
        let ns = Netns::new(&format!("{}-{role}", self.prefix))?;
        let host_if = format!("veth{index}");
        let host_mac = format!("02:00:00:00:{index:02x}:fe");
        let pod_mac = format!("02:00:00:00:{index:02x}:01");
        self.node.ip(&[
            "link", "add", &host_if, "address", &host_mac, "type", "veth", "peer", "name", "eth0",
            "address", &pod_mac, "netns", &ns.name,
        ])?;
        self.node.ip(&["link", "set", &host_if, "up"])?;
        let ip_s = ip.to_string();
        let cidr = format!("{ip}/32");
        ns.ip(&["addr", "add", &cidr, "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", GATEWAY, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "10.0.0.0/8", "via", GATEWAY, "dev", "eth0"])?;
        ns.ip(&[
            "neigh",
            "replace",
            GATEWAY,
            "lladdr",
            &host_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        self.node.ip(&["route", "add", &cidr, "dev", &host_if])?;
        self.node.ip(&[
            "neigh",
            "replace",
            &ip_s,
            "lladdr",
            &pod_mac,
            "dev",
            &host_if,
            "nud",
            "permanent",
        ])?;
        self.pods.insert(role.to_owned(), Pod { ns, ip, host_if });
        self.pods.get(role).context("pod just inserted")
    }

    /// The pod called `role`.
    pub fn pod(&self, role: &str) -> Result<&Pod> {
        self.pods
            .get(role)
            .with_context(|| format!("no pod {role}"))
    }

    /// Pin root for an agent of this cluster.
    pub fn pin_root(&self) -> PathBuf {
        self.bpffs.path.join("proxy-agent")
    }
}

/// TCP and UDP servers in a pod. A TCP connection is greeted with
/// `<name> <peer address:port>` and then every line it sends comes back as
/// `<name> <line>` until it closes; a UDP datagram is answered with
/// `<name> <peer address:port>`.
pub struct NameServer {
    stop: Vec<i32>,
    threads: Vec<JoinHandle<()>>,
}

impl NameServer {
    /// Starts servers on `port` (TCP) and `port` (UDP) in `pod`.
    pub fn start(pod: &Pod, name: &str, port: u16) -> Result<Self> {
        let (tcp, udp) = pod.ns.run(move || {
            let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
            Ok((TcpListener::bind(addr)?, UdpSocket::bind(addr)?))
        })?;
        let stop = vec![tcp.as_raw_fd(), udp.as_raw_fd()];
        let tcp_name = name.to_owned();
        let tcp_thread = std::thread::spawn(move || {
            for conn in tcp.incoming() {
                let Ok(conn) = conn else { break };
                let name = tcp_name.clone();
                std::thread::spawn(move || serve_tcp(conn, &name));
            }
        });
        let udp_name = name.to_owned();
        let udp_thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, peer)) = udp.recv_from(&mut buf) {
                if peer.port() == 0 {
                    break; // woken by shutdown
                }
                let mut answer = format!("{udp_name} {peer}\n").into_bytes();
                // A "big:" request is echoed after the answer line: a reply as
                // large as the request (fragmented like it).
                if buf[..n].starts_with(BIG) {
                    answer.extend_from_slice(&buf[..n]);
                }
                let _ = udp.send_to(&answer, peer);
            }
        });
        Ok(Self {
            stop,
            threads: vec![tcp_thread, udp_thread],
        })
    }
}

/// The prefix of a UDP request the name server echoes whole.
const BIG: &[u8] = b"big:";

/// Sends one UDP datagram of `size` bytes from `ns` to `target` (larger
/// than the MTU: it leaves in fragments) and returns the answering backend
/// and the size of the echo, as large (the reply is fragmented too).
pub fn udp_big(ns: &Netns, target: SocketAddrV4, size: usize) -> Result<(String, usize)> {
    ns.run(move || {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut request = BIG.to_vec();
        request.resize(size, b'x');
        s.send_to(&request, target)?;
        let mut buf = vec![0u8; 65_536];
        let (n, from) = s.recv_from(&mut buf)?;
        if from != SocketAddr::V4(target) {
            bail!("answer from {from}, not {target}");
        }
        let text = String::from_utf8_lossy(&buf[..n]);
        let (line, echo) = text.split_once('\n').context("no answer line")?;
        Ok((
            line.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
            echo.len(),
        ))
    })
}

/// Greets, then echoes lines prefixed with the server's name.
fn serve_tcp(mut conn: TcpStream, name: &str) {
    let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    if conn
        .write_all(format!("{name} {peer}\n").as_bytes())
        .is_err()
    {
        return;
    }
    let Ok(reader) = conn.try_clone() else { return };
    for line in BufReader::new(reader).lines().map_while(Result::ok) {
        if conn
            .write_all(format!("{name} {line}\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        for fd in &self.stop {
            // SAFETY: shutdown(2) on sockets the server threads own; it wakes
            // their blocking accept/recv so they exit and close them.
            unsafe {
                libc::shutdown(*fd, libc::SHUT_RDWR);
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One answered request: who answered and whom it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Name of the answering backend.
    pub backend: String,
    /// The client address the backend saw.
    pub client_seen: String,
    /// The address the answer came from, as the client saw it.
    pub peer: SocketAddr,
    /// The client's own address for this request.
    pub local: SocketAddr,
}

fn parse_answer(text: &str, peer: SocketAddr, local: SocketAddr) -> Result<Answer> {
    let mut parts = text.split_whitespace();
    let (Some(backend), Some(client_seen)) = (parts.next(), parts.next()) else {
        bail!("malformed answer {text:?}");
    };
    Ok(Answer {
        backend: backend.to_owned(),
        client_seen: client_seen.to_owned(),
        peer,
        local,
    })
}

/// After this many failed requests a client gives up: the test fails anyway,
/// and a broken datapath should not cost minutes of timeouts.
const GIVE_UP_AFTER: usize = 3;

/// Runs `request` up to `n` times, stopping after `GIVE_UP_AFTER` failures.
fn repeat(n: usize, mut request: impl FnMut() -> Result<Answer>) -> Vec<Result<Answer>> {
    let mut out = Vec::with_capacity(n);
    let mut failures = 0;
    for _ in 0..n {
        let r = request();
        failures += usize::from(r.is_err());
        out.push(r);
        if failures >= GIVE_UP_AFTER {
            break;
        }
    }
    out
}

/// `n` TCP connections from inside `ns` to `target`, one request each.
pub fn tcp_requests(ns: &Netns, target: SocketAddrV4, n: usize) -> Result<Vec<Result<Answer>>> {
    ns.run(move || {
        Ok(repeat(n, || {
            let s = TcpStream::connect_timeout(&target.into(), Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let (peer, local) = (s.peer_addr()?, s.local_addr()?);
            let mut greeting = String::new();
            BufReader::new(s).read_line(&mut greeting)?;
            parse_answer(&greeting, peer, local)
        }))
    })
}

/// `n` UDP request/responses from inside `ns` to `target`, each from a new socket
/// (a new flow). The answer's source is what the client really received from.
pub fn udp_requests(ns: &Netns, target: SocketAddrV4, n: usize) -> Result<Vec<Result<Answer>>> {
    ns.run(move || {
        Ok(repeat(n, || {
            let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.send_to(b"hello", target)?;
            let mut buf = [0u8; 1500];
            let (len, from) = s.recv_from(&mut buf)?;
            parse_answer(&String::from_utf8_lossy(&buf[..len]), from, s.local_addr()?)
        }))
    })
}

/// A long-lived TCP connection opened from a client namespace.
pub struct LongLived {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The backend that greeted it.
    pub backend: String,
    /// The client's own address of the connection.
    pub local: SocketAddr,
}

impl LongLived {
    /// Opens a connection from `ns` and reads the greeting.
    pub fn open(ns: &Netns, target: SocketAddrV4) -> Result<Self> {
        let stream = ns.run(move || {
            Ok(TcpStream::connect_timeout(
                &target.into(),
                Duration::from_secs(3),
            )?)
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let writer = stream.try_clone()?;
        let (peer, local) = (stream.peer_addr()?, stream.local_addr()?);
        let mut reader = BufReader::new(stream);
        let mut greeting = String::new();
        reader.read_line(&mut greeting)?;
        let backend = parse_answer(&greeting, peer, local)?.backend;
        Ok(Self {
            reader,
            writer,
            backend,
            local,
        })
    }

    /// Sends a line and checks the same backend echoes it.
    pub fn ping(&mut self, text: &str) -> Result<()> {
        self.writer.write_all(format!("{text}\n").as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let want = format!("{} {text}", self.backend);
        if line.trim_end() != want {
            bail!("sent {text:?}, got {line:?} instead of {want:?}");
        }
        Ok(())
    }
}

/// Connects over TCP from `ns` and returns the error kind and how long it took.
pub fn tcp_connect_error(
    ns: &Netns,
    target: SocketAddrV4,
) -> Result<(Option<std::io::ErrorKind>, Duration)> {
    ns.run(move || {
        let start = Instant::now();
        let r = TcpStream::connect_timeout(&target.into(), Duration::from_secs(5));
        Ok((r.err().map(|e| e.kind()), start.elapsed()))
    })
}

/// Sends one UDP datagram on a connected socket from `ns` and returns the error
/// kind of the following receive.
pub fn udp_connected_error(ns: &Netns, target: SocketAddrV4) -> Result<Option<std::io::ErrorKind>> {
    ns.run(move || {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(target)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send(b"hello")?;
        let mut buf = [0u8; 64];
        Ok(s.recv(&mut buf).err().map(|e| e.kind()))
    })
}

/// Where the `proxy-agent` binary is: `$PROXY_AGENT_BIN`, or next to the
/// running test/demo binary in the cargo target directory.
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PROXY_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    binary("proxy-agent")
}

/// The workspace binary `name` next to the running test, demo or bench
/// binary in the cargo target directory (built with it).
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("binary without directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps without parent")?;
    }
    let bin = dir.join(name);
    if !bin.exists() {
        bail!(
            "{} not found: build the workspace's binaries first (`cargo xtask test`, `demo` and `bench` do)",
            bin.display()
        );
    }
    Ok(bin)
}

/// The agent running in a node namespace, its log captured.
/// The agent's log filter: `PXT_AGENT_LOG`, else `info`.
fn log_filter() -> String {
    std::env::var("PXT_AGENT_LOG").unwrap_or_else(|_| "info".into())
}

/// The agent arguments that make it read a manifest directory.
fn manifests_source(manifests: &Path) -> [String; 2] {
    [
        "--manifests".to_owned(),
        manifests.to_string_lossy().into_owned(),
    ]
}

pub struct Agent {
    pub process: KillOnDrop,
    log: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts `proxy-agent run` in `node` and waits until it reports running.
    pub fn start(node: &Netns, manifests: &Path, pin_root: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_with_log(node, manifests, pin_root, extra, &log_filter())
    }

    /// As `start`, with a `RUST_LOG` filter for the agent.
    pub fn start_with_log(
        node: &Netns,
        manifests: &Path,
        pin_root: &Path,
        extra: &[&str],
        log_filter: &str,
    ) -> Result<Self> {
        Self::spawn(
            node,
            &manifests_source(manifests),
            pin_root,
            extra,
            log_filter,
        )
    }

    /// Starts the agent watching the Kubernetes API described by `kubeconfig`,
    /// as node `node_name`.
    pub fn start_kube(
        node: &Netns,
        kubeconfig: &Path,
        node_name: &str,
        pin_root: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let source = [
            "--kubeconfig".to_owned(),
            kubeconfig.to_string_lossy().into_owned(),
            "--node-name".to_owned(),
            node_name.to_owned(),
        ];
        Self::spawn(node, &source, pin_root, extra, &log_filter())
    }

    /// As `start`, running the agent binary at `bin` (another build).
    pub fn start_binary(
        bin: &Path,
        node: &Netns,
        manifests: &Path,
        pin_root: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let source = manifests_source(manifests);
        Self::spawn_binary(bin, node, &source, pin_root, extra, &log_filter())
    }

    fn spawn(
        node: &Netns,
        source: &[String],
        pin_root: &Path,
        extra: &[&str],
        log_filter: &str,
    ) -> Result<Self> {
        Self::spawn_binary(&agent_binary()?, node, source, pin_root, extra, log_filter)
    }

    fn spawn_binary(
        bin: &Path,
        node: &Netns,
        source: &[String],
        pin_root: &Path,
        extra: &[&str],
        log_filter: &str,
    ) -> Result<Self> {
        // Small maps unless the caller sizes them: tests run many agents at once.
        let sizes: Vec<&str> = [
            ("--max-backends", "4096"),
            ("--max-services", "1024"),
            ("--max-frontends", "4096"),
            ("--ct-entries", "65536"),
        ]
        .into_iter()
        .filter(|(flag, _)| !extra.contains(flag))
        .flat_map(|(flag, value)| [flag, value])
        .collect();
        // Socket hooks only where a test asks for them (with a cgroup of its
        // own): the agent refuses the machine's root cgroup from a test
        // namespace anyway, but says so in its log.
        let sockets: &[&str] = if extra
            .iter()
            .any(|a| a.starts_with("--socket-lb") || a.starts_with("--cgroup-root"))
        {
            &[]
        } else {
            &["--socket-lb", "off"]
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.name])
            .arg(bin)
            .arg("run")
            .args(source)
            .args(["--pod-iface", "veth*", "--bpffs"])
            .arg(pin_root)
            .args(&sizes)
            .args(sockets)
            .args(extra)
            .env("RUST_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting proxy-agent")?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let process = KillOnDrop::new(child);
        let log = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        let echo = std::env::var_os("PXT_VERBOSE").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    println!("agent| {line}");
                }
                if let Ok(mut l) = sink.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let mut agent = Self { process, log };
        agent.wait_for_log("running", Duration::from_secs(20))?;
        Ok(agent)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until the log contains `needle`, failing with the log if the agent
    /// exits or the time runs out.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.process.child.try_wait() {
                bail!(
                    "proxy-agent exited ({status}) before {needle:?}:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "proxy-agent did not log {needle:?} in {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Number of times `needle` appears in the log.
    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.process.terminate(Duration::from_secs(5))
    }
}

/// `GET path` over HTTP/1.1 to `addr` from inside `ns`: (status code, body).
pub fn http_get(ns: &Netns, addr: SocketAddrV4, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text)?;
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })
}

/// Polls `check` every 50 ms until it holds or `timeout` passes.
pub fn eventually(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes manifests into a fresh directory under the cluster's /run dir.
pub fn manifest_dir(cluster: &Cluster, files: &[(&str, &str)]) -> Result<PathBuf> {
    let dir = PathBuf::from("/run")
        .join(&cluster.prefix)
        .join("manifests");
    std::fs::create_dir_all(&dir)?;
    for (name, text) in files {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(dir)
}

/// Counts answers per backend name.
pub fn tally(answers: &[Result<Answer>]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for a in answers.iter().flatten() {
        *out.entry(a.backend.clone()).or_insert(0) += 1;
    }
    out
}

/// An endpoint of [`web_manifest`] and its conditions.
#[derive(Clone, Copy, Debug)]
pub struct Ep {
    pub ip: Ipv4Addr,
    pub ready: bool,
    pub terminating: bool,
}

impl Ep {
    /// A ready endpoint.
    pub fn ready(ip: Ipv4Addr) -> Self {
        Self {
            ip,
            ready: true,
            terminating: false,
        }
    }
}

/// Service `empty` in namespace `demo` (80/TCP and 53/UDP) at `vip`,
/// without endpoints.
pub fn empty_manifest(vip: Ipv4Addr) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: demo}}
spec:
  clusterIP: {vip}
  ports:
  - {{name: http, port: 80, protocol: TCP}}
  - {{name: dns, port: 53, protocol: UDP}}
"#
    )
}

/// Service `web` at `vip` (80/TCP "http" and 53/UDP "dns" → `port`) with
/// `annotations` (flow-style YAML map entries) and extra spec lines, and an
/// EndpointSlice with `eps`.
pub fn web_manifest(
    vip: Ipv4Addr,
    port: u16,
    annotations: &str,
    spec_extra: &str,
    eps: &[Ep],
) -> String {
    let endpoints: String = eps
        .iter()
        .map(|e| {
            format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: {}, serving: {}, terminating: {}}}\n",
                e.ip,
                e.ready,
                e.ready || e.terminating,
                e.terminating
            )
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
  annotations: {{{annotations}}}
spec:
  clusterIP: {vip}
{spec_extra}  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: {port}}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: {port}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {{name: http, port: {port}, protocol: TCP}}
- {{name: dns, port: {port}, protocol: UDP}}
endpoints:
{endpoints}"#
    )
}
