//! Is a subnet in a node's data path yet? Looks the subnet up in the agent's pinned `ROUTE_V4`
//! LPM trie (`<bpf-dir>/maps/ROUTE_V4`, on the node's own bpffs that the harness mounts in the
//! node's directory), from the bench process, in microseconds per lookup.
//!
//! Only the key's shape is relied on (the trie's prefix length, then the IPv4 network address,
//! as in `overlay-common`'s `RouteKeyV4`); the value is read as opaque bytes of the size the
//! kernel reports, so the measurement survives changes to what the data path stores per route.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use anyhow::{Context, Result, bail};
use aya::maps::MapData;
use ipnet::Ipv4Net;
use overlay_common::names;

/// The pinned `ROUTE_V4` map of one node, opened once.
pub struct RouteMap {
    map: MapData,
    value_size: usize,
}

/// `struct bpf_lpm_trie_key` for IPv4: prefix length (host order), then the address bytes.
#[repr(C)]
struct LpmKeyV4 {
    prefix_len: u32,
    addr: [u8; 4],
}

/// The part of `union bpf_attr` that `BPF_MAP_LOOKUP_ELEM` reads.
#[repr(C)]
struct LookupAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

impl RouteMap {
    /// Opens `<bpf_dir>/maps/ROUTE_V4`.
    pub fn open(bpf_dir: &Path) -> Result<Self> {
        let path = bpf_dir.join("maps").join(names::ROUTE_V4);
        let map = MapData::from_pin(&path)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        let info = map.info().context("BPF_OBJ_GET_INFO_BY_FD on ROUTE_V4")?;
        if info.key_size() as usize != size_of::<LpmKeyV4>() {
            bail!(
                "ROUTE_V4 key is {} bytes, expected {} (an IPv4 LPM key)",
                info.key_size(),
                size_of::<LpmKeyV4>()
            );
        }
        Ok(Self {
            map,
            value_size: info.value_size() as usize,
        })
    }

    /// Whether the trie routes `subnet`: its network address, looked up as a /32, matches an
    /// entry. The agent's entries are one per lease and none covers another, so a match is
    /// that lease's own entry.
    pub fn has(&self, subnet: Ipv4Net) -> Result<bool> {
        let key = LpmKeyV4 {
            prefix_len: 32,
            addr: subnet.network().octets(),
        };
        let mut value = vec![0u8; self.value_size.max(1)];
        let attr = LookupAttr {
            map_fd: u32::try_from(self.map.fd().as_fd().as_raw_fd())?,
            _pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: BPF_MAP_LOOKUP_ELEM reads `attr` (valid for its size) and the key, and writes
        // `value_size` bytes into `value`, which is that long.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                std::ptr::from_ref(&attr),
                size_of::<LookupAttr>(),
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(false);
        }
        Err(err).context("BPF_MAP_LOOKUP_ELEM on ROUTE_V4")
    }
}
