//! `cargo xtask`: set-up, eBPF build, demo and test runner.
//!
//! Every command first runs the idempotent set-up (Debian packages, the nightly's rust-src,
//! bpf-linker linked against the nightly's LLVM), which costs a few process spawns when all is
//! already in place, so the README's two commands work on a fresh machine.

mod setup;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, demo and test the overlay network"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (Debian packages, rust-src for the nightly, bpf-linker) and
    /// verify each step's result.
    Setup {
        /// Instead: remove everything set-up installs (Debian packages beyond a fresh
        /// machine's, rust-src, bpf-linker, cargo-fuzz), to prove set-up again from nothing.
        #[arg(long)]
        uninstall: bool,
    },
    /// Build the eBPF object (nightly, release, with BTF) that the agent embeds.
    BuildEbpf,
    /// Build the eBPF object, then the agent binary that embeds it.
    Build {
        /// Build the agent in release mode.
        #[arg(long)]
        release: bool,
    },
    /// Run the demo: a local etcd and a namespace cluster with pods on several nodes.
    Demo,
    /// Benchmark this data path against flannel's kernel paths (release build; writes
    /// docs/bench/ unless --out says otherwise). `cargo xtask bench --help` lists the options.
    #[command(disable_help_flag = true)]
    Bench {
        /// Options of `overlay-bench run` (e.g. --quick, --paths D,K,E, --out /tmp/x).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Check formatting (nightly rustfmt, for grouped imports) and run clippy on the host
    /// crates and on the eBPF crate (its own target), warnings as errors.
    Lint,
    /// Run the whole test suite: unit tests, then the root tests one at a time.
    Test {
        /// Only run root tests whose name contains this filter (unit tests still run all).
        filter: Option<String>,
    },
    /// Fuzz one parser of outside input with libFuzzer (cargo-fuzz on the nightly, installed
    /// if missing), starting from its corpus in fuzz/corpus/<target>; prints executions, time
    /// and crashes. Targets: network_config, lease_record, subnet_file, go_flags.
    Fuzz {
        /// The fuzz target.
        target: String,
        /// How long to fuzz, in seconds.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Stop after this many executions instead (whichever comes first).
        #[arg(long)]
        runs: Option<u64>,
        /// cargo-fuzz's sanitizer: `address` (the default) or `none` (several times faster,
        /// for targets that are safe Rust only).
        #[arg(long, default_value = "address")]
        sanitizer: String,
    },
}

/// The fuzz targets in fuzz/fuzz_targets/, one per parser of outside input.
const FUZZ_TARGETS: [&str; 4] = ["network_config", "lease_record", "subnet_file", "go_flags"];

fn main() -> ExitCode {
    match run_cli(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_cli(cli: Cli) -> Result<()> {
    let root = workspace_root();
    env::set_current_dir(&root).with_context(|| format!("cd {}", root.display()))?;
    if let Cmd::Setup { uninstall: true } = cli.command {
        return setup::uninstall();
    }
    setup::run().context("set-up failed")?;
    match cli.command {
        Cmd::Setup { .. } => Ok(()),
        Cmd::BuildEbpf => build_ebpf(&root).map(|_| ()),
        Cmd::Build { release } => build(&root, release).map(|_| ()),
        Cmd::Demo => demo(&root),
        Cmd::Bench { args } => bench(&root, &args),
        Cmd::Lint => lint(&root),
        Cmd::Test { filter } => test(&root, filter.as_deref()),
        Cmd::Fuzz {
            target,
            time,
            runs,
            sanitizer,
        } => fuzz(&root, &target, time, runs, &sanitizer),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn target_dir(root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |t| root.join(t))
}

/// What the outer `cargo run` sets for the stable toolchain: a nightly cargo must pick its own.
const NIGHTLY_CLEAN_ENV: [&str; 5] = [
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTUP_TOOLCHAIN",
    "CARGO",
];

/// The nightly the eBPF build and the fuzz targets use (see setup).
const NIGHTLY: &str = "nightly";

/// Builds the eBPF crate with the nightly (`-Z build-std=core`, bpf-linker as linker) and
/// returns the object's path. Always release: debug eBPF objects do not load.
fn build_ebpf(root: &Path) -> Result<PathBuf> {
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        NIGHTLY,
        "cargo",
        "build",
        "--package",
        "overlay-ebpf",
    ])
    .args([
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
        "--release",
    ])
    // BTF lets the loader and bpftool see map and program types.
    .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
    .current_dir(root);
    for var in NIGHTLY_CLEAN_ENV {
        cmd.env_remove(var);
    }
    run(&mut cmd, "building the eBPF object")?;
    let object = target_dir(root).join("bpfel-unknown-none/release/overlay");
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but {} is missing",
            object.display()
        );
    }
    println!("eBPF object: {}", object.display());
    Ok(object)
}

/// `cargo +nightly fmt --check`, then clippy with `-D warnings` on the host crates (the
/// eBPF object is built first: the agent embeds it) and on the eBPF crate for its target.
fn lint(root: &Path) -> Result<()> {
    let object = build_ebpf(root)?;
    let nightly = |args: &[&str]| {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", NIGHTLY, "cargo"])
            .args(args)
            .current_dir(root);
        for var in NIGHTLY_CLEAN_ENV {
            cmd.env_remove(var);
        }
        cmd
    };
    run(
        &mut nightly(&["fmt", "--all", "--check"]),
        "formatting (fix with `cargo +nightly fmt --all`)",
    )?;
    let mut host = cargo();
    host.args(["clippy", "--all-targets", "--", "-D", "warnings"])
        .env("OVERLAY_EBPF_OBJECT", &object);
    run(&mut host, "clippy on the host crates")?;
    let mut ebpf = nightly(&[
        "clippy",
        "--package",
        "overlay-ebpf",
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
        "--release",
        "--",
        "-D",
        "warnings",
    ]);
    ebpf.env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    run(&mut ebpf, "clippy on the eBPF crate")
}

/// The built artifacts: the eBPF object and the agent binary that embeds it.
struct Built {
    object: PathBuf,
    agent: PathBuf,
}

/// Builds the eBPF object, then the agent (which embeds it) and the test-support binaries.
fn build(root: &Path, release: bool) -> Result<Built> {
    let object = build_ebpf(root)?;
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "overlay-agent",
        "--package",
        "overlay-tests",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    cmd.env("OVERLAY_EBPF_OBJECT", &object);
    run(&mut cmd, "building the agent")?;
    let agent = target_dir(root)
        .join(if release { "release" } else { "debug" })
        .join("overlay-agent");
    println!("agent: {}", agent.display());
    Ok(Built { object, agent })
}

fn demo(root: &Path) -> Result<()> {
    setup::require_root("the demo creates network namespaces")?;
    let no_args: [String; 0] = [];
    run_release(
        root,
        &["overlay-tests", "--bin", "overlay-demo"],
        &no_args,
        "running the demo",
    )
}

fn bench(root: &Path, args: &[String]) -> Result<()> {
    if !args.iter().any(|a| a == "--help" || a == "-h") {
        setup::require_root("the benchmark creates network namespaces")?;
    }
    run_release(
        root,
        &["overlay-bench", "--", "run"],
        args,
        "running the benchmark",
    )
}

/// Builds the agent in release, then `cargo run --release --package <package_args> <args>`
/// with the release agent (and `ovl-xfer`) for the harness to find.
fn run_release(root: &Path, package_args: &[&str], args: &[String], step: &str) -> Result<()> {
    let Built { agent, .. } = build(root, true)?;
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--release", "--package"])
        .args(package_args)
        .args(args)
        .env("OVERLAY_AGENT_BIN", &agent)
        .env("OVL_XFER_BIN", agent.with_file_name("ovl-xfer"));
    run(&mut cmd, step)
}

fn test(root: &Path, filter: Option<&str>) -> Result<()> {
    let Built { object, agent } = build(root, false)?;

    println!("== unit tests (no root needed)");
    let mut unit = cargo();
    unit.args([
        "test",
        "--workspace",
        "--exclude",
        "overlay-ebpf",
        "--exclude",
        "overlay-tests",
        "--exclude",
        "overlay-bench",
    ])
    .env("OVERLAY_EBPF_OBJECT", &object);
    run(&mut unit, "unit tests")?;

    println!(
        "== root tests: namespaces, etcd, the real agent, the quick benchmark (one at a time)"
    );
    setup::require_root("the root tests create network namespaces and load eBPF programs")?;
    let mut e2e = cargo();
    e2e.args([
        "test",
        "--package",
        "overlay-tests",
        "--package",
        "overlay-bench",
        "--",
        "--test-threads=1",
    ])
    .env("OVERLAY_AGENT_BIN", &agent)
    .env("OVERLAY_EBPF_OBJECT", &object);
    if let Some(filter) = filter {
        e2e.arg(filter);
    }
    run(&mut e2e, "root tests")
}

/// Runs the fuzz target `target` for `time` seconds: new inputs go to a work corpus under the
/// target directory, the repository's corpus is read as seeds; libFuzzer's log goes to
/// `<target dir>/fuzz-<target>.log`. Fails on a crash (libFuzzer writes the input under
/// fuzz/artifacts/<target>/).
fn fuzz(root: &Path, target: &str, time: u64, runs: Option<u64>, sanitizer: &str) -> Result<()> {
    ensure!(
        FUZZ_TARGETS.contains(&target),
        "unknown fuzz target {target:?}: one of {}",
        FUZZ_TARGETS.join(", ")
    );
    setup::cargo_fuzz().context("set-up of cargo-fuzz failed")?;
    // The agent library the targets call embeds the eBPF object.
    let object = build_ebpf(root)?;
    let work = target_dir(root).join("fuzz-corpus").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let seeds = root.join("fuzz/corpus").join(target);
    let log_path = target_dir(root).join(format!("fuzz-{target}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        NIGHTLY,
        "cargo",
        "fuzz",
        "run",
        "--sanitizer",
        sanitizer,
        target,
    ])
    .arg(&work)
    .arg(&seeds)
    .args([
        "--",
        &format!("-max_total_time={time}"),
        "-print_final_stats=1",
    ])
    .args(runs.map(|n| format!("-runs={n}")))
    .env("OVERLAY_EBPF_OBJECT", &object)
    .stderr(log)
    .current_dir(root);
    for var in NIGHTLY_CLEAN_ENV {
        cmd.env_remove(var);
    }
    println!(
        "fuzzing {target} for {time} s (libFuzzer's log: {})",
        log_path.display()
    );
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    // libFuzzer's own summary: `Done <runs> runs in <seconds> second(s)`.
    let seconds = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("Done "))
        .and_then(|l| l.split(" runs in ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("?");
    let stat = |name: &str| {
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map_or_else(|| "?".to_owned(), |v| v.trim().to_owned())
    };
    let crashes: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Test unit written to"))
        .collect();
    println!(
        "fuzz {target}: {} executions in {seconds} s ({} per s), {} crashes, corpus {} inputs",
        stat("number_of_executed_units"),
        stat("average_exec_per_sec"),
        crashes.len(),
        std::fs::read_dir(&work).map_or(0, Iterator::count),
    );
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzzing {target} failed ({status}){}:
{}",
            if crashes.is_empty() { "" } else { ", a crash" },
            tail.join("\n")
        );
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs a command, failing with the step's name when it does not succeed.
fn run(cmd: &mut Command, step: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{step}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{step} failed ({status}): {cmd:?}");
    }
    Ok(())
}
