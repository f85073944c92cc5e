//! Forwarding: the kernel's FIB and MTU checks and the redirects that leave a program, in one
//! place (Cilium's `lib/fib.h`). Every caller hands a packet on through these helpers:
//! - [`fits`] / [`fits_with`]: `bpf_check_mtu` against a device (GSO packets segment by
//!   segment); if the check itself fails (a device just vanished) the packet goes ahead and the
//!   redirect decides.
//! - [`redirect_neigh`] / [`redirect_neigh_via`]: `bpf_redirect_neigh` out of a device, the
//!   kernel routing the destination (or the given next hop) and filling the MACs from its
//!   neighbour table.
//! - [`to_host_device`]: into the host device's ingress, as if it had received the packet.
//! - [`lookup`]: `bpf_fib_lookup` without neighbour resolution.

use core::ptr;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_INGRESS, BPF_FIB_LOOKUP_SKIP_NEIGH, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS,
        bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS, bpf_fib_lookup as FibLookup, bpf_redir_neigh,
        bpf_redir_neigh__bindgen_ty_1,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use overlay_common::config::Config;

use crate::lib::hdr::Ipv4Hdr;

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

/// Hands the packet to the host device's ingress, as if the device had received it (the
/// caller has made the destination MAC the device's own).
#[inline(always)]
pub fn to_host_device(cfg: &Config) -> i32 {
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(cfg.host_ifindex, u64::from(BPF_F_INGRESS)) as i32 }
}

/// The kernel's route for `ip` sent to `daddr` as if it arrived on `ifindex` (no neighbour
/// resolution: `bpf_redirect_neigh` does that): the helper's return code and its result.
#[inline(always)]
pub fn lookup(ctx: &TcContext, ifindex: u32, ip: &Ipv4Hdr, daddr: [u8; 4]) -> (i64, FibLookup) {
    // SAFETY: a zeroed bpf_fib_lookup is a valid argument.
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = ip.proto;
    fib.ifindex = ifindex;
    fib.__bindgen_anon_2.tos = ip.tos;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.saddr);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
    // SAFETY: helper call with our context and a stack struct of the right size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            size_of::<FibLookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    (rc, fib)
}
