//! Programs the agent never attaches: it runs them once with `BPF_PROG_TEST_RUN` on a frame of
//! its own to learn what the running kernel supports.
//!
//! - `probe_decap_l4_udp`: whether `bpf_skb_adjust_room` accepts `BPF_F_ADJ_ROOM_DECAP_L4_UDP`
//!   (an unknown flag makes the helper fail with `-EINVAL`). It first removes 50 bytes with the
//!   flags decapsulation always uses (bit 0 of the answer: the frame was fit for the test), then
//!   50 more with the new flag added (bit 1: the kernel accepts it).

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    macros::classifier,
    programs::TcContext,
};
use overlay_common::wire::VXLAN_OVERHEAD;

use crate::lib::decap::BPF_F_ADJ_ROOM_DECAP_L4_UDP;

#[classifier]
pub fn probe_decap_l4_udp(ctx: TcContext) -> i32 {
    let base = u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4);
    let shrink = |flags| {
        i32::from(
            ctx.adjust_room(-(VXLAN_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, flags)
                .is_ok(),
        )
    };
    let plain = shrink(base);
    plain | (shrink(base | BPF_F_ADJ_ROOM_DECAP_L4_UDP) << 1)
}
named!(
    probe_decap_l4_udp,
    overlay_common::names::PROBE_DECAP_L4_UDP
);
