//! Which packets are masqueraded: the settings (`NAT_CONFIG`), the destinations never
//! translated (`NAT_EXCLUDE_V4`) and flannel's two rules (see the parent module). Read-only;
//! called by `snat` and `reverse`.

use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, lpm_trie::Key},
    programs::TcContext,
};
use overlay_common::{
    config::Config,
    nat::{KUBE_MASQ_MARK, NAT_CONFIG_INDEX, NAT_CONFIG_LEN, NAT_EXCLUDE_V4_CAPACITY, NatConfig},
    wire::ETH_P_IP,
};

use super::IP_OFF;
use crate::lib::{
    hdr::{EthHdr, Ipv4Hdr},
    maps::in_subnet,
};

#[map]
static NAT_CONFIG: Array<NatConfig> = Array::with_max_entries(NAT_CONFIG_LEN, 0);
named!(NAT_CONFIG, overlay_common::names::NAT_CONFIG);

#[map]
static NAT_EXCLUDE_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(NAT_EXCLUDE_V4_CAPACITY, 0);
named!(NAT_EXCLUDE_V4, overlay_common::names::NAT_EXCLUDE_V4);

/// The masquerade settings, when masquerade is on.
#[inline(always)]
pub(super) fn nat_config() -> Option<&'static NatConfig> {
    NAT_CONFIG.get(NAT_CONFIG_INDEX).filter(|c| c.enabled())
}

/// flannel's rules for a packet from `saddr` to `daddr` carrying `mark`, leaving the cluster.
#[inline(always)]
pub(super) fn masquerades(cfg: &Config, saddr: [u8; 4], daddr: [u8; 4], mark: u32) -> bool {
    mark & KUBE_MASQ_MARK == 0
        && in_subnet(saddr, cfg.network, cfg.network_mask)
        && !in_subnet(daddr, cfg.network, cfg.network_mask)
        && daddr[0] & 0xf0 != 0xe0
        && daddr != [0xff; 4]
        && NAT_EXCLUDE_V4.get(Key::new(32, daddr)).is_none()
}

/// flannel's last rule (`! -s <cluster> -d <cluster>`) for a packet from `saddr` to `daddr`
/// (a remote pod: the caller found its peer) carrying `mark`.
#[inline(always)]
pub(super) fn masquerades_to_cluster(
    cfg: &Config,
    saddr: [u8; 4],
    daddr: [u8; 4],
    mark: u32,
) -> bool {
    mark & KUBE_MASQ_MARK == 0
        && !in_subnet(saddr, cfg.network, cfg.network_mask)
        && in_subnet(daddr, cfg.network, cfg.network_mask)
        && NAT_EXCLUDE_V4.get(Key::new(32, daddr)).is_none()
}

/// The IPv4 header behind an Ethernet header, with its length in bytes; `None` for anything
/// else (the caller lets it pass).
#[inline(always)]
fn ipv4(ctx: &TcContext) -> Option<(Ipv4Hdr, usize)> {
    let eth: EthHdr = ctx.load(0).ok()?;
    if eth.proto != ETH_P_IP {
        return None;
    }
    let ip: Ipv4Hdr = ctx.load(IP_OFF).ok()?;
    let ihl = usize::from(ip.ver_ihl & 0x0f) * 4;
    if ip.ver_ihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    Some((ip, ihl))
}

/// The masquerade settings and the packet's IPv4 header with its length, when masquerade is on
/// and the packet is IPv4; `None` for anything else (the caller lets it pass).
#[inline(always)]
pub(super) fn nat_ipv4(ctx: &TcContext) -> Option<(&'static NatConfig, Ipv4Hdr, usize)> {
    let nat = nat_config()?;
    let (ip, ihl) = ipv4(ctx)?;
    Some((nat, ip, ihl))
}
