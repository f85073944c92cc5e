//! The flow table: `SNAT_V4_CT` (original direction → translated source), `SNAT_V4_REV`
//! (reply tuple → originator), the same pair for flows not assured yet (`SNAT_V4_CT_NEW`,
//! `SNAT_V4_REV_NEW`), and `SNAT_V4_FRAG` (datagram identity → originator, for later
//! fragments). Finds, creates, refreshes, promotes and expires flows (the idle rule is
//! `NatConfig::is_expired`, shared with the agent's sweeper); rewrites nothing. Called by
//! `snat`, `reverse` and `icmp`.
//!
//! Why two tiers: in one LRU table a flood of new flows (a scan, a pod retrying a dead
//! address, a burst of DNS queries from random ports) evicts the least recently used
//! entries, which are the idle but live connections; their next packet then gets another
//! port and the connection breaks. New flows start in the `_NEW` tables and can only evict
//! each other. A flow moves (`promote`) once it is assured: its originator sends again after a
//! reply that was neither a reset nor a FIN (for TCP, the ACK that completes the handshake, as
//! conntrack assures it; for UDP and ICMP echo, traffic both ways, where conntrack also counts
//! a later reply and never assures ICMP). So neither a one-shot query, nor a host answering a
//! scan the pod never completes, nor a half-open connection fills the assured tier; flows that
//! complete handshakes do, as in conntrack. Only assured flows get the long timeouts
//! (`NatConfig::timeout`). Packets of assured flows look them up first and find them at once.
//!
//! Concurrency: the programs run on every CPU. A promotion inserts both assured entries before
//! it removes the new ones, and lookups that miss both tiers look in the assured tier again
//! ([`flow_in`], `either_tier`), and a flow created meanwhile checks the assured tier after its
//! insert ([`flow_out`]), so a flow being moved is found. Reply tuples are
//! claimed with an insert and a look at the other tier after it ([`claim`]); without a full
//! barrier between the two, two claims of one tuple in different tiers at the same instant
//! could both hold, which needs a flow's assured reply entry evicted and a new flow picking
//! that very port and remote at once. Entries are written through map pointers that a
//! concurrent removal may hand to another flow (preallocated LRU elements are reused at
//! once); the writes are state and times, except the cached next hop.

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_F_CURRENT_NETNS, BPF_NOEXIST, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_sk_lookup_udp, bpf_sk_release,
        bpf_skc_lookup_tcp,
    },
    macros::map,
    maps::LruHashMap,
    programs::TcContext,
};
use overlay_common::{
    config::Config,
    counters::Reason,
    nat::{
        IPPROTO_TCP, IPPROTO_UDP, NAT_E_TO_CLUSTER, NAT_F_KEEP_PORT, NAT_FRAG_TIMEOUT,
        NAT_PORT_TRIES, NAT_REFRESH_NS, NAT_S_FIN, NAT_S_REPLIED, NAT_S_RST, NatConfig, NatEntryV4,
        NatKeyV4, SNAT_V4_CAPACITY, SNAT_V4_FRAG_CAPACITY, SNAT_V4_NEW_CAPACITY, idle_longer_than,
        in_close_window,
    },
    route::NextHopV4,
};

use crate::lib::{
    counters::count,
    hdr::{Ipv4Hdr, TcpHdr},
};

#[map]
static SNAT_V4_CT: LruHashMap<NatKeyV4, NatEntryV4> =
    LruHashMap::with_max_entries(SNAT_V4_CAPACITY, 0);
named!(SNAT_V4_CT, overlay_common::names::SNAT_V4_CT);

#[map]
static SNAT_V4_REV: LruHashMap<NatKeyV4, NatEntryV4> =
    LruHashMap::with_max_entries(SNAT_V4_CAPACITY, 0);
named!(SNAT_V4_REV, overlay_common::names::SNAT_V4_REV);

#[map]
static SNAT_V4_CT_NEW: LruHashMap<NatKeyV4, NatEntryV4> =
    LruHashMap::with_max_entries(SNAT_V4_NEW_CAPACITY, 0);
named!(SNAT_V4_CT_NEW, overlay_common::names::SNAT_V4_CT_NEW);

#[map]
static SNAT_V4_REV_NEW: LruHashMap<NatKeyV4, NatEntryV4> =
    LruHashMap::with_max_entries(SNAT_V4_NEW_CAPACITY, 0);
named!(SNAT_V4_REV_NEW, overlay_common::names::SNAT_V4_REV_NEW);

type FlowMap = LruHashMap<NatKeyV4, NatEntryV4>;

/// One tier of the flow table. Code generic over a tier is compiled once per tier, so every
/// map access names its map: a map picked at run time would make the verifier give up
/// inlining the lookups it reaches.
trait Tier {
    /// The tier of flows not assured yet.
    const NEW: bool;
    fn ct() -> &'static FlowMap;
    fn rev() -> &'static FlowMap;
    /// The other tier's reply table: a reply tuple is claimed in one tier only.
    fn other_rev() -> &'static FlowMap;
}

/// Assured flows (`SNAT_V4_CT`, `SNAT_V4_REV`).
struct Assured;
/// Flows not assured yet (`SNAT_V4_CT_NEW`, `SNAT_V4_REV_NEW`).
struct Unassured;

impl Tier for Assured {
    const NEW: bool = false;
    #[inline(always)]
    fn ct() -> &'static FlowMap {
        &SNAT_V4_CT
    }
    #[inline(always)]
    fn rev() -> &'static FlowMap {
        &SNAT_V4_REV
    }
    #[inline(always)]
    fn other_rev() -> &'static FlowMap {
        &SNAT_V4_REV_NEW
    }
}

impl Tier for Unassured {
    const NEW: bool = true;
    #[inline(always)]
    fn ct() -> &'static FlowMap {
        &SNAT_V4_CT_NEW
    }
    #[inline(always)]
    fn rev() -> &'static FlowMap {
        &SNAT_V4_REV_NEW
    }
    #[inline(always)]
    fn other_rev() -> &'static FlowMap {
        &SNAT_V4_REV
    }
}

/// The entry of `key` in `assured` or `new` (the same table of the two tiers), and whether it
/// is assured. A lookup that misses both looks in the assured tier again: a promotion on
/// another CPU inserts there before it removes the new entry, so a flow being moved is found.
#[inline(always)]
fn either_tier(
    assured: &FlowMap,
    new: &FlowMap,
    key: &NatKeyV4,
) -> Option<(*const NatEntryV4, bool)> {
    if let Some(e) = assured.get_ptr(key) {
        return Some((e, true));
    }
    if let Some(e) = new.get_ptr(key) {
        return Some((e, false));
    }
    assured.get_ptr(key).map(|e| (e, true))
}

/// The CT entry of the flow `key`, assured or not ([`either_tier`]).
#[inline(always)]
fn ct_entry(key: &NatKeyV4) -> Option<(*const NatEntryV4, bool)> {
    either_tier(&SNAT_V4_CT, &SNAT_V4_CT_NEW, key)
}

/// Whether `map` holds the reply tuple `rev_key` for the originator of `key`.
#[inline(always)]
fn holds_for(map: &FlowMap, rev_key: &NatKeyV4, key: &NatKeyV4) -> bool {
    match map.get_ptr(rev_key) {
        // SAFETY: a map value pointer, valid during this program run.
        Some(rev) => unsafe { (*rev).addr == key.saddr && (*rev).port == key.sport },
        None => false,
    }
}

/// Claims the reply tuple `rev_key` in tier `T` with `entry`, unless either tier holds it. The
/// other tier is checked after the insert, so a tuple being moved by a promotion (in both
/// tiers for a moment) is never claimed (see the module's note on concurrency).
#[inline(always)]
fn claim<T: Tier>(rev_key: &NatKeyV4, entry: &NatEntryV4) -> bool {
    if T::rev()
        .insert(rev_key, entry, u64::from(BPF_NOEXIST))
        .is_err()
    {
        return false;
    }
    if T::other_rev().get_ptr(rev_key).is_some() {
        let _ = T::rev().remove(rev_key);
        return false;
    }
    true
}

#[map]
static SNAT_V4_FRAG: LruHashMap<NatKeyV4, NatEntryV4> =
    LruHashMap::with_max_entries(SNAT_V4_FRAG_CAPACITY, 0);
named!(SNAT_V4_FRAG, overlay_common::names::SNAT_V4_FRAG);

/// The flow table's clock (see `overlay_common::nat`): the last tick's CLOCK_MONOTONIC, which
/// costs a memory read where `bpf_ktime_get_ns` reads the clock source (a paravirtual clock
/// in a VM: several percent of a masqueraded packet's time).
#[inline(always)]
pub(super) fn now() -> u64 {
    // SAFETY: no arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Whether a packet that leaves the flow's state as it is may leave its entries alone: the
/// entry it found was refreshed (both entries were) less than `NAT_REFRESH_NS` ago.
#[inline(always)]
fn fresh(last_seen: u64, now: u64) -> bool {
    now.saturating_sub(last_seen) < NAT_REFRESH_NS
}

#[inline(always)]
pub(super) fn frag_offset(ip: &Ipv4Hdr) -> u16 {
    u16::from_be_bytes(ip.frag_off) & Ipv4Hdr::OFFSET_MASK
}

/// The first fragment of a fragmented datagram (offset 0, more fragments to come).
#[inline(always)]
pub(super) fn is_first_fragment(ip: &Ipv4Hdr) -> bool {
    u16::from_be_bytes(ip.frag_off) & Ipv4Hdr::MF_OFFSET_MASK == Ipv4Hdr::MF
}

/// The `SNAT_V4_FRAG` key of the datagram `ip` belongs to: its reassembly identity.
#[inline(always)]
fn frag_key(ip: &Ipv4Hdr) -> NatKeyV4 {
    NatKeyV4::new(ip.saddr, ip.daddr, ip.id, [0, 0], ip.proto)
}

/// Whether `key` (a packet about to be masqueraded at the external interface) is the reply of a
/// live `NAT_E_TO_CLUSTER` flow: a remote pod answering the outside host, after [`reverse`]
/// routed it out (or handed it to the kernel). Such a packet belongs to that flow, as in
/// conntrack, and must keep its pod source.
#[inline(always)]
pub(super) fn replies_to_cluster_flow(nat: &NatConfig, key: &NatKeyV4, now: u64) -> bool {
    let orig = key.reversed();
    match ct_entry(&orig) {
        // SAFETY: a map value pointer, valid during this program run.
        Some((ct, assured)) => unsafe {
            (*ct).flags & NAT_E_TO_CLUSTER != 0 && !nat.is_expired(key.proto, &*ct, now, assured)
        },
        None => false,
    }
}

/// State bits a TCP packet with `flags` adds; a bare SYN starts the flow over.
#[inline(always)]
fn tcp_state(old: u8, flags: u8) -> u8 {
    let mut state = old;
    if flags & TcpHdr::SYN != 0 && flags & TcpHdr::ACK == 0 {
        state = 0;
    }
    if flags & TcpHdr::FIN != 0 {
        state |= NAT_S_FIN;
    }
    if flags & TcpHdr::RST != 0 {
        state |= NAT_S_RST;
    }
    state
}

/// A random port in the configured range (multiply-shift, no division).
#[inline(always)]
fn random_port(nat: &NatConfig) -> u16 {
    let span = u64::from(nat.port_max.saturating_sub(nat.port_min)) + 1;
    // SAFETY: no arguments.
    let r = u64::from(unsafe { bpf_get_prandom_u32() });
    nat.port_min.wrapping_add(((r * span) >> 32) as u16)
}

/// Whether a socket of this node's own stack owns the reply tuple `reply` (remote → our
/// translated address and port): a host connection from that port to the same remote port, a
/// listener on it (TCP, time-wait included), or a UDP socket bound to it. A pod's flow on that
/// tuple would take the host socket's packets into the pod; the kernel's MASQUERADE never
/// picks a tuple that conntrack knows is in use. Looked up in the namespace of the packet's
/// device: the node's. ICMP has no sockets to collide with.
#[inline(always)]
fn host_socket_owns(skb: *mut __sk_buff, reply: &NatKeyV4) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: u32::from_ne_bytes(reply.saddr),
                daddr: u32::from_ne_bytes(reply.daddr),
                sport: u16::from_ne_bytes(reply.sport),
                dport: u16::from_ne_bytes(reply.dport),
            },
        },
    };
    let size = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    let netns = BPF_F_CURRENT_NETNS as u64;
    let ctx_ptr = skb.cast();
    // SAFETY: helper calls on our own context with a tuple of the size given; a socket found
    // is released at once below.
    let sk = unsafe {
        match reply.proto {
            IPPROTO_TCP => bpf_skc_lookup_tcp(ctx_ptr, &raw mut tuple, size, netns, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(ctx_ptr, &raw mut tuple, size, netns, 0),
            _ => return false,
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket reference the lookup returned, released once.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// The route cached in the CT entry `ct` (`NatEntryV4::route`), read as the one word it is
/// written as.
#[inline(always)]
fn load_route(ct: *const NatEntryV4) -> NextHopV4 {
    // SAFETY: a map value pointer, valid during this program run; `route` is an 8-byte word at
    // an 8-byte offset (asserted in overlay_common::nat).
    let word = unsafe { core::ptr::read_volatile((&raw const (*ct).route).cast::<u64>()) };
    // SAFETY: `NextHopV4` is 8 bytes of plain data; any bit pattern is one.
    unsafe { core::mem::transmute::<u64, NextHopV4>(word) }
}

/// Caches `route` in the CT entry `ct`, in one store.
#[inline(always)]
fn store_route(ct: *mut NatEntryV4, route: NextHopV4) {
    // SAFETY: as in `load_route`.
    unsafe {
        let word = core::mem::transmute::<NextHopV4, u64>(route);
        core::ptr::write_volatile((&raw mut (*ct).route).cast::<u64>(), word);
    }
}

/// The next hop cached in the flow `key`'s CT entry (generation 0: none cached), if the flow
/// has an entry.
#[inline(always)]
pub(super) fn flow_route(key: &NatKeyV4) -> Option<NextHopV4> {
    let (ct, _) = ct_entry(key)?;
    Some(load_route(ct))
}

/// Finds the live flow for `key` (assured first) or creates one; returns the translated port.
/// A packet that changes the flow's state, or finds its entry older than `NAT_REFRESH_NS`,
/// confirms that the reply entry is still the flow's and refreshes both; one that assures a
/// flow moves it ([`promote`]). `route` (generation 0: none) is the next hop the caller looked
/// up for the packet, cached in the CT entry for the flow's next packets. A TCP packet's
/// acknowledgment number is kept in the CT entry (`orig_ack`). A new flow starts unassured.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined into translate_out only")]
pub(super) fn flow_out(
    ctx: &TcContext,
    nat: &NatConfig,
    cfg: &Config,
    key: &NatKeyV4,
    nat_addr: [u8; 4],
    seg: Segment,
    eflags: u8,
    route: NextHopV4,
    now: u64,
) -> Result<[u8; 2], Reason> {
    let tcp_flags = seg.flags;
    let going = Going {
        key: *key,
        nat_addr,
        tcp_flags,
        ack: seg.ack,
        route,
        now,
    };
    if let Some(port) = Continued(continue_flow::<Assured>(nat, &going)).port() {
        return Ok(port);
    }
    if let Some(port) = Continued(continue_flow::<Unassured>(nat, &going)).port() {
        return Ok(port);
    }
    let proto = key.proto;
    let mut state = 0;
    if proto == IPPROTO_TCP {
        state = tcp_state(0, tcp_flags);
    }

    let mut choice = PortChoice {
        nat_addr,
        vxlan_port: cfg.port,
        entry: NatEntryV4 {
            addr: key.saddr,
            port: key.sport,
            state,
            flags: eflags,
            last_seen: now,
            route: NextHopV4::default(),
            orig_ack: 0,
            _pad: [0; 4],
        },
    };
    let port = match choose_port(ctx.skb.skb, nat, key, &choice) {
        0 => return Err(Reason::DropNatExhausted),
        port => port.to_be_bytes(),
    };
    // The reply entry is claimed: its stack slot becomes the CT entry (the verifier's 512
    // bytes of stack for this program and `choose_port` hold no second entry).
    let new_ct = &mut choice.entry;
    new_ct.addr = nat_addr;
    new_ct.port = port;
    new_ct.route = route;
    if seg.acknowledges(proto) {
        new_ct.orig_ack = seg.ack;
    }
    if SNAT_V4_CT_NEW
        .insert(key, new_ct, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Another CPU created the flow meanwhile (and may have promoted it since): use its
        // port, give ours back.
        let _ = SNAT_V4_REV_NEW.remove(&key.reply(nat_addr, port));
        return match ct_entry(key) {
            // SAFETY: as above.
            Some((ct, _)) => Ok(unsafe { (*ct).port }),
            None => Err(Reason::DropNatFailed),
        };
    }
    if let Some(ct) = SNAT_V4_CT.get_ptr(key) {
        // Another CPU's packet of this flow promoted it between our lookups: it keeps its port.
        let _ = SNAT_V4_CT_NEW.remove(key);
        let _ = SNAT_V4_REV_NEW.remove(&key.reply(nat_addr, port));
        // SAFETY: as above.
        return Ok(unsafe { (*ct).port });
    }
    count(Reason::NatNewFlow, 0);
    Ok(port)
}

/// What [`fixed_tuple_out`] returns.
pub(super) const FIXED_OK: u32 = 1;
pub(super) const FIXED_TAKEN: u32 = 2;

/// The outbound half of a flow whose reply tuple its packet fixes: ports kept (DCCP, UDP-Lite,
/// SCTP) or none (GRE, ESP, ...), translated to `nat_addr`. Such flows live in the unassured
/// tier on UDP's first timeout, refreshed by packets both ways, and are never promoted: a
/// path of its own, apart from [`flow_out`], since every protocol class that went through
/// that one multiplied the verifier's work on it. `FIXED_OK`, `FIXED_TAKEN` (another
/// flow holds the reply tuple: conntrack's clash), or 0 (a map refused the entry).
#[inline(never)]
pub(super) fn fixed_tuple_out(
    nat: &NatConfig,
    key: &NatKeyV4,
    nat_addr: [u8; 4],
    eflags: u8,
) -> u32 {
    let now = now();
    let rev_key = key.reply(nat_addr, key.sport);
    if let Some(ct) = SNAT_V4_CT_NEW.get_ptr_mut(key) {
        // SAFETY: a map value pointer, valid during this program run.
        let e = unsafe { *ct };
        // UDP's timeouts are every such protocol's (`NatConfig::timeout`).
        if e.addr == nat_addr && !nat.is_expired(IPPROTO_UDP, &e, now, false) {
            if !fresh(e.last_seen, now) {
                // SAFETY: as above.
                unsafe { (*ct).last_seen = now };
                if let Some(rev) = SNAT_V4_REV_NEW.get_ptr_mut(&rev_key) {
                    // SAFETY: as above.
                    unsafe {
                        if (*rev).addr == key.saddr && (*rev).port == key.sport {
                            (*rev).last_seen = now;
                        }
                    }
                }
            }
            return FIXED_OK;
        }
        // Dead, or translated to another address: made again below.
        let _ = SNAT_V4_CT_NEW.remove(key);
        if holds_for(&SNAT_V4_REV_NEW, &rev_key, key) {
            let _ = SNAT_V4_REV_NEW.remove(&rev_key);
        }
    }
    let mut entry = NatEntryV4 {
        addr: key.saddr,
        port: key.sport,
        state: 0,
        flags: eflags,
        last_seen: now,
        route: NextHopV4::default(),
        orig_ack: 0,
        _pad: [0; 4],
    };
    if !claim::<Unassured>(&rev_key, &entry) {
        return FIXED_TAKEN;
    }
    entry.addr = nat_addr;
    if SNAT_V4_CT_NEW.insert(key, &entry, 0).is_err() {
        let _ = SNAT_V4_REV_NEW.remove(&rev_key);
        return 0;
    }
    count(Reason::NatNewFlow, 0);
    FIXED_OK
}

/// What [`flow_out`] reads of an outgoing TCP segment besides its tuple (flags 0 for other
/// protocols).
#[derive(Clone, Copy)]
pub(super) struct Segment {
    pub flags: u8,
    /// The acknowledgment number, host order.
    pub ack: u32,
}

impl Segment {
    /// Whether this is a TCP segment that carries an acknowledgment number.
    #[inline(always)]
    fn acknowledges(self, proto: u8) -> bool {
        proto == IPPROTO_TCP && self.flags & TcpHdr::ACK != 0
    }
}

/// An outgoing packet of a flow, as [`continue_flow`] needs it.
struct Going {
    key: NatKeyV4,
    nat_addr: [u8; 4],
    tcp_flags: u8,
    /// [`Segment::ack`], meaningful where [`Segment::acknowledges`].
    ack: u32,
    route: NextHopV4,
    now: u64,
}

/// What [`continue_flow`] returns: [`Continued::NONE`], or the translated port (as on the
/// wire) with bit 16 set. A plain integer: an `Option` returned from a function of its own
/// leaves `None`'s payload undefined, and LLVM reads it, which the verifier refuses.
struct Continued(u32);

impl Continued {
    const NONE: u32 = 0;

    #[inline(always)]
    fn of(port: [u8; 2]) -> u32 {
        1 << 16 | u32::from(u16::from_ne_bytes(port))
    }

    #[inline(always)]
    fn port(&self) -> Option<[u8; 2]> {
        (self.0 != Self::NONE).then(|| (self.0 as u16).to_ne_bytes())
    }
}

/// The translated port of `g.key`'s live flow in tier `T` ([`Continued`]), refreshing or
/// promoting it as [`flow_out`] says. None: no flow there, or a dead one, or one whose reply
/// tuple went to another flow; the last two are removed, and the packet starts a new flow.
/// A function of its own, per tier: inlined, both tiers' entries sat in the program's stack
/// frame, and with `choose_port`'s the call chain passed the verifier's 512 bytes.
#[inline(never)]
fn continue_flow<T: Tier>(nat: &NatConfig, g: &Going) -> u32 {
    match continue_in::<T>(nat, g) {
        Some(port) => Continued::of(port),
        None => Continued::NONE,
    }
}

#[inline(always)]
fn continue_in<T: Tier>(nat: &NatConfig, g: &Going) -> Option<[u8; 2]> {
    let key = &g.key;
    let ct = T::ct().get_ptr_mut(key)?;
    // SAFETY: a map value pointer, valid during this program run.
    let e = unsafe { *ct };
    if g.route.route_gen != 0 && load_route(ct) != g.route {
        store_route(ct, g.route);
    }
    let rev_key = key.reply(e.addr, e.port);
    if !nat.is_expired(key.proto, &e, g.now, !T::NEW) && e.addr == g.nat_addr {
        let acknowledges = Segment {
            flags: g.tcp_flags,
            ack: g.ack,
        }
        .acknowledges(key.proto);
        if acknowledges && g.ack != e.orig_ack {
            // A store into the entry this packet already holds: where replies may close the
            // flow from (`in_close_window`).
            // SAFETY: a map value pointer, valid during this program run.
            unsafe { (*ct).orig_ack = g.ack };
        }
        let st = if key.proto == IPPROTO_TCP {
            tcp_state(e.state, g.tcp_flags)
        } else {
            e.state
        };
        // This flow's reply entry as of this packet.
        let mine = NatEntryV4 {
            addr: key.saddr,
            port: key.sport,
            state: st,
            flags: e.flags,
            last_seen: g.now,
            route: NextHopV4::default(),
            orig_ack: 0,
            _pad: [0; 4],
        };
        if T::NEW && st & (NAT_S_REPLIED | NAT_S_FIN | NAT_S_RST) == NAT_S_REPLIED {
            let assured = NatEntryV4 {
                state: st,
                last_seen: g.now,
                route: if g.route.route_gen != 0 {
                    g.route
                } else {
                    e.route
                },
                orig_ack: if acknowledges { g.ack } else { e.orig_ack },
                ..e
            };
            if promote(key, &rev_key, &assured, &mine) {
                return Some(e.port);
            }
        }
        if st == e.state && fresh(e.last_seen, g.now) {
            // Both entries were confirmed and refreshed together a moment ago.
            return Some(e.port);
        }
        let rev_ok = match T::rev().get_ptr_mut(&rev_key) {
            // SAFETY: as above.
            Some(rev) => unsafe {
                if (*rev).addr == key.saddr && (*rev).port == key.sport {
                    (*rev).state = st;
                    (*rev).last_seen = g.now;
                    true
                } else {
                    false
                }
            },
            // Evicted (LRU) while the flow lived: claim the reply tuple again.
            None => {
                if claim::<T>(&rev_key, &mine) {
                    true
                } else if holds_for(T::other_rev(), &rev_key, key) {
                    // Being moved between the tiers this instant by another CPU's packet of
                    // this flow, which refreshes it.
                    return Some(e.port);
                } else {
                    false
                }
            }
        };
        if rev_ok {
            // SAFETY: as above.
            unsafe {
                (*ct).state = st;
                (*ct).last_seen = g.now;
            }
            return Some(e.port);
        }
        // The reply tuple went to another flow: this one needs a new port.
    } else if holds_for(T::rev(), &rev_key, key) {
        // Dead: free its reply tuple, then start over.
        let _ = T::rev().remove(&rev_key);
    }
    let _ = T::ct().remove(key);
    None
}

/// What [`choose_port`] needs besides the packet, the NAT settings and the flow's
/// original-direction tuple (a BPF function takes at most five arguments; the tuple is the
/// caller's, not a copy: the two stack frames together must fit the verifier's 512 bytes).
struct PortChoice {
    nat_addr: [u8; 4],
    /// The VXLAN port, never given to UDP.
    vxlan_port: u16,
    /// The `SNAT_V4_REV` entry to claim the reply tuple with.
    entry: NatEntryV4,
}

/// A translated port (host order) for the new flow `key` whose reply tuple is free in both
/// tiers, claimed in `SNAT_V4_REV_NEW` with `c.entry`; 0 when none was (0 is never chosen). With
/// `NAT_F_KEEP_PORT` the pod's own port comes first, unless a socket of the node owns its
/// reply tuple ([`host_socket_owns`]): that port is in the kernel's ephemeral range, where the
/// host's own connections take theirs. Then random ports, from a range outside it (the agent
/// chooses it so), `NAT_PORT_TRIES` in all. The socket lookup stays out of the loop: inside,
/// the verifier walks it once per try (seconds of loading for 32 tries).
///
/// A function of its own, returning a plain integer: inlined with the socket lookup, or
/// returning an `Option`, LLVM emitted a read of a register that one path never set (`None`'s
/// undefined payload), which the verifier rejects.
#[inline(never)]
fn choose_port(skb: *mut __sk_buff, nat: &NatConfig, key: &NatKeyV4, c: &PortChoice) -> u16 {
    // The VXLAN port is decapsulation's; 0 is no port.
    let usable = |port: u16| port != 0 && !(key.proto == IPPROTO_UDP && port == c.vxlan_port);
    let claim =
        |port: u16| claim::<Unassured>(&key.reply(c.nat_addr, port.to_be_bytes()), &c.entry);
    let mut first = 0;
    if nat.flags & NAT_F_KEEP_PORT != 0 {
        first = 1;
        let own = u16::from_be_bytes(key.sport);
        if usable(own) && !host_socket_owns(skb, &key.reply(c.nat_addr, key.sport)) && claim(own) {
            return own;
        }
    }
    for _ in first..NAT_PORT_TRIES {
        let port = random_port(nat);
        if usable(port) && claim(port) {
            return port;
        }
    }
    0
}

/// Looks up the reply tuple `key` (assured flows first); returns the pod's side of a live
/// flow, refreshing both of its entries when the packet changes the state or the entry is
/// older than `NAT_REFRESH_NS`. A dead flow is removed (the packet then goes to the kernel, as
/// without an entry). Replies never promote a flow: only its originator assures it. A FIN or
/// RST (`tcp_seq` its sequence number) closes an assured flow only inside the close window
/// ([`in_close_window`]); outside, it is delivered and changes nothing.
#[inline(always)]
pub(super) fn flow_in(
    nat: &NatConfig,
    key: &NatKeyV4,
    tcp_flags: u8,
    tcp_seq: u32,
) -> Option<NatEntryV4> {
    let (rev, assured) = either_tier(&SNAT_V4_REV, &SNAT_V4_REV_NEW, key)?;
    // A map value pointer: the entry is writable.
    let rev = rev.cast_mut();
    if assured {
        reply_in::<Assured>(nat, key, rev, tcp_flags, tcp_seq)
    } else {
        reply_in::<Unassured>(nat, key, rev, tcp_flags, tcp_seq)
    }
}

/// [`flow_in`] for the reply entry `rev` of `key`, found in tier `T`.
#[inline(always)]
fn reply_in<T: Tier>(
    nat: &NatConfig,
    key: &NatKeyV4,
    rev: *mut NatEntryV4,
    tcp_flags: u8,
    tcp_seq: u32,
) -> Option<NatEntryV4> {
    // SAFETY: a map value pointer, valid during this program run.
    let e = unsafe { *rev };
    let now = now();
    let ct_key = key.original(e.addr, e.port);
    if nat.is_expired(key.proto, &e, now, !T::NEW) {
        let _ = T::rev().remove(key);
        if let Some(ct) = T::ct().get_ptr(&ct_key) {
            // SAFETY: as above.
            if unsafe { (*ct).port == key.dport } {
                let _ = T::ct().remove(&ct_key);
            }
        }
        return None;
    }
    let mut state = e.state | NAT_S_REPLIED;
    if key.proto == IPPROTO_TCP {
        state = tcp_state(state, tcp_flags) | NAT_S_REPLIED;
    }
    if state == e.state && fresh(e.last_seen, now) {
        return Some(e);
    }
    if !T::NEW
        && state & !e.state & (NAT_S_FIN | NAT_S_RST) != 0
        && let Some(ct) = T::ct().get_ptr(&ct_key)
        // SAFETY: as above.
        && unsafe { (*ct).port == key.dport && !in_close_window(tcp_seq, (*ct).orig_ack) }
    {
        // Not where the pod's stream is: perhaps spoofed. The pod's kernel judges it; the flow
        // stays as it was, unrefreshed. (Unassured flows have no stream to check against yet.)
        count(Reason::NatCloseOutOfWindow, 0);
        return Some(e);
    }
    // SAFETY: as above.
    unsafe {
        (*rev).state = state;
        (*rev).last_seen = now;
    }
    if let Some(ct) = T::ct().get_ptr_mut(&ct_key) {
        // SAFETY: as above.
        unsafe {
            if (*ct).port == key.dport {
                (*ct).state = state;
                (*ct).last_seen = now;
            }
        }
    }
    Some(e)
}

/// Moves the unassured flow `key` (reply tuple `rev_key`) to the assured tier with `assured`
/// as its CT entry and `rev` as its reply entry (both updated for the packet). Both are
/// inserted before either new one is removed, so a concurrent packet of the flow finds it in
/// one tier or the other. False when the assured tier refused (its reply entry is another
/// flow's, or the insert failed): the flow then stays where it is.
#[inline(always)]
fn promote(key: &NatKeyV4, rev_key: &NatKeyV4, assured: &NatEntryV4, rev: &NatEntryV4) -> bool {
    if SNAT_V4_REV
        .insert(rev_key, rev, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Already moved by another CPU's packet of this flow, or the tuple is another's.
        return holds_for(&SNAT_V4_REV, rev_key, key);
    }
    let ours_here = holds_for(&SNAT_V4_REV_NEW, rev_key, key);
    if !ours_here && SNAT_V4_REV_NEW.get_ptr(rev_key).is_some() {
        // Our new reply entry was evicted and the tuple claimed by another flow since.
        let _ = SNAT_V4_REV.remove(rev_key);
        return false;
    }
    if SNAT_V4_CT.insert(key, assured, 0).is_err() {
        let _ = SNAT_V4_REV.remove(rev_key);
        return false;
    }
    if ours_here {
        let _ = SNAT_V4_REV_NEW.remove(rev_key);
    }
    let _ = SNAT_V4_CT_NEW.remove(key);
    true
}

/// The pod's side of the live flow whose reply tuple is `key`, for an ICMP error about it. The
/// error is related to the flow, as conntrack says, not a reply: it neither marks the flow
/// answered nor refreshes it, so an unanswered SYN that a router answers with "unreachable"
/// keeps its short timeout instead of the established one. A dead entry is left to the
/// sweeper.
#[inline(always)]
pub(super) fn flow_related(nat: &NatConfig, key: &NatKeyV4) -> Option<NatEntryV4> {
    let (rev, assured) = either_tier(&SNAT_V4_REV, &SNAT_V4_REV_NEW, key)?;
    // SAFETY: a map value pointer, valid during this program run; copied at once.
    let e = unsafe { *rev };
    (!nat.is_expired(key.proto, &e, now(), assured)).then_some(e)
}

/// Remembers where the later fragments of the datagram whose first fragment `ip` is go: to
/// `orig`, as of `now`.
#[inline(always)]
pub(super) fn remember_fragments(ip: &Ipv4Hdr, orig: NatEntryV4, now: u64) {
    let entry = NatEntryV4 {
        last_seen: now,
        ..orig
    };
    let _ = SNAT_V4_FRAG.insert(&frag_key(ip), &entry, 0);
}

/// Where a later fragment `ip` goes: the originator its first fragment was translated back to,
/// within `NAT_FRAG_TIMEOUT` (an older entry is removed).
#[inline(always)]
pub(super) fn fragment_flow(ip: &Ipv4Hdr, now: u64) -> Option<NatEntryV4> {
    let key = frag_key(ip);
    let entry = SNAT_V4_FRAG.get_ptr(&key)?;
    // SAFETY: a map value pointer, valid during this program run; copied at once.
    let orig = unsafe { *entry };
    if idle_longer_than(orig.last_seen, now, NAT_FRAG_TIMEOUT) {
        let _ = SNAT_V4_FRAG.remove(&key);
        return None;
    }
    Some(orig)
}

/// The live flow whose original-direction key is `key`, translated to `nat_addr`.
#[inline(always)]
pub(super) fn live_flow(
    nat: &NatConfig,
    key: &NatKeyV4,
    nat_addr: [u8; 4],
    now: u64,
) -> Option<NatEntryV4> {
    let (ct, assured) = ct_entry(key)?;
    // SAFETY: a map value pointer, valid during this program run; copied at once.
    let flow = unsafe { *ct };
    if flow.addr != nat_addr || nat.is_expired(key.proto, &flow, now, assured) {
        return None;
    }
    Some(flow)
}
