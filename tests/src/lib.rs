//! End-to-end test harness for the overlay agent.
//!
//! Builds small clusters out of network namespaces on one machine and runs the real
//! `overlay-agent` binary in them against a real etcd:
//!
//! ```text
//!   ovl-<pid>-<n>-ul  (underlay namespace)            ovl-<pid>-<n>-out (optional "outside")
//!   br0 198.18.0.254/24, etcd on :2379  -- out0 198.19.0.254/24 <--> eth0 198.19.0.1/24
//!    |  n0          |  n1   ...  (veth ports)
//!   eth0 198.18.0.1  eth0 198.18.0.2              node namespaces ovl-<pid>-<n>-n<i>,
//!   cni0 <FLANNEL_SUBNET gateway>                 default route via 198.18.0.254,
//!    | veth0 | veth1 ...                          ip_forward=1, agent runs here
//!   eth0 of pods ovl-<pid>-<n>-n<i>-<pod>         default route via the cni0 address
//! ```
//!
//! Every namespace, process and temporary directory of a cluster is removed when the
//! [`Cluster`] is dropped, also when the test panics (agent logs are then printed to stderr).
//! Names carry the test process's pid (`ovl-<pid>-...`) so that concurrent runs never collide and
//! leftovers of crashed runs can be found and removed ([`cleanup_leftovers`], called by every
//! [`ClusterBuilder::build`]).
//!
//! All functions return [`anyhow::Result`]; tests `.unwrap()` / `.expect()` them (tests panic
//! rather than return errors). What panics by itself: [`require_root`] (also called by
//! [`ClusterBuilder::build`]) on a machine that cannot run the tests, and the accessors
//! [`Cluster::node`], [`Cluster::pod`], [`Cluster::outside`] when asked for what does not exist.
//!
//! Things to know:
//! - Every process the harness starts gets `PR_SET_PDEATHSIG(SIGKILL)`: it dies when the thread
//!   that started it ends, so a test killed hard leaves no etcd or agent behind. Keep fixtures
//!   on the test's own thread (no sharing a cluster across tests through a static).
//! - Processes in a namespace run through `ip netns exec`, which gives them a private mount
//!   namespace with a fresh `/sys` of that network namespace: `/sys/fs/bpf` there is an empty
//!   directory, not a bpffs. An agent that pins must mount its own bpffs (it is then private
//!   to that agent process and gone when it exits).
//! - Network tests share kernel state; run them one at a time (`--test-threads=1`), although
//!   the names make parallel runs safe.
//!
//! ```no_run
//! use overlay_tests::Cluster;
//!
//! let cluster = Cluster::builder()
//!     .nodes(2)
//!     .pods_per_node(1)
//!     .network_config(r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#)
//!     .build()
//!     .unwrap();
//! let a = cluster.pod(0, 0);
//! let b = cluster.pod(1, 0);
//! a.ping_until(b.ip(), std::time::Duration::from_secs(10)).unwrap();
//! let t = a.tcp_transfer(&b, 4 << 20).unwrap();
//! assert_eq!(t.server_peer.ip(), std::net::IpAddr::V4(a.ip()));
//! ```

pub mod agent;
pub mod bpf;
pub mod capture;
pub mod checks;
pub mod cluster;
pub mod cmd;
pub mod etcd;
pub mod model;
pub mod netns;
pub mod packet;
pub mod stock;
pub mod traffic;
pub mod xfer;

use std::{
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::{Context, Result, bail};

pub use crate::{
    agent::AgentProcess,
    bpf::{AttachKind, AttachedProg, attached_programs},
    capture::{Capture, tshark_fields},
    cluster::{
        Cluster, ClusterBuilder, Endpoint, Host, Node, OUTSIDE_IP, Pod, SECOND_SEGMENT_GATEWAY,
        SubnetEnv, UNDERLAY_GATEWAY,
    },
    cmd::ChildGuard,
    etcd::{DEFAULT_ETCD_PREFIX, EtcdServer, KeyValue, TlsFiles},
    netns::{NetNs, add_veth},
    traffic::{PingReport, TransferReport, UdpReport},
};

/// Prefix of every namespace and temporary directory this harness creates.
pub const NAME_PREFIX: &str = "ovl-";

/// `ovl-<pid>-`: the prefix of everything this test process creates.
pub fn run_prefix() -> String {
    format!("{NAME_PREFIX}{}-", std::process::id())
}

/// A new unique id `ovl-<pid>-<n>` for a cluster or a standalone fixture of this process.
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{}{}", run_prefix(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A temporary directory `/tmp/<id>-XXXXXX`, removed on drop (kept when the environment variable
/// `OVERLAY_TEST_KEEP_TMP` is set, e.g. to read logs after a run).
pub fn temp_dir(id: &str) -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new()
        .prefix(&format!("{id}-"))
        .tempdir()
        .context("creating temporary directory")?;
    if std::env::var_os("OVERLAY_TEST_KEEP_TMP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("overlay-tests: keeping {}", dir.path().display());
    }
    Ok(dir)
}

/// Panics with a clear message unless the process runs as root and `ip`, `sysctl`, `ping`,
/// `etcd`, `etcdctl` and `bpftool` are installed. End-to-end tests call it first (the cluster
/// builder does), so that they never pass or skip silently on a machine that cannot run them.
pub fn require_root() {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let res = CHECK.get_or_init(|| {
        if !nix::unistd::geteuid().is_root() {
            return Err("not running as root (namespaces, veth, BPF need it)".to_owned());
        }
        let tools: [(&str, &[&str], &str); 6] = [
            ("ip", &["-V"], "iproute2"),
            ("sysctl", &["--version"], "procps"),
            ("ping", &["-V"], "iputils-ping"),
            ("etcd", &["--version"], "etcd-server"),
            ("etcdctl", &["version"], "etcd-client"),
            ("bpftool", &["version"], "bpftool"),
        ];
        let missing: Vec<String> = tools
            .iter()
            .filter(|(tool, args, _)| {
                !cmd::output(cmd::command(tool, args)).is_ok_and(|o| o.status.success())
            })
            .map(|(tool, _, pkg)| format!("`{tool}` (Debian package {pkg})"))
            .collect();
        if !missing.is_empty() {
            return Err(format!("missing tools: {}", missing.join(", ")));
        }
        Ok(())
    });
    if let Err(why) = res {
        panic!(
            "overlay-tests: this end-to-end test needs root and network tools, and cannot run \
             here: {why}. Run it as root on a machine prepared by the project's setup (CI does)."
        );
    }
}

/// Removes the namespaces and temporary directories named `ovl-<pid>-...` whose owning process
/// `<pid>` is no longer alive (leftovers of crashed runs), killing any process still inside
/// those namespaces. Names of live processes (a concurrent run) are never touched. Returns the
/// names removed.
pub fn cleanup_leftovers() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    for name in netns::list_namespaces()? {
        if owner_is_dead(&name) {
            match netns::delete_by_name(&name) {
                Ok(()) => removed.push(name),
                Err(e) => errors.push(format!("{name}: {e:#}")),
            }
        }
    }
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && owner_is_dead(&name) {
                for mount in mounts_below(&entry.path()) {
                    if let Err(e) = unmount(&mount) {
                        errors.push(format!("{}: {e:#}", mount.display()));
                    }
                }
                match std::fs::remove_dir_all(entry.path()) {
                    Ok(()) => removed.push(entry.path().display().to_string()),
                    Err(e) => errors.push(format!("{}: {e}", entry.path().display())),
                }
            }
        }
    }
    if !errors.is_empty() {
        bail!("could not remove some leftovers: {}", errors.join("; "));
    }
    Ok(removed)
}

/// Mounts a fresh bpffs on `dir` (created if missing).
pub fn mount_bpffs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.display().to_string();
    let mut mount = std::process::Command::new("mount");
    mount.args(["-t", "bpf", "bpf", &dir]);
    cmd::check(mount)?;
    Ok(())
}

/// Unmounts `dir` (lazily: a process may still hold a file there) if something is mounted.
pub fn unmount(dir: &Path) -> Result<()> {
    if mounts_below(dir).is_empty() {
        return Ok(());
    }
    let dir = dir.display().to_string();
    let mut umount = std::process::Command::new("umount");
    umount.args(["-l", &dir]);
    cmd::check(umount)?;
    Ok(())
}

/// Mount points at or below `dir`, deepest first, from /proc/self/mounts.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found
}

/// The pid in a name `ovl-<pid>-...`, if it has that shape.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn owner_is_dead(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Path of the agent binary: `$OVERLAY_AGENT_BIN`, else `overlay-agent` next to the running test
/// binary's profile directory (`target/<profile>/`, so release tests use the release agent), else
/// `<workspace>/target/debug/overlay-agent`. Fails with a build hint when none exists.
pub fn agent_bin() -> Result<PathBuf> {
    find_bin(
        "OVERLAY_AGENT_BIN",
        "overlay-agent",
        "build it with `cargo build -p overlay-agent` or run `cargo xtask test`",
    )
}

/// Path of the `ovl-xfer` test helper: `$OVL_XFER_BIN`, else next to the running test binary's
/// profile directory (cargo builds it for this package's integration tests).
pub fn xfer_bin() -> Result<PathBuf> {
    find_bin(
        "OVL_XFER_BIN",
        "ovl-xfer",
        "build it with `cargo build -p overlay-tests --bin ovl-xfer`",
    )
}

fn find_bin(env: &str, name: &str, hint: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "${env} points to {}, which does not exist; {hint}",
            p.display()
        );
    }
    let mut candidates = Vec::new();
    // Binaries of this package (the demo) live in target/<profile>/, test binaries in
    // target/<profile>/deps/: look beside the running executable, then one level up.
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().skip(1).take(2).map(|dir| dir.join(name)));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    candidates.push(workspace.join("target/debug").join(name));
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "`{name}` not found (looked at ${env}, {}); {hint}",
        looked.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_harness_names() {
        assert_eq!(owner_pid("ovl-1234-0-ul"), Some(1234));
        assert_eq!(owner_pid("ovl-1234-"), Some(1234));
        assert_eq!(owner_pid("ovl-12a4-0-ul"), None);
        assert_eq!(owner_pid("ovl--0"), None);
        assert_eq!(owner_pid("ovl-1234"), None);
        assert_eq!(owner_pid("other-1234-0"), None);
    }

    #[test]
    fn unique_ids_carry_the_pid() {
        let a = unique_id();
        let b = unique_id();
        assert_ne!(a, b);
        assert_eq!(owner_pid(&a), Some(std::process::id()));
    }
}
