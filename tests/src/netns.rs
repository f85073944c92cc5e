//! Network namespaces and the links between them.
//!
//! Every link is created directly inside the namespaces the test owns (`ip -n <ns> link add ...
//! peer ... netns <other>`), never in the root namespace, and disappears with its namespace.

use std::{
    ffi::OsStr,
    fs::File,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, ChildGuard};

/// A network namespace created by the test (`ip netns add`), with `lo` up. Dropping it (or
/// [`NetNs::delete`]) kills every process still inside and deletes it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    deleted: AtomicBool,
}

impl NetNs {
    /// Creates the namespace `name` and brings its `lo` up. Fails if it already exists.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        if name.is_empty() || name.contains('/') || name.len() > 200 {
            bail!("bad namespace name {name:?}");
        }
        cmd::check(cmd::command("ip", &["netns", "add", &name]))
            .with_context(|| format!("creating namespace {name}"))?;
        let ns = Self {
            name,
            deleted: AtomicBool::new(false),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as in `ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A `Command` running `program` inside the namespace (`ip netns exec <name> program`).
    /// `ip netns exec` execs the program (same pid) in a private mount namespace whose `/sys`
    /// belongs to this network namespace (so `/sys/fs/bpf` there is an empty directory).
    /// Add args and stdio, then run it with the helpers of [`crate::cmd`] (which bound it in time).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `program args...` inside the namespace (bounded by [`cmd::DEFAULT_TIMEOUT`]); the
    /// exit status is not checked.
    pub fn exec<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Result<Output> {
        let mut c = self.command(program);
        c.args(args);
        cmd::output(c)
    }

    /// Runs `program args...` inside the namespace, fails unless it exits 0; returns stdout.
    pub fn run<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Result<String> {
        self.run_timeout(program, args, cmd::DEFAULT_TIMEOUT)
    }

    /// [`NetNs::run`] with an explicit time limit.
    pub fn run_timeout<S: AsRef<OsStr>>(
        &self,
        program: impl AsRef<OsStr>,
        args: &[S],
        timeout: Duration,
    ) -> Result<String> {
        let mut c = self.command(program);
        c.args(args);
        cmd::check_with(c, None, timeout)
    }

    /// Starts `program args...` inside the namespace in the background (stdin null, stdout and
    /// stderr discarded); the guard kills it when dropped.
    pub fn spawn<S: AsRef<OsStr>>(
        &self,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> Result<ChildGuard> {
        let mut c = self.command(program);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        ChildGuard::spawn(c)
    }

    /// `ip -n <name> args...`, checked; returns stdout.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name]).args(args);
        cmd::check(c)
    }

    /// `sysctl -w key=value` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-q", "-w", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Reads a sysctl inside the namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        Ok(self.run("sysctl", &["-n", key])?.trim().to_owned())
    }

    /// Creates a bridge `name` (STP off, forward delay 0) and brings it up.
    pub fn add_bridge(&self, name: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        self.link_up(name)
    }

    /// `ip link set <dev> up`.
    pub fn link_up(&self, dev: &str) -> Result<()> {
        self.ip(&["link", "set", dev, "up"]).map(drop)
    }

    /// `ip link set <dev> mtu <mtu>`.
    pub fn set_mtu(&self, dev: &str, mtu: u32) -> Result<()> {
        self.ip(&["link", "set", dev, "mtu", &mtu.to_string()])
            .map(drop)
    }

    /// `ip link set <dev> master <bridge>`.
    pub fn set_master(&self, dev: &str, bridge: &str) -> Result<()> {
        self.ip(&["link", "set", dev, "master", bridge]).map(drop)
    }

    /// `ip addr add <cidr> dev <dev>`, e.g. `198.18.0.1/24`.
    pub fn add_addr(&self, dev: &str, cidr: &str) -> Result<()> {
        self.ip(&["addr", "add", cidr, "dev", dev]).map(drop)
    }

    /// `ip route add default via <gw> dev <dev>`.
    pub fn add_default_route(&self, gw: &str, dev: &str) -> Result<()> {
        self.ip(&["route", "add", "default", "via", gw, "dev", dev])
            .map(drop)
    }

    /// The link's MTU.
    pub fn mtu(&self, dev: &str) -> Result<u32> {
        let out = self.ip(&["-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parsing `ip -j link`")?;
        v.get(0)
            .and_then(|l| l.get("mtu"))
            .and_then(serde_json::Value::as_u64)
            .and_then(|m| u32::try_from(m).ok())
            .with_context(|| format!("no mtu for {dev} in {out}"))
    }

    /// The link's interface index.
    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let out = self.ip(&["-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parsing `ip -j link`")?;
        v.get(0)
            .and_then(|l| l.get("ifindex"))
            .and_then(serde_json::Value::as_u64)
            .and_then(|i| u32::try_from(i).ok())
            .with_context(|| format!("no ifindex for {dev} in {out}"))
    }

    /// The link's MAC address.
    pub fn mac(&self, dev: &str) -> Result<String> {
        let out = self.ip(&["-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parsing `ip -j link`")?;
        v.get(0)
            .and_then(|l| l.get("address"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("no address for {dev} in {out}"))
    }

    /// Pids of the processes inside the namespace (`ip netns pids`).
    pub fn pids(&self) -> Result<Vec<i32>> {
        pids_in(&self.name)
    }

    /// Runs `f` on a new thread that has joined this namespace (`setns`), e.g. for netlink or
    /// BPF queries that resolve interface indexes in the current namespace. Other threads are
    /// not affected.
    pub fn in_netns<R: Send>(&self, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("setns");
                }
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
        })
    }

    /// Kills the processes inside and deletes the namespace. Idempotent.
    pub fn delete(&self) -> Result<()> {
        if self.deleted.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        delete_by_name(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!(
                "overlay-tests: could not delete namespace {}: {e:#}",
                self.name
            );
        }
    }
}

/// Creates a veth pair `a_if` (in `a`) <-> `b_if` (in `b`), both ends created inside their
/// namespaces. Both ends stay down; set MTU, addresses, master, then bring them up.
pub fn add_veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<()> {
    check_ifname(a_if)?;
    check_ifname(b_if)?;
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])
    .with_context(|| format!("veth {}:{a_if} <-> {}:{b_if}", a.name(), b.name()))?;
    Ok(())
}

/// Fails unless `name` is a valid interface name (1..=15 bytes, no '/', no whitespace).
pub fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\t', '\n']) {
        bail!("bad interface name {name:?} (1..=15 bytes, no '/' or whitespace)");
    }
    Ok(())
}

/// Names of all namespaces (`ip netns list`).
pub fn list_namespaces() -> Result<Vec<String>> {
    let out = cmd::check(cmd::command("ip", &["netns", "list"]))?;
    // Lines look like "name (id: 3)" or "name".
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn pids_in(name: &str) -> Result<Vec<i32>> {
    let out = cmd::check(cmd::command("ip", &["netns", "pids", name]))?;
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse()
                .with_context(|| format!("bad pid {l:?} from `ip netns pids {name}`"))
        })
        .collect()
}

/// Kills what runs inside namespace `name` (bounded: 5 s) and deletes it.
pub(crate) fn delete_by_name(name: &str) -> Result<()> {
    if !PathBuf::from("/run/netns").join(name).exists() {
        // Already gone (e.g. removed by a leftover cleanup).
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = pids_in(name)?;
        if pids.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!("overlay-tests: processes {pids:?} still in namespace {name} after SIGKILL");
            break;
        }
        for pid in pids {
            // SAFETY: kill has no memory-safety preconditions. The pid was read just now; a
            // process outside the namespace could only be hit after pid reuse within microseconds.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(20));
    }
    cmd::check(cmd::command("ip", &["netns", "del", name]))
        .with_context(|| format!("deleting namespace {name}"))?;
    Ok(())
}
