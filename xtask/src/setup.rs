//! Idempotent set-up of a fresh Debian machine. Each step installs what is missing and then
//! verifies its own result (a package's programs run, protoc compiles an import of a well-known
//! type, the nightly has its sources, bpf-linker links a BPF object), so a step that "succeeded"
//! but left the build broken fails here, naming the step and the missing piece.
//! The recipe follows ../shared/toolchain.md.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

/// A Debian package the project needs, why, and the programs (with arguments that make them
/// print their version and exit 0) whose running proves it is usable.
pub struct AptPackage {
    pub name: &'static str,
    pub why: &'static str,
    pub verify: &'static [&'static [&'static str]],
}

/// Every Debian package the build, the demo, the tests and the benchmark use, whether or not a
/// fresh machine already has it (then set-up installs nothing for it, but still verifies it).
pub const APT_PACKAGES: &[AptPackage] = &[
    AptPackage {
        name: "etcd-server",
        why: "etcd for the demo, the end-to-end tests and the benchmark",
        verify: &[&["etcd", "--version"]],
    },
    AptPackage {
        name: "etcd-client",
        why: "etcdctl, used by the tests to write and delete records",
        verify: &[&["etcdctl", "version"]],
    },
    AptPackage {
        name: "iproute2",
        why: "ip, bridge and tc, to build the namespace clusters",
        verify: &[&["ip", "-V"], &["bridge", "-V"]],
    },
    AptPackage {
        name: "iptables",
        why: "the stock flannel nodes of the interop tests, the benchmark's baseline, and both \
              backends (iptables-legacy, iptables-nft) for the FORWARD rules",
        verify: &[
            &["iptables", "--version"],
            &["iptables-save", "--version"],
            &["iptables-legacy", "--version"],
            &["iptables-nft", "--version"],
        ],
    },
    AptPackage {
        name: "nftables",
        why: "nft, to show that the agent adds no rules",
        verify: &[&["nft", "--version"]],
    },
    AptPackage {
        name: "conntrack",
        why: "inspecting the kernel's connection tracking in the baseline",
        verify: &[&["conntrack", "--version"]],
    },
    AptPackage {
        name: "iperf3",
        why: "TCP throughput and UDP packet-rate benchmarks",
        verify: &[&["iperf3", "--version"]],
    },
    AptPackage {
        name: "sockperf",
        why: "request/response latency benchmarks",
        verify: &[&["sockperf", "--version"]],
    },
    AptPackage {
        name: "iputils-ping",
        why: "ping between pods",
        verify: &[&["ping", "-V"]],
    },
    AptPackage {
        name: "tcpdump",
        why: "captures on the underlay",
        verify: &[&["tcpdump", "--version"]],
    },
    AptPackage {
        name: "tshark",
        why: "decoding captures as VXLAN",
        verify: &[&["tshark", "--version"]],
    },
    AptPackage {
        name: "bpftool",
        why: "inspecting programs and maps",
        verify: &[&["bpftool", "version"]],
    },
    AptPackage {
        name: "ethtool",
        why: "offload settings of the benchmark's devices (nic mode) and their record",
        verify: &[&["ethtool", "--version"]],
    },
    AptPackage {
        name: "util-linux",
        why: "taskset, to pin benchmark clients and servers to CPUs",
        verify: &[&["taskset", "--version"]],
    },
    AptPackage {
        name: "protobuf-compiler",
        why: "protoc, which etcd-client's build script runs",
        verify: &[&["protoc", "--version"]],
    },
    AptPackage {
        // protobuf-compiler only *recommends* it, and we install without recommends.
        name: "libprotobuf-dev",
        why: "protobuf's well-known .proto files (descriptor.proto) that etcd's protos import",
        verify: &[],
    },
    AptPackage {
        name: "e2fsprogs",
        why: "chattr, to make a subnet file unreplaceable in the start-up fault test",
        verify: &[],
    },
    AptPackage {
        name: "g++",
        why: "compiles libFuzzer's runtime (libfuzzer-sys) for `cargo xtask fuzz`",
        verify: &[&["g++", "--version"]],
    },
    AptPackage {
        name: "libfontconfig1-dev",
        why: "fontconfig for the benchmark charts (plotters finds its font through it)",
        verify: &[&["pkg-config", "--exists", "fontconfig"]],
    },
    AptPackage {
        name: "fonts-dejavu-core",
        why: "a font for the text in the benchmark charts",
        verify: &[&["fc-match", "DejaVu Sans"]],
    },
    AptPackage {
        name: "linux-perf",
        why: "perf, for the benchmark's --profile (top kernel symbols per path)",
        verify: &[&["perf", "--version"]],
    },
    AptPackage {
        name: "pkg-config",
        why: "finds fontconfig for the benchmark's chart crate",
        verify: &[&["pkg-config", "--version"]],
    },
    AptPackage {
        // On a fresh machine already; named so the dist tests' need is on record.
        name: "systemd",
        why: "systemd-analyze, which checks dist/'s unit file (tests/dist.rs)",
        verify: &[&["systemd-analyze", "--version"]],
    },
];

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Runs every step in order; each installs what is missing, then checks its result.
pub fn run() -> Result<()> {
    let started = Instant::now();
    step("Debian packages", apt_packages)?;
    step(
        "protobuf (protoc and its well-known types)",
        protoc_imports_well_known_types,
    )?;
    step("nightly toolchain", nightly_present)?;
    step("rust-src for the nightly", rust_src)?;
    step("bpf-linker", bpf_linker)?;
    if std::env::var_os("OVERLAY_SETUP_TIMING").is_some() {
        println!("set-up: all steps verified in {:.1?}", started.elapsed());
    }
    Ok(())
}

fn step(name: &str, f: fn() -> Result<()>) -> Result<()> {
    f().with_context(|| format!("set-up step '{name}' failed"))
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|p| !dpkg_installed(p.name))
        .map(|p| {
            println!("set-up: missing Debian package {}: {}", p.name, p.why);
            p.name
        })
        .collect();
    if !missing.is_empty() {
        require_root(&format!("installing {}", missing.join(" ")))?;
        apt_get(&["update", "-q"])?;
        let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
        install.extend(&missing);
        apt_get(&install)?;
    }
    for package in APT_PACKAGES {
        ensure!(
            dpkg_installed(package.name),
            "Debian package {} is not installed after apt-get install",
            package.name
        );
        for argv in package.verify {
            verify_program(package.name, argv)?;
        }
    }
    Ok(())
}

/// Runs `argv` and fails naming the package when it does not start or does not exit 0.
fn verify_program(package: &str, argv: &[&str]) -> Result<()> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => bail!(
            "`{}` (from Debian package {package}) exited with {}: {}",
            argv.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => bail!(
            "`{}` (from Debian package {package}) cannot run: {e}",
            argv[0]
        ),
    }
}

fn apt_get(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot run apt-get {}", args.join(" ")))?;
    ensure!(
        status.success(),
        "apt-get {} failed ({status})",
        args.join(" ")
    );
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"ii"))
}

/// etcd's .proto files import `google/protobuf/descriptor.proto`: compile a file that does, the
/// way etcd-client's build script runs protoc (no explicit include of the well-known types).
fn protoc_imports_well_known_types() -> Result<()> {
    let dir = scratch_dir("protoc")?;
    std::fs::write(
        dir.join("check.proto"),
        "syntax = \"proto3\";\n\
         import \"google/protobuf/descriptor.proto\";\n\
         extend google.protobuf.FieldOptions { string overlay_check = 50000; }\n",
    )?;
    let out = Command::new("protoc")
        .arg("-I")
        .arg(&dir)
        .arg("--descriptor_set_out")
        .arg(dir.join("check.pb"))
        .arg(dir.join("check.proto"))
        .output()
        .context("cannot run protoc")?;
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        out.status.success(),
        "protoc cannot compile an import of google/protobuf/descriptor.proto \
         (is libprotobuf-dev installed?): {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn nightly_present() -> Result<()> {
    let ok = Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--version"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    // Installing a newer nightly would not match bpf-linker's LLVM; see toolchain.md.
    ensure!(
        ok,
        "the `{NIGHTLY}` toolchain is missing (`rustup toolchain install {NIGHTLY}`)"
    );
    Ok(())
}

/// Where `rust-src` puts `core`'s sources, which `-Z build-std=core` compiles.
fn core_sources(sysroot: &Path) -> PathBuf {
    sysroot.join("lib/rustlib/src/rust/library/core/src/lib.rs")
}

fn rust_src() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if core_sources(&sysroot).is_file() {
        return Ok(());
    }
    println!("set-up: adding rust-src to the {NIGHTLY} toolchain");
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", NIGHTLY])
        .status()
        .context("cannot run rustup")?;
    ensure!(
        status.success(),
        "rustup component add rust-src --toolchain {NIGHTLY} failed"
    );
    ensure!(
        core_sources(&sysroot).is_file(),
        "rust-src was added but {} is missing",
        core_sources(&sysroot).display()
    );
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if bpf_linker_links().is_ok() {
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
            "--force",
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major},no-llvm-linking"))
        .env("RUSTFLAGS", rustflags)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .status()
        .context("cannot run cargo install")?;
    ensure!(status.success(), "cargo install bpf-linker failed");
    bpf_linker_links().context("bpf-linker was installed but cannot link a BPF object")
}

/// cargo-fuzz, for `cargo xtask fuzz` only (the other commands do not need it): installed when
/// `cargo fuzz --version` does not say the pinned version, then checked the same way.
pub fn cargo_fuzz() -> Result<()> {
    if cargo_fuzz_version().as_deref() == Some(CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    println!("set-up: installing cargo-fuzz {CARGO_FUZZ_VERSION} (takes ~1 min)");
    let status = Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
            "--force",
        ])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .status()
        .context("cannot run cargo install")?;
    ensure!(status.success(), "cargo install cargo-fuzz failed");
    let installed = cargo_fuzz_version();
    ensure!(
        installed.as_deref() == Some(CARGO_FUZZ_VERSION),
        "cargo-fuzz was installed but `cargo fuzz --version` says {installed:?}"
    );
    Ok(())
}

/// The version `cargo fuzz --version` prints (`cargo-fuzz 0.13.2`), if it runs.
fn cargo_fuzz_version() -> Option<String> {
    let out = Command::new("cargo")
        .args(["fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success())
        .then(|| text.split_whitespace().nth(1).map(str::to_owned))
        .flatten()
}

/// Compiles a `no_core` crate for the BPF target to LLVM bitcode with the nightly and links it
/// with bpf-linker: proves the linker runs, loads the nightly's LLVM and writes a BPF ELF.
fn bpf_linker_links() -> Result<()> {
    let dir = scratch_dir("bpf-linker")?;
    let result = (|| {
        let src = dir.join("check.rs");
        std::fs::write(
            &src,
            "#![feature(no_core, lang_items)]\n#![no_core]\n#![no_std]\n\
             #[lang = \"pointee_sized\"] pub trait PointeeSized {}\n\
             #[lang = \"meta_sized\"] pub trait MetaSized: PointeeSized {}\n\
             #[lang = \"sized\"] pub trait Sized: MetaSized {}\n\
             #[unsafe(no_mangle)] #[unsafe(link_section = \"classifier\")]\n\
             pub extern \"C\" fn overlay_check(_ctx: *mut u8) -> i32 { 0 }\n",
        )?;
        let bitcode = dir.join("check.bc");
        let out = Command::new("rustup")
            .args(["run", NIGHTLY, "rustc"])
            .args(["--crate-type", "cdylib", "--target", "bpfel-unknown-none"])
            .args(["-C", "opt-level=2", "-C", "panic=abort", "--emit"])
            .arg(format!("llvm-bc={}", bitcode.display()))
            .arg(&src)
            .output()
            .context("cannot run rustc +nightly")?;
        ensure!(
            out.status.success(),
            "rustc +{NIGHTLY} cannot emit BPF bitcode: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let object = dir.join("check.o");
        let out = Command::new("bpf-linker")
            .arg(&bitcode)
            .arg("-o")
            .arg(&object)
            .output()
            .context("bpf-linker is not installed or cannot start")?;
        ensure!(
            out.status.success(),
            "bpf-linker failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let elf = std::fs::read(&object)
            .with_context(|| format!("bpf-linker wrote no {}", object.display()))?;
        ensure!(
            is_bpf_elf(&elf),
            "bpf-linker's output is not a BPF ELF object"
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// ELF magic, little-endian, e_machine EM_BPF (247).
fn is_bpf_elf(bytes: &[u8]) -> bool {
    bytes.len() > 20
        && bytes.starts_with(b"\x7fELF")
        && bytes[5] == 1
        && u16::from_le_bytes([bytes[18], bytes[19]]) == 247
}

fn scratch_dir(what: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("overlay-setup-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--print", "sysroot"])
        .output()
        .context("cannot run rustc +nightly")?;
    ensure!(
        out.status.success(),
        "rustc +{NIGHTLY} --print sysroot failed"
    );
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

pub fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    ensure!(unsafe { libc::geteuid() } == 0, "must run as root: {why}");
    Ok(())
}

/// Packages a fresh machine of this kind has (`../shared/fresh-machine-packages.txt`, copied
/// here so a clone carries it).
pub const FRESH_MACHINE_PACKAGES: &str = include_str!("../fresh-machine-packages.txt");

fn fresh_packages() -> std::collections::BTreeSet<&'static str> {
    FRESH_MACHINE_PACKAGES
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// Undoes set-up so that it can be proven on a used machine: purges every Debian package that
/// is installed and not on the fresh machine's list (the set-up's packages and what they pulled
/// in), removes the nightly's rust-src, bpf-linker and cargo-fuzz. The README's commands then have to
/// install all of it again.
pub fn uninstall() -> Result<()> {
    require_root("removing Debian packages")?;
    let fresh = fresh_packages();
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev} ${Package}\n"])
        .output()
        .context("cannot run dpkg-query")?;
    let extra: Vec<String> = String::from_utf8_lossy(&installed.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("ii "))
        .map(|p| p.trim().split(':').next().unwrap_or_default().to_owned())
        .filter(|p| !fresh.contains(p.as_str()))
        .collect();
    if extra.is_empty() {
        println!("uninstall: no Debian packages beyond a fresh machine's");
    } else {
        println!("uninstall: purging {}", extra.join(" "));
        let mut purge = vec!["purge", "-y", "-q"];
        purge.extend(extra.iter().map(String::as_str));
        apt_get(&purge)?;
    }
    let sysroot = nightly_sysroot()?;
    if core_sources(&sysroot).is_file() {
        println!("uninstall: removing rust-src from {NIGHTLY}");
        let status = Command::new("rustup")
            .args(["component", "remove", "rust-src", "--toolchain", NIGHTLY])
            .status()
            .context("cannot run rustup")?;
        ensure!(status.success(), "rustup component remove rust-src failed");
    }
    for tool in ["bpf-linker", "cargo-fuzz"] {
        let removed = Command::new("cargo")
            .args(["uninstall", tool])
            .status()
            .context("cannot run cargo uninstall")?;
        if !removed.success() {
            println!("uninstall: {tool} was not installed by cargo");
        }
    }
    Ok(())
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

    #[test]
    fn the_fresh_list_is_a_real_package_list() {
        let fresh = fresh_packages();
        assert!(fresh.len() > 500, "only {} fresh packages", fresh.len());
        // What a fresh machine is known to lack and to have (toolchain.md).
        for absent in [
            "protobuf-compiler",
            "libprotobuf-dev",
            "etcd-server",
            "iperf3",
        ] {
            assert!(!fresh.contains(absent), "{absent} listed as fresh");
        }
        for present in ["iproute2", "util-linux", "pkg-config", "fonts-dejavu-core"] {
            assert!(fresh.contains(present), "{present} not listed as fresh");
        }
    }

    /// The set-up packages a fresh machine lacks.
    fn packages_beyond_fresh() -> Vec<&'static str> {
        let fresh = fresh_packages();
        APT_PACKAGES
            .iter()
            .map(|p| p.name)
            .filter(|p| !fresh.contains(p))
            .collect()
    }

    #[test]
    fn set_up_installs_the_well_known_protos_with_protoc() {
        // protobuf-compiler only recommends libprotobuf-dev; without it etcd-client's build fails.
        let beyond = packages_beyond_fresh();
        for needed in ["protobuf-compiler", "libprotobuf-dev"] {
            assert!(beyond.contains(&needed), "{needed} missing from set-up");
        }
    }

    #[test]
    fn every_package_has_a_reason_and_unique_name() {
        let mut names = std::collections::BTreeSet::new();
        for p in APT_PACKAGES {
            assert!(!p.why.is_empty(), "{} has no reason", p.name);
            assert!(names.insert(p.name), "{} listed twice", p.name);
            for argv in p.verify {
                assert!(!argv.is_empty(), "{} has an empty check", p.name);
            }
        }
    }

    #[test]
    fn bpf_elf_is_recognised_by_machine() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[5] = 1;
        elf[18..20].copy_from_slice(&247u16.to_le_bytes());
        assert!(is_bpf_elf(&elf));
        elf[18] = 62; // x86-64
        assert!(!is_bpf_elf(&elf));
        assert!(!is_bpf_elf(b"\x7fELF"));
    }

    /// The Debian package that owns `program` as found on PATH (usrmerge: dpkg may know it
    /// under /bin or /sbin).
    fn owning_package(program: &str) -> Option<String> {
        let path = std::env::var("PATH").unwrap_or_default();
        let found = path
            .split(':')
            .map(|d| Path::new(d).join(program))
            .find(|p| p.is_file())?;
        let real = std::fs::canonicalize(&found).ok()?;
        let mut candidates = vec![found.clone(), real.clone()];
        for p in [&found, &real] {
            if let Ok(rest) = p.strip_prefix("/usr") {
                candidates.push(Path::new("/").join(rest));
            }
        }
        candidates.into_iter().find_map(|p| {
            let out = Command::new("dpkg-query").arg("-S").arg(&p).output().ok()?;
            let text = String::from_utf8_lossy(&out.stdout);
            // A diverted file (linux-perf diverts /usr/bin/perf to its wrapper) is listed first
            // as "diversion by <pkg> from: <path>"; the owner's line follows.
            let line = text.lines().find(|l| !l.starts_with("diversion by "))?;
            let pkg = line.split(':').next()?.trim().to_owned();
            (out.status.success() && !pkg.is_empty()).then_some(pkg)
        })
    }

    /// Needs the set-up done (as `cargo xtask test` does before the unit tests): every program
    /// that set-up verifies comes from a package that set-up installs or a fresh machine has.
    #[test]
    fn every_verified_program_comes_from_set_up_or_a_fresh_machine() {
        let fresh = fresh_packages();
        let ours: std::collections::BTreeSet<&str> = APT_PACKAGES.iter().map(|p| p.name).collect();
        for package in APT_PACKAGES {
            for argv in package.verify {
                let owner = owning_package(argv[0]).unwrap_or_else(|| {
                    panic!(
                        "{} (checked for {}) is not installed: run `cargo xtask setup`",
                        argv[0], package.name
                    )
                });
                assert!(
                    ours.contains(owner.as_str()) || fresh.contains(owner.as_str()),
                    "{} comes from {owner}, which neither set-up installs nor a fresh machine has",
                    argv[0]
                );
            }
        }
    }
}
