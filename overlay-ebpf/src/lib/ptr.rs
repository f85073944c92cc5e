//! Bounds-checked direct packet access: the one place that turns an offset into a pointer.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;

/// A pointer to a `T` at `offset` bytes into the packet's linear data, or `None` when the
/// packet (or its linear part) ends before `offset + size_of::<T>()`. Every header access goes
/// through here so the verifier always sees the `data + off + len <= data_end` check.
///
/// The pointer is only valid until the next helper call that may move packet data
/// (`bpf_skb_adjust_room`, `bpf_skb_store_bytes`, `bpf_skb_pull_data`): get a new one after.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Makes sure the packet's first `len` bytes are in the linear part, which is all direct packet
/// access sees (paged or GRO-built packets may keep headers in fragments). A packet shorter
/// than `len` is left as it is: the bounds checks after this turn it away.
#[inline(always)]
pub fn pull_headers(ctx: &TcContext, len: usize) {
    if ctx.data() + len > ctx.data_end() && ctx.len() as usize >= len {
        let _ = ctx.pull_data(len as u32);
    }
}
