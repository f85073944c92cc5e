//! A reference model of the data path in plain Rust, for the randomised test of the eBPF
//! programs (`tests/packet_random.rs`): for a node's configuration and maps and any frame, what
//! each program does with it, namely its verdict, the counters it counts the frame under (and
//! how many bytes), and the frame that comes out.
//!
//! It is written from the design notes at the top of each data-path module (`overlay-ebpf/src`)
//! and the kernel's semantics of the helpers used, not from the programs' code: the checks in
//! the order the notes give them, with the byte-level details the notes fix (which checksum
//! update, which MACs are rewritten, which length a counter adds). It covers the programs with
//! masquerade off (the NAT has random ports and per-flow state; its packet tests check it byte
//! for byte), and `BPF_PROG_TEST_RUN`'s view of a frame: linear, no GSO, `PACKET_HOST` only
//! for a destination MAC equal to loopback's (00:00:00:00:00:00).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Mutex,
};

use ipnet::Ipv4Net;
use overlay_common::{
    config::Config,
    counters::Reason,
    endpoint::Endpoint,
    kernel_flow::{KERNEL_FLOW_IN, KERNEL_FLOW_IN_DIRECT, KERNEL_FLOW_OUT},
    route::RemoteNode,
};

use crate::packet::checksum;

/// `TC_ACT_OK`, `TC_ACT_SHOT`, `TC_ACT_REDIRECT`; `XDP_PASS`.
pub const TC_OK: u32 = 0;
pub const TC_SHOT: u32 = 2;
pub const TC_REDIRECT: u32 = 7;
pub const XDP_PASS: u32 = 2;

/// Bytes between the outer Ethernet header and the inner IPv4 header of a VXLAN frame.
const OVERHEAD: usize = 50;

/// The node the programs run for: its `CONFIG`, its maps, and the MTUs of the devices the
/// programs check against (`bpf_check_mtu` adds the device's 14-byte header length).
#[derive(Debug)]
pub struct Node {
    pub cfg: Config,
    /// `ROUTE_V4`: remote subnets (longest prefix wins).
    pub routes: Vec<(Ipv4Net, RemoteNode)>,
    /// `NODE_V4`: member PublicIPs.
    pub members: Vec<[u8; 4]>,
    /// `ENDPOINT_V4`.
    pub endpoints: BTreeMap<[u8; 4], Endpoint>,
    /// MTU of the external interface (`underlay_ifindex`).
    pub underlay_mtu: usize,
    /// MTU of the host device (`host_ifindex`), when there is one.
    pub host_mtu: usize,
    /// `KERNEL_FLOW_V4`: flows the kernel forwarded for a local pod, filed by `host_egress`,
    /// `underlay_egress` and `pod_ingress` as frames go through them (pod, remote, pod port,
    /// remote port, protocol).
    pub kernel_flows: Mutex<BTreeSet<KernelFlow>>,
}

/// A `KERNEL_FLOW_V4` key: pod address, remote address, pod port, remote port, protocol, way.
pub type KernelFlow = ([u8; 4], [u8; 4], [u8; 2], [u8; 2], u8, u8);

/// What comes out of a run, as far as the model fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// The frame as it went in.
    Same,
    /// Exactly these bytes.
    Bytes(Vec<u8>),
    /// A VXLAN encapsulation: these bytes, except the outer IPv4 identifier (random) and with
    /// it the outer header checksum, and the UDP source port (a flow hash in
    /// `[src_port_min, src_port_max)`), which are checked apart.
    Encap(Vec<u8>),
}

/// A program's effect on one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: u32,
    /// Counters counted, with the bytes each adds, in the order counted.
    pub counts: Vec<(Reason, u64)>,
    pub out: Expected,
}

impl Outcome {
    fn new(verdict: u32, counts: Vec<(Reason, u64)>, out: Expected) -> Self {
        Self {
            verdict,
            counts,
            out,
        }
    }
}

/// Where a frame a program took over goes: the verdict, the counter (and bytes) it counts
/// the frame under, and the frame that comes out.
type Delivery = (u32, Option<(Reason, u64)>, Expected);

/// Big-endian u16 at `off`.
fn be16(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

fn addr(f: &[u8], off: usize) -> [u8; 4] {
    [f[off], f[off + 1], f[off + 2], f[off + 3]]
}

/// Whether the IPv4 header in `h` verifies.
fn header_ok(h: &[u8]) -> bool {
    checksum(h) == 0
}

/// RFC 1624 eqn. 3, the incremental update the programs use for a changed 16-bit word.
fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Decrements the TTL of the IPv4 header at `ip` and patches its checksum incrementally.
fn decrement_ttl(f: &mut [u8], ip: usize) {
    let old = be16(f, ip + 8);
    f[ip + 8] -= 1;
    let c = replace16(be16(f, ip + 10), old, old - 0x100);
    f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
}

/// RFC 6040 decapsulation of the outer TOS into the inner header at `ip`: `Err` for a CE mark
/// over a not-ECT packet.
fn decapsulate_ecn(f: &mut [u8], outer_tos: u8, ip: usize) -> Result<(), Reason> {
    if outer_tos & 3 != 3 {
        return Ok(());
    }
    match f[ip + 1] & 3 {
        0 => Err(Reason::DropEcn),
        3 => Ok(()),
        _ => {
            let old = be16(f, ip);
            f[ip + 1] |= 3;
            let c = replace16(be16(f, ip + 10), old, be16(f, ip));
            f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
            Ok(())
        }
    }
}

/// The Ethernet and IPv4 headers the programs accept as "IPv4" (`eth_ipv4`): EtherType IPv4,
/// version 4, a header length of at least 20, both headers within the frame.
fn is_ipv4(f: &[u8]) -> bool {
    f.len() >= 34 && f[12..14] == [0x08, 0x00] && f[14] >> 4 == 4 && f[14] & 0x0f >= 5
}

impl Node {
    fn ready(&self) -> bool {
        self.cfg.is_ready()
    }

    /// A local pod's address: in the subnet, neither `.0` (the host device) nor `.1` (the
    /// bridge).
    fn is_local_pod(&self, a: [u8; 4]) -> bool {
        self.in_subnet(a) && a != self.cfg.subnet && a != self.gateway()
    }

    /// The ports a `KERNEL_FLOW_V4` key takes from the IPv4 packet at `ip` of `f` (source,
    /// destination): none for a later fragment, a header the frame does not hold, or ICMP
    /// other than an echo request (`from_pod`) or reply; 0 for protocols without ports; an
    /// echo's identifier stands for the pod's port.
    fn kernel_flow_ports(f: &[u8], ip: usize, from_pod: bool) -> Option<([u8; 2], [u8; 2])> {
        if be16(f, ip + 6) & 0x1fff != 0 {
            return None;
        }
        let l4 = ip + usize::from(f[ip] & 0x0f) * 4;
        match f[ip + 9] {
            6 | 17 | 33 | 132 | 136 => {
                (f.len() >= l4 + 4).then(|| ([f[l4], f[l4 + 1]], [f[l4 + 2], f[l4 + 3]]))
            }
            1 => {
                if f.len() < l4 + 8 {
                    return None;
                }
                let id = [f[l4 + 4], f[l4 + 5]];
                match (from_pod, f[l4]) {
                    (true, 8) => Some((id, [0, 0])),
                    (false, 0) => Some(([0, 0], id)),
                    _ => None,
                }
            }
            _ => Some(([0, 0], [0, 0])),
        }
    }

    /// Files the flow of a local pod's packet at `ip` of `f` that the kernel routed out; the
    /// count of a new one.
    fn file_kernel_flow(&self, f: &[u8], ip: usize) -> Option<(Reason, u64)> {
        let (saddr, daddr) = (addr(f, ip + 12), addr(f, ip + 16));
        if !self.is_local_pod(saddr) || self.is_kernel_flow_from_pod(f, ip) {
            return None;
        }
        let (sport, dport) = Self::kernel_flow_ports(f, ip, true)?;
        let new = self.kernel_flows.lock().unwrap().insert((
            saddr,
            daddr,
            sport,
            dport,
            f[ip + 9],
            KERNEL_FLOW_OUT,
        ));
        new.then_some((Reason::KernelFlowNew, f.len() as u64))
    }

    /// Files the flow of a packet the kernel sends into a local pod at `ip` of `f` from
    /// elsewhere than this node's subnet (not from the node's own addresses; from a remote
    /// pod only to a pod with an endpoint); the count of a new one.
    fn file_delivered_flow(&self, f: &[u8], ip: usize) -> Option<(Reason, u64)> {
        let (saddr, daddr) = (addr(f, ip + 12), addr(f, ip + 16));
        if !self.is_local_pod(daddr) || self.in_subnet(saddr) || self.own_address(saddr) {
            return None;
        }
        if self.in_network(saddr) && !self.endpoints.contains_key(&daddr) {
            return None;
        }
        self.file_inbound(f, ip, KERNEL_FLOW_IN)
    }

    /// Files the flow of a packet that direct delivery or decapsulation sends into a local pod
    /// at `ip` of `f` from outside the cluster network; the count of a new one.
    fn file_delivered_directly(&self, f: &[u8], ip: usize) -> Option<(Reason, u64)> {
        if self.in_network(addr(f, ip + 12)) {
            return None;
        }
        self.file_inbound(f, ip, KERNEL_FLOW_IN_DIRECT)
    }

    /// Files the connection of the packet into a local pod at `ip` of `f` as `way`.
    fn file_inbound(&self, f: &[u8], ip: usize, way: u8) -> Option<(Reason, u64)> {
        let (saddr, daddr) = (addr(f, ip + 12), addr(f, ip + 16));
        let (sport, dport) = Self::kernel_flow_ports(f, ip, false)?;
        let new =
            self.kernel_flows
                .lock()
                .unwrap()
                .insert((daddr, saddr, dport, sport, f[ip + 9], way));
        new.then_some((Reason::KernelFlowNew, f.len() as u64))
    }

    /// Whether a local pod's packet at `ip` of `f` answers a connection filed as delivered
    /// into the pod (by the kernel or directly).
    fn is_kernel_flow_from_pod(&self, f: &[u8], ip: usize) -> bool {
        self.is_filed(f, ip, true, &[KERNEL_FLOW_IN, KERNEL_FLOW_IN_DIRECT])
    }

    /// Whether the packet for a local pod at `ip` of `f`, to be delivered by us, belongs to a
    /// flow the kernel forwarded out of it; if not, from the cluster network, a connection
    /// filed under its tuple as delivered in by the kernel is forgotten (it is over).
    fn is_kernel_flow(&self, f: &[u8], ip: usize) -> bool {
        if self.is_filed(f, ip, false, &[KERNEL_FLOW_OUT]) {
            return true;
        }
        if self.in_network(addr(f, ip + 12)) {
            self.forget(f, ip, false, KERNEL_FLOW_IN);
        }
        false
    }

    /// Whether a local pod's packet at `ip` of `f` to a peer answers a connection delivered
    /// into the pod; if not, a flow the kernel forwarded out under its tuple is forgotten.
    fn pod_packet_is_inbound(&self, f: &[u8], ip: usize) -> bool {
        if self.is_kernel_flow_from_pod(f, ip) {
            return true;
        }
        self.forget(f, ip, true, KERNEL_FLOW_OUT);
        false
    }

    /// Forgets the flow of the packet at `ip` of `f` (as in [`Self::is_filed`]) filed as `way`.
    fn forget(&self, f: &[u8], ip: usize, from_pod: bool, way: u8) {
        if let Some(key) = Self::flow_key(f, ip, from_pod, way) {
            self.kernel_flows.lock().unwrap().remove(&key);
        }
    }

    /// Whether the flow of the packet at `ip` of `f`, sent by a local pod (`from_pod`) or to
    /// one, is filed as one of `ways`.
    fn is_filed(&self, f: &[u8], ip: usize, from_pod: bool, ways: &[u8]) -> bool {
        let flows = self.kernel_flows.lock().unwrap();
        ways.iter().any(|&way| {
            Self::flow_key(f, ip, from_pod, way).is_some_and(|key| flows.contains(&key))
        })
    }

    /// The key of the packet at `ip` of `f`'s flow as `way`, oriented from the pod (`from_pod`:
    /// the pod sent it); `None` for what carries no ports to match.
    fn flow_key(f: &[u8], ip: usize, from_pod: bool, way: u8) -> Option<KernelFlow> {
        let (sport, dport) = Self::kernel_flow_ports(f, ip, from_pod)?;
        let (saddr, daddr, proto) = (addr(f, ip + 12), addr(f, ip + 16), f[ip + 9]);
        Some(if from_pod {
            (saddr, daddr, sport, dport, proto, way)
        } else {
            (daddr, saddr, dport, sport, proto, way)
        })
    }

    fn in_subnet(&self, a: [u8; 4]) -> bool {
        mask(a, self.cfg.subnet_mask) == self.cfg.subnet
    }

    fn in_network(&self, a: [u8; 4]) -> bool {
        mask(a, self.cfg.network_mask) == self.cfg.network
    }

    fn gateway(&self) -> [u8; 4] {
        (u32::from_be_bytes(self.cfg.subnet).wrapping_add(1)).to_be_bytes()
    }

    /// `ROUTE_V4`'s longest match for `a`.
    pub fn route(&self, a: [u8; 4]) -> Option<RemoteNode> {
        let a = Ipv4Addr::from(a);
        self.routes
            .iter()
            .filter(|(net, _)| net.contains(&a))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, node)| *node)
    }

    fn member(&self, a: [u8; 4]) -> bool {
        self.members.contains(&a)
    }

    /// `underlay_ingress`: counts every frame, decapsulates VXLAN for us (dropping what fails a
    /// check), delivers direct traffic, and (masquerade off) passes everything else.
    pub fn underlay_ingress(&self, f: &[u8]) -> Outcome {
        let len = f.len() as u64;
        let mut counts = vec![(Reason::UnderlayRx, len)];
        let decided = if !self.ready() || !self.cfg.vxlan_enabled() || !self.vxlan_for_us(f) {
            None
        } else {
            Some(self.decapsulate(f))
        };
        let decided = match decided {
            None => self.direct_ingress(f),
            some => some,
        };
        match decided {
            None => Outcome::new(TC_OK, counts, Expected::Same),
            Some(Err(reason)) => {
                counts.push((reason, len));
                Outcome::new(TC_SHOT, counts, Expected::Same)
            }
            Some(Ok((verdict, count, out))) => {
                match count {
                    Some((Reason::DeliverDirectEndpoint | Reason::DeliverDirectPod, _)) => {
                        counts.extend(self.file_delivered_directly(f, 14));
                    }
                    // Filed from the decapsulated packet.
                    Some((Reason::DecapEndpoint | Reason::DecapPod, _)) => {
                        if let Expected::Bytes(inner) = &out {
                            counts.extend(self.file_delivered_directly(inner, 14));
                        }
                    }
                    _ => {}
                }
                counts.extend(count);
                Outcome::new(verdict, counts, out)
            }
        }
    }

    /// Option-less IPv4 to one of our addresses (the interface's or the PublicIP), not a later
    /// fragment, UDP to our port.
    fn vxlan_for_us(&self, f: &[u8]) -> bool {
        is_ipv4(f)
            && f[14] == 0x45
            && f[23] == 17
            && self.own_address(addr(f, 30))
            && be16(f, 20) & 0x1fff == 0
            && f.len() >= 42
            && be16(f, 36) == self.cfg.port
    }

    /// A (first) fragment: `vxlan_for_us` accepts no later one.
    fn is_fragment(f: &[u8]) -> bool {
        be16(f, 20) & 0x3fff != 0
    }

    /// Every check of VXLAN for us, on an unfragmented frame `vxlan_for_us` accepted.
    fn check_vxlan(&self, f: &[u8]) -> Result<(), Reason> {
        if !header_ok(&f[14..34]) {
            return Err(Reason::DropBadChecksum);
        }
        let tot = usize::from(be16(f, 16));
        if tot + 14 > f.len() || tot < 70 {
            return Err(Reason::DropTruncated);
        }
        if usize::from(be16(f, 38)) != tot - 20 {
            return Err(Reason::DropMalformed);
        }
        if f[42..46] != [0x08, 0, 0, 0] || f[49] != 0 {
            return Err(Reason::DropMalformed);
        }
        if u32::from_be_bytes([0, f[46], f[47], f[48]]) != self.cfg.vni {
            return Err(Reason::DropWrongVni);
        }
        if !self.member(addr(f, 26)) {
            return Err(Reason::DropUnknownPeer);
        }
        if f[50..56] != self.cfg.vtep_mac {
            return Err(Reason::DropWrongMac);
        }
        if f[62..64] != [0x08, 0x00] {
            return Err(Reason::DropNotIpv4);
        }
        // The inner header: what ip_rcv would accept, within what the outer headers carry.
        let ip = 64;
        let ihl = usize::from(f[ip] & 0x0f) * 4;
        let inner_tot = usize::from(be16(f, ip + 2));
        if f[ip] >> 4 != 4
            || ihl < 20
            || ihl > inner_tot
            || inner_tot > tot - OVERHEAD
            || ip + ihl > f.len()
            || !header_ok(&f[ip..ip + ihl])
        {
            return Err(Reason::DropMalformed);
        }
        let saddr = addr(f, ip + 12);
        if self.own_address(saddr)
            || self.in_network(saddr)
                && self
                    .route(saddr)
                    .is_none_or(|peer| peer.public_ip != addr(f, 26))
        {
            return Err(Reason::DropInnerSource);
        }
        Ok(())
    }

    /// The interface's address or the PublicIP.
    fn own_address(&self, a: [u8; 4]) -> bool {
        a == self.cfg.local_ip || a == self.cfg.public_ip
    }

    /// Decapsulates VXLAN for us: the verdict, the counter, and the frame.
    fn decapsulate(&self, f: &[u8]) -> Result<Delivery, Reason> {
        if Self::is_fragment(f) {
            // To the kernel, which reassembles it for the GRO device's socket.
            return Ok((
                TC_OK,
                Some((Reason::StackFragment, f.len() as u64)),
                Expected::Same,
            ));
        }
        self.check_vxlan(f)?;
        let mut out = f.to_vec();
        let ip = 64;
        let (daddr, ttl) = (addr(f, ip + 16), f[ip + 8]);
        #[derive(PartialEq)]
        enum Target {
            Pod,
            Host,
            HostTtl,
            HostKernelFlow,
        }
        let target = if daddr == self.cfg.subnet || daddr == self.gateway() {
            Target::Host
        } else if !self.in_subnet(daddr) {
            return Err(Reason::DropNotLocal);
        } else if ttl <= 1 {
            Target::HostTtl
        } else if self.is_kernel_flow(f, ip) {
            Target::HostKernelFlow
        } else {
            Target::Pod
        };
        let endpoint = (target == Target::Pod)
            .then(|| self.endpoints.get(&daddr).copied())
            .flatten();
        if target == Target::Pod && endpoint.is_none() && self.cfg.bridge_ifindex == 0 {
            return Err(Reason::DropNoBridge);
        }
        if target != Target::Pod && self.cfg.host_ifindex == 0 {
            return Err(Reason::DropNoHostDevice);
        }
        decapsulate_ecn(&mut out, f[15], ip)?;
        if target == Target::Pod {
            decrement_ttl(&mut out, ip);
        }
        // `bpf_skb_adjust_room(-50, BPF_ADJ_ROOM_MAC)` removes the 50 bytes behind the outer
        // Ethernet header: the outer MACs stay (the redirect rewrites them), the inner go.
        let mut out = [&out[..14], &out[14 + OVERHEAD..]].concat();
        let len = out.len() as u64;
        let reason = match (target, endpoint) {
            (Target::Pod, Some(ep)) => {
                out[0..6].copy_from_slice(&ep.mac);
                out[6..12].copy_from_slice(&self.cfg.bridge_mac);
                Reason::DecapEndpoint
            }
            (Target::Pod, None) => Reason::DecapPod,
            (target, _) => {
                // For the host device's own address the masquerade (off) passes first. The
                // stack sees the frame from the sender's VtepMAC, as from flannel.1.
                out[0..6].copy_from_slice(&self.cfg.host_mac);
                out[6..12].copy_from_slice(&f[56..62]);
                match target {
                    Target::HostTtl => Reason::StackTtl,
                    Target::HostKernelFlow => Reason::StackKernelFlow,
                    _ => Reason::DecapHost,
                }
            }
        };
        Ok((TC_REDIRECT, Some((reason, len)), Expected::Bytes(out)))
    }

    /// Unencapsulated traffic for local pods from direct peers (host-gw, DirectRouting).
    fn direct_ingress(&self, f: &[u8]) -> Option<Result<Delivery, Reason>> {
        let len = f.len() as u64;
        // PACKET_HOST in a test run: addressed to loopback's MAC.
        if !self.ready() || !self.cfg.accepts_direct() || f[0..6] != [0; 6] || !is_ipv4(f) {
            return None;
        }
        let daddr = addr(f, 30);
        if !self.in_subnet(daddr) {
            return None;
        }
        let broadcast = (u32::from_be_bytes(self.cfg.subnet)
            | !u32::from_be_bytes(self.cfg.subnet_mask))
        .to_be_bytes();
        if f[14] != 0x45 || daddr == broadcast {
            return None;
        }
        let saddr = addr(f, 26);
        let from_peer = self.route(saddr).is_some_and(|p| p.is_direct()) || self.member(saddr);
        if !from_peer {
            return Some(Ok((
                TC_OK,
                Some((Reason::StackNotPeer, len)),
                Expected::Same,
            )));
        }
        let tot = usize::from(be16(f, 16));
        if !header_ok(&f[14..34]) || tot < 20 || tot + 14 > f.len() {
            return Some(Err(Reason::DropDirectMalformed));
        }
        let to_host = daddr == self.cfg.subnet || daddr == self.gateway();
        let kernel_flow = !to_host && f[22] > 1 && self.is_kernel_flow(f, 14);
        let mut out = f.to_vec();
        if !to_host && !kernel_flow && f[22] > 1 {
            let endpoint = self.endpoints.get(&daddr).copied();
            if endpoint.is_none() && self.cfg.bridge_ifindex == 0 {
                return Some(Err(Reason::DropNoBridge));
            }
            decrement_ttl(&mut out, 14);
            let reason = match endpoint {
                Some(ep) => {
                    out[0..6].copy_from_slice(&ep.mac);
                    out[6..12].copy_from_slice(&self.cfg.bridge_mac);
                    Reason::DeliverDirectEndpoint
                }
                None => Reason::DeliverDirectPod,
            };
            return Some(Ok((TC_REDIRECT, Some((reason, len)), Expected::Bytes(out))));
        }
        if self.cfg.host_ifindex == 0 {
            return Some(Err(Reason::DropNoHostDevice));
        }
        out[0..6].copy_from_slice(&self.cfg.host_mac);
        let reason = if to_host {
            Reason::DeliverDirectHost
        } else if kernel_flow {
            Reason::StackKernelFlow
        } else {
            Reason::StackTtl
        };
        Some(Ok((TC_REDIRECT, Some((reason, len)), Expected::Bytes(out))))
    }

    /// `underlay_xdp`: decapsulates VXLAN for us that passes every check (and the ECN rule),
    /// and marks it with the cookie in 8 bytes of metadata; everything else goes on unchanged.
    pub fn underlay_xdp(&self, f: &[u8]) -> Outcome {
        let pass = Outcome::new(XDP_PASS, Vec::new(), Expected::Same);
        if !self.ready()
            || !self.cfg.vxlan_enabled()
            || self.cfg.xdp_cookie == 0
            || !self.vxlan_for_us(f)
            || Self::is_fragment(f)
            || self.check_vxlan(f).is_err()
        {
            return pass;
        }
        let mut frame = f.to_vec();
        if decapsulate_ecn(&mut frame, f[15], 64).is_err() {
            return pass;
        }
        let mut out = self.cfg.xdp_cookie.to_ne_bytes().to_vec();
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&frame[OVERHEAD..]);
        let len = (f.len() - OVERHEAD) as u64;
        Outcome::new(
            XDP_PASS,
            vec![(Reason::XdpDecap, len)],
            Expected::Bytes(out),
        )
    }

    /// `underlay_egress` with masquerade off: counts what leaves, files a local pod's flow
    /// to outside the cluster network, changes nothing.
    pub fn underlay_egress(&self, f: &[u8]) -> Outcome {
        let mut counts = vec![(Reason::UnderlayTx, f.len() as u64)];
        if self.ready() && is_ipv4(f) && !self.in_network(addr(f, 30)) {
            counts.extend(self.file_kernel_flow(f, 14));
        }
        Outcome::new(TC_OK, counts, Expected::Same)
    }

    /// `pod_ingress` (the bridge's egress): files what comes from outside the cluster network
    /// into a local pod, changes nothing.
    pub fn pod_ingress(&self, f: &[u8]) -> Outcome {
        let mut counts = Vec::new();
        if self.ready() && is_ipv4(f) {
            counts.extend(self.file_delivered_flow(f, 14));
        }
        Outcome::new(TC_OK, counts, Expected::Same)
    }

    /// `pod_egress` (the bridge's hook, `accelerator` false) and `pod_port_egress` (a pod's
    /// veth, `accelerator` true: only frames to the gateway's MAC, hand-backs not counted).
    pub fn pod_egress(&self, f: &[u8], accelerator: bool) -> Outcome {
        let mut outcome = self.pod_egress_body(f, accelerator);
        if accelerator && outcome.verdict != TC_OK {
            outcome.counts.push((Reason::PodPort, f.len() as u64));
        }
        outcome
    }

    fn pod_egress_body(&self, f: &[u8], accelerator: bool) -> Outcome {
        let len = f.len() as u64;
        let pass = |counts| Outcome::new(TC_OK, counts, Expected::Same);
        if !self.ready() || !is_ipv4(f) {
            return pass(Vec::new());
        }
        if f[0] & 1 != 0 || (accelerator && f[0..6] != self.cfg.bridge_mac) {
            return pass(Vec::new());
        }
        let handback = |reason| {
            if accelerator {
                pass(Vec::new())
            } else {
                pass(vec![(reason, len)])
            }
        };
        let (tos, ttl, daddr) = (f[15], f[22], addr(f, 30));
        let Some(peer) = self.route(daddr) else {
            return pass(Vec::new());
        };
        if self.pod_packet_is_inbound(f, 14) {
            return handback(Reason::StackKernelFlow);
        }
        if peer.is_direct() {
            if ttl <= 1 {
                return handback(Reason::StackTtl);
            }
            if f.len() > self.underlay_mtu + 14 {
                return handback(Reason::StackMtu);
            }
            let mut out = f.to_vec();
            decrement_ttl(&mut out, 14);
            return Outcome::new(
                TC_REDIRECT,
                vec![(Reason::DirectPod, len)],
                Expected::Bytes(out),
            );
        }
        if !peer.is_vxlan() {
            return pass(Vec::new());
        }
        if ttl <= 1 {
            return handback(Reason::StackTtl);
        }
        let fits = if self.cfg.host_ifindex != 0 {
            f.len() <= self.host_mtu + 14
        } else {
            f.len() + OVERHEAD <= self.underlay_mtu + 14
        };
        if !fits {
            return handback(Reason::StackMtu);
        }
        let mut inner = f.to_vec();
        decrement_ttl(&mut inner, 14);
        Outcome::new(
            TC_REDIRECT,
            vec![(Reason::EncapPod, len + OVERHEAD as u64)],
            Expected::Encap(self.encapsulate(&inner, &peer, tos)),
        )
    }

    /// `host_egress` with masquerade off.
    pub fn host_egress(&self, f: &[u8]) -> Outcome {
        let len = f.len() as u64;
        if !self.ready() || !is_ipv4(f) {
            return Outcome::new(TC_OK, Vec::new(), Expected::Same);
        }
        let daddr = addr(f, 30);
        let Some(peer) = self.route(daddr) else {
            if self.in_network(daddr) {
                return Outcome::new(TC_SHOT, vec![(Reason::DropNoRoute, len)], Expected::Same);
            }
            return Outcome::new(TC_OK, Vec::new(), Expected::Same);
        };
        let mut counts: Vec<(Reason, u64)> = self.file_kernel_flow(f, 14).into_iter().collect();
        if peer.is_direct() {
            counts.push((Reason::DirectHost, len));
            return Outcome::new(TC_REDIRECT, counts, Expected::Same);
        }
        if !peer.is_vxlan() {
            return Outcome::new(TC_OK, counts, Expected::Same);
        }
        counts.push((Reason::EncapHost, len + OVERHEAD as u64));
        Outcome::new(
            TC_REDIRECT,
            counts,
            Expected::Encap(self.encapsulate(f, &peer, f[15])),
        )
    }

    /// The frame `f` encapsulated for `peer` (flannel.1's headers), with the outer identifier
    /// and UDP source port zero (random and a flow hash: checked apart).
    fn encapsulate(&self, f: &[u8], peer: &RemoteNode, inner_tos: u8) -> Vec<u8> {
        let outer_len = f.len() - 14 + OVERHEAD;
        let mut out = f[..14].to_vec();
        let ecn = match inner_tos & 3 {
            3 => 2,
            e => e,
        };
        let mut ip = vec![0x45, ecn];
        ip.extend_from_slice(&(outer_len as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
        ip.extend_from_slice(&self.cfg.local_ip);
        ip.extend_from_slice(&peer.public_ip);
        out.extend_from_slice(&ip);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.cfg.port.to_be_bytes());
        out.extend_from_slice(&((outer_len - 20) as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0x08, 0, 0, 0]);
        out.extend_from_slice(&((self.cfg.vni & 0x00ff_ffff) << 8).to_be_bytes());
        out.extend_from_slice(&peer.vtep_mac);
        out.extend_from_slice(&self.cfg.vtep_mac);
        out.extend_from_slice(&[0x08, 0x00]);
        out.extend_from_slice(&f[14..]);
        out
    }
}

fn mask(a: [u8; 4], m: [u8; 4]) -> [u8; 4] {
    (u32::from_be_bytes(a) & u32::from_be_bytes(m)).to_be_bytes()
}

/// Why an actual run differs from the model's expectation, if it does: compares `actual`
/// with `expected` (for an encapsulation: the outer identifier copied from `actual`, its
/// header checksum verified, the UDP source port in `[min, max)`).
pub fn mismatch(
    expected: &Expected,
    input: &[u8],
    actual: &[u8],
    ports: (u16, u16),
) -> Option<String> {
    match expected {
        Expected::Same if actual == input => None,
        Expected::Same => Some(diff("unchanged", input, actual)),
        Expected::Bytes(bytes) if actual == bytes.as_slice() => None,
        Expected::Bytes(bytes) => Some(diff("bytes", bytes, actual)),
        Expected::Encap(bytes) => {
            if actual.len() != bytes.len() {
                return Some(diff("encapsulation", bytes, actual));
            }
            if !header_ok(&actual[14..34]) {
                return Some("outer IPv4 checksum does not verify".to_owned());
            }
            let sport = be16(actual, 34);
            if sport < ports.0 || (ports.1 > ports.0 && sport >= ports.1) {
                return Some(format!("UDP source port {sport} outside {ports:?}"));
            }
            let mut expected = bytes.clone();
            expected[18..20].copy_from_slice(&actual[18..20]);
            expected[24..26].copy_from_slice(&actual[24..26]);
            expected[34..36].copy_from_slice(&actual[34..36]);
            (expected != actual).then(|| diff("encapsulation", &expected, actual))
        }
    }
}

fn diff(what: &str, expected: &[u8], actual: &[u8]) -> String {
    let at = expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(actual.len()));
    format!(
        "{what}: {} bytes expected, {} came out, first difference at byte {at}",
        expected.len(),
        actual.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_updates_keep_a_header_valid() {
        let mut h = vec![
            0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert!(header_ok(&h));
        let mut f = vec![0u8; 14];
        f.extend_from_slice(&h);
        decrement_ttl(&mut f, 14);
        assert_eq!(f[22], 63);
        assert!(header_ok(&f[14..34]));
        f[15] = 0b10;
        let c = checksum(&{
            let mut x = f[14..34].to_vec();
            x[10] = 0;
            x[11] = 0;
            x
        });
        f[24..26].copy_from_slice(&c.to_be_bytes());
        decapsulate_ecn(&mut f, 3, 14).unwrap();
        assert_eq!(f[15] & 3, 3);
        assert!(header_ok(&f[14..34]));
        f[15] = 0;
        assert_eq!(decapsulate_ecn(&mut f, 3, 14), Err(Reason::DropEcn));
    }
}
