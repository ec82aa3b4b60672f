//! Building the eBPF object and the userspace crates, running tests and the demo.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::setup;

/// Workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where `build-ebpf` leaves the object; proxy-agent's build script embeds it from here.
pub fn ebpf_object() -> PathBuf {
    root().join("target/ebpf/bpfel-unknown-none/release/proxy-ebpf")
}

pub fn cmd(program: &str) -> Command {
    let mut c = Command::new(program);
    c.current_dir(root());
    c
}

pub fn run(c: &mut Command) -> Result<()> {
    let status = c
        .status()
        .with_context(|| format!("starting {:?}", c.get_program()))?;
    if !status.success() {
        bail!("{c:?} failed: {status}");
    }
    Ok(())
}

/// The rustup cargo running us (userspace builds).
fn cargo() -> Command {
    cmd(&std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub fn ebpf() -> Result<()> {
    if !Path::new("/usr/bin/cargo").exists() || !Path::new("/usr/bin/rustc").exists() {
        bail!("Debian's rustc-web/cargo-web are not installed: run `cargo xtask setup`");
    }
    let linker = setup::bpf_linker_path();
    if !linker.exists() {
        bail!(
            "bpf-linker not found at {}: run `cargo xtask setup`",
            linker.display()
        );
    }
    let linker_dir = linker.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = std::env::var("PATH").unwrap_or_default();
    println!("build-ebpf: building proxy-ebpf for bpfel-unknown-none");
    let mut c = cmd("/usr/bin/cargo");
    // The environment cargo set up for xtask itself must not leak into the
    // Debian toolchain build (it would pick rustup's rustc, which has no rust-src).
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        c.env_remove(var);
    }
    c.env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf\x1f-Ctarget-cpu=v3",
        )
        .env("PATH", format!("{}:{path}", linker_dir.display()))
        .args([
            "build",
            "-p",
            "proxy-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
            "target/ebpf",
        ]);
    run(&mut c).context("building the eBPF object")?;
    println!("build-ebpf: {}", ebpf_object().display());
    Ok(())
}

pub fn all(release: bool) -> Result<()> {
    ebpf()?;
    let mut c = cargo();
    c.args(["build", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

pub fn lint() -> Result<()> {
    println!("lint: cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    println!("lint: cargo clippy");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--exclude",
        "proxy-ebpf",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate is checked for the host: it is no_std, so it needs
    // panic=abort, kept in its own target dir not to invalidate the main build.
    run(cargo().env("RUSTFLAGS", "-C panic=abort").args([
        "clippy",
        "-p",
        "proxy-ebpf",
        "--target-dir",
        "target/clippy-ebpf",
        "--",
        "-D",
        "warnings",
    ]))
}

pub fn test(lint_too: bool, cargo_args: &[String]) -> Result<()> {
    setup::run()?;
    if !setup::is_root() {
        bail!(
            "the datapath and namespace tests need root (BPF, network namespaces); rerun as root"
        );
    }
    all(false)?;
    if lint_too {
        lint()?;
    }
    println!("test: cargo test (every crate but proxy-ebpf)");
    run(cargo().args(["test", "--no-fail-fast"]).args(cargo_args))
}

pub fn demo() -> Result<()> {
    setup::run()?;
    if !setup::is_root() {
        bail!("the demo builds network namespaces and loads BPF programs: run it as root");
    }
    all(false)?;
    // Replace xtask with the demo so Ctrl-C reaches the demo directly and its
    // cleanup finishes before the shell prompt returns.
    let err = std::os::unix::process::CommandExt::exec(cargo().args([
        "run",
        "--quiet",
        "-p",
        "proxy-tests",
        "--bin",
        "demo",
    ]));
    Err(err).context("starting the demo")
}

pub fn bench(args: &[String]) -> Result<()> {
    setup::run()?;
    if !setup::is_root() {
        bail!("benchmarks load BPF programs: run them as root");
    }
    ebpf()?;
    run(cargo().args(["build", "--release", "--bins"]))?;
    let out = root().join("BENCHMARKS.md");
    run(cargo()
        .args([
            "run",
            "--release",
            "--quiet",
            "-p",
            "proxy-tests",
            "--bin",
            "bench",
            "--",
        ])
        .arg("--out")
        .arg(out)
        .args(args))
}

/// Differential fuzzing of the datapath against the reference model:
/// `packets` generated frames from `seed`, release build.
pub fn fuzz(packets: u64, seed: u64) -> Result<()> {
    setup::run()?;
    if !setup::is_root() {
        bail!("fuzzing runs BPF programs: run it as root");
    }
    ebpf()?;
    run(cargo()
        .args([
            "test",
            "--release",
            "-p",
            "proxy-tests",
            "--test",
            "fuzz",
            "--",
            "--nocapture",
        ])
        .env("PXT_FUZZ_PACKETS", packets.to_string())
        .env("PXT_FUZZ_SEED", seed.to_string()))
}
