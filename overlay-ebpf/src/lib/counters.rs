//! Per-reason counters (see `overlay_common::counters`), shared by every program, and the one
//! place a program's result becomes a TC verdict.

use aya_ebpf::{bindings::TC_ACT_SHOT, macros::map, maps::PerCpuArray, programs::TcContext};
use overlay_common::counters::{COUNTERS_LEN, Counter, Reason};

use crate::lib::events::drop_event;

#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);
named!(COUNTERS, overlay_common::names::COUNTERS);

/// Counts one packet of `len` bytes under `reason` on this CPU.
#[inline(always)]
pub fn count(reason: Reason, len: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(reason.index()) {
        // SAFETY: the pointer is to this CPU's slot of a per-CPU array; nothing else writes it
        // while this program runs (programs are not preempted on one CPU).
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += u64::from(len);
        }
    }
}

/// Which of two hooks that share a program body runs it. `pod_egress` runs on the pod bridge
/// (the authority: it sees every routed frame from every pod) and, where the agent attaches it,
/// also on a pod's host-side veth in front of the bridge (an accelerator: what it can finish it
/// redirects, everything else it passes on to the bridge, uncounted, so nothing is counted
/// twice).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Authority,
    Accelerator,
}

/// Counts a packet handed to the kernel (`to_stack_*`), where `role` is the authority.
#[inline(always)]
pub fn count_handback(role: Role, reason: Reason, len: u32) {
    if role == Role::Authority {
        count(reason, len);
    }
}

/// Turns a program body's result into its verdict: `Ok` carries the verdict (already counted
/// where it is decided), `Err` a drop reason, counted here before the packet is dropped, and
/// sampled into the drop events (`lib::events`).
#[inline(always)]
pub fn verdict(ctx: &TcContext, result: Result<i32, Reason>) -> i32 {
    match result {
        Ok(verdict) => verdict,
        Err(reason) => {
            count(reason, ctx.len());
            drop_event(ctx, reason);
            TC_ACT_SHOT
        }
    }
}
