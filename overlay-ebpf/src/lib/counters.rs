//! Per-reason counters (see `overlay_common::counters`), shared by every program, and the one
//! place a program's result becomes a TC verdict.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
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

/// What one stage of a program decided, where a program runs several in turn
/// (`underlay_ingress`: decapsulation, direct delivery, masquerade replies): the packet goes on
/// to the next stage (after the last one, to the kernel), or its fate is settled. A drop is the
/// `Err` around it.
#[derive(Clone, Copy)]
pub enum Step {
    /// Not this stage's packet, or left as it is: the next stage's turn.
    Next,
    /// Settled: this verdict.
    Done(i32),
}

impl Step {
    /// A stage whose body returns a verdict: `TC_ACT_OK` means "go on", anything else settles.
    #[inline(always)]
    pub fn of(result: Result<i32, Reason>) -> Result<Self, Reason> {
        result.map(|v| {
            if v == TC_ACT_OK {
                Self::Next
            } else {
                Self::Done(v)
            }
        })
    }
}

/// Runs `stage` if the stages before let the packet go on; keeps their decision otherwise.
#[inline(always)]
pub fn then(
    before: Result<Step, Reason>,
    stage: impl FnOnce() -> Result<i32, Reason>,
) -> Result<Step, Reason> {
    match before {
        Ok(Step::Next) => Step::of(stage()),
        settled => settled,
    }
}

/// The result of a chain of stages: `TC_ACT_OK` (the kernel's) when none settled the packet.
#[inline(always)]
pub fn settled(steps: Result<Step, Reason>) -> Result<i32, Reason> {
    steps.map(|step| match step {
        Step::Next => TC_ACT_OK,
        Step::Done(verdict) => verdict,
    })
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
