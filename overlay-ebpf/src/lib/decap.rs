//! VXLAN decapsulation on the underlay's ingress: `underlay_ingress` (tcx) and, where the
//! external interface runs it, `underlay_xdp` (native XDP, before GRO).
//!
//! Hook: tcx ingress of the external interface, before the IP stack. A frame is ours when it is
//! option-less IPv4 to our interface address or our PublicIP (`--public-ip`, which a NAT in
//! front of the node may or may not rewrite), UDP to the configured VXLAN port; everything else
//! (including what we cannot recognise, like non-first fragments or IP options, which Linux never
//! puts on VXLAN) goes on to the kernel untouched. Ours is then either delivered or dropped and
//! counted, except a fragment: we send with DF clear, as flannel.1 does, so an underlay path
//! with a smaller MTU fragments our datagrams; their first fragments are counted
//! (`to_stack_fragment`) and all go to the kernel, which reassembles the datagram for the GRO
//! device's socket, where `gro_device_ingress` makes the same checks on what the kernel
//! decapsulated and delivers it the same way ([`try_gro_device_ingress`]).
//!
//! Checks, in order ([`check_vxlan`]): outer IPv4 checksum
//! (the IP layer that would verify it runs after us), lengths (the frame holds what IP and UDP
//! announce, which holds VXLAN + inner Ethernet + an IPv4 header), VXLAN flags exactly 0x08
//! with zero reserved bits (as the kernel's VXLAN device demands without GBP/GPE), our VNI, an
//! outer source that is a member node's PublicIP (`NODE_V4`), inner destination MAC = our
//! VtepMAC, inner IPv4 with a header the kernel's `ip_rcv` would accept (version, header and
//! total lengths within what the frame carries, header checksum; `drop_malformed`), and an
//! inner source the sending member may speak for: outside the cluster network, or in one of
//! that member's own subnets (`ROUTE_V4`; `drop_inner_source`). The TC and XDP paths share
//! these checks, so both enforce them.
//!
//! Delivery of the inner packet `d`:
//! - `d` = our subnet's `.0` (the host device's address, which flannel gives flannel.1) or its
//!   gateway `.1` (the bridge's own address, which `bpf_redirect_neigh` cannot reach: it would
//!   ARP for it on the bridge) → ingress of the host device, MACs rewritten so the stack takes it
//!   as addressed to that device; the host stack does the rest, as after flannel.1. With
//!   `--ip-masq`, a reply to `.0` of a flow masqueraded into the cluster (`lib::nat`,
//!   `NAT_E_TO_CLUSTER`) is first translated back to its original destination: a host socket's
//!   address goes on to the host device likewise, an outside host's is routed out directly.
//! - other `d` in our subnet: a pod. With an entry in `ENDPOINT_V4` (`lib::endpoint`) it goes
//!   straight into the pod's namespace (`bpf_redirect_peer`, `decap_endpoint`); without one
//!   (a pod the agent has not seen yet) `bpf_redirect_neigh` to the pod bridge, where the kernel
//!   resolves the pod's MAC and the bridge forwards to its port (`decap_pod`, marked as ours
//!   for `pod_ingress`). This replaces
//!   the kernel's forwarding hop, so the inner TTL is decremented here (a packet whose TTL would
//!   expire goes to the host device instead, so the kernel answers ICMP time exceeded). A
//!   packet of a flow the kernel forwarded for the pod (`lib::kernel_flow`: a Service
//!   endpoint's reply, which kube-proxy's conntrack must give the Service address back) goes
//!   to the host device too, untouched (`to_stack_kernel_flow`). A packet from outside the
//!   cluster network (an outside host's, forwarded by a member without `--ip-masq`) has its
//!   connection filed (`KERNEL_FLOW_IN_DIRECT`), so that `--ip-masq` here leaves the pod's
//!   replies untranslated, as flannel's MASQUERADE does for a connection it did not start.
//! - anything else → dropped (`DropNotLocal`): peers only send us our subnet.
//!
//! ECN follows RFC 6040 as the kernel's `INET_ECN_decapsulate` (`ipv4::decapsulate_ecn`). The
//! outer UDP checksum is not verified (zero is allowed; the inner packet carries its own
//! checksums). The 50 bytes go with `bpf_skb_adjust_room(-50, BPF_ADJ_ROOM_MAC)`:
//! `BPF_F_ADJ_ROOM_FIXED_GSO` keeps a GSO packet's MSS, which describes the inner TCP segments
//! and must not grow by the 50 bytes removed; `BPF_F_ADJ_ROOM_DECAP_L3_IPV4` states the new
//! network protocol; where the kernel accepts `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (the agent probes
//! it at load time, `CONFIG_F_DECAP_L4_UDP`), it also clears the sender's UDP-tunnel GSO state.
//!
//! GSO: GSO packets arrive here when the underlay passes the sender's super-packets whole, as
//! veth does. Without `DECAP_L4_UDP` (kernel 6.18) the decapsulated packet keeps the sender's
//! tunnel GSO type; a transmit through the pod bridge (which has no encapsulation offloads)
//! would then segment and checksum it in software. Delivery into the pod with
//! `bpf_redirect_peer` has no transmit path, so the pod's TCP receives the super-packet whole.
//!
//! With frames arriving MTU-sized (real NICs, or a veth underlay without TSO), GRO runs before
//! TC. It aggregates VXLAN only for a port with a tunnel socket, which the agent's GRO device
//! (`ovl-gro`, a kernel VXLAN device in collect-metadata mode whose own deliveries
//! `gro_device_ingress` drops, except reassembled fragments) provides: GRO then merges frames
//! of one inner flow with equal outer and inner headers, and the aggregate arrives here as a
//! tunnel GSO packet, checked and decapsulated as one, like a veth's super-packet.
//!
//! XDP (`underlay_xdp`, [`xdp_decapsulate`], only with `--xdp on`): native XDP runs before GRO
//! instead: it makes every check
//! above, strips the 50 bytes (and applies ECN) so GRO aggregates the inner flow, and marks the
//! frame in its metadata with the per-load cookie of `CONFIG`. `underlay_ingress` delivers a
//! frame with that mark as decapsulated ([`deliver_decapsulated`]); XDP never drops: what fails
//! a check goes on unchanged and `underlay_ingress` drops and counts it as above.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_tunnel_key, xdp_action,
    },
    helpers::{bpf_skb_get_tunnel_key, bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    config::Config,
    counters::Reason,
    endpoint::Endpoint,
    wire::{
        ETH_HLEN, ETH_P_IP, FRAGMENT_MARK, IPPROTO_UDP, IPV4_HLEN, UDP_HLEN, VXLAN_FLAGS_I,
        VXLAN_HLEN, VXLAN_OVERHEAD,
    },
};

use crate::lib::{
    counters::{Step, count},
    csum::{ipv4_checksum_ok, ipv4_header_checksum_ok},
    endpoint::{endpoint_v4, redirect_to_bridge, redirect_to_endpoint},
    fib,
    hdr::{EthHdr, Ipv4Hdr, UdpHdr, VxlanHdr},
    ipv4::{decapsulate_ecn, decrement_ttl, eth_ipv4},
    kernel_flow::{file_delivered_directly, is_kernel_flow},
    maps::{config, in_subnet, is_member, route_v4},
    nat,
    ptr::{Packet, ptr_at, pull_headers, skb_mark},
};

const UDP_OFF: usize = ETH_HLEN + IPV4_HLEN;
const VXLAN_OFF: usize = UDP_OFF + UDP_HLEN;
const INNER_ETH_OFF: usize = VXLAN_OFF + VXLAN_HLEN;
const INNER_IP_OFF: usize = INNER_ETH_OFF + ETH_HLEN;
/// Headers read by the checks, from the outer Ethernet header to the end of the inner IPv4 one.
const HEADERS_LEN: usize = INNER_IP_OFF + IPV4_HLEN;
/// The smallest outer IPv4 total length that holds VXLAN and an inner IPv4 header.
const MIN_OUTER_IP_LEN: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN + IPV4_HLEN;

/// `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (uapi `1 << 10`), newer than the bindings: used only where
/// the agent's probe found the running kernel accepts it.
pub const BPF_F_ADJ_ROOM_DECAP_L4_UDP: u64 = 1 << 10;
const DECAP_FLAGS: u64 = (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4) as u64;

/// What `underlay_xdp` writes into the metadata in front of a frame it decapsulated.
#[repr(C)]
#[derive(Clone, Copy)]
struct XdpMark {
    /// `Config::xdp_cookie` of the load that decapsulated the frame.
    cookie: u32,
    _reserved: u32,
}
const XDP_MARK_LEN: i32 = size_of::<XdpMark>() as i32;

/// Where a decapsulated packet goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// A local pod: straight in (with an endpoint) or through the bridge.
    Pod,
    /// The host stack, through the host device's ingress.
    Host,
    /// The host stack because the TTL expires here (the kernel answers ICMP time exceeded).
    HostTtl,
    /// The host stack because the packet belongs to a flow the kernel forwarded for the pod
    /// (`lib::kernel_flow`): its conntrack undoes the flow's NAT on the way in.
    HostKernelFlow,
}

/// The delivery decided for a decapsulated packet, before the packet is changed.
#[derive(Clone, Copy)]
struct Plan {
    target: Target,
    endpoint: Option<Endpoint>,
    /// A pod's packet from outside the cluster network, whose connection is filed on delivery.
    from_outside: bool,
}

/// The body of `underlay_ingress`: `Ok(verdict)` or the drop reason.
#[inline(always)]
pub fn try_underlay_ingress(ctx: &TcContext) -> Result<i32, Reason> {
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK);
    };
    if !cfg.vxlan_enabled() {
        // host-gw: no VXLAN on this node; the kernel has no socket for it either.
        return Ok(TC_ACT_OK);
    }
    if marked_by_xdp(ctx, cfg) {
        return deliver_decapsulated(ctx, cfg);
    }
    // Short packets fail the checks below.
    pull_headers(ctx, HEADERS_LEN);

    let Some((ip, _)) = vxlan_for_us(ctx, cfg) else {
        return Ok(TC_ACT_OK);
    };
    if is_fragment(&ip) {
        // The kernel reassembles the datagram for the GRO device's socket, whose program
        // makes the checks below and delivers it (`try_gro_device_ingress`), if it carries
        // this mark: the reassembled packet keeps the first fragment's.
        count(Reason::StackFragment, ctx.len());
        ctx.set_mark(FRAGMENT_MARK);
        return Ok(TC_ACT_OK);
    }
    // VXLAN to our port: from here on, deliver or drop.
    let (inner_eth, inner_ip) = check_vxlan(ctx, cfg, &ip, ctx.len() as usize)?;
    // SAFETY: a checked pointer, read before any helper moves data.
    let inner = unsafe { *inner_ip };
    let daddr = inner.daddr;
    let plan = plan(ctx, cfg, INNER_IP_OFF, &inner)?;
    // SAFETY: `inner_ip` is a checked pointer, still valid: no helper has moved data yet.
    unsafe { decapsulate_ecn(ip.tos, inner_ip)? };
    if plan.target == Target::Pod {
        // SAFETY: as above; `plan` guarantees ttl > 1.
        unsafe { decrement_ttl(inner_ip) };
    }

    let flags = if cfg.decap_clears_tunnel_gso() {
        DECAP_FLAGS | BPF_F_ADJ_ROOM_DECAP_L4_UDP
    } else {
        DECAP_FLAGS
    };
    ctx.adjust_room(-(VXLAN_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Reason::DropDecapFailed)?;
    deliver(ctx, cfg, plan, daddr, inner_eth.src)
}

/// The outer IPv4 and UDP headers when the frame is VXLAN for us: option-less IPv4 to one of
/// our addresses (the interface's, or the PublicIP peers send to, which a NAT in front of us
/// may leave as it is), not a later fragment (no UDP header to recognise), UDP to our port.
#[inline(always)]
fn vxlan_for_us(ctx: &impl Packet, cfg: &Config) -> Option<(Ipv4Hdr, UdpHdr)> {
    let (_, ip) = eth_ipv4(ctx)?;
    // SAFETY: a checked pointer from `eth_ipv4`, read before any helper moves data.
    let ip = unsafe { *ip };
    if ip.ver_ihl != Ipv4Hdr::VER_IHL_NO_OPTIONS
        || ip.proto != IPPROTO_UDP
        || !cfg.is_own_address(ip.daddr)
        || u16::from_be_bytes(ip.frag_off) & Ipv4Hdr::OFFSET_MASK != 0
    {
        return None;
    }
    // SAFETY: a checked pointer, read at once.
    let udp = unsafe { *ptr_at::<UdpHdr>(ctx, UDP_OFF)? };
    (udp.dest == cfg.port.to_be_bytes()).then_some((ip, udp))
}

/// Whether the outer header `ip` is of a fragment (the first one; `vxlan_for_us` recognises no
/// later one): the kernel reassembles those.
#[inline(always)]
fn is_fragment(ip: &Ipv4Hdr) -> bool {
    u16::from_be_bytes(ip.frag_off) & Ipv4Hdr::MF_OFFSET_MASK != 0
}

/// Every check of VXLAN for us (see the module note), on an unfragmented frame of `frame_len` bytes whose
/// outer IPv4 header is `ip`: the inner Ethernet header and a checked pointer to the inner
/// IPv4 header (valid until a helper moves packet data), or why the frame must be dropped.
#[inline(always)]
fn check_vxlan(
    ctx: &impl Packet,
    cfg: &Config,
    ip: &Ipv4Hdr,
    frame_len: usize,
) -> Result<(EthHdr, *mut Ipv4Hdr), Reason> {
    if !ipv4_checksum_ok(ip) {
        return Err(Reason::DropBadChecksum);
    }
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if tot_len + ETH_HLEN > frame_len || tot_len < MIN_OUTER_IP_LEN {
        return Err(Reason::DropTruncated);
    }
    let udp = ptr_at::<UdpHdr>(ctx, UDP_OFF).ok_or(Reason::DropTruncated)?;
    // SAFETY: a checked pointer, read before any helper moves data.
    if usize::from(u16::from_be_bytes(unsafe { (*udp).len })) != tot_len - IPV4_HLEN {
        return Err(Reason::DropMalformed);
    }
    // SAFETY: a checked pointer, read at once.
    let vxlan = unsafe { *ptr_at::<VxlanHdr>(ctx, VXLAN_OFF).ok_or(Reason::DropTruncated)? };
    if vxlan.flags != [VXLAN_FLAGS_I, 0, 0, 0] || vxlan.vni[3] != 0 {
        return Err(Reason::DropMalformed);
    }
    if u32::from_be_bytes(vxlan.vni) >> 8 != cfg.vni {
        return Err(Reason::DropWrongVni);
    }
    if !is_member(ip.saddr) {
        return Err(Reason::DropUnknownPeer);
    }
    check_inner(
        ctx,
        cfg,
        INNER_ETH_OFF,
        tot_len - (INNER_IP_OFF - ETH_HLEN),
        ip.saddr,
    )
}

/// The checks of a VXLAN frame's inner frame at `eth_off`, of which the outer headers announce
/// `carried` bytes from the inner IPv4 header on, sent by the member `outer_saddr`: our VtepMAC,
/// IPv4 the kernel would accept, a source the member may speak for. The inner Ethernet header
/// and a checked pointer to the inner IPv4 header (valid until a helper moves packet data).
#[inline(always)]
fn check_inner(
    ctx: &impl Packet,
    cfg: &Config,
    eth_off: usize,
    carried: usize,
    outer_saddr: [u8; 4],
) -> Result<(EthHdr, *mut Ipv4Hdr), Reason> {
    // SAFETY: a checked pointer, read at once.
    let inner_eth = unsafe { *ptr_at::<EthHdr>(ctx, eth_off).ok_or(Reason::DropTruncated)? };
    if inner_eth.dst != cfg.vtep_mac {
        return Err(Reason::DropWrongMac);
    }
    if inner_eth.proto != ETH_P_IP {
        return Err(Reason::DropNotIpv4);
    }
    let ip_off = eth_off + ETH_HLEN;
    let inner_ip = ptr_at::<Ipv4Hdr>(ctx, ip_off).ok_or(Reason::DropTruncated)?;
    // SAFETY: a checked pointer, read at once.
    let inner = unsafe { *inner_ip };
    check_inner_ipv4(ctx, &inner, ip_off, carried)?;
    check_inner_source(cfg, outer_saddr, inner.saddr)?;
    Ok((inner_eth, inner_ip))
}

/// The checks of the kernel's `ip_rcv` that delivery by redirect skips, on the inner IPv4
/// header `h` at `off` of a frame whose outer headers announce `carried` bytes from the inner
/// header on: version 4, a header length of at least 20 bytes that the packet holds, a total length
/// between the header's and `carried`, a header checksum that verifies (options included).
/// Anything else is `DropMalformed` (the direct path refuses the same, `drop_direct_malformed`).
#[inline(always)]
fn check_inner_ipv4(
    ctx: &impl Packet,
    h: &Ipv4Hdr,
    off: usize,
    carried: usize,
) -> Result<(), Reason> {
    let ihl = usize::from(h.ver_ihl & 0x0f);
    let tot_len = usize::from(u16::from_be_bytes(h.tot_len));
    if h.ver_ihl >> 4 != 4
        || ihl < 5
        || ihl * 4 > tot_len
        || tot_len > carried
        || !ipv4_header_checksum_ok(ctx, h, off, ihl - 5)
    {
        return Err(Reason::DropMalformed);
    }
    Ok(())
}

/// A member node (`outer_saddr`, checked already) speaks only for its own subnet: an inner
/// source inside the cluster network must lie in a `ROUTE_V4` subnet of that very node
/// (the longest match, so a more specific subnet of another node wins). Sources outside the
/// cluster network (what the member forwards for outside hosts) pass, except this node's own
/// addresses (the interface's and the PublicIP): behind `flannel.1` the host's stack refuses
/// a local address as a source (martian), but a packet delivered straight into a pod meets no
/// such check, and a pod would take it for its node's. This node's own subnet is never in `ROUTE_V4`, so our own pods'
/// addresses cannot be claimed either.
#[inline(always)]
fn check_inner_source(cfg: &Config, outer_saddr: [u8; 4], saddr: [u8; 4]) -> Result<(), Reason> {
    if cfg.is_own_address(saddr) {
        return Err(Reason::DropInnerSource);
    }
    if !in_subnet(saddr, cfg.network, cfg.network_mask) {
        return Ok(());
    }
    match route_v4(saddr) {
        Some(peer) if peer.public_ip == outer_saddr => Ok(()),
        _ => Err(Reason::DropInnerSource),
    }
}

/// Where the inner packet (header `ip`, a copy of the one at `ip_off`) is delivered, or why it
/// is dropped (including a missing bridge or host device).
#[inline(always)]
fn plan(ctx: &TcContext, cfg: &Config, ip_off: usize, ip: &Ipv4Hdr) -> Result<Plan, Reason> {
    let daddr = ip.daddr;
    let target = if cfg.is_host_subnet_address(daddr) {
        Target::Host
    } else if !in_subnet(daddr, cfg.subnet, cfg.subnet_mask) {
        return Err(Reason::DropNotLocal);
    } else if ip.ttl <= 1 {
        Target::HostTtl
    } else if is_kernel_flow(ctx, cfg, ip_off, ip) {
        Target::HostKernelFlow
    } else {
        Target::Pod
    };
    let endpoint = if target == Target::Pod {
        endpoint_v4(daddr)
    } else {
        None
    };
    match target {
        Target::Pod if endpoint.is_none() && cfg.bridge_ifindex == 0 => Err(Reason::DropNoBridge),
        Target::Host | Target::HostTtl | Target::HostKernelFlow if cfg.host_ifindex == 0 => {
            Err(Reason::DropNoHostDevice)
        }
        _ => Ok(Plan {
            target,
            endpoint,
            from_outside: target == Target::Pod
                && !in_subnet(ip.saddr, cfg.network, cfg.network_mask),
        }),
    }
}

/// Sends the decapsulated packet (an IPv4 packet behind an Ethernet header) where `plan` says.
/// `peer_vtep_mac` is the sender's VtepMAC, the source MAC of what the host device receives.
#[inline(always)]
fn deliver(
    ctx: &TcContext,
    cfg: &Config,
    plan: Plan,
    daddr: [u8; 4],
    peer_vtep_mac: [u8; 6],
) -> Result<i32, Reason> {
    if plan.target == Target::Pod {
        if plan.from_outside {
            // An outside host's packet that a member forwarded unmasqueraded (a node without
            // `--ip-masq`): no conntrack here sees it, so the pod's replies must be known as
            // replies (`--ip-masq` leaves them untranslated). Read again here, off the path
            // of pod-to-pod packets, which need no header kept across the decapsulation.
            if let Ok(ip) = ctx.load::<Ipv4Hdr>(ETH_HLEN) {
                file_delivered_directly(ctx, cfg, ETH_HLEN, &ip);
            }
        }
        if let Some(ep) = plan.endpoint {
            count(Reason::DecapEndpoint, ctx.len());
            return redirect_to_endpoint(ctx, cfg, &ep).ok_or(Reason::DropDecapFailed);
        }
        count(Reason::DecapPod, ctx.len());
        return Ok(redirect_to_bridge(ctx, cfg));
    }
    if plan.target == Target::Host && daddr == cfg.subnet {
        // A reply to a flow masqueraded into the cluster: translated back, and either routed
        // out (a verdict) or left for the host stack.
        if let Step::Done(verdict) = Step::of(nat::reverse_decapsulated(ctx, cfg))? {
            return Ok(verdict);
        }
    }
    deliver_to_host(ctx, cfg, peer_vtep_mac, plan.target)
}

/// Hands the decapsulated packet to the host stack as if the host device had received it: the
/// destination MAC becomes the device's own (so the stack sees PACKET_HOST), the source the
/// sender's VtepMAC (what flannel.1 would show).
#[inline(always)]
fn deliver_to_host(
    ctx: &TcContext,
    cfg: &Config,
    peer_vtep_mac: [u8; 6],
    target: Target,
) -> Result<i32, Reason> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Err(Reason::DropDecapFailed);
    };
    // SAFETY: checked pointer, fresh after the resize.
    unsafe {
        (*eth).dst = cfg.host_mac;
        (*eth).src = peer_vtep_mac;
    }
    count(
        match target {
            Target::HostTtl => Reason::StackTtl,
            Target::HostKernelFlow => Reason::StackKernelFlow,
            _ => Reason::DecapHost,
        },
        ctx.len(),
    );
    Ok(fib::to_host_device(cfg))
}

/// Whether `underlay_xdp` of this load decapsulated the frame: its metadata holds our cookie.
#[inline(always)]
fn marked_by_xdp(ctx: &TcContext, cfg: &Config) -> bool {
    if cfg.xdp_cookie == 0 {
        return false;
    }
    // SAFETY: reading a field of our own context; the verifier turns it into the metadata
    // pointer, which may only be dereferenced after the bounds check below.
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    if meta + size_of::<XdpMark>() > ctx.data() {
        return false;
    }
    // SAFETY: the metadata holds a whole mark (checked against the start of the data).
    let mark = unsafe { *(meta as *const XdpMark) };
    mark.cookie == cfg.xdp_cookie
}

/// `underlay_ingress` for a frame `underlay_xdp` decapsulated (every check made, ECN applied):
/// the frame is the inner Ethernet frame, delivered as in [`try_underlay_ingress`].
#[inline(always)]
fn deliver_decapsulated(ctx: &TcContext, cfg: &Config) -> Result<i32, Reason> {
    pull_headers(ctx, ETH_HLEN + IPV4_HLEN);
    let (eth, ip) = eth_ipv4(ctx).ok_or(Reason::DropMalformed)?;
    // SAFETY: a checked pointer, read before any helper moves data.
    let src_mac = unsafe { (*eth).src };
    deliver_stripped(ctx, cfg, ip, src_mac)
}

/// Delivers a frame whose outer headers are already gone (stripped by `underlay_xdp`, or by
/// the kernel's VXLAN socket) and whose inner IPv4 header `ip` (a checked pointer, valid: no
/// helper has moved data since) passed every check: where `plan` says, the TTL decremented
/// for a pod. `src_mac` is the sender's VtepMAC.
#[inline(always)]
fn deliver_stripped(
    ctx: &TcContext,
    cfg: &Config,
    ip: *mut Ipv4Hdr,
    src_mac: [u8; 6],
) -> Result<i32, Reason> {
    // SAFETY: a checked pointer, read before any helper moves data.
    let inner = unsafe { *ip };
    let daddr = inner.daddr;
    let plan = plan(ctx, cfg, ETH_HLEN, &inner)?;
    if plan.target == Target::Pod {
        // SAFETY: as above; `plan` guarantees ttl > 1.
        unsafe { decrement_ttl(ip) };
    }
    deliver(ctx, cfg, plan, daddr, src_mac)
}

/// The body of `underlay_xdp`: decapsulates VXLAN for us that passes every check, before GRO,
/// and marks it for `underlay_ingress` (see the module note). Always `XDP_PASS`.
#[inline(always)]
pub fn xdp_decapsulate(ctx: &XdpContext) -> u32 {
    const PASS: u32 = xdp_action::XDP_PASS;
    let Some(cfg) = config() else {
        return PASS;
    };
    if !cfg.vxlan_enabled() || cfg.xdp_cookie == 0 {
        return PASS;
    }
    let Some((ip, _)) = vxlan_for_us(ctx, cfg) else {
        return PASS;
    };
    if is_fragment(&ip) {
        return PASS;
    }
    let frame_len = ctx.data_end() - ctx.data();
    // A frame that fails a check goes on whole: `underlay_ingress` drops and counts it.
    let Ok((_, inner_ip)) = check_vxlan(ctx, cfg, &ip, frame_len) else {
        return PASS;
    };
    // SAFETY: `inner_ip` is a checked pointer, valid until the head moves.
    if unsafe { decapsulate_ecn(ip.tos, inner_ip) }.is_err() {
        return PASS;
    }
    // Room for the mark first, zeroed, so that a failure to strip leaves an unmarked frame.
    // SAFETY: helper calls on our own context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -XDP_MARK_LEN) } != 0 {
        return PASS;
    }
    let Some(mark) = meta_mark(ctx) else {
        return PASS;
    };
    // SAFETY: `mark` is a checked pointer into the metadata.
    unsafe {
        *mark = XdpMark {
            cookie: 0,
            _reserved: 0,
        };
    }
    // The metadata moves along with the data.
    // SAFETY: a helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, VXLAN_OVERHEAD as i32) } != 0 {
        return PASS;
    }
    let Some(mark) = meta_mark(ctx) else {
        return PASS;
    };
    // SAFETY: as above, fresh after the move.
    unsafe { (*mark).cookie = cfg.xdp_cookie };
    count(Reason::XdpDecap, (ctx.data_end() - ctx.data()) as u32);
    PASS
}

/// The mark in front of the frame's data, as a checked pointer.
#[inline(always)]
fn meta_mark(ctx: &XdpContext) -> Option<*mut XdpMark> {
    let meta = ctx.metadata();
    if meta + size_of::<XdpMark>() > ctx.data() {
        return None;
    }
    Some(meta as *mut XdpMark)
}

/// The body of `gro_device_ingress`: VXLAN that the GRO device's kernel socket decapsulated.
/// That is what `underlay_ingress` leaves to the kernel: datagrams it reassembles from
/// fragments (the reason this path exists), and VXLAN to our port that is not for us by its
/// checks (another local address, IPv6, outer IP options), that arrived on another interface,
/// or that a pod or a local process sent to the node's socket. Only reassembled datagrams
/// carry `FRAGMENT_MARK` (set on their first fragment by `underlay_ingress`); everything else
/// is dropped and counted (`drop_gro_device`). The outer headers are gone; the tunnel
/// metadata the kernel recorded stands in for them. What is for us (outer destination one of
/// our addresses, the interface's or the PublicIP, our VNI, from a member node) goes through
/// the checks of [`check_vxlan`] that concern the inner frame and is delivered as a
/// decapsulated frame is. The kernel has checked the outer IP and UDP headers, the UDP
/// checksum, the VXLAN flags, and applied RFC 6040's ECN rules.
#[inline(always)]
pub fn try_gro_device_ingress(ctx: &TcContext) -> Result<i32, Reason> {
    let Some(cfg) = config() else {
        return Err(Reason::DropGroDevice);
    };
    if !cfg.vxlan_enabled() || skb_mark(ctx) != FRAGMENT_MARK {
        // Not reassembled from fragments that `underlay_ingress` handed over: VXLAN to the
        // node's socket from a pod or a local process, or from another interface.
        return Err(Reason::DropGroDevice);
    }
    ctx.set_mark(0);
    // SAFETY: all-zero bytes are a valid `bpf_tunnel_key` (integers and unions of integers).
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: a helper call on our own context, writing `key` of the size given; without
    // `BPF_F_TUNINFO_IPV6` it fails for a tunnel over IPv6.
    let got = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &raw mut key,
            size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if got != 0 {
        return Err(Reason::DropGroDevice);
    }
    // SAFETY: IPv4 tunnel metadata (the helper checked the family), host order.
    let (remote, local) = unsafe {
        (
            key.__bindgen_anon_1.remote_ipv4.to_be_bytes(),
            key.__bindgen_anon_3.local_ipv4.to_be_bytes(),
        )
    };
    if !cfg.is_own_address(local) {
        return Err(Reason::DropGroDevice);
    }
    if key.tunnel_id != cfg.vni {
        return Err(Reason::DropWrongVni);
    }
    if !is_member(remote) {
        return Err(Reason::DropUnknownPeer);
    }
    pull_headers(ctx, ETH_HLEN + IPV4_HLEN);
    let carried = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    let (inner_eth, inner_ip) = check_inner(ctx, cfg, 0, carried, remote)?;
    let verdict = deliver_stripped(ctx, cfg, inner_ip, inner_eth.src)?;
    count(Reason::DecapGroDevice, ctx.len());
    Ok(verdict)
}
