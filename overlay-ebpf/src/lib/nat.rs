//! Masquerade (`--ip-masq`): flannel's six nat POSTROUTING rules as a source NAT in eBPF.
//!
//! Which packets are masqueraded: `NAT_CONFIG` on, not marked 0x4000/0x4000 (kube-proxy
//! masquerades those itself), not to a destination in `NAT_EXCLUDE_V4`, and either
//! - ([`masquerades`], rule 5) source inside the cluster network, destination outside it, not
//!   multicast (224.0.0.0/4) nor broadcast; or
//! - ([`masquerades_to_cluster`], rule 6, `! -s <cluster> -d <cluster>`) source outside the
//!   cluster network, destination a remote pod (a peer's subnet, so leaving this node).
//!
//! Everything else (pod ↔ cluster, outside → local pod) is never touched, so pods see real pod
//! addresses.
//!
//! Where (layouts in `overlay_common::nat`):
//! - `pod_egress` (tcx ingress of the pod bridge) calls [`snat_from_pod`] for what no peer
//!   route covers. A packet that the kernel would route out of the external interface
//!   (`bpf_fib_lookup`) gets its source rewritten to that interface's address, its TTL
//!   decremented (we replace the forwarding hop) and is sent with `bpf_redirect_neigh`: the
//!   kernel's FORWARD chain (which Docker sets to DROP) is bypassed, as flannel's FORWARD
//!   ACCEPT rules would let it through. What the FIB routes elsewhere (or not at all, a local
//!   address, "fragmentation needed", TTL expiring) goes on to the kernel untouched.
//! - `underlay_egress` (tcx egress of the external interface) calls [`snat_egress`] for what
//!   the kernel routed there itself (e.g. Service traffic after kube-proxy's DNAT): translated
//!   in place, flagged `NAT_E_KERNEL` so the replies go back through the kernel. A reply of a
//!   `NAT_E_TO_CLUSTER` flow (a remote pod answering an outside host, see below) is not a new
//!   flow and is left alone, as conntrack would.
//! - `host_egress` (tcx egress of the host device ovl0) calls [`snat_to_cluster`] for rule 6:
//!   what the kernel sends into the cluster from a non-cluster source, i.e. a host socket bound
//!   to another address (`ping -I <node IP>`) or traffic the node forwards for an outside host
//!   that routes the cluster network through it (the kernel's FORWARD chain has seen that one:
//!   under policy DROP without flannel's `-d <cluster> -j ACCEPT` rule it never gets here). The
//!   source becomes the address flannel's MASQUERADE would pick on the egress device: the host
//!   device's `<subnet>.0` (flannel.1's address) for a VXLAN peer, the external interface's
//!   address for a direct (host-gw, DirectRouting) peer. Flagged `NAT_E_TO_CLUSTER`; the kernel
//!   has routed it already, so the TTL is left alone.
//! - `underlay_ingress` calls [`reverse`] for what decapsulation left alone: a reply to the
//!   node's address matching `SNAT_V4_REV` (TCP, UDP, ICMP echo reply, or an ICMP error whose
//!   inner header is a translated flow) gets the pod's address and port back (inner header and
//!   every checksum too, for errors) and goes to the pod bridge with `bpf_redirect_neigh`
//!   (or to the kernel for `NAT_E_KERNEL` flows). Decapsulation calls
//!   [`reverse_decapsulated`] for VXLAN packets to `<subnet>.0` before it hands them to the host
//!   device. A `NAT_E_TO_CLUSTER` reply gets its original destination back and is routed
//!   (`bpf_fib_lookup`): to a local address (a host socket) it goes on to the host stack; to
//!   anything else (the outside host) it is sent out with `bpf_redirect_neigh`, TTL
//!   decremented, bypassing the kernel's FORWARD chain as `pod_egress` does; an expiring TTL, a
//!   packet too big or no route go to the kernel instead.
//!
//! Flows: a new one gets a port (ICMP: identifier) in `[port_min, port_max]`, at random, or its
//! own first with `NAT_F_KEEP_PORT`; the reply tuple is claimed with `BPF_NOEXIST`, so two flows
//! never share one, retrying up to `NAT_PORT_TRIES` times (then dropped, `drop_nat_exhausted`).
//! Both entries of a flow are refreshed on every packet; an entry idle longer than its timeout
//! (by protocol and TCP state) is dead for the data path at once and swept by the agent.
//!
//! Checksums: the L4 checksum through `bpf_l4_csum_replace` (`BPF_F_PSEUDO_HDR` for addresses,
//! so CHECKSUM_PARTIAL packets from pods — GSO included — stay right; `BPF_F_MARK_MANGLED_0`
//! for UDP, so a zero checksum stays zero), the IPv4 header's with `bpf_l3_csum_replace`; stores
//! do not touch `skb->csum`, each change being compensated by its checksum field. Inside ICMP
//! errors the inner headers' checksums are patched by hand (RFC 1624) and the ICMP checksum
//! follows every changed word (the inner IPv4 header's sum is unchanged by construction).
//!
//! ICMP errors the originator of a flow sends about it (a pod's "port unreachable" for a reply
//! whose socket is gone) are related to the flow, as conntrack says: they leave translated
//! ([`icmp_error_out`]), the packet they quote included, so no pod address leaks out.
//! A pod's UDP to a member node's VXLAN port is dropped instead of translated
//! (`drop_pod_vxlan`): with the node's address it would pass for the node's tunnel traffic.
//!
//! Fragments: later fragments of a pod's datagram get the address only (they carry no ports);
//! the first fragment of a reply, translated back, leaves its datagram's identity in
//! `SNAT_V4_FRAG`, and the later fragments follow it to the same destination (within
//! `NAT_FRAG_TIMEOUT`; fragments that arrive before the first go to the kernel untouched).
//!
//! Limits: IPv4 only; protocols other than TCP, UDP and ICMP echo/errors are not translated
//! (they go on to the kernel untouched). Traffic from
//! outside into the cluster is masqueraded only where the kernel hands it to ovl0: under a
//! FORWARD policy DROP, forwarded traffic from an outside host never gets there (flannel's
//! `-d <cluster> -j ACCEPT` FORWARD rule is not written).

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, TC_ACT_OK,
    },
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, lpm_trie::Key},
    programs::TcContext,
};
use overlay_common::{
    config::Config,
    counters::Reason,
    endpoint::Endpoint,
    nat::{
        IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, KUBE_MASQ_MARK, NAT_CONFIG_INDEX, NAT_CONFIG_LEN,
        NAT_E_KERNEL, NAT_E_TO_CLUSTER, NAT_EXCLUDE_V4_CAPACITY, NAT_F_KEEP_PORT, NAT_FRAG_TIMEOUT,
        NAT_PORT_TRIES, NAT_S_FIN, NAT_S_REPLIED, NAT_S_RST, NatConfig, NatEntryV4, NatKeyV4,
        SNAT_V4_CAPACITY, SNAT_V4_FRAG_CAPACITY, idle_longer_than,
    },
    wire::{ETH_HLEN, ETH_P_IP},
};

use crate::lib::{
    counters::{Role, count, count_handback},
    csum::replace16,
    endpoint::{endpoint_v4, redirect_to_endpoint},
    fib,
    hdr::{EthHdr, Ipv4Hdr},
    maps::{config, in_subnet, is_member},
};

#[map]
static NAT_CONFIG: Array<NatConfig> = Array::with_max_entries(NAT_CONFIG_LEN, 0);
named!(NAT_CONFIG, overlay_common::names::NAT_CONFIG);

#[map]
static NAT_EXCLUDE_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(NAT_EXCLUDE_V4_CAPACITY, 0);
named!(NAT_EXCLUDE_V4, overlay_common::names::NAT_EXCLUDE_V4);

#[map]
static SNAT_V4_CT: LruHashMap<NatKeyV4, NatEntryV4> =
    LruHashMap::with_max_entries(SNAT_V4_CAPACITY, 0);
named!(SNAT_V4_CT, overlay_common::names::SNAT_V4_CT);

#[map]
static SNAT_V4_REV: LruHashMap<NatKeyV4, NatEntryV4> =
    LruHashMap::with_max_entries(SNAT_V4_CAPACITY, 0);
named!(SNAT_V4_REV, overlay_common::names::SNAT_V4_REV);

#[map]
static SNAT_V4_FRAG: LruHashMap<NatKeyV4, NatEntryV4> =
    LruHashMap::with_max_entries(SNAT_V4_FRAG_CAPACITY, 0);
named!(SNAT_V4_FRAG, overlay_common::names::SNAT_V4_FRAG);

const IP_OFF: usize = ETH_HLEN;
const IP_CHECK_OFF: usize = IP_OFF + 10;
const IP_TTL_OFF: usize = IP_OFF + 8;
const IP_SADDR_OFF: usize = IP_OFF + 12;
const IP_DADDR_OFF: usize = IP_OFF + 16;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// Where an address rewrite also patches the L4 checksum: `(offset, bpf_l4_csum_replace flags)`.
/// A plain pair rather than an `Option`: a `None` leaves its payload undefined, and the
/// verifier refuses to see an uninitialised register stored (`!read_ok`).
type L4Csum = (usize, u64);
/// No L4 checksum to patch (offset 0 is the Ethernet header, never an L4 checksum).
const NO_L4_CSUM: L4Csum = (0, 0);

/// The masquerade settings, when masquerade is on.
#[inline(always)]
fn nat_config() -> Option<&'static NatConfig> {
    NAT_CONFIG.get(NAT_CONFIG_INDEX).filter(|c| c.enabled())
}

/// flannel's rules for a packet from `saddr` to `daddr` carrying `mark`, leaving the cluster.
#[inline(always)]
fn masquerades(cfg: &Config, saddr: [u8; 4], daddr: [u8; 4], mark: u32) -> bool {
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
fn masquerades_to_cluster(cfg: &Config, saddr: [u8; 4], daddr: [u8; 4], mark: u32) -> bool {
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
fn nat_ipv4(ctx: &TcContext) -> Option<(&'static NatConfig, Ipv4Hdr, usize)> {
    let nat = nat_config()?;
    let (ip, ihl) = ipv4(ctx)?;
    Some((nat, ip, ihl))
}

#[inline(always)]
fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: the context's skb pointer is valid for the program's run.
    unsafe { (*ctx.skb.skb).mark }
}

#[inline(always)]
fn frag_offset(ip: &Ipv4Hdr) -> u16 {
    u16::from_be_bytes(ip.frag_off) & Ipv4Hdr::OFFSET_MASK
}

/// The first fragment of a fragmented datagram (offset 0, more fragments to come).
#[inline(always)]
fn is_first_fragment(ip: &Ipv4Hdr) -> bool {
    u16::from_be_bytes(ip.frag_off) & Ipv4Hdr::MF_OFFSET_MASK == Ipv4Hdr::MF
}

/// The `SNAT_V4_FRAG` key of the datagram `ip` belongs to: its reassembly identity.
#[inline(always)]
fn frag_key(ip: &Ipv4Hdr) -> NatKeyV4 {
    NatKeyV4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ip.id,
        dport: [0, 0],
        proto: ip.proto,
        _pad: [0; 3],
    }
}

/// The pod bridge's tcx ingress: masquerades `ip` when it leaves through the external
/// interface. `Ok(TC_ACT_OK)` when the packet is not for us.
#[inline(always)]
pub fn snat_from_pod(ctx: &TcContext, cfg: &Config, role: Role) -> Result<i32, Reason> {
    let Some((nat, ip, ihl)) = nat_ipv4(ctx) else {
        return Ok(TC_ACT_OK);
    };
    if !masquerades(cfg, ip.saddr, ip.daddr, mark(ctx)) {
        return Ok(TC_ACT_OK);
    }
    // Only what the kernel would send out of the external interface: that is the address we
    // translate to and the interface whose ingress sees the replies.
    let (rc, fib) = fib::lookup(ctx, cfg.bridge_ifindex, &ip, ip.daddr);
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || fib.ifindex != cfg.underlay_ifindex {
        return Ok(TC_ACT_OK);
    }
    if ip.ttl <= 1 {
        count_handback(role, Reason::StackTtl, ctx.len());
        return Ok(TC_ACT_OK);
    }
    let translated = translate_out(ctx, nat, cfg, &ip, ihl, cfg.local_ip, 0, true)?;
    if !translated {
        return Ok(TC_ACT_OK);
    }
    count(Reason::NatSnat, ctx.len());
    Ok(fib::redirect_neigh(cfg.underlay_ifindex))
}

/// The external interface's tcx egress: masquerades what the kernel routed there itself.
#[inline(always)]
pub fn snat_egress(ctx: &TcContext) -> Result<i32, Reason> {
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK);
    };
    let Some((nat, ip, ihl)) = nat_ipv4(ctx) else {
        return Ok(TC_ACT_OK);
    };
    if !masquerades(cfg, ip.saddr, ip.daddr, mark(ctx)) {
        return Ok(TC_ACT_OK);
    }
    if translate_out(ctx, nat, cfg, &ip, ihl, cfg.local_ip, NAT_E_KERNEL, false)? {
        count(Reason::NatSnat, ctx.len());
    }
    Ok(TC_ACT_OK)
}

/// The host device's tcx egress, for a packet the kernel sends to a remote pod (`ROUTE_V4` has
/// its peer): masquerades it when its source is outside the cluster network (flannel's last
/// rule), to `<subnet>.0` towards a VXLAN peer or to the external interface's address towards
/// a `direct` one. The caller then encapsulates or forwards it.
#[inline(always)]
pub fn snat_to_cluster(ctx: &TcContext, cfg: &Config, direct: bool) -> Result<(), Reason> {
    let Some((nat, ip, ihl)) = nat_ipv4(ctx) else {
        return Ok(());
    };
    if !masquerades_to_cluster(cfg, ip.saddr, ip.daddr, mark(ctx)) {
        return Ok(());
    }
    let nat_addr = if direct { cfg.local_ip } else { cfg.subnet };
    if translate_out(ctx, nat, cfg, &ip, ihl, nat_addr, NAT_E_TO_CLUSTER, false)? {
        count(Reason::NatSnat, ctx.len());
    }
    Ok(())
}

/// Whether `key` (a packet about to be masqueraded at the external interface) is the reply of a
/// live `NAT_E_TO_CLUSTER` flow: a remote pod answering the outside host, after [`reverse`]
/// routed it out (or handed it to the kernel). Such a packet belongs to that flow, as in
/// conntrack, and must keep its pod source.
#[inline(always)]
fn replies_to_cluster_flow(nat: &NatConfig, key: &NatKeyV4, now: u64) -> bool {
    let orig = NatKeyV4 {
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        proto: key.proto,
        _pad: [0; 3],
    };
    match SNAT_V4_CT.get_ptr(&orig) {
        // SAFETY: a map value pointer, valid during this program run.
        Some(ct) => unsafe {
            (*ct).flags & NAT_E_TO_CLUSTER != 0 && !nat.is_expired(key.proto, &*ct, now)
        },
        None => false,
    }
}

/// State bits a TCP packet with `flags` adds; a bare SYN starts the flow over.
#[inline(always)]
fn tcp_state(old: u8, flags: u8) -> u8 {
    let mut state = old;
    if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
        state = 0;
    }
    if flags & TCP_FIN != 0 {
        state |= NAT_S_FIN;
    }
    if flags & TCP_RST != 0 {
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

/// The outbound translation of one packet: finds or creates the flow, then rewrites source
/// address (to `nat_addr`) and port (and the TTL with `hop`). `Ok(false)`: not a protocol we
/// translate, or (at the external interface, `NAT_E_KERNEL`) the reply of a
/// `NAT_E_TO_CLUSTER` flow.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined into three call sites")]
fn translate_out(
    ctx: &TcContext,
    nat: &NatConfig,
    cfg: &Config,
    ip: &Ipv4Hdr,
    ihl: usize,
    nat_addr: [u8; 4],
    eflags: u8,
    hop: bool,
) -> Result<bool, Reason> {
    let l4 = IP_OFF + ihl;
    if frag_offset(ip) != 0 {
        // A later fragment: no ports; every masqueraded flow has the same address.
        rewrite_addr(ctx, IP_SADDR_OFF, ip.saddr, nat_addr, NO_L4_CSUM, hop, ip)?;
        return Ok(true);
    }
    // Ports (ICMP: identifier) and where the L4 checksum is.
    let (sport, dport, csum_off, tcp_flags) = match ip.proto {
        IPPROTO_TCP => {
            // Through the checksum: a header cut before it could not be rewritten.
            let h: [u8; 18] = ctx.load(l4).map_err(|_| Reason::DropNatMalformed)?;
            ([h[0], h[1]], [h[2], h[3]], l4 + 16, h[13])
        }
        IPPROTO_UDP => {
            let h: [u8; 8] = ctx.load(l4).map_err(|_| Reason::DropNatMalformed)?;
            // Translated to our address, a datagram to a member's VXLAN port would pass for
            // this node's own tunnel traffic there: a pod must not speak VXLAN as the node.
            if u16::from_be_bytes([h[2], h[3]]) == cfg.port && is_member(ip.daddr) {
                return Err(Reason::DropPodVxlan);
            }
            ([h[0], h[1]], [h[2], h[3]], l4 + 6, 0)
        }
        IPPROTO_ICMP => {
            let h: [u8; 8] = ctx.load(l4).map_err(|_| Reason::DropNatMalformed)?;
            match h[0] {
                ICMP_ECHO => ([h[4], h[5]], [0, 0], l4 + 2, 0),
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB => {
                    return icmp_error_out(ctx, nat, ip, l4, nat_addr, hop);
                }
                _ => return Ok(false),
            }
        }
        _ => return Ok(false),
    };
    let key = NatKeyV4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        proto: ip.proto,
        _pad: [0; 3],
    };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if eflags & NAT_E_KERNEL != 0 && replies_to_cluster_flow(nat, &key, now) {
        return Ok(false);
    }
    let nat_port = flow_out(nat, cfg, &key, nat_addr, tcp_flags, eflags, now)?;

    // Rewrites, by offset (no packet pointer survives these helpers).
    let port_off = if ip.proto == IPPROTO_ICMP { l4 + 4 } else { l4 };
    let (pseudo, mangled) = match ip.proto {
        IPPROTO_TCP => (BPF_F_PSEUDO_HDR, 0),
        IPPROTO_UDP => (BPF_F_PSEUDO_HDR, BPF_F_MARK_MANGLED_0),
        _ => (0, 0),
    };
    let flags = u64::from(mangled);
    if pseudo != 0 {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(u32::from_ne_bytes(ip.saddr)),
            u64::from(u32::from_ne_bytes(nat_addr)),
            flags | u64::from(pseudo) | 4,
        )
        .map_err(|_| Reason::DropNatFailed)?;
    }
    if nat_port != sport {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(u16::from_ne_bytes(sport)),
            u64::from(u16::from_ne_bytes(nat_port)),
            flags | 2,
        )
        .map_err(|_| Reason::DropNatFailed)?;
        ctx.store(port_off, &nat_port, 0)
            .map_err(|_| Reason::DropNatFailed)?;
    }
    rewrite_addr(ctx, IP_SADDR_OFF, ip.saddr, nat_addr, NO_L4_CSUM, hop, ip)?;
    Ok(true)
}

/// Finds the live flow for `key` (refreshing both of its entries) or creates one; returns the
/// translated port.
#[inline(always)]
fn flow_out(
    nat: &NatConfig,
    cfg: &Config,
    key: &NatKeyV4,
    nat_addr: [u8; 4],
    tcp_flags: u8,
    eflags: u8,
    now: u64,
) -> Result<[u8; 2], Reason> {
    let proto = key.proto;
    let mut state = 0;
    if let Some(ct) = SNAT_V4_CT.get_ptr_mut(key) {
        // SAFETY: a map value pointer, valid during this program run.
        let e = unsafe { *ct };
        if !nat.is_expired(proto, &e, now) && e.addr == nat_addr {
            let st = if proto == IPPROTO_TCP {
                tcp_state(e.state, tcp_flags)
            } else {
                e.state
            };
            let rev_key = key.reply(e.addr, e.port);
            let mine = NatEntryV4 {
                addr: key.saddr,
                port: key.sport,
                state: st,
                flags: e.flags,
                last_seen: now,
            };
            let rev_ok = match SNAT_V4_REV.get_ptr_mut(&rev_key) {
                // SAFETY: as above.
                Some(rev) => unsafe {
                    if (*rev).addr == key.saddr && (*rev).port == key.sport {
                        (*rev).state = st;
                        (*rev).last_seen = now;
                        true
                    } else {
                        false
                    }
                },
                // Evicted (LRU) while the flow lived: claim the reply tuple again.
                None => SNAT_V4_REV
                    .insert(&rev_key, &mine, u64::from(BPF_NOEXIST))
                    .is_ok(),
            };
            if rev_ok {
                // SAFETY: as above.
                unsafe {
                    (*ct).state = st;
                    (*ct).last_seen = now;
                }
                return Ok(e.port);
            }
            // The reply tuple went to another flow: this one needs a new port.
        } else {
            // Dead: free its reply tuple if still ours, then start over.
            let rev_key = key.reply(e.addr, e.port);
            if let Some(rev) = SNAT_V4_REV.get_ptr(&rev_key) {
                // SAFETY: as above.
                if unsafe { (*rev).addr == key.saddr && (*rev).port == key.sport } {
                    let _ = SNAT_V4_REV.remove(&rev_key);
                }
            }
        }
        let _ = SNAT_V4_CT.remove(key);
    }
    if proto == IPPROTO_TCP {
        state = tcp_state(0, tcp_flags);
    }

    let keep = nat.flags & NAT_F_KEEP_PORT != 0;
    let mut chosen: Option<[u8; 2]> = None;
    let mut rev_entry = NatEntryV4 {
        addr: key.saddr,
        port: key.sport,
        state,
        flags: eflags,
        last_seen: now,
    };
    for i in 0..NAT_PORT_TRIES {
        let port = if i == 0 && keep {
            u16::from_be_bytes(key.sport)
        } else {
            random_port(nat)
        };
        // The VXLAN port is decapsulation's; 0 is no port.
        if port == 0 || (proto == IPPROTO_UDP && port == cfg.port) {
            continue;
        }
        let port = port.to_be_bytes();
        rev_entry.last_seen = now;
        if SNAT_V4_REV
            .insert(
                &key.reply(nat_addr, port),
                &rev_entry,
                u64::from(BPF_NOEXIST),
            )
            .is_ok()
        {
            chosen = Some(port);
            break;
        }
    }
    let Some(port) = chosen else {
        return Err(Reason::DropNatExhausted);
    };
    let ct_entry = NatEntryV4 {
        addr: nat_addr,
        port,
        state,
        flags: eflags,
        last_seen: now,
    };
    if SNAT_V4_CT
        .insert(key, &ct_entry, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Another CPU created the flow meanwhile: use its port, give ours back.
        let _ = SNAT_V4_REV.remove(&key.reply(nat_addr, port));
        return match SNAT_V4_CT.get_ptr(key) {
            // SAFETY: as above.
            Some(ct) => Ok(unsafe { (*ct).port }),
            None => Err(Reason::DropNatFailed),
        };
    }
    count(Reason::NatNewFlow, 0);
    Ok(port)
}

/// Rewrites the address at `off` (source or destination) from `old` to `new` with the IPv4
/// checksum, the L4 checksum at `l4_csum` (`(offset, flags)`, pseudo-header) unless it is
/// [`NO_L4_CSUM`], and
/// decrements the TTL when `hop`.
#[inline(always)]
fn rewrite_addr(
    ctx: &TcContext,
    off: usize,
    old: [u8; 4],
    new: [u8; 4],
    l4_csum: L4Csum,
    hop: bool,
    ip: &Ipv4Hdr,
) -> Result<(), Reason> {
    let (old32, new32) = (
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
    );
    let (csum_off, flags) = l4_csum;
    if csum_off != 0 {
        ctx.l4_csum_replace(
            csum_off,
            old32,
            new32,
            flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
        )
        .map_err(|_| Reason::DropNatFailed)?;
    }
    ctx.l3_csum_replace(IP_CHECK_OFF, old32, new32, 4)
        .map_err(|_| Reason::DropNatFailed)?;
    ctx.store(off, &new, 0).map_err(|_| Reason::DropNatFailed)?;
    if hop {
        let old_w = [ip.ttl, ip.proto];
        let new_w = [ip.ttl - 1, ip.proto];
        ctx.l3_csum_replace(
            IP_CHECK_OFF,
            u64::from(u16::from_ne_bytes(old_w)),
            u64::from(u16::from_ne_bytes(new_w)),
            2,
        )
        .map_err(|_| Reason::DropNatFailed)?;
        ctx.store(IP_TTL_OFF, &new_w[0], 0)
            .map_err(|_| Reason::DropNatFailed)?;
    }
    Ok(())
}

/// `underlay_ingress`, for what decapsulation left to the kernel: translates replies (and ICMP
/// errors about flows) to the node's address back to the pod (or the outside source).
/// `Ok(TC_ACT_OK)` when the packet is not ours, or is translated and goes on to the kernel.
#[inline(always)]
pub fn reverse(ctx: &TcContext) -> Result<i32, Reason> {
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK);
    };
    reverse_to(ctx, cfg, cfg.local_ip)
}

/// Decapsulation, for a packet to the host device's address `<subnet>.0` (after the outer
/// headers are gone): translates replies of `NAT_E_TO_CLUSTER` flows back. `Ok(TC_ACT_OK)`:
/// not ours, or translated for the host stack: the caller hands it to the host device either
/// way.
#[inline(always)]
pub fn reverse_decapsulated(ctx: &TcContext, cfg: &Config) -> Result<i32, Reason> {
    reverse_to(ctx, cfg, cfg.subnet)
}

/// Translates back a reply to `nat_addr` (a translated source address of ours).
#[inline(always)]
fn reverse_to(ctx: &TcContext, cfg: &Config, nat_addr: [u8; 4]) -> Result<i32, Reason> {
    let Some((nat, ip, ihl)) = nat_ipv4(ctx) else {
        return Ok(TC_ACT_OK);
    };
    if ip.daddr != nat_addr {
        return Ok(TC_ACT_OK);
    }
    if frag_offset(&ip) != 0 {
        return reverse_later_fragment(ctx, cfg, &ip);
    }
    let l4 = IP_OFF + ihl;
    let (sport, dport, csum_off, tcp_flags) = match ip.proto {
        IPPROTO_TCP => {
            let Ok(h) = ctx.load::<[u8; 18]>(l4) else {
                return Ok(TC_ACT_OK);
            };
            ([h[0], h[1]], [h[2], h[3]], l4 + 16, h[13])
        }
        IPPROTO_UDP => {
            let Ok(h) = ctx.load::<[u8; 8]>(l4) else {
                return Ok(TC_ACT_OK);
            };
            ([h[0], h[1]], [h[2], h[3]], l4 + 6, 0)
        }
        IPPROTO_ICMP => {
            let Ok(h) = ctx.load::<[u8; 8]>(l4) else {
                return Ok(TC_ACT_OK);
            };
            match h[0] {
                ICMP_ECHO_REPLY => ([0, 0], [h[4], h[5]], l4 + 2, 0),
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB => {
                    return icmp_error_reverse(ctx, nat, cfg, &ip, l4);
                }
                _ => return Ok(TC_ACT_OK),
            }
        }
        _ => return Ok(TC_ACT_OK),
    };
    let key = NatKeyV4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        proto: ip.proto,
        _pad: [0; 3],
    };
    let Some(orig) = flow_in(nat, &key, tcp_flags) else {
        return Ok(TC_ACT_OK);
    };
    if is_first_fragment(&ip) {
        // The later fragments carry no ports: they follow this one by the datagram's identity.
        // SAFETY: no arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        let entry = NatEntryV4 {
            last_seen: now,
            ..orig
        };
        let _ = SNAT_V4_FRAG.insert(&frag_key(&ip), &entry, 0);
    }

    let port_off = if ip.proto == IPPROTO_ICMP {
        l4 + 4
    } else {
        l4 + 2
    };
    let mangled = if ip.proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    if orig.port != dport {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(u16::from_ne_bytes(dport)),
            u64::from(u16::from_ne_bytes(orig.port)),
            mangled | 2,
        )
        .map_err(|_| Reason::DropNatFailed)?;
        ctx.store(port_off, &orig.port, 0)
            .map_err(|_| Reason::DropNatFailed)?;
    }
    let l4_csum = if ip.proto == IPPROTO_ICMP {
        NO_L4_CSUM
    } else {
        (csum_off, mangled)
    };
    deliver(ctx, cfg, &ip, orig, l4_csum)
}

/// A later fragment of a reply whose first fragment was translated back (`SNAT_V4_FRAG`, within
/// `NAT_FRAG_TIMEOUT`): the same destination, delivered the same way; its ports and L4
/// checksum are in the first fragment. Fragments that arrive before the first one, or of
/// datagrams never translated, go on to the kernel untouched.
#[inline(always)]
fn reverse_later_fragment(ctx: &TcContext, cfg: &Config, ip: &Ipv4Hdr) -> Result<i32, Reason> {
    let key = frag_key(ip);
    let Some(entry) = SNAT_V4_FRAG.get_ptr(&key) else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: a map value pointer, valid during this program run; copied at once.
    let orig = unsafe { *entry };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if idle_longer_than(orig.last_seen, now, NAT_FRAG_TIMEOUT) {
        let _ = SNAT_V4_FRAG.remove(&key);
        return Ok(TC_ACT_OK);
    }
    deliver(ctx, cfg, ip, orig, NO_L4_CSUM)
}

/// Rewrites the destination to the pod and sends the packet to it (or to the kernel).
#[inline(always)]
fn deliver(
    ctx: &TcContext,
    cfg: &Config,
    ip: &Ipv4Hdr,
    orig: NatEntryV4,
    l4_csum: L4Csum,
) -> Result<i32, Reason> {
    if orig.flags & NAT_E_TO_CLUSTER != 0 {
        return route_back(ctx, cfg, ip, orig, l4_csum);
    }
    // Straight into the pod when its endpoint is known, else through the bridge. An unknown
    // endpoint is all zeroes (interface index 0), not a `None` held across the helper calls
    // below: its undefined payload would be spilled, which the verifier refuses (`!read_ok`).
    let endpoint = endpoint_v4(orig.addr).unwrap_or(Endpoint::new(0, [0; 6]));
    let egress = if endpoint.ifindex != 0 {
        endpoint.ifindex
    } else {
        cfg.bridge_ifindex
    };
    // Through the kernel: `NAT_E_KERNEL` flows, an expiring TTL (it answers "time exceeded"),
    // no bridge, or a packet too big for the pod (the kernel fragments or answers).
    let to_kernel =
        orig.flags & NAT_E_KERNEL != 0 || ip.ttl <= 1 || egress == 0 || !fib::fits(ctx, egress);
    rewrite_addr(
        ctx,
        IP_DADDR_OFF,
        ip.daddr,
        orig.addr,
        l4_csum,
        !to_kernel,
        ip,
    )?;
    count(Reason::NatRev, ctx.len());
    if to_kernel {
        return Ok(TC_ACT_OK);
    }
    if endpoint.ifindex != 0 {
        count(Reason::NatRevEndpoint, ctx.len());
        return redirect_to_endpoint(ctx, cfg, &endpoint).ok_or(Reason::DropNatFailed);
    }
    Ok(fib::redirect_neigh(cfg.bridge_ifindex))
}

/// A reply of a `NAT_E_TO_CLUSTER` flow: rewrites the destination to the original source and
/// routes it there. A local address (a host socket) goes on to the host stack (`TC_ACT_OK`);
/// anything else is forwarded with `bpf_redirect_neigh` (TTL decremented: we are the
/// forwarding hop, so the kernel's FORWARD chain is bypassed), or handed to the kernel when the
/// TTL expires, the packet is too big for the egress device or the FIB has no route.
#[inline(always)]
fn route_back(
    ctx: &TcContext,
    cfg: &Config,
    ip: &Ipv4Hdr,
    orig: NatEntryV4,
    l4_csum: L4Csum,
) -> Result<i32, Reason> {
    let (rc, fib) = fib::lookup(ctx, cfg.underlay_ifindex, ip, orig.addr);
    // NOT_FWDED (a local destination) and every failure: the kernel's.
    let forward =
        rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) && ip.ttl > 1 && fib::fits(ctx, fib.ifindex);
    rewrite_addr(ctx, IP_DADDR_OFF, ip.daddr, orig.addr, l4_csum, forward, ip)?;
    count(Reason::NatRev, ctx.len());
    if !forward {
        return Ok(TC_ACT_OK);
    }
    Ok(fib::redirect_neigh(fib.ifindex))
}

/// Looks up the reply tuple `key`; refreshes both entries of a live flow and returns the pod's
/// side. A dead flow is removed (the packet then goes to the kernel, as without an entry).
#[inline(always)]
fn flow_in(nat: &NatConfig, key: &NatKeyV4, tcp_flags: u8) -> Option<NatEntryV4> {
    let rev = SNAT_V4_REV.get_ptr_mut(key)?;
    // SAFETY: a map value pointer, valid during this program run.
    let e = unsafe { *rev };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let ct_key = key.original(e.addr, e.port);
    if nat.is_expired(key.proto, &e, now) {
        let _ = SNAT_V4_REV.remove(key);
        if let Some(ct) = SNAT_V4_CT.get_ptr(&ct_key) {
            // SAFETY: as above.
            if unsafe { (*ct).port == key.dport } {
                let _ = SNAT_V4_CT.remove(&ct_key);
            }
        }
        return None;
    }
    let mut state = e.state | NAT_S_REPLIED;
    if key.proto == IPPROTO_TCP {
        state = tcp_state(state, tcp_flags) | NAT_S_REPLIED;
    }
    // SAFETY: as above.
    unsafe {
        (*rev).state = state;
        (*rev).last_seen = now;
    }
    if let Some(ct) = SNAT_V4_CT.get_ptr_mut(&ct_key) {
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

/// An ICMP error to a translated address of ours about a translated flow: the embedded header
/// (what we sent: translated address and port → remote) is given the originator's address and
/// port back, with its own checksums, the ICMP checksum and the outer destination.
#[inline(always)]
fn icmp_error_reverse(
    ctx: &TcContext,
    nat: &NatConfig,
    cfg: &Config,
    ip: &Ipv4Hdr,
    l4: usize,
) -> Result<i32, Reason> {
    let inner = l4 + 8;
    let Ok(iip) = ctx.load::<Ipv4Hdr>(inner) else {
        return Ok(TC_ACT_OK);
    };
    if iip.ver_ihl != Ipv4Hdr::VER_IHL_NO_OPTIONS || iip.saddr != ip.daddr {
        return Ok(TC_ACT_OK);
    }
    let il4 = inner + 20;
    let Ok(ih) = ctx.load::<[u8; 8]>(il4) else {
        return Ok(TC_ACT_OK);
    };
    // The inner packet went from us to the remote: its reply tuple is the reverse.
    let (sport, dport, port_off, inner_csum_off) = match iip.proto {
        IPPROTO_TCP => ([ih[2], ih[3]], [ih[0], ih[1]], il4, il4 + 16),
        IPPROTO_UDP => ([ih[2], ih[3]], [ih[0], ih[1]], il4, il4 + 6),
        IPPROTO_ICMP if ih[0] == ICMP_ECHO => ([0, 0], [ih[4], ih[5]], il4 + 4, il4 + 2),
        _ => return Ok(TC_ACT_OK),
    };
    let key = NatKeyV4 {
        saddr: iip.daddr,
        daddr: iip.saddr,
        sport,
        dport,
        proto: iip.proto,
        _pad: [0; 3],
    };
    let Some(orig) = flow_in(nat, &key, 0) else {
        return Ok(TC_ACT_OK);
    };
    // The quoted packet's source (us, translated) and port become the originator's again.
    let side = QuotedSide {
        addr_off: 12,
        old_addr: iip.saddr,
        new_addr: orig.addr,
        port_off,
        old_port: key.dport,
        new_port: orig.port,
    };
    rewrite_quote(ctx, l4, inner_csum_off, &iip, &side)?;

    // The outer destination (ICMP has no pseudo-header).
    deliver(ctx, cfg, ip, orig, NO_L4_CSUM)
}

/// An ICMP error that a masqueraded flow's originator sends about a packet of that flow it
/// received (a pod answering "port unreachable" to a translated reply; an outside host
/// answering a remote pod's reply): related to the flow, as conntrack would say, so it leaves
/// translated like the flow (`nat_addr`, the outer source), and the packet it quotes (the
/// reply, addressed to the originator) gets the translated address and port back, with its own
/// checksums and the ICMP checksum. `Ok(false)` when the quoted packet belongs to no live flow
/// translated to `nat_addr` (it then goes on as it is: nothing of it was translated).
#[inline(always)]
fn icmp_error_out(
    ctx: &TcContext,
    nat: &NatConfig,
    ip: &Ipv4Hdr,
    l4: usize,
    nat_addr: [u8; 4],
    hop: bool,
) -> Result<bool, Reason> {
    let inner = l4 + 8;
    let Ok(iip) = ctx.load::<Ipv4Hdr>(inner) else {
        return Ok(false);
    };
    if iip.ver_ihl != Ipv4Hdr::VER_IHL_NO_OPTIONS || iip.daddr != ip.saddr {
        return Ok(false);
    }
    let il4 = inner + 20;
    let Ok(ih) = ctx.load::<[u8; 8]>(il4) else {
        return Ok(false);
    };
    // The quoted packet came from the remote to the originator: the reverse of the flow's key.
    // The originator's side is its destination port (ICMP: the echo reply's identifier).
    let (sport, dport, port_off, inner_csum_off) = match iip.proto {
        IPPROTO_TCP => ([ih[2], ih[3]], [ih[0], ih[1]], il4 + 2, il4 + 16),
        IPPROTO_UDP => ([ih[2], ih[3]], [ih[0], ih[1]], il4 + 2, il4 + 6),
        IPPROTO_ICMP if ih[0] == ICMP_ECHO_REPLY => ([ih[4], ih[5]], [0, 0], il4 + 4, il4 + 2),
        _ => return Ok(false),
    };
    let key = NatKeyV4 {
        saddr: iip.daddr,
        daddr: iip.saddr,
        sport,
        dport,
        proto: iip.proto,
        _pad: [0; 3],
    };
    let Some(ct) = SNAT_V4_CT.get_ptr(&key) else {
        return Ok(false);
    };
    // SAFETY: a map value pointer, valid during this program run; copied at once.
    let flow = unsafe { *ct };
    // SAFETY: no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if flow.addr != nat_addr || nat.is_expired(key.proto, &flow, now) {
        return Ok(false);
    }
    // The quoted packet's destination (the originator) and port become the translated ones.
    let side = QuotedSide {
        addr_off: 16,
        old_addr: iip.daddr,
        new_addr: nat_addr,
        port_off,
        old_port: sport,
        new_port: flow.port,
    };
    rewrite_quote(ctx, l4, inner_csum_off, &iip, &side)?;

    // The outer source (ICMP has no pseudo-header).
    rewrite_addr(ctx, IP_SADDR_OFF, ip.saddr, nat_addr, NO_L4_CSUM, hop, ip)?;
    Ok(true)
}

/// The side of a packet quoted by an ICMP error that a translation rewrites: the address at
/// `addr_off` in the quoted IPv4 header (12 source, 16 destination) and the port (ICMP: the
/// identifier) at `port_off` in the packet.
struct QuotedSide {
    addr_off: usize,
    old_addr: [u8; 4],
    new_addr: [u8; 4],
    port_off: usize,
    old_port: [u8; 2],
    new_port: [u8; 2],
}

/// Rewrites `side` of the packet quoted by the ICMP error whose header is at `l4` (`iip`, the
/// quoted IPv4 header, read before): the address with the quoted header's checksum (their sum
/// stays the same, so does the ICMP checksum), the port, and, where the error carries it, the
/// quoted L4 checksum at `inner_csum_off` (pseudo-header for TCP/UDP; a zero UDP checksum stays
/// zero). Every other changed word moves the ICMP checksum.
#[inline(always)]
fn rewrite_quote(
    ctx: &TcContext,
    l4: usize,
    inner_csum_off: usize,
    iip: &Ipv4Hdr,
    side: &QuotedSide,
) -> Result<(), Reason> {
    let icmp_csum_off = l4 + 2;
    let inner = l4 + 8;
    let (old_a, new_a) = (side.old_addr, side.new_addr);
    let w = |a: [u8; 4], i: usize| u16::from_be_bytes([a[i], a[i + 1]]);

    let mut icheck = replace16(iip.check, w(old_a, 0), w(new_a, 0));
    icheck = replace16(icheck, w(old_a, 2), w(new_a, 2));
    ctx.store(inner + side.addr_off, &new_a, 0)
        .map_err(|_| Reason::DropNatFailed)?;
    ctx.store(inner + 10, &icheck, 0)
        .map_err(|_| Reason::DropNatFailed)?;

    if let Ok(old_c) = ctx.load::<[u8; 2]>(inner_csum_off) {
        let udp_zero = iip.proto == IPPROTO_UDP && old_c == [0, 0];
        if !udp_zero {
            let mut c = replace16(
                old_c,
                u16::from_be_bytes(side.old_port),
                u16::from_be_bytes(side.new_port),
            );
            if iip.proto != IPPROTO_ICMP {
                c = replace16(c, w(old_a, 0), w(new_a, 0));
                c = replace16(c, w(old_a, 2), w(new_a, 2));
            }
            if iip.proto == IPPROTO_UDP && c == [0, 0] {
                c = [0xff, 0xff];
            }
            ctx.l4_csum_replace(
                icmp_csum_off,
                u64::from(u16::from_ne_bytes(old_c)),
                u64::from(u16::from_ne_bytes(c)),
                2,
            )
            .map_err(|_| Reason::DropNatFailed)?;
            ctx.store(inner_csum_off, &c, 0)
                .map_err(|_| Reason::DropNatFailed)?;
        }
    }
    ctx.l4_csum_replace(
        icmp_csum_off,
        u64::from(u16::from_ne_bytes(side.old_port)),
        u64::from(u16::from_ne_bytes(side.new_port)),
        2,
    )
    .map_err(|_| Reason::DropNatFailed)?;
    ctx.store(side.port_off, &side.new_port, 0)
        .map_err(|_| Reason::DropNatFailed)
}
