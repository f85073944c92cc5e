//! Embeds the eBPF object that `cargo xtask build-ebpf` builds, so the agent is one
//! self-contained binary. The object is built by the xtask (nightly, build-std, bpf-linker)
//! rather than here, so that a host build never needs the eBPF toolchain's environment.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=OVERLAY_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let object = env::var_os("OVERLAY_EBPF_OBJECT").map_or_else(default_object, PathBuf::from);
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        eprintln!(
            "error: the eBPF object {} does not exist.\n\
             The agent embeds it: run `cargo xtask build-ebpf` first \
             (or `cargo xtask build`, which does both).",
            object.display()
        );
        std::process::exit(1);
    }
    println!("cargo:rustc-env=OVERLAY_EBPF_OBJECT={}", object.display());
}

/// `<target dir>/bpfel-unknown-none/release/overlay`, where the xtask puts it.
fn default_object() -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = env::var_os("CARGO_TARGET_DIR").map_or_else(
        || workspace.join("target"),
        |t| workspace.join(PathBuf::from(t)),
    );
    target
        .join("bpfel-unknown-none")
        .join("release")
        .join("overlay")
}
