//! Idempotent machine setup: Debian packages and bpf-linker.
//!
//! The recipe is the one verified in ../shared/docs/toolchain.md: Debian's
//! rustc-web + rust-web-src give a compiler with its own library source (needed
//! for `-Z build-std=core` on the bpfel target), llvm-22-dev is what bpf-linker
//! links against, and the rest are tools the tests and demo drive.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::build::{cmd, run as run_cmd};

/// Debian packages the project needs, with what each is for.
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "rustc with LLVM 22 for the eBPF build"),
    // Only a Recommends of rustc-web, which --no-install-recommends skips.
    (
        "cargo-web",
        "the cargo that goes with rustc-web, for the eBPF build",
    ),
    ("rust-web-src", "library source for -Z build-std=core"),
    ("llvm-22-dev", "LLVM libraries bpf-linker links against"),
    ("bpftool", "inspecting maps and programs"),
    ("iproute2", "network namespaces and veth pairs"),
    ("ethtool", "checksum offload switches in tests"),
    (
        "iptables",
        "kube-proxy's iptables rules in the benchmarks and the migration test (both backends)",
    ),
    (
        "nftables",
        "kube-proxy's nftables rules in the benchmarks and the migration test",
    ),
    (
        "git",
        "the upgrade test builds the previous layout's agent from history",
    ),
    ("tcpdump", "packet captures"),
    ("curl", "HTTP checks"),
    ("socat", "ad-hoc TCP/UDP endpoints"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    println!("setup: checking Debian packages");
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(pkg, _)| !dpkg_installed(pkg))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        println!("setup: all {} packages present", PACKAGES.len());
    } else {
        for (pkg, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
            println!("setup: missing {pkg} ({why})");
        }
        if !is_root() {
            bail!(
                "missing Debian packages: {}; run as root (or install them with apt-get) and retry",
                missing.join(" ")
            );
        }
        println!("setup: apt-get update");
        run_cmd(cmd("apt-get").args(["update", "-q"]))?;
        println!("setup: apt-get install {}", missing.join(" "));
        run_cmd(
            cmd("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    for (path, pkg) in [
        ("/usr/bin/rustc", "rustc-web"),
        ("/usr/bin/cargo", "cargo-web"),
        ("/usr/lib/rustlib/src/rust/library/core", "rust-web-src"),
        ("/usr/lib/llvm-22/lib", "llvm-22-dev"),
    ] {
        if !PathBuf::from(path).exists() {
            bail!("{path} is missing although {pkg} is installed; reinstall {pkg}");
        }
    }

    let linker = bpf_linker_path();
    if bpf_linker_ok(&linker) {
        println!("setup: bpf-linker {BPF_LINKER_VERSION} present");
    } else {
        println!(
            "setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        run_cmd(
            cmd("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"),
        )
        .context("installing bpf-linker")?;
        if !bpf_linker_ok(&linker) {
            bail!(
                "bpf-linker {BPF_LINKER_VERSION} still not usable at {}",
                linker.display()
            );
        }
    }
    println!("setup: done");
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ok installed"))
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Where `cargo install` puts bpf-linker.
pub fn bpf_linker_path() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    cargo_home.join("bin").join("bpf-linker")
}

fn bpf_linker_ok(path: &PathBuf) -> bool {
    Command::new(path)
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false)
}
