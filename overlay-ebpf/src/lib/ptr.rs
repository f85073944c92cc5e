//! Bounds-checked direct packet access: the one place that turns an offset into a pointer, for
//! TC (`TcContext`) and XDP (`XdpContext`) programs alike.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};

/// A packet whose linear data the program reads directly.
pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
}

/// A pointer to a `T` at `offset` bytes into the packet's linear data, or `None` when the
/// packet (or its linear part) ends before `offset + size_of::<T>()`. Every header access goes
/// through here so the verifier always sees the `data + off + len <= data_end` check.
///
/// The pointer is only valid until the next helper call that may move packet data
/// (`bpf_skb_adjust_room`, `bpf_skb_store_bytes`, `bpf_skb_pull_data`, `bpf_xdp_adjust_head`):
/// get a new one after.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Packet, offset: usize) -> Option<*mut T> {
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

/// The packet's mark (`skb->mark`).
#[inline(always)]
pub fn skb_mark(ctx: &TcContext) -> u32 {
    // SAFETY: the context's skb pointer is valid for the program's run; reading a field.
    unsafe { (*ctx.skb.skb).mark }
}
