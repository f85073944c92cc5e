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

use anyhow::{Context as _, Result, bail};
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
        /// machine's, rust-src, bpf-linker), to prove set-up again from nothing.
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
    /// Run the whole test suite: unit tests, then the root tests one at a time.
    Test {
        /// Only run root tests whose name contains this filter (unit tests still run all).
        filter: Option<String>,
    },
}

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
        Cmd::Test { filter } => test(&root, filter.as_deref()),
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

/// Builds the eBPF crate with the nightly (`-Z build-std=core`, bpf-linker as linker) and
/// returns the object's path. Always release: debug eBPF objects do not load.
fn build_ebpf(root: &Path) -> Result<PathBuf> {
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
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
    // The outer `cargo run` sets these for the stable toolchain; the nightly must pick its own.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
    ] {
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
