//! Embeds the eBPF object built by `cargo xtask build-ebpf` into the agent.
//!
//! When the object is missing (plain `cargo check`/`clippy` without bpf-linker),
//! an empty stub is embedded instead, as aya's own integration tests do; the agent
//! then refuses to start with a message saying how to build it.
#![expect(
    clippy::expect_used,
    reason = "a build script that cannot write OUT_DIR should fail loudly"
)]

use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-env-changed=PROXY_EBPF_OBJECT");
    let object = env::var_os("PROXY_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/proxy-ebpf"));
    println!("cargo:rerun-if-changed={}", object.display());
    let dest = out.join("proxy-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&dest, bytes).expect("writing the embedded eBPF object"),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object not found at {}; embedding a stub (run `cargo xtask build-ebpf`)",
                object.display()
            );
            fs::write(&dest, []).expect("writing the eBPF stub");
        }
    }
}
