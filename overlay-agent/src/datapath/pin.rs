//! Pinning under `--bpf-dir`, so the data path outlives the agent.
//!
//! Layout: `<dir>/maps/<MAP>` for the state maps and `<dir>/links/<program>` for the tcx links.
//! A pinned link keeps its program attached while no process holds it, so traffic flows on
//! while the agent is dead or restarting; the next agent opens the same maps and swaps its own
//! programs into the pinned links atomically (BPF_LINK_UPDATE), so there is no gap. Several
//! agents in different network namespaces can share one bpffs: each needs its own `--bpf-dir`.
//!
//! One agent per directory: the agent holds an exclusive `flock` on the directory for its
//! life ([`PinDir::lock`]), so a second agent, or `overlay-agent cleanup`, cannot take the
//! data path from under a running one. The lock goes with the process (also on `kill -9`).
//!
//! The pins must outlive the agent, so the bpffs must too: where `--bpf-dir` is not on a bpffs
//! the agent mounts one on `/sys/fs/bpf` only when that mount outlives it, i.e. when its mount
//! namespace is shared with other processes. Alone in a mount namespace of its own (as under
//! `ip netns exec`, or as the only process of a container), a bpffs it mounted would be gone
//! with it, and with it the whole data path at a `kill -9`: it refuses to start and says so.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

/// Where systemd mounts bpffs, and what the agent mounts when nothing is there.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("--bpf-dir {dir} is not on a bpffs (mount one there: mount -t bpf bpf <dir>)")]
    NotBpffs { dir: PathBuf },
    #[error("cannot mount a bpffs on {BPFFS_ROOT}: {source}")]
    Mount { source: io::Error },
    #[error(
        "--bpf-dir {dir} is not on a bpffs, and a bpffs this agent mounted itself would live only \
         in its private mount namespace (as under `ip netns exec`) and vanish with the agent, \
         taking the data path with it: mount a bpffs that outlives the agent (e.g. \
         `mount -t bpf bpf /run/overlay/bpf` in the host's mount namespace) and pass that \
         directory with --bpf-dir",
        dir = dir.display()
    )]
    PrivateMountNamespace { dir: PathBuf },
    #[error(
        "another agent is running with --bpf-dir {dir} (it holds its lock): stop it first",
        dir = dir.display()
    )]
    Locked { dir: PathBuf },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// A prepared pin directory.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// Makes sure `root` lies on a bpffs (mounting one on /sys/fs/bpf when the directory is
    /// under it and nothing is mounted there) and creates `maps/` and `links/` below it.
    pub fn prepare(root: &Path) -> Result<Self, PinError> {
        if !on_bpffs(root) {
            if root.starts_with(BPFFS_ROOT) && !on_bpffs(Path::new(BPFFS_ROOT)) {
                if alone_in_mount_namespace() {
                    return Err(PinError::PrivateMountNamespace {
                        dir: root.to_owned(),
                    });
                }
                mount_bpffs(Path::new(BPFFS_ROOT))?;
                tracing::info!("mounted a bpffs on {BPFFS_ROOT}");
            }
            if !on_bpffs(root) {
                return Err(PinError::NotBpffs {
                    dir: root.to_owned(),
                });
            }
        }
        let dir = Self {
            root: root.to_owned(),
        };
        for sub in [dir.maps_dir(), dir.links_dir()] {
            std::fs::create_dir_all(&sub).map_err(|source| PinError::Io {
                action: "create",
                path: sub.clone(),
                source,
            })?;
        }
        Ok(dir)
    }

    /// An existing pin directory, for the subcommands that read it; `None` if absent.
    pub fn existing(root: &Path) -> Option<Self> {
        root.join("maps").is_dir().then(|| Self {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the directory's lock (see the module note) without waiting: the returned
    /// descriptor holds it until it is closed. [`PinError::Locked`] when a running agent has it.
    pub fn lock(&self) -> Result<OwnedFd, PinError> {
        let io_err = |source| PinError::Io {
            action: "lock",
            path: self.root.clone(),
            source,
        };
        let dir = File::open(&self.root).map_err(io_err)?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(PinError::Locked {
                    dir: self.root.clone(),
                });
            }
            return Err(io_err(err));
        }
        Ok(OwnedFd::from(dir))
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Every link pinned here, whatever program it holds (an older agent may have pinned
    /// programs this one no longer has).
    pub fn links(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.links_dir())
            .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Removes every pin: links first (their programs detach as the last reference goes), then
    /// maps, then the directories. Returns what was removed.
    pub fn remove_all(&self) -> Result<Vec<PathBuf>, PinError> {
        let mut removed = Vec::new();
        for sub in [self.links_dir(), self.maps_dir()] {
            let Ok(entries) = std::fs::read_dir(&sub) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                remove_pin(&path)?;
                removed.push(path);
            }
            remove_dir(&sub)?;
        }
        // The layout version marker (`datapath::layout`): empty directories only.
        let layout = self.root.join("layout");
        if let Ok(entries) = std::fs::read_dir(&layout) {
            for entry in entries.flatten() {
                remove_dir(&entry.path())?;
            }
            remove_dir(&layout)?;
        }
        remove_dir(&self.root)?;
        Ok(removed)
    }
}

/// Unlinks one pin; a pin that is already gone is fine.
pub fn remove_pin(path: &Path) -> Result<(), PinError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(PinError::Io {
            action: "remove",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn remove_dir(path: &Path) -> Result<(), PinError> {
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(PinError::Io {
            action: "remove",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Whether `path`, or its nearest existing ancestor, is on a bpffs.
fn on_bpffs(path: &Path) -> bool {
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return false;
    };
    nix::sys::statfs::statfs(existing)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Whether no other process shares this process's mount namespace: a mount made here ends
/// with the process (under `ip netns exec`, which unshares one per command, or as the only
/// process of a container). Unknown (no /proc) counts as shared, as before this check.
fn alone_in_mount_namespace() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let Some(ours) = ns("self") else {
        return false;
    };
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    !entries.flatten().any(|entry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        name.bytes().all(|b| b.is_ascii_digit()) && name != me && ns(&name).as_ref() == Some(&ours)
    })
}

fn mount_bpffs(target: &Path) -> Result<(), PinError> {
    nix::mount::mount(
        Some("bpf"),
        target,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| PinError::Mount {
        source: errno.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = PinDir::prepare(&dir.path().join("overlay")).unwrap_err();
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn one_lock_per_directory_released_when_closed() {
        let dir = tempfile::tempdir().unwrap();
        let pins = PinDir {
            root: dir.path().to_owned(),
        };
        let held = pins.lock().unwrap();
        let err = pins.lock().unwrap_err();
        assert!(matches!(err, PinError::Locked { .. }), "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
        drop(held);
        pins.lock().unwrap();
    }

    #[test]
    fn the_test_process_shares_its_mount_namespace() {
        // cargo's test harness runs in the namespace of the shell that started it (and of
        // cargo itself), never alone in one of its own.
        assert!(!alone_in_mount_namespace());
    }

    #[test]
    fn layout_is_maps_and_links_under_the_root() {
        let dir = PinDir {
            root: PathBuf::from("/sys/fs/bpf/overlay"),
        };
        assert_eq!(
            dir.map("ROUTE_V4"),
            Path::new("/sys/fs/bpf/overlay/maps/ROUTE_V4")
        );
        assert_eq!(
            dir.link("pod_egress"),
            Path::new("/sys/fs/bpf/overlay/links/pod_egress")
        );
    }
}
