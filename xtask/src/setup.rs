//! Idempotent set-up of a fresh Debian machine. Each step checks first and does nothing when its
//! part is already there; a failing step names itself. The recipe follows ../shared/toolchain.md.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Debian packages and why the project needs each.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("etcd-server", "etcd for the demo and the end-to-end tests"),
    (
        "etcd-client",
        "etcdctl, used by the tests to write and delete records",
    ),
    ("iproute2", "ip and bridge, to build the namespace clusters"),
    (
        "iptables",
        "the stock flannel node of the interop tests and the iptables baseline",
    ),
    ("nftables", "nft, to show that the agent adds no rules"),
    (
        "conntrack",
        "inspecting the kernel's connection tracking in the baseline",
    ),
    ("iperf3", "TCP throughput benchmarks"),
    ("sockperf", "request/response latency benchmarks"),
    ("iputils-ping", "ping between pods"),
    ("tcpdump", "captures on the underlay"),
    ("tshark", "decoding captures as VXLAN"),
    ("bpftool", "inspecting programs and maps"),
    (
        "ethtool",
        "recording the devices' offload settings in benchmarks",
    ),
    (
        "protobuf-compiler",
        "protoc, which etcd-client's build script needs",
    ),
];

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    step("Debian packages", apt_packages)?;
    step("nightly toolchain", nightly_present)?;
    step("rust-src for the nightly", rust_src)?;
    step("bpf-linker", bpf_linker)?;
    Ok(())
}

fn step(name: &str, f: fn() -> Result<()>) -> Result<()> {
    f().with_context(|| format!("set-up step '{name}' failed"))
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("set-up: installing Debian packages: {}", missing.join(" "));
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("installing {} needs root", missing.join(" "));
    }
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("cannot run apt-get {args:?}"))
    };
    if !apt(&["update", "-q"])?.success() {
        bail!("apt-get update failed");
    }
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    if !apt(&install)?.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"ii"))
}

fn nightly_present() -> Result<()> {
    let ok = Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--version"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        // Installing a newer nightly would not match bpf-linker's LLVM; see toolchain.md.
        bail!("the `{NIGHTLY}` toolchain is missing (`rustup toolchain install {NIGHTLY}`)");
    }
    Ok(())
}

fn rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .output()
        .context("cannot run rustup")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    println!("set-up: adding rust-src to the {NIGHTLY} toolchain");
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", NIGHTLY])
        .status()
        .context("cannot run rustup")?;
    if !status.success() {
        bail!("rustup component add rust-src --toolchain {NIGHTLY} failed");
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    // bpf-linker must use the very LLVM the nightly's rustc emits bitcode for: link it against
    // the shared library in the nightly's sysroot instead of a system LLVM (Debian's is too old).
    let lib_dir = nightly_sysroot()?.join("lib");
    let (lib_name, major) = llvm_dylib(&lib_dir)?;
    println!("set-up: building bpf-linker {BPF_LINKER_VERSION} against {lib_name} (takes ~2 min)");
    let rustflags = format!(
        "-L {dir} -C link-arg=-Wl,-rpath,{dir} -l dylib={lib_name}",
        dir = lib_dir.display()
    );
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major},no-llvm-linking"))
        .env("RUSTFLAGS", rustflags)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed");
    }
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--print", "sysroot"])
        .output()
        .context("cannot run rustc +nightly")?;
    if !out.status.success() {
        bail!("rustc +{NIGHTLY} --print sysroot failed");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// Finds `libLLVM-<major>-rust-<version>.so` in the sysroot: returns the name to link
/// (`LLVM-<major>-rust-<version>`) and the LLVM major version (for bpf-linker's feature).
fn llvm_dylib(lib_dir: &Path) -> Result<(String, String)> {
    for entry in
        std::fs::read_dir(lib_dir).with_context(|| format!("reading {}", lib_dir.display()))?
    {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_prefix("lib").and_then(|n| n.strip_suffix(".so"))
            && let Some(rest) = stem.strip_prefix("LLVM-")
            && let Some((major, _)) = rest.split_once('-')
            && major.chars().all(|c| c.is_ascii_digit())
        {
            return Ok((stem.to_owned(), major.to_owned()));
        }
    }
    bail!("no libLLVM-<major>-rust-*.so in {}", lib_dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_dylib_is_found_by_its_versioned_name() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "librustc_driver-abc.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "libLLVM-22-rust-1.97.0-nightly.so",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let (lib, major) = llvm_dylib(dir.path()).unwrap();
        assert_eq!(
            (lib.as_str(), major.as_str()),
            ("LLVM-22-rust-1.97.0-nightly", "22")
        );
    }

    #[test]
    fn a_sysroot_without_llvm_names_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = llvm_dylib(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }
}
