//! Forwarding: the kernel's FIB and MTU checks and the redirects that leave a program, in one
//! place (Cilium's `lib/fib.h`). Every caller hands a packet on through these helpers:
//! - [`fits`] / [`fits_with`]: `bpf_check_mtu` against a device (GSO packets segment by
//!   segment); if the check itself fails (a device just vanished) the packet goes ahead and the
//!   redirect decides.
//! - [`redirect_neigh`] / [`redirect_neigh_via`] / [`redirect_neigh_to`]: `bpf_redirect_neigh`
//!   out of a device, the kernel routing the destination (or the given next hop, or the one a
//!   lookup may have found) and filling the MACs from its neighbour table.
//! - [`to_host_device`]: into the host device's ingress, as if it had received the packet.
//! - [`lookup`]: `bpf_fib_lookup` without neighbour resolution, with the IPv4 next hop it
//!   chose; [`next_hop_out`], the same from the output side, for packets we originate (the
//!   VXLAN outer header). Handing a known next hop to `redirect_neigh_via` spares the
//!   kernel the full output route lookup (`ip_route_output_flow`: rules, the dst cache and its
//!   reference counts, xfrm) that `redirect_neigh` makes for every packet.

use core::{mem::MaybeUninit, ptr};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_INGRESS, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, BPF_FIB_LOOKUP_SKIP_NEIGH,
        bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS,
        bpf_fib_lookup as FibLookup, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use overlay_common::config::Config;

use crate::lib::{hdr::Ipv4Hdr, ptr::skb_mark};

/// `AF_INET`, the family of an IPv4 FIB lookup or next hop.
const AF_INET: u8 = 2;

/// Whether the packet, grown by `len_diff` bytes, fits `ifindex`'s MTU; `flags` are
/// `bpf_check_mtu`'s (`BPF_MTU_CHK_SEGS`: each GSO segment instead of the whole packet).
#[inline(always)]
pub fn fits_with(ctx: &TcContext, ifindex: u32, len_diff: i32, flags: u64) -> bool {
    let mut mtu_len: u32 = 0;
    // SAFETY: plain helper call on our own context and a stack variable.
    let ret = unsafe { bpf_check_mtu(ctx.as_ptr(), ifindex, &mut mtu_len, len_diff, flags) };
    ret < 0 || ret == i64::from(BPF_MTU_CHK_RET_SUCCESS)
}

/// Whether the packet fits `ifindex`'s MTU as it is (GSO packets segment by segment).
#[inline(always)]
pub fn fits(ctx: &TcContext, ifindex: u32) -> bool {
    fits_with(ctx, ifindex, 0, u64::from(BPF_MTU_CHK_SEGS))
}

/// Sends the packet out of `ifindex`; the kernel routes its destination and writes the MACs.
#[inline(always)]
pub fn redirect_neigh(ifindex: u32) -> i32 {
    // SAFETY: NULL parameters are allowed (the kernel does the FIB lookup).
    unsafe { bpf_redirect_neigh(ifindex, ptr::null_mut(), 0, 0) as i32 }
}

/// Sends the packet out of `ifindex` to the next hop `nexthop` (network order); the kernel
/// writes the MACs from its neighbour table.
#[inline(always)]
pub fn redirect_neigh_via(ifindex: u32, nexthop: [u8; 4]) -> i32 {
    let mut nh = bpf_redir_neigh {
        nh_family: u32::from(AF_INET),
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
            ipv4_nh: u32::from_ne_bytes(nexthop),
        },
    };
    // SAFETY: `nh` is a valid parameter block of the size passed.
    unsafe { bpf_redirect_neigh(ifindex, &mut nh, size_of::<bpf_redir_neigh>() as i32, 0) as i32 }
}

/// Sends the packet out of `ifindex` to `next_hop` where a FIB lookup gave one
/// ([`redirect_neigh_via`]), else with the kernel routing it ([`redirect_neigh`]).
#[inline(always)]
pub fn redirect_neigh_to(ifindex: u32, next_hop: Option<[u8; 4]>) -> i32 {
    match next_hop {
        Some(nexthop) => redirect_neigh_via(ifindex, nexthop),
        None => redirect_neigh(ifindex),
    }
}

/// Hands the packet to the host device's ingress, as if the device had received it (the
/// caller has made the destination MAC the device's own).
#[inline(always)]
pub fn to_host_device(cfg: &Config) -> i32 {
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(cfg.host_ifindex, u64::from(BPF_F_INGRESS)) as i32 }
}

/// What a FIB lookup found: the helper's return code (`BPF_FIB_LKUP_RET_*`), the egress device
/// and, where it is an IPv4 address, the next hop (the gateway, or the destination itself when
/// it is on the link; a route through an IPv6 gateway, RFC 5549, has none to give
/// `redirect_neigh_via`).
pub struct Route {
    pub rc: i64,
    pub ifindex: u32,
    pub next_hop: Option<[u8; 4]>,
}

impl Route {
    /// Whether the lookup found a route to forward by (`NOT_FWDED` for a local destination,
    /// and every failure, say no; with `BPF_FIB_LOOKUP_SKIP_NEIGH` success does not wait for
    /// the neighbour).
    #[inline(always)]
    pub fn found(&self) -> bool {
        self.rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS)
    }
}

/// The IPv4 flow a FIB lookup is made for.
pub struct Flow {
    pub proto: u8,
    pub tos: u8,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// The kernel's route for `ip` sent to `daddr` as if it arrived on `ifindex` (no neighbour
/// resolution: `bpf_redirect_neigh` does that).
#[inline(always)]
pub fn lookup(ctx: &TcContext, ifindex: u32, ip: &Ipv4Hdr, daddr: [u8; 4]) -> Route {
    let flow = Flow {
        proto: ip.proto,
        tos: ip.tos,
        saddr: ip.saddr,
        daddr,
    };
    fib_lookup(ctx, ifindex, &flow, 0)
}

/// The next hop out of `ifindex` for a packet of `flow` that we originate, as
/// `redirect_neigh(ifindex)` would route it, or `None` where that is not certain and the caller
/// should let `redirect_neigh` route: no unicast route, a route out of another device, a
/// non-IPv4 next hop, or a packet mark (the lookup runs the routing rules with mark 0;
/// `redirect_neigh` with the packet's).
#[inline(always)]
pub fn next_hop_out(ctx: &TcContext, ifindex: u32, flow: &Flow) -> Option<[u8; 4]> {
    if skb_mark(ctx) != 0 {
        return None;
    }
    let route = fib_lookup(ctx, ifindex, flow, BPF_FIB_LOOKUP_OUTPUT);
    if !route.found() || route.ifindex != ifindex {
        return None;
    }
    route.next_hop
}

/// `bpf_fib_lookup` of `flow` from `ifindex` (`BPF_FIB_LOOKUP_OUTPUT` in `flags`: as sent
/// from this host out of it; otherwise as arriving on it), never resolving the neighbour.
///
/// The parameter block is zeroed with eight word stores where it lies and read in place:
/// `mem::zeroed` or moving the 64-byte struct compiles to calls of the byte-by-byte `memset`
/// and `memcpy` subprograms, which cost more per packet than the lookup itself.
#[inline(always)]
fn fib_lookup(ctx: &TcContext, ifindex: u32, flow: &Flow, flags: u32) -> Route {
    const WORDS: usize = size_of::<FibLookup>() / 8;
    const _: () = assert!(size_of::<FibLookup>() == WORDS * 8);
    let mut block = MaybeUninit::<[u64; WORDS]>::uninit();
    let words = block.as_mut_ptr().cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: word `i` < WORDS of our own stack block; volatile so no memset replaces them.
        unsafe { words.add(i).write_volatile(0) };
    }
    let fib = words.cast::<FibLookup>();
    // SAFETY: `fib` points to a zeroed, 8-byte aligned block the size of a bpf_fib_lookup (an
    // all-zero one is valid); the helper gets its size and our context.
    unsafe {
        (*fib).family = AF_INET;
        (*fib).l4_protocol = flow.proto;
        (*fib).ifindex = ifindex;
        (*fib).__bindgen_anon_2.tos = flow.tos;
        (*fib).__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(flow.saddr);
        (*fib).__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(flow.daddr);
        let rc = bpf_fib_lookup(
            ctx.as_ptr(),
            fib,
            size_of::<FibLookup>() as i32,
            flags | BPF_FIB_LOOKUP_SKIP_NEIGH,
        );
        Route {
            rc,
            ifindex: (*fib).ifindex,
            next_hop: ((*fib).family == AF_INET)
                .then(|| (*fib).__bindgen_anon_4.ipv4_dst.to_ne_bytes()),
        }
    }
}
