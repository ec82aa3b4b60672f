//! Network namespaces for tests and the demo, and cleaning up after them.
//!
//! Every namespace this harness creates is named `pxt<pid>-<n>-<role>`, is
//! registered for cleanup the moment it exists, and is removed on drop, on
//! panic, and (for the demo) on Ctrl-C. Namespaces left behind by a harness
//! process that died (its pid is gone) are swept on the next start.
//!
//! Safety rule: nothing here touches the root namespace's interfaces. Links are
//! created with `ip -n <ns>`, so both ends are born inside test namespaces.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
};

use anyhow::{Context as _, Result, bail};

/// Prefix of every namespace and mount this harness creates.
pub const PREFIX: &str = "pxt";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Cleanup actions registered by live resources (run at most once each).
static CLEANUP: Mutex<Vec<(u64, Cleanup)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU32 = AtomicU32::new(1);

#[derive(Clone, Debug)]
enum Cleanup {
    Netns(String),
    Kill(u32),
    /// `/run/<prefix>`: unmount its bpffs, then remove it.
    RunDir(PathBuf),
    /// A cgroup2 hierarchy mounted at this path, with test cgroups in it:
    /// their processes killed, the cgroups removed, the mount undone.
    Cgroup(PathBuf),
}

fn register(action: Cleanup) -> u64 {
    let id = u64::from(NEXT_ID.fetch_add(1, Ordering::Relaxed));
    if let Ok(mut list) = CLEANUP.lock() {
        list.push((id, action));
    }
    id
}

fn run_cleanup(action: &Cleanup) {
    match action {
        Cleanup::Netns(name) => {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(Stdio::null())
                .status();
        }
        Cleanup::Kill(pid) => {
            let Ok(pid) = i32::try_from(*pid) else { return };
            // SAFETY: plain kill(2).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        Cleanup::Cgroup(mount) => remove_cgroups(mount),
        Cleanup::RunDir(dir) => {
            let cgroup = dir.join("cgroup2");
            if cgroup.exists() {
                remove_cgroups(&cgroup);
            }
            let bpffs = dir.join("bpffs");
            if bpffs.exists() {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&bpffs)
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Kills the processes of the test cgroup under the cgroup2 mount `mount`
/// (`/run/<prefix>/cgroup2`, the cgroup `<prefix>` in it), removes the
/// cgroup, and unmounts it. Only this run's own cgroup: every cgroup2 mount
/// shows the same hierarchy, with the other tests' cgroups in it.
fn remove_cgroups(mount: &Path) {
    let Some(prefix) = mount.parent().and_then(Path::file_name) else {
        return;
    };
    let cgroup = mount.join(prefix);
    if cgroup.is_dir() {
        for _ in 0..50 {
            let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: plain kill(2) of a process of our test cgroup.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir(&cgroup);
    }
    let _ = Command::new("umount")
        .arg("-l")
        .arg(mount)
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir(mount);
    // `/run/<prefix>`, unless a cluster of the same prefix still uses it.
    if let Some(run_dir) = mount.parent() {
        let _ = std::fs::remove_dir(run_dir);
    }
}

/// Runs and forgets one registered cleanup.
fn cleanup_one(id: u64) {
    let action = CLEANUP.lock().ok().and_then(|mut list| {
        let pos = list.iter().position(|(i, _)| *i == id)?;
        Some(list.remove(pos).1)
    });
    if let Some(action) = action {
        run_cleanup(&action);
    }
}

/// Runs every registered cleanup, newest first. For signal handlers and exits.
pub fn cleanup_all() {
    let actions: Vec<Cleanup> = match CLEANUP.lock() {
        Ok(mut list) => list.drain(..).rev().map(|(_, a)| a).collect(),
        Err(_) => return,
    };
    for a in &actions {
        run_cleanup(a);
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// On SIGINT/SIGTERM/SIGHUP: remove everything `what` (the demo, the
/// bench) created, then exit 130.
#[expect(
    clippy::print_stderr,
    reason = "the user pressed Ctrl-C: say what is being undone"
)]
pub fn cleanup_on_interrupt(what: &'static str) {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    std::thread::spawn(move || {
        loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                eprintln!("\ninterrupted: removing the namespaces, agents and pins {what} created");
                cleanup_all();
                std::process::exit(130);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
}

/// Runs a command, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails with a clear message unless running as root with `ip` available.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "this test needs root (BPF programs, network namespaces); run `cargo xtask test` as root"
        );
    }
    if Command::new("ip").arg("-V").output().is_err() {
        bail!("`ip` (iproute2) is missing; run `cargo xtask setup`");
    }
    Ok(())
}

/// Removes namespaces and mounts of harness processes that no longer exist.
pub fn sweep_stale() {
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    let owner = |name: &str| -> Option<String> {
        let rest = name.strip_prefix(PREFIX)?;
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        (!pid.is_empty()).then_some(pid)
    };
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if let Some(pid) = owner(name)
                && !alive(&pid)
            {
                run_cleanup(&Cleanup::Netns(name.to_owned()));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/run") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = owner(&name)
                && !alive(&pid)
            {
                run_cleanup(&Cleanup::RunDir(e.path()));
            }
        }
    }
}

/// A unique prefix for one test's resources: `pxt<pid>-<n>`.
pub fn unique_prefix() -> String {
    format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    cleanup: u64,
}

impl Netns {
    /// Creates a namespace with loopback up.
    pub fn new(name: &str) -> Result<Self> {
        sh("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
            cleanup: register(Cleanup::Netns(name.to_owned())),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets created
    /// there stay in this namespace wherever they are used later.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }

    /// Spawns a long-running thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<T>> {
        let path = format!("/var/run/netns/{}", self.name);
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let entered = enter(&path);
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            if !ok {
                // The caller gets the error; this thread's result is never used.
                loop {
                    std::thread::park();
                }
            }
            f()
        });
        rx.recv().context("namespace thread vanished")??;
        Ok(handle)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        cleanup_one(self.cleanup);
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A process that is killed (SIGKILL) on drop unless stopped earlier.
#[derive(Debug)]
pub struct KillOnDrop {
    pub child: std::process::Child,
    cleanup: u64,
}

impl KillOnDrop {
    pub fn new(child: std::process::Child) -> Self {
        let cleanup = register(Cleanup::Kill(child.id()));
        Self { child, cleanup }
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; then SIGKILL.
    pub fn terminate(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: plain kill(2) on our own child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Forget the registered pid without killing: it may be reused by now.
        if let Ok(mut list) = CLEANUP.lock() {
            list.retain(|(id, _)| *id != self.cleanup);
        }
    }
}

/// A bpffs mounted for one harness run at `/run/<prefix>/bpffs`; the whole
/// `/run/<prefix>` directory (manifests too) is removed on drop.
#[derive(Debug)]
pub struct BpffsMount {
    pub path: PathBuf,
    cleanup: u64,
}

impl BpffsMount {
    /// Mounts a fresh bpffs in the root mount namespace, so agent processes
    /// (even restarted ones) share it.
    pub fn new(prefix: &str) -> Result<Self> {
        let dir = PathBuf::from("/run").join(prefix);
        let path = dir.join("bpffs");
        std::fs::create_dir_all(&path)?;
        let cleanup = register(Cleanup::RunDir(dir));
        let target = path.to_string_lossy().into_owned();
        sh("mount", &["-t", "bpf", "bpf", &target])?;
        Ok(Self { path, cleanup })
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        cleanup_one(self.cleanup);
    }
}

/// A cgroup of its own for one test, `<prefix>` under the cgroup2 hierarchy,
/// reachable at `/run/<prefix>/cgroup2/<prefix>` (a path agents started with
/// `ip netns exec` see too: that remounts `/sys`). The socket hooks of a test
/// attach here, never to the hierarchy's root. Its processes are killed and
/// it is removed on drop.
#[derive(Debug)]
pub struct TestCgroup {
    pub path: PathBuf,
    cleanup: u64,
}

impl TestCgroup {
    pub fn new(prefix: &str) -> Result<Self> {
        let mount = PathBuf::from("/run").join(prefix).join("cgroup2");
        std::fs::create_dir_all(&mount)?;
        let cleanup = register(Cleanup::Cgroup(mount.clone()));
        let target = mount.to_string_lossy().into_owned();
        sh("mount", &["-t", "cgroup2", "none", &target])?;
        let path = mount.join(prefix);
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path, cleanup })
    }

    /// `ip netns exec <ns> <program> <args>`, the process placed in this
    /// cgroup before it runs `program`; returns its output.
    pub fn exec(&self, ns: &Netns, program: &Path, args: &[&str]) -> Result<String> {
        sh(
            "ip",
            &self
                .command(ns, program, args)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
    }

    /// As [`Self::exec`], running on: its stdout piped, killed on drop.
    pub fn spawn(&self, ns: &Netns, program: &Path, args: &[&str]) -> Result<KillOnDrop> {
        let child = Command::new("ip")
            .args(self.command(ns, program, args))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ip netns exec")?;
        Ok(KillOnDrop::new(child))
    }

    /// The arguments of `ip` for [`Self::exec`].
    fn command(&self, ns: &Netns, program: &Path, args: &[&str]) -> Vec<String> {
        let procs = self.path.join("cgroup.procs");
        let script = format!("echo $$ > '{}' && exec \"$0\" \"$@\"", procs.display());
        let mut all = vec![
            "netns".to_owned(),
            "exec".to_owned(),
            ns.name.clone(),
            "sh".to_owned(),
            "-c".to_owned(),
            script,
            program.to_string_lossy().into_owned(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        all
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        cleanup_one(self.cleanup);
    }
}
