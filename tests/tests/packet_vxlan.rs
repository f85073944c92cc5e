//! Packet tests of the VXLAN data path: the eBPF programs run on crafted frames through
//! `BPF_PROG_TEST_RUN` (aya's `TestRun`), and the tests check the bytes that come out, the
//! verdict and the per-reason counters.
//!
//! Root only (loading BPF programs needs it); they fail, never skip, without it. Run with
//! `cargo xtask build-ebpf && cargo test -p overlay-tests --test packet_vxlan -- --test-threads=1`.
//! The object is `$OVERLAY_EBPF_OBJECT` or `target/bpfel-unknown-none/release/overlay`.
//!
//! What `BPF_PROG_TEST_RUN` does and does not show: the program runs on a linear skb built from
//! the frame (the kernel wants 14 bytes, 34 for IPv4) in the caller's network namespace; a
//! redirect only returns `TC_ACT_REDIRECT` (nothing is sent, the target is not reported), so the
//! outer MACs that `bpf_redirect_neigh` would fill in are never asserted, and where a packet
//! went is told apart by the counters. GSO packets cannot be built (no `gso_type`), so
//! segmentation is not covered here. Three tests use network namespaces (the harness's `NetNs`, named `ovl-<pid>-…`
//! and removed on drop): one runs the programs in a namespace with small MTUs; one sends our
//! encapsulated frame to a stock kernel `flannel.1` VXLAN device, built as flanneld builds it,
//! and decapsulates the reply that device sends back; one drives the agent's `Datapath` API
//! (attach to real devices, configure, add and remove peers) and checks through the programs
//! that the maps it wrote mean what the programs expect.

use std::{
    collections::BTreeMap,
    mem::{size_of, zeroed},
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie},
    programs::SchedClassifier,
};
use overlay_common::names::{
    self, HOST_EGRESS, POD_EGRESS, PROBE_DECAP_L4_UDP, UNDERLAY_EGRESS, UNDERLAY_INGRESS,
    UNDERLAY_XDP,
};
use overlay_common::{
    config::{CONFIG_F_READY, Config},
    counters::{Counter, Reason},
    endpoint::Endpoint,
    route::{MemberNode, RemoteNode, route_key},
};
use overlay_tests::{
    NetNs, add_veth,
    packet::{
        BRIDGE_MAC, ETH_P_IP, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Run, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_PASS, be16, checksum, counters, counters_full, ether,
        ipv4_packet, load_object, parse_mac, require_root, run_prog, run_xdp, set_endpoint,
        udp_datagram, with_ttl_decremented,
    },
    stock::{StockPeer, stock_vxlan_node},
    unique_id,
};

const VNI: u32 = 1;
const PORT: u16 = 8472;
const SRC_PORT_MIN: u16 = 32768;
const SRC_PORT_MAX: u16 = 60999;
const NETWORK: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 0);
const NETWORK_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 0, 0);
const SUBNET_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// The host device's MAC in the tests (distinct from the VtepMAC to see the rewrite).
const HOST_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x10];
/// Pod bridge (gateway) and pod MACs, for frames from pods.
const GW_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];
const POD_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x05];
/// The underlay NIC's MAC on the receiving side, and a router's: outer MACs of received frames.
const NIC_MAC: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 0x01];
const ROUTER_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0xfe];
/// Test ifindexes. `BPF_PROG_TEST_RUN` does not check redirect targets; the host device's is
/// `lo` (1) because `bpf_check_mtu` looks it up (in the caller's namespace; MTU 65536).
const UNDERLAY_IFINDEX: u32 = 11;
const BRIDGE_IFINDEX: u32 = 12;
const HOST_IFINDEX: u32 = 1;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;

/// A node of the test cluster.
#[derive(Clone, Copy)]
struct Node {
    local_ip: Ipv4Addr,
    subnet: Ipv4Addr,
    vtep: [u8; 6],
}

const A: Node = Node {
    local_ip: Ipv4Addr::new(198, 18, 0, 1),
    subnet: Ipv4Addr::new(172, 17, 1, 0),
    vtep: [0x0e, 0, 0, 0, 0, 0x01],
};
const B: Node = Node {
    local_ip: Ipv4Addr::new(198, 18, 0, 2),
    subnet: Ipv4Addr::new(172, 17, 2, 0),
    vtep: [0x0e, 0, 0, 0, 0, 0x02],
};

fn host_addr(node: Node, last: u8) -> Ipv4Addr {
    let [a, b, c, _] = node.subnet.octets();
    Ipv4Addr::new(a, b, c, last)
}

// ---------------------------------------------------------------------------------------------
// The loaded object

/// The eBPF object with fresh maps and every program loaded (so verified by the kernel); the
/// tests fill the maps directly with the shared types.
struct Loaded {
    ebpf: Ebpf,
}

impl Loaded {
    fn new() -> Self {
        Self {
            ebpf: load_object("packet_vxlan"),
        }
    }
    /// Configured as `node` with `peers` as members and their /24 subnets routed over VXLAN.
    fn node(node: Node, peers: &[Node]) -> Self {
        let mut dp = Self::new();
        dp.set_config(config_for(node));
        for peer in peers {
            dp.add_peer(
                peer.subnet,
                24,
                RemoteNode::vxlan(peer.local_ip.octets(), peer.vtep),
            );
            dp.add_member(peer.local_ip);
        }
        dp
    }

    fn set_config(&mut self, cfg: Config) {
        let mut map: Array<_, Config> =
            Array::try_from(self.ebpf.map_mut(names::CONFIG).unwrap()).unwrap();
        map.set(0, cfg, 0).unwrap();
    }

    fn config(&self) -> Config {
        let map: Array<_, Config> = Array::try_from(self.ebpf.map(names::CONFIG).unwrap()).unwrap();
        map.get(&0, 0).unwrap()
    }

    fn update_config(&mut self, f: impl FnOnce(&mut Config)) {
        let mut cfg = self.config();
        f(&mut cfg);
        self.set_config(cfg);
    }

    fn add_peer(&mut self, subnet: Ipv4Addr, prefix_len: u8, node: RemoteNode) {
        let mut map: LpmTrie<_, [u8; 4], RemoteNode> =
            LpmTrie::try_from(self.ebpf.map_mut(names::ROUTE_V4).unwrap()).unwrap();
        map.insert(&route_key(subnet, prefix_len), node, 0).unwrap();
    }

    fn add_member(&mut self, ip: Ipv4Addr) {
        let mut map: HashMap<_, [u8; 4], MemberNode> =
            HashMap::try_from(self.ebpf.map_mut(names::NODE_V4).unwrap()).unwrap();
        map.insert(ip.octets(), MemberNode { routes: 1 }, 0)
            .unwrap();
    }

    fn run(&self, prog: &str, frame: &[u8]) -> Run {
        run_prog(&self.ebpf, prog, frame)
    }

    /// Packets per reason, summed over the CPUs; reasons that counted nothing are left out.
    fn counters(&self) -> BTreeMap<&'static str, u64> {
        counters(&self.ebpf)
    }

    fn counters_full(&self) -> BTreeMap<&'static str, Counter> {
        counters_full(&self.ebpf)
    }

    /// Asserts exactly these counters (every other reason counted nothing).
    #[track_caller]
    fn assert_counters(&self, expected: &[(Reason, u64)]) {
        let expected: BTreeMap<&'static str, u64> = expected
            .iter()
            .filter(|(_, n)| *n != 0)
            .map(|(r, n)| (r.name(), *n))
            .collect();
        assert_eq!(self.counters(), expected, "counters");
    }
}

fn config_for(node: Node) -> Config {
    Config {
        flags: CONFIG_F_READY,
        vni: VNI,
        underlay_ifindex: UNDERLAY_IFINDEX,
        bridge_ifindex: BRIDGE_IFINDEX,
        host_ifindex: HOST_IFINDEX,
        local_ip: node.local_ip.octets(),
        subnet: node.subnet.octets(),
        subnet_mask: SUBNET_MASK.octets(),
        network: NETWORK.octets(),
        network_mask: NETWORK_MASK.octets(),
        vtep_mac: node.vtep,
        host_mac: HOST_MAC,
        port: PORT,
        src_port_min: SRC_PORT_MIN,
        src_port_max: SRC_PORT_MAX,
        bridge_mac: BRIDGE_MAC,
        xdp_cookie: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Building frames (independent of the data path's own header definitions)

fn icmp_echo(kind: u8, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut p = vec![kind, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(data);
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// An inner IPv4/UDP packet of `data_len` payload bytes.
fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, sport: u16, data_len: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..data_len).map(|i| i as u8).collect();
    ipv4_packet(
        src,
        dst,
        IPPROTO_UDP,
        ttl,
        0,
        &udp_datagram(sport, 5201, &data),
    )
}

/// A frame a pod sends to its gateway.
fn pod_frame(inner: &[u8]) -> Vec<u8> {
    ether(GW_MAC, POD_MAC, ETH_P_IP, inner)
}

/// Fields of a VXLAN frame that tests vary.
#[derive(Clone)]
struct Vxlan {
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    outer_tos: u8,
    frag_off: u16,
    dport: u16,
    flags: [u8; 4],
    vni: u32,
    vni_reserved: u8,
    inner_dst_mac: [u8; 6],
    inner_src_mac: [u8; 6],
    inner_type: u16,
}

impl Vxlan {
    /// What `from` sends to `to`.
    fn between(from: Node, to: Node) -> Self {
        Self {
            outer_src: from.local_ip,
            outer_dst: to.local_ip,
            outer_tos: 0,
            frag_off: 0,
            dport: PORT,
            flags: [0x08, 0, 0, 0],
            vni: VNI,
            vni_reserved: 0,
            inner_dst_mac: to.vtep,
            inner_src_mac: from.vtep,
            inner_type: ETH_P_IP,
        }
    }

    fn frame(&self, inner: &[u8]) -> Vec<u8> {
        let mut vx = self.flags.to_vec();
        vx.extend_from_slice(&(self.vni << 8 | u32::from(self.vni_reserved)).to_be_bytes());
        vx.extend_from_slice(&ether(
            self.inner_dst_mac,
            self.inner_src_mac,
            self.inner_type,
            inner,
        ));
        let udp = udp_datagram(45678, self.dport, &vx);
        let mut ip = ipv4_packet(
            self.outer_src,
            self.outer_dst,
            IPPROTO_UDP,
            64,
            self.outer_tos,
            &udp,
        );
        ip[6..8].copy_from_slice(&self.frag_off.to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&ip[..20]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ether(NIC_MAC, ROUTER_MAC, ETH_P_IP, &ip)
    }
}

/// Checks an encapsulated frame from node `from` to node `to` carrying `inner` (as it must
/// appear inside), and returns the UDP source port. The outer MACs are the kernel's business.
#[track_caller]
fn assert_vxlan(out: &[u8], from: Node, to: Node, inner: &[u8]) -> u16 {
    assert_eq!(out.len(), 14 + 50 + inner.len(), "encapsulated length");
    assert_eq!(be16(out, 12), ETH_P_IP, "outer EtherType");
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45, "outer version/IHL");
    assert_eq!(ip[1] & 0xfc, 0, "outer DSCP (flannel.1 sends tos 0)");
    assert_eq!(
        usize::from(be16(ip, 2)),
        20 + 8 + 8 + 14 + inner.len(),
        "outer total length"
    );
    assert_eq!(
        be16(ip, 6),
        0,
        "outer flags/fragment offset: DF clear, as flannel.1 sends"
    );
    assert_eq!(ip[8], 64, "outer TTL");
    assert_eq!(ip[9], IPPROTO_UDP, "outer protocol");
    assert_eq!(checksum(ip), 0, "outer IPv4 header checksum must verify");
    assert_eq!(&ip[12..16], &from.local_ip.octets(), "outer source");
    assert_eq!(&ip[16..20], &to.local_ip.octets(), "outer destination");
    let udp = &out[34..42];
    let sport = be16(udp, 0);
    assert!(
        (SRC_PORT_MIN..SRC_PORT_MAX).contains(&sport),
        "UDP source port {sport}"
    );
    assert_eq!(be16(udp, 2), PORT, "UDP destination port");
    assert_eq!(
        usize::from(be16(udp, 4)),
        8 + 8 + 14 + inner.len(),
        "UDP length"
    );
    assert_eq!(be16(udp, 6), 0, "UDP checksum");
    assert_eq!(
        &out[42..50],
        &[0x08, 0, 0, 0, 0, 0, VNI as u8, 0],
        "VXLAN header"
    );
    assert_eq!(
        &out[50..56],
        &to.vtep,
        "inner destination MAC = peer VtepMAC"
    );
    assert_eq!(&out[56..62], &from.vtep, "inner source MAC = our VtepMAC");
    assert_eq!(be16(out, 62), ETH_P_IP, "inner EtherType");
    assert_eq!(&out[64..], inner, "inner packet");
    sport
}

fn from_hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// A frame captured on the underlay (`tcpdump -xx` on the receiving veth) from a stock kernel
/// VXLAN device created as flanneld creates it (`ip link add flannel.1 type vxlan id 1 local
/// 198.18.0.1 dev <ext> dstport 8472 nolearning`, MAC 0e:00:00:00:00:01, 172.17.1.0/32, with the
/// neigh/fdb/route entries for 172.17.2.0/24 at 198.18.0.2, MAC 0e:00:00:00:00:02): the host
/// pinging 172.17.2.5. Kernel 6.18. Its UDP checksum field holds the pseudo-header sum of a
/// CHECKSUM_PARTIAL packet (checksum offload between veths; on a real wire the NIC fills it).
const FLANNEL1_CAPTURE: &str = "
    66db 9109 8d8a ea5e e27c dbb3 0800 4500
    0086 c314 0000 4011 2b2b c612 0001 c612
    0002 ad20 2118 0072 8cab 0800 0000 0000
    0100 0e00 0000 0002 0e00 0000 0001 0800
    4500 0054 d2e9 4000 4001 0c98 ac11 0100
    ac11 0205 0800 41f9 2f48 0001 cdcd 026b
    0000 0000 f2b1 0500 0000 0000 1011 1213
    1415 1617 1819 1a1b 1c1d 1e1f 2021 2223
    2425 2627 2829 2a2b 2c2d 2e2f 3031 3233
    3435 3637";

// ---------------------------------------------------------------------------------------------
// Encapsulation

#[test]
fn every_program_passes_the_verifier() {
    let dp = Loaded::new();
    for name in [
        POD_EGRESS,
        HOST_EGRESS,
        UNDERLAY_INGRESS,
        UNDERLAY_EGRESS,
        PROBE_DECAP_L4_UDP,
    ] {
        let prog: &SchedClassifier = dp.ebpf.program(name).unwrap().try_into().unwrap();
        assert!(prog.fd().is_ok(), "{name} is loaded");
    }
    let xdp: &aya::programs::Xdp = dp.ebpf.program(UNDERLAY_XDP).unwrap().try_into().unwrap();
    assert!(xdp.fd().is_ok(), "{UNDERLAY_XDP} is loaded");
    for map in [
        names::CONFIG,
        names::ROUTE_V4,
        names::NODE_V4,
        names::ENDPOINT_V4,
        names::COUNTERS,
    ] {
        assert!(dp.ebpf.map(map).is_some(), "map {map}");
    }
}

#[test]
fn the_decap_probe_decapsulates_its_frame_and_answers_for_the_new_flag() {
    // The agent's probe frame: Ethernet, then room for two rounds of 50 bytes and an IPv4
    // header. Bit 0: the flags decapsulation always uses worked; bit 1: the kernel also took
    // BPF_F_ADJ_ROOM_DECAP_L4_UDP (not on 6.18; it must never be set without bit 0).
    let dp = Loaded::new();
    let mut frame = vec![0u8; 14 + 100 + 40];
    frame[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    frame[14] = 0x45;
    let run = dp.run(PROBE_DECAP_L4_UDP, &frame);
    assert_eq!(
        run.verdict & 1,
        1,
        "the plain decapsulation of the probe frame failed"
    );
    assert!(run.verdict <= 3, "answer {}", run.verdict);
    let shrunk = if run.verdict & 2 != 0 { 100 } else { 50 };
    assert_eq!(
        run.out.len(),
        frame.len() - shrunk,
        "bytes removed match the answer"
    );
    // A frame too short for even the first round is refused, so bit 0 means something.
    let short = &frame[..14 + 20 + 20];
    assert_eq!(dp.run(PROBE_DECAP_L4_UDP, short).verdict & 1, 0);
}

const POD_IFINDEX: u32 = 21;
const OTHER_POD_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x09];

#[test]
fn underlay_ingress_delivers_a_known_pod_straight_into_it() {
    let mut dp = Loaded::node(A, &[B]);
    let pod = host_addr(A, 7);
    set_endpoint(&mut dp.ebpf, pod, Some(Endpoint::new(POD_IFINDEX, POD_MAC)));
    let inner = udp_packet(host_addr(B, 5), pod, 64, 1, 100);
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(&run.out[..6], &POD_MAC, "destination MAC: the pod's");
    assert_eq!(
        &run.out[6..12],
        &BRIDGE_MAC,
        "source MAC: the bridge's (its gateway)"
    );
    assert_eq!(be16(&run.out, 12), ETH_P_IP);
    assert_eq!(&run.out[14..], &with_ttl_decremented(&inner, 1)[..]);
    dp.assert_counters(&[(Reason::UnderlayRx, 1), (Reason::DecapEndpoint, 1)]);
    assert_eq!(
        dp.counters_full()["decap_endpoint"].bytes,
        run.out.len() as u64
    );

    // Without a bridge (the runtime deleted it) a known pod is still reached.
    dp.update_config(|c| c.bridge_ifindex = 0);
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(&run.out[..6], &POD_MAC);
    // An unknown one then has nowhere to go.
    let unknown = udp_packet(host_addr(B, 5), host_addr(A, 8), 64, 1, 100);
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&unknown));
    assert_eq!(run.verdict, TC_ACT_SHOT);
    dp.assert_counters(&[
        (Reason::UnderlayRx, 3),
        (Reason::DecapEndpoint, 2),
        (Reason::DropNoBridge, 1),
    ]);
}

#[test]
fn underlay_ingress_takes_the_bridge_for_a_pod_without_an_endpoint() {
    let mut dp = Loaded::node(A, &[B]);
    // Another pod's entry does not make this one known.
    set_endpoint(
        &mut dp.ebpf,
        host_addr(A, 9),
        Some(Endpoint::new(POD_IFINDEX, OTHER_POD_MAC)),
    );
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 100);
    let frame = Vxlan::between(B, A).frame(&inner);
    let run = dp.run(UNDERLAY_INGRESS, &frame);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        &run.out[..12],
        &frame[..12],
        "the MACs are left to bpf_redirect_neigh on the bridge"
    );
    assert_eq!(&run.out[14..], &with_ttl_decremented(&inner, 1)[..]);
    dp.assert_counters(&[(Reason::UnderlayRx, 1), (Reason::DecapPod, 1)]);
}

#[test]
fn underlay_ingress_follows_an_endpoint_that_changed_or_went_away() {
    let mut dp = Loaded::node(A, &[B]);
    let pod = host_addr(A, 7);
    let inner = udp_packet(host_addr(B, 5), pod, 64, 1, 100);
    let frame = Vxlan::between(B, A).frame(&inner);
    set_endpoint(&mut dp.ebpf, pod, Some(Endpoint::new(POD_IFINDEX, POD_MAC)));
    assert_eq!(&dp.run(UNDERLAY_INGRESS, &frame).out[..6], &POD_MAC);
    // The address moved to another pod (another MAC, another veth): the next packet follows.
    set_endpoint(
        &mut dp.ebpf,
        pod,
        Some(Endpoint::new(POD_IFINDEX + 1, OTHER_POD_MAC)),
    );
    assert_eq!(&dp.run(UNDERLAY_INGRESS, &frame).out[..6], &OTHER_POD_MAC);
    // The pod went (the agent removed its entry): back to the bridge, never the old veth.
    set_endpoint(&mut dp.ebpf, pod, None);
    let run = dp.run(UNDERLAY_INGRESS, &frame);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(&run.out[..12], &frame[..12]);
    dp.assert_counters(&[
        (Reason::UnderlayRx, 3),
        (Reason::DecapEndpoint, 2),
        (Reason::DecapPod, 1),
    ]);
}

#[test]
fn underlay_ingress_never_sends_host_addresses_to_an_endpoint() {
    // Entries for .0 and .1 cannot come from the agent, but even then the host gets them.
    let mut dp = Loaded::node(A, &[B]);
    for last in [0, 1] {
        set_endpoint(
            &mut dp.ebpf,
            host_addr(A, last),
            Some(Endpoint::new(POD_IFINDEX, POD_MAC)),
        );
        let inner = udp_packet(host_addr(B, 5), host_addr(A, last), 64, 1, 10);
        let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&inner));
        assert_eq!(&run.out[..6], &HOST_MAC, ".{last}");
    }
    dp.assert_counters(&[(Reason::UnderlayRx, 2), (Reason::DecapHost, 2)]);
}

const XDP_COOKIE: u32 = 0xc0ff_ee01;

/// The 8 bytes of metadata `underlay_xdp` puts in front of a frame it decapsulated.
fn xdp_mark(cookie: u32) -> Vec<u8> {
    let mut mark = cookie.to_ne_bytes().to_vec();
    mark.extend_from_slice(&[0; 4]);
    mark
}

#[test]
fn underlay_xdp_decapsulates_and_marks_what_passes_every_check() {
    let mut dp = Loaded::node(A, &[B]);
    dp.update_config(|c| c.xdp_cookie = XDP_COOKIE);
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 300);
    let vx = Vxlan::between(B, A);
    let run = run_xdp(&dp.ebpf, UNDERLAY_XDP, &vx.frame(&inner));
    assert_eq!(run.verdict, XDP_PASS);
    let mut expected = xdp_mark(XDP_COOKIE);
    // The inner Ethernet frame, untouched: TC decides the delivery and the TTL.
    expected.extend_from_slice(&ether(A.vtep, B.vtep, ETH_P_IP, &inner));
    assert_eq!(run.out, expected);
    dp.assert_counters(&[(Reason::XdpDecap, 1)]);
    assert_eq!(
        dp.counters_full()["xdp_decap"].bytes,
        (14 + inner.len()) as u64
    );
}

#[test]
fn underlay_xdp_applies_ecn_as_tc_decapsulation_does() {
    let mut dp = Loaded::node(A, &[B]);
    dp.update_config(|c| c.xdp_cookie = XDP_COOKIE);
    let vx = Vxlan {
        outer_tos: 0b11,
        ..Vxlan::between(B, A)
    };
    let mut inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 30);
    inner[1] = 0b10; // ECT(0)
    inner[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&inner[..20]);
    inner[10..12].copy_from_slice(&c.to_be_bytes());
    let run = run_xdp(&dp.ebpf, UNDERLAY_XDP, &vx.frame(&inner));
    let ip = &run.out[8 + 14..8 + 14 + 20];
    assert_eq!(ip[1] & 0b11, 0b11, "CE copied inward");
    assert_eq!(checksum(ip), 0, "inner checksum patched");

    // CE over a not-ECT inner packet must be dropped: XDP leaves that to TC, unchanged.
    inner[1] = 0;
    inner[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&inner[..20]);
    inner[10..12].copy_from_slice(&c.to_be_bytes());
    let frame = vx.frame(&inner);
    let run = run_xdp(&dp.ebpf, UNDERLAY_XDP, &frame);
    assert_eq!((run.verdict, &run.out), (XDP_PASS, &frame));
    assert_eq!(dp.run(UNDERLAY_INGRESS, &frame).verdict, TC_ACT_SHOT);
    dp.assert_counters(&[
        (Reason::XdpDecap, 1),
        (Reason::UnderlayRx, 1),
        (Reason::DropEcn, 1),
    ]);
}

#[test]
fn underlay_xdp_leaves_everything_else_unchanged_for_tc() {
    let mut dp = Loaded::node(A, &[B]);
    dp.update_config(|c| c.xdp_cookie = XDP_COOKIE);
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 50);
    let c = Node {
        local_ip: Ipv4Addr::new(198, 18, 0, 3),
        ..B
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "wrong VNI",
            Vxlan {
                vni: 7,
                ..Vxlan::between(B, A)
            }
            .frame(&inner),
        ),
        ("not a member", Vxlan::between(c, A).frame(&inner)),
        (
            "wrong inner MAC",
            Vxlan {
                inner_dst_mac: B.vtep,
                ..Vxlan::between(B, A)
            }
            .frame(&inner),
        ),
        (
            "fragment",
            Vxlan {
                frag_off: 0x2000,
                ..Vxlan::between(B, A)
            }
            .frame(&inner),
        ),
        (
            "another port",
            Vxlan {
                dport: 4789,
                ..Vxlan::between(B, A)
            }
            .frame(&inner),
        ),
        (
            "truncated",
            Vxlan::between(B, A).frame(&inner)[..14 + 20 + 8 + 8 + 14 + 10].to_vec(),
        ),
        (
            "plain traffic",
            ether(NIC_MAC, ROUTER_MAC, ETH_P_IP, &inner),
        ),
    ];
    for (what, frame) in &cases {
        let run = run_xdp(&dp.ebpf, UNDERLAY_XDP, frame);
        assert_eq!((run.verdict, &run.out), (XDP_PASS, frame), "{what}");
    }
    // Without a cookie (XDP not in use by the agent) nothing is decapsulated either.
    dp.update_config(|c| c.xdp_cookie = 0);
    let frame = Vxlan::between(B, A).frame(&inner);
    let run = run_xdp(&dp.ebpf, UNDERLAY_XDP, &frame);
    assert_eq!((run.verdict, &run.out), (XDP_PASS, &frame));
    dp.assert_counters(&[]);
}

#[test]
fn pod_egress_encapsulates_for_a_peer_subnet() {
    let dp = Loaded::node(A, &[B]);
    let inner = udp_packet(host_addr(A, 5), host_addr(B, 7), 64, 40000, 100);
    let frame = pod_frame(&inner);

    let run = dp.run(POD_EGRESS, &frame);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    // The sender's forwarding hop: TTL 64 -> 63, checksum patched.
    let expected_inner = with_ttl_decremented(&inner, 1);
    assert_eq!(checksum(&expected_inner[..20]), 0);
    let sport = assert_vxlan(&run.out, A, B, &expected_inner);

    // Same flow, same source port.
    assert_eq!(
        assert_vxlan(&dp.run(POD_EGRESS, &frame).out, A, B, &expected_inner),
        sport
    );
    // The port comes from the flow hash: different flows spread over the range.
    let ports: std::collections::BTreeSet<u16> = (0..8u16)
        .map(|i| {
            let inner = udp_packet(host_addr(A, 5), host_addr(B, 7), 64, 41000 + i, 100);
            assert_vxlan(
                &dp.run(POD_EGRESS, &pod_frame(&inner)).out,
                A,
                B,
                &with_ttl_decremented(&inner, 1),
            )
        })
        .collect();
    assert!(ports.len() >= 4, "source ports of 8 flows: {ports:?}");

    dp.assert_counters(&[(Reason::EncapPod, 10)]);
    let bytes = dp.counters_full()["encap_pod"].bytes;
    assert_eq!(
        bytes,
        10 * run.out.len() as u64,
        "encap_pod counts the encapsulated size"
    );
}

#[test]
fn pod_egress_uses_the_longest_prefix_and_the_peer_entry() {
    let mut dp = Loaded::node(A, &[B]);
    // A /16 catch-all to another node and a /28 inside B's subnet to a third one.
    let c = Node {
        local_ip: Ipv4Addr::new(198, 18, 0, 3),
        subnet: Ipv4Addr::new(172, 17, 3, 0),
        vtep: [0x0e, 0, 0, 0, 0, 3],
    };
    let d = Node {
        local_ip: Ipv4Addr::new(198, 18, 0, 4),
        subnet: Ipv4Addr::new(172, 17, 2, 16),
        vtep: [0x0e, 0, 0, 0, 0, 4],
    };
    dp.add_peer(NETWORK, 16, RemoteNode::vxlan(c.local_ip.octets(), c.vtep));
    dp.add_peer(d.subnet, 28, RemoteNode::vxlan(d.local_ip.octets(), d.vtep));
    for (dst, to) in [
        (host_addr(B, 7), B),
        (host_addr(B, 20), d),
        (Ipv4Addr::new(172, 17, 99, 1), c),
    ] {
        let inner = udp_packet(host_addr(A, 5), dst, 64, 40000, 10);
        let run = dp.run(POD_EGRESS, &pod_frame(&inner));
        assert_eq!(run.verdict, TC_ACT_REDIRECT, "{dst}");
        assert_vxlan(&run.out, A, to, &with_ttl_decremented(&inner, 1));
    }
    // A route with neither the VXLAN nor the DIRECT flag is left to the kernel (DIRECT routes:
    // packet_direct.rs).
    dp.add_peer(
        Ipv4Addr::new(172, 17, 4, 0),
        24,
        RemoteNode {
            public_ip: [198, 18, 0, 5],
            vtep_mac: [0; 6],
            flags: 0,
        },
    );
    let frame = pod_frame(&udp_packet(
        host_addr(A, 5),
        Ipv4Addr::new(172, 17, 4, 9),
        64,
        40000,
        10,
    ));
    let run = dp.run(POD_EGRESS, &frame);
    assert_eq!((run.verdict, run.out), (TC_ACT_OK, frame));
    dp.assert_counters(&[(Reason::EncapPod, 3)]);
}

#[test]
fn pod_egress_leaves_everything_else_to_the_kernel() {
    let mut dp = Loaded::node(A, &[B]);
    let src = host_addr(A, 5);
    let peer_bound = pod_frame(&udp_packet(src, host_addr(B, 7), 64, 40000, 10));
    let mut broadcast = peer_bound.clone();
    broadcast[..6].copy_from_slice(&[0xff; 6]);
    let mut bad_ihl = peer_bound.clone();
    bad_ihl[14] = 0x44;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "outside world",
            pod_frame(&udp_packet(src, Ipv4Addr::new(198, 19, 0, 1), 64, 1, 10)),
        ),
        (
            "own subnet",
            pod_frame(&udp_packet(src, host_addr(A, 9), 64, 1, 10)),
        ),
        (
            "cluster address without a peer",
            pod_frame(&udp_packet(src, Ipv4Addr::new(172, 17, 9, 9), 64, 1, 10)),
        ),
        ("ARP", ether([0xff; 6], POD_MAC, ETH_P_ARP, &[0; 28])),
        ("IPv6", ether(GW_MAC, POD_MAC, ETH_P_IPV6, &[0x60; 60])),
        ("broadcast MAC", broadcast),
        ("IPv4 header length below 20", bad_ihl),
    ];
    for (what, frame) in &cases {
        let run = dp.run(POD_EGRESS, frame);
        assert_eq!(run.verdict, TC_ACT_OK, "{what}");
        assert_eq!(&run.out, frame, "{what}: untouched");
    }
    // TTL about to expire: the kernel must answer ICMP time exceeded, so it gets the packet.
    let ttl1 = pod_frame(&udp_packet(src, host_addr(B, 7), 1, 40000, 10));
    let run = dp.run(POD_EGRESS, &ttl1);
    assert_eq!((run.verdict, &run.out), (TC_ACT_OK, &ttl1));
    dp.assert_counters(&[(Reason::StackTtl, 1)]);

    // Before the agent has configured the node, nothing is touched.
    dp.set_config(Config::default());
    let run = dp.run(POD_EGRESS, &peer_bound);
    assert_eq!((run.verdict, &run.out), (TC_ACT_OK, &peer_bound));
    dp.assert_counters(&[(Reason::StackTtl, 1)]);
}

#[test]
fn host_egress_encapsulates_without_touching_the_inner_packet() {
    let dp = Loaded::node(A, &[B]);
    // The host (source: the host device's address) pings a remote pod. The kernel routed it
    // already, so the TTL stays.
    let inner = ipv4_packet(
        A.subnet,
        host_addr(B, 5),
        IPPROTO_ICMP,
        64,
        0,
        &icmp_echo(8, 7, 1, b"ping"),
    );
    let frame = ether(
        [0x02, 0x11, 0, 0, 0, 1],
        [0x02, 0x11, 0, 0, 0, 1],
        ETH_P_IP,
        &inner,
    );
    let run = dp.run(HOST_EGRESS, &frame);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_vxlan(&run.out, A, B, &inner);
    dp.assert_counters(&[(Reason::EncapHost, 1)]);
}

#[test]
fn host_egress_drops_cluster_addresses_without_a_peer() {
    let dp = Loaded::node(A, &[B]);
    let no_peer = ether(
        HOST_MAC,
        HOST_MAC,
        ETH_P_IP,
        &udp_packet(A.subnet, Ipv4Addr::new(172, 17, 9, 9), 64, 1, 10),
    );
    assert_eq!(dp.run(HOST_EGRESS, &no_peer).verdict, TC_ACT_SHOT);
    // Not a cluster address, not IPv4: not ours.
    let outside = ether(
        HOST_MAC,
        HOST_MAC,
        ETH_P_IP,
        &udp_packet(A.subnet, Ipv4Addr::new(10, 1, 2, 3), 64, 1, 10),
    );
    let run = dp.run(HOST_EGRESS, &outside);
    assert_eq!((run.verdict, &run.out), (TC_ACT_OK, &outside));
    let ipv6 = ether(HOST_MAC, HOST_MAC, ETH_P_IPV6, &[0x60; 60]);
    assert_eq!(dp.run(HOST_EGRESS, &ipv6).verdict, TC_ACT_OK);
    dp.assert_counters(&[(Reason::DropNoRoute, 1)]);
}

#[test]
fn ecn_is_copied_to_the_outer_header_as_the_kernel_does() {
    let dp = Loaded::node(A, &[B]);
    // inner ECN -> outer ECN: Not-ECT -> 0, ECT(1) -> 1, ECT(0) -> 2, CE -> ECT(0); DSCP never.
    for (inner_tos, outer_tos) in [(0x00, 0), (0xb9, 1), (0x02, 2), (0x03, 2)] {
        let inner = ipv4_packet(
            A.subnet,
            host_addr(B, 5),
            IPPROTO_UDP,
            64,
            inner_tos,
            &udp_datagram(1, 2, b"x"),
        );
        let run = dp.run(HOST_EGRESS, &ether(HOST_MAC, HOST_MAC, ETH_P_IP, &inner));
        assert_eq!(run.verdict, TC_ACT_REDIRECT);
        assert_eq!(
            run.out[15], outer_tos,
            "outer TOS for inner TOS {inner_tos:#x}"
        );
        assert_eq!(checksum(&run.out[14..34]), 0);
    }
}

/// The same inner packet as in the kernel capture, through `host_egress` configured like the
/// capture's node: every byte after the outer Ethernet header must be the kernel's, except the
/// IP ID (random in both), the header checksum (follows the ID), the UDP source port (flow hash
/// with a per-boot key) and the UDP checksum (zero from us; flannel.1 fills it in).
#[test]
fn encapsulation_matches_the_kernel_vxlan_device() {
    let kernel = from_hex(FLANNEL1_CAPTURE);
    assert_eq!(kernel.len(), 148);
    let dp = Loaded::node(A, &[B]);
    let inner = &kernel[64..];
    let run = dp.run(HOST_EGRESS, &ether(HOST_MAC, HOST_MAC, ETH_P_IP, inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_vxlan(&run.out, A, B, inner);
    assert_eq!(run.out.len(), kernel.len());
    let differ: Vec<usize> = (14..kernel.len())
        .filter(|&i| run.out[i] != kernel[i])
        .collect();
    let allowed = [18, 19, 24, 25, 34, 35, 40, 41];
    assert!(
        differ.iter().all(|i| allowed.contains(i)),
        "bytes differing from flannel.1: {differ:?}"
    );
    // The kernel's frame passes our own frame checks too.
    assert_vxlan(
        &[
            &run.out[..14],
            &kernel[14..34],
            &run.out[34..36],
            &kernel[36..40],
            &[0, 0],
            &kernel[42..],
        ]
        .concat(),
        A,
        B,
        inner,
    );
}

// ---------------------------------------------------------------------------------------------
// Decapsulation

#[test]
fn underlay_ingress_decapsulates_a_kernel_vxlan_frame_to_the_pod_bridge() {
    // The capture is A -> B (172.17.2.5); run it on node B.
    let kernel = from_hex(FLANNEL1_CAPTURE);
    let dp = Loaded::node(B, &[A]);
    let run = dp.run(UNDERLAY_INGRESS, &kernel);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(run.out.len(), kernel.len() - 50);
    assert_eq!(be16(&run.out, 12), ETH_P_IP);
    // The receiver's forwarding hop decrements the TTL (64 -> 63).
    assert_eq!(&run.out[14..], &with_ttl_decremented(&kernel[64..], 1)[..]);
    dp.assert_counters(&[(Reason::UnderlayRx, 1), (Reason::DecapPod, 1)]);
    assert_eq!(dp.counters_full()["decap_pod"].bytes, run.out.len() as u64);
}

#[test]
fn underlay_ingress_delivers_host_addresses_to_the_host_device() {
    let dp = Loaded::node(A, &[B]);
    // .0 is the host device's address, .1 the bridge's (gateway): both are the host's.
    for last in [0, 1] {
        let inner = ipv4_packet(
            host_addr(B, 5),
            host_addr(A, last),
            IPPROTO_ICMP,
            64,
            0,
            &icmp_echo(8, 1, 1, b"hi"),
        );
        let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&inner));
        assert_eq!(run.verdict, TC_ACT_REDIRECT, ".{last}");
        assert_eq!(
            &run.out[..6],
            &HOST_MAC,
            "destination MAC: the host device's"
        );
        assert_eq!(&run.out[6..12], &B.vtep, "source MAC: the sender's VtepMAC");
        assert_eq!(be16(&run.out, 12), ETH_P_IP);
        assert_eq!(
            &run.out[14..],
            &inner[..],
            "the host stack forwards it, if at all: TTL kept"
        );
    }
    dp.assert_counters(&[(Reason::UnderlayRx, 2), (Reason::DecapHost, 2)]);
}

#[test]
fn underlay_ingress_hands_expiring_packets_to_the_host() {
    let dp = Loaded::node(A, &[B]);
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 1, 1, 10);
    let run = dp.run(UNDERLAY_INGRESS, &Vxlan::between(B, A).frame(&inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(&run.out[..6], &HOST_MAC);
    assert_eq!(
        &run.out[14..],
        &inner[..],
        "TTL 1 kept: the kernel answers time exceeded"
    );
    dp.assert_counters(&[(Reason::UnderlayRx, 1), (Reason::StackTtl, 1)]);
}

#[test]
fn underlay_ingress_copies_congestion_marks_inward() {
    let dp = Loaded::node(A, &[B]);
    let mut vx = Vxlan::between(B, A);
    vx.outer_tos = 0x03; // CE
    // ECT(0) inner -> CE inner (checksum patched), then the TTL hop.
    let inner = ipv4_packet(
        host_addr(B, 5),
        host_addr(A, 7),
        IPPROTO_UDP,
        64,
        0x02,
        &udp_datagram(1, 2, b"x"),
    );
    let run = dp.run(UNDERLAY_INGRESS, &vx.frame(&inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let mut expected = inner.clone();
    expected[1] = 0x03;
    assert_eq!(&run.out[14..], &with_ttl_decremented(&expected, 1)[..]);
    assert_eq!(checksum(&run.out[14..34]), 0);
    // Not-ECT inner under a CE outer: dropped (RFC 6040).
    let not_ect = ipv4_packet(
        host_addr(B, 5),
        host_addr(A, 7),
        IPPROTO_UDP,
        64,
        0,
        &udp_datagram(1, 2, b"x"),
    );
    assert_eq!(
        dp.run(UNDERLAY_INGRESS, &vx.frame(&not_ect)).verdict,
        TC_ACT_SHOT
    );
    // ECT outer without CE changes nothing.
    vx.outer_tos = 0x02;
    let run = dp.run(UNDERLAY_INGRESS, &vx.frame(&not_ect));
    assert_eq!(&run.out[14..], &with_ttl_decremented(&not_ect, 1)[..]);
    dp.assert_counters(&[
        (Reason::UnderlayRx, 3),
        (Reason::DecapPod, 2),
        (Reason::DropEcn, 1),
    ]);
}

#[test]
fn underlay_ingress_drops_and_counts_what_fails_a_check() {
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 32);
    let good = Vxlan::between(B, A);
    let with = |f: &dyn Fn(&mut Vxlan)| {
        let mut v = good.clone();
        f(&mut v);
        v.frame(&inner)
    };
    let mut bad_checksum = good.frame(&inner);
    bad_checksum[24] ^= 0xff;
    let mut udp_len = good.frame(&inner);
    udp_len[39] -= 1; // UDP length one short of IP's
    let mut inner_ihl = good.frame(&inner);
    inner_ihl[64] = 0x44;
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        (
            "source not a member",
            with(&|v| v.outer_src = Ipv4Addr::new(198, 18, 0, 99)),
            Reason::DropUnknownPeer,
        ),
        ("other VNI", with(&|v| v.vni = 2), Reason::DropWrongVni),
        (
            "inner MAC not our VtepMAC",
            with(&|v| v.inner_dst_mac = [0x0e, 0, 0, 0, 0, 0x09]),
            Reason::DropWrongMac,
        ),
        (
            "inner broadcast",
            with(&|v| v.inner_dst_mac = [0xff; 6]),
            Reason::DropWrongMac,
        ),
        (
            "inner ARP",
            with(&|v| v.inner_type = ETH_P_ARP),
            Reason::DropNotIpv4,
        ),
        (
            "inner IPv6",
            with(&|v| v.inner_type = ETH_P_IPV6),
            Reason::DropNotIpv4,
        ),
        (
            "VXLAN flags with G bit",
            with(&|v| v.flags = [0x88, 0, 0, 0]),
            Reason::DropMalformed,
        ),
        (
            "VXLAN flags without I bit",
            with(&|v| v.flags = [0, 0, 0, 0]),
            Reason::DropMalformed,
        ),
        (
            "VXLAN reserved bytes",
            with(&|v| v.flags = [0x08, 0, 1, 0]),
            Reason::DropMalformed,
        ),
        (
            "VXLAN reserved byte after VNI",
            with(&|v| v.vni_reserved = 1),
            Reason::DropMalformed,
        ),
        ("UDP length mismatch", udp_len, Reason::DropMalformed),
        ("inner IPv4 header length", inner_ihl, Reason::DropMalformed),
        ("outer checksum", bad_checksum, Reason::DropBadChecksum),
        (
            "first fragment",
            with(&|v| v.frag_off = 0x2000),
            Reason::DropFragment,
        ),
        (
            "inner destination outside our subnet",
            Vxlan::between(B, A).frame(&udp_packet(
                host_addr(B, 5),
                Ipv4Addr::new(172, 17, 3, 4),
                64,
                1,
                32,
            )),
            Reason::DropNotLocal,
        ),
    ];
    let dp = Loaded::node(A, &[B]);
    for (what, frame, reason) in &cases {
        let before = dp.counters();
        let run = dp.run(UNDERLAY_INGRESS, frame);
        assert_eq!(run.verdict, TC_ACT_SHOT, "{what}");
        let after = dp.counters();
        assert_eq!(
            after.get(reason.name()).copied().unwrap_or(0),
            before.get(reason.name()).copied().unwrap_or(0) + 1,
            "{what}: counted as {}",
            reason.name()
        );
    }
    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, _, reason) in &cases {
        *expected.entry(reason.name()).or_default() += 1;
    }
    expected.insert("underlay_rx", cases.len() as u64);
    assert_eq!(dp.counters(), expected);
}

/// Runs `frame` through `underlay_xdp` and then `underlay_ingress` on a node with XDP in use,
/// as the kernel would: XDP first, then TC on what XDP left. Returns TC's verdict, after
/// asserting that XDP either decapsulated and marked the frame (`decapsulated`) or left it
/// unchanged for TC to drop and count (XDP never drops).
#[track_caller]
fn xdp_then_tc(dp: &Loaded, frame: &[u8], decapsulated: bool, what: &str) -> u32 {
    let xdp = run_xdp(&dp.ebpf, UNDERLAY_XDP, frame);
    assert_eq!(xdp.verdict, XDP_PASS, "{what}: XDP passes everything");
    if decapsulated {
        let mut expected = xdp_mark(XDP_COOKIE);
        expected.extend_from_slice(&frame[14 + 50 - 14..]);
        assert_eq!(xdp.out, expected, "{what}: XDP decapsulates and marks");
    } else {
        assert_eq!(
            xdp.out, frame,
            "{what}: XDP leaves the frame unchanged for TC"
        );
    }
    dp.run(UNDERLAY_INGRESS, frame).verdict
}

/// Issue 12, item 2: a member node speaks only for its own subnet, and for sources outside the
/// cluster network that it forwards; anything else is dropped and counted, in TC and (by
/// leaving it for TC) in XDP.
#[test]
fn a_member_cannot_claim_inner_sources_of_other_nodes_or_of_ours() {
    let c = Node {
        local_ip: Ipv4Addr::new(198, 18, 0, 3),
        subnet: Ipv4Addr::new(172, 17, 3, 0),
        vtep: [0x0e, 0, 0, 0, 0, 0x03],
    };
    let mut dp = Loaded::node(A, &[B, c]);
    dp.update_config(|cfg| cfg.xdp_cookie = XDP_COOKIE);
    let from_b = |src| Vxlan::between(B, A).frame(&udp_packet(src, host_addr(A, 7), 64, 1, 32));
    let refused = [
        ("another member's pod", host_addr(c, 5)),
        ("another member's host device", c.subnet),
        ("one of our own pods", host_addr(A, 9)),
        ("our own host device", A.subnet),
        (
            "a cluster address no node holds",
            Ipv4Addr::new(172, 17, 200, 1),
        ),
    ];
    let accepted = [
        ("its own pod", host_addr(B, 5)),
        ("its own host device", B.subnet),
        (
            "an outside host it forwards for",
            Ipv4Addr::new(198, 19, 0, 1),
        ),
    ];
    for (what, src) in refused {
        let before = dp.counters();
        assert_eq!(
            xdp_then_tc(&dp, &from_b(src), false, what),
            TC_ACT_SHOT,
            "{what}"
        );
        let grown = |r: Reason| {
            dp.counters().get(r.name()).copied().unwrap_or(0)
                - before.get(r.name()).copied().unwrap_or(0)
        };
        assert_eq!(grown(Reason::DropInnerSource), 1, "{what}: counted");
    }
    for (what, src) in accepted {
        assert_eq!(
            xdp_then_tc(&dp, &from_b(src), true, what),
            TC_ACT_REDIRECT,
            "{what}"
        );
    }
    dp.assert_counters(&[
        (Reason::UnderlayRx, 8),
        (Reason::DropInnerSource, 5),
        (Reason::XdpDecap, 3),
        (Reason::DecapPod, 3),
    ]);
}

/// The inner IPv4 header with a recomputed checksum after `f` changed it.
fn inner_with(inner: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut p = inner.to_vec();
    f(&mut p);
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if p.len() >= ihl && ihl >= 20 {
        p[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&p[..ihl]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// Issue 12, item 10: an inner IPv4 header the kernel's `ip_rcv` would refuse is dropped and
/// counted (`drop_malformed`), as the direct path does (`drop_direct_malformed`), instead of
/// being delivered by redirect; a valid header with options still passes.
#[test]
fn malformed_inner_ipv4_headers_are_dropped_and_counted() {
    let mut dp = Loaded::node(A, &[B]);
    dp.update_config(|cfg| cfg.xdp_cookie = XDP_COOKIE);
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 40);
    let vx = Vxlan::between(B, A);
    let mut bad_checksum = inner.clone();
    bad_checksum[10] ^= 0x5a;
    // One option word (a NOP and three END bytes), lengths and checksum consistent.
    let with_options = {
        let mut p = inner[..20].to_vec();
        p.extend_from_slice(&[1, 0, 0, 0]);
        p.extend_from_slice(&inner[20..]);
        inner_with(&p, |p| {
            p[0] = 0x46;
            let len = u16::try_from(p.len()).unwrap();
            p[2..4].copy_from_slice(&len.to_be_bytes());
        })
    };
    let mut options_bad_checksum = with_options.clone();
    options_bad_checksum[21] = 7;
    let refused: Vec<(&str, Vec<u8>)> = vec![
        ("header checksum", bad_checksum),
        ("checksum over the options", options_bad_checksum),
        (
            "header length beyond the total length",
            inner_with(
                &udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 4),
                |p| p[0] = 0x4f,
            ),
        ),
        (
            "header length beyond the packet",
            inner_with(&inner[..20], |p| {
                p[0] = 0x46;
                p[2..4].copy_from_slice(&24u16.to_be_bytes());
            }),
        ),
        (
            "total length beyond the frame",
            inner_with(&inner, |p| {
                let len = u16::try_from(p.len() + 1).unwrap();
                p[2..4].copy_from_slice(&len.to_be_bytes());
            }),
        ),
        (
            "total length below the header",
            inner_with(&inner, |p| p[2..4].copy_from_slice(&19u16.to_be_bytes())),
        ),
        ("version 6", inner_with(&inner, |p| p[0] = 0x65)),
    ];
    for (what, packet) in &refused {
        let before = dp.counters();
        let frame = vx.frame(packet);
        assert_eq!(xdp_then_tc(&dp, &frame, false, what), TC_ACT_SHOT, "{what}");
        assert_eq!(
            dp.counters().get("drop_malformed").copied().unwrap_or(0),
            before.get("drop_malformed").copied().unwrap_or(0) + 1,
            "{what}: counted as drop_malformed"
        );
    }
    // Shorter than the frame (Ethernet padding) is fine, as for the kernel; so are options.
    let padded = {
        let mut f = vx.frame(&inner);
        let outer_len = be16(&f, 16) + 6;
        f[16..18].copy_from_slice(&outer_len.to_be_bytes());
        f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let c = checksum(&f[14..34]);
        f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
        let udp_len = be16(&f, 38) + 6;
        f[38..40].copy_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[0; 6]);
        f
    };
    for (what, frame) in [
        ("padded", padded),
        ("with options", vx.frame(&with_options)),
    ] {
        assert_eq!(
            xdp_then_tc(&dp, &frame, true, what),
            TC_ACT_REDIRECT,
            "{what}"
        );
    }
    dp.assert_counters(&[
        (Reason::UnderlayRx, refused.len() as u64 + 2),
        (Reason::DropMalformed, refused.len() as u64),
        (Reason::XdpDecap, 2),
        (Reason::DecapPod, 2),
    ]);
}

#[test]
fn underlay_ingress_drops_when_the_target_device_is_missing() {
    let mut dp = Loaded::node(A, &[B]);
    dp.update_config(|c| {
        c.bridge_ifindex = 0;
        c.host_ifindex = 0;
    });
    let to_pod =
        Vxlan::between(B, A).frame(&udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 10));
    let to_host = Vxlan::between(B, A).frame(&udp_packet(host_addr(B, 5), A.subnet, 64, 1, 10));
    let expiring =
        Vxlan::between(B, A).frame(&udp_packet(host_addr(B, 5), host_addr(A, 7), 1, 1, 10));
    assert_eq!(dp.run(UNDERLAY_INGRESS, &to_pod).verdict, TC_ACT_SHOT);
    assert_eq!(dp.run(UNDERLAY_INGRESS, &to_host).verdict, TC_ACT_SHOT);
    assert_eq!(dp.run(UNDERLAY_INGRESS, &expiring).verdict, TC_ACT_SHOT);
    dp.assert_counters(&[
        (Reason::UnderlayRx, 3),
        (Reason::DropNoBridge, 1),
        (Reason::DropNoHostDevice, 2),
    ]);
    // The bridge appears: pods are reachable again.
    dp.update_config(|c| c.bridge_ifindex = BRIDGE_IFINDEX);
    assert_eq!(dp.run(UNDERLAY_INGRESS, &to_pod).verdict, TC_ACT_REDIRECT);
}

#[test]
fn underlay_ingress_drops_truncated_vxlan_at_every_length() {
    let dp = Loaded::node(A, &[B]);
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 16);
    let full = Vxlan::between(B, A).frame(&inner);
    // Header boundaries: 14 Ethernet | 34 IPv4 | 42 UDP | 50 VXLAN | 64 inner Ethernet |
    // 84 inner IPv4 | 92 inner UDP. The kernel's test run refuses IPv4 frames shorter than
    // Ethernet + IPv4 header (EINVAL), so cuts start at 34; shorter ones fail the program's
    // first bounds check and pass, like the 34..42 ones below.
    let mut dropped = 0;
    for cut in 34..full.len() {
        let frame = &full[..cut];
        let run = dp.run(UNDERLAY_INGRESS, frame);
        if cut < 42 {
            // No complete UDP header: nothing says it is VXLAN; the kernel deals with it.
            assert_eq!(run.verdict, TC_ACT_OK, "cut at {cut}");
            assert_eq!(run.out, frame, "cut at {cut}: untouched");
        } else {
            assert_eq!(run.verdict, TC_ACT_SHOT, "cut at {cut}");
            dropped += 1;
        }
    }
    // Frames whose IP and UDP lengths agree with the frame but end at a header boundary.
    for end in [42, 50, 64, 70, 83] {
        let mut frame = full[..end].to_vec();
        let ip_len = u16::try_from(end - 14).unwrap();
        frame[16..18].copy_from_slice(&ip_len.to_be_bytes());
        frame[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
        frame[24..26].copy_from_slice(&[0, 0]);
        let c = checksum(&frame[14..34]);
        frame[24..26].copy_from_slice(&c.to_be_bytes());
        assert_eq!(
            dp.run(UNDERLAY_INGRESS, &frame).verdict,
            TC_ACT_SHOT,
            "consistent but ends at {end}"
        );
        dropped += 1;
    }
    let runs = (full.len() - 34) as u64 + 5;
    dp.assert_counters(&[(Reason::UnderlayRx, runs), (Reason::DropTruncated, dropped)]);
    // The whole frame still goes through.
    assert_eq!(dp.run(UNDERLAY_INGRESS, &full).verdict, TC_ACT_REDIRECT);
}

#[test]
fn underlay_ingress_passes_what_is_not_vxlan_for_us() {
    let dp = Loaded::node(A, &[B]);
    let inner = udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 16);
    let other_port = {
        let mut v = Vxlan::between(B, A);
        v.dport = 4789;
        v.frame(&inner)
    };
    let other_dst = {
        let mut v = Vxlan::between(B, A);
        v.outer_dst = Ipv4Addr::new(198, 18, 0, 77);
        v.frame(&inner)
    };
    let later_fragment = {
        let mut v = Vxlan::between(B, A);
        v.frag_off = 0x00b9; // offset 1480 bytes, no UDP header in it
        v.frame(&inner)
    };
    let mut with_options = Vxlan::between(B, A).frame(&inner);
    with_options[14] = 0x46;
    let tcp = ether(
        NIC_MAC,
        ROUTER_MAC,
        ETH_P_IP,
        &ipv4_packet(B.local_ip, A.local_ip, IPPROTO_TCP, 64, 0, &[0; 20]),
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("ARP", ether([0xff; 6], ROUTER_MAC, ETH_P_ARP, &[0; 28])),
        ("IPv6", ether(NIC_MAC, ROUTER_MAC, ETH_P_IPV6, &[0x60; 80])),
        ("TCP to our address", tcp),
        ("UDP to another port", other_port),
        ("VXLAN for another address", other_dst),
        ("later fragment", later_fragment),
        ("IP options", with_options),
    ];
    for (what, frame) in &cases {
        let run = dp.run(UNDERLAY_INGRESS, frame);
        assert_eq!(run.verdict, TC_ACT_OK, "{what}");
        assert_eq!(&run.out, frame, "{what}: untouched");
    }
    dp.assert_counters(&[(Reason::UnderlayRx, cases.len() as u64)]);
    // underlay_egress only counts.
    let run = dp.run(UNDERLAY_EGRESS, &cases[0].1);
    assert_eq!((run.verdict, &run.out), (TC_ACT_OK, &cases[0].1));
    dp.assert_counters(&[
        (Reason::UnderlayRx, cases.len() as u64),
        (Reason::UnderlayTx, 1),
    ]);
}

#[test]
fn underlay_ingress_without_configuration_passes_everything() {
    let dp = Loaded::new();
    let frame =
        Vxlan::between(B, A).frame(&udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 16));
    let run = dp.run(UNDERLAY_INGRESS, &frame);
    assert_eq!((run.verdict, &run.out), (TC_ACT_OK, &frame));
    dp.assert_counters(&[(Reason::UnderlayRx, 1)]);
}

#[test]
fn a_pod_packet_survives_encapsulation_and_decapsulation() {
    let a = Loaded::node(A, &[B]);
    let b = Loaded::node(B, &[A]);
    for len in [0, 1, 100, 1372, 1422] {
        let inner = udp_packet(host_addr(A, 5), host_addr(B, 7), 64, 40000, len);
        let wire = a.run(POD_EGRESS, &pod_frame(&inner));
        assert_eq!(wire.verdict, TC_ACT_REDIRECT, "{len}");
        let delivered = b.run(UNDERLAY_INGRESS, &wire.out);
        assert_eq!(delivered.verdict, TC_ACT_REDIRECT, "{len}");
        // Two forwarding hops, as between two stock flannel nodes.
        assert_eq!(
            &delivered.out[14..],
            &with_ttl_decremented(&inner, 2)[..],
            "{len}"
        );
    }
    a.assert_counters(&[(Reason::EncapPod, 5)]);
    b.assert_counters(&[(Reason::UnderlayRx, 5), (Reason::DecapPod, 5)]);
}

// ---------------------------------------------------------------------------------------------
// With network namespaces

/// The MTU check runs against real devices: the host device (tunnel MTU) when there is one,
/// else the underlay MTU minus the overhead. A namespace provides devices with those MTUs.
#[test]
fn pod_egress_hands_packets_too_big_for_the_tunnel_to_the_kernel() {
    require_root("packet_vxlan");
    let ns = NetNs::new(format!("{}-mtu", unique_id())).unwrap();
    // veth pairs (the kernel has no dummy driver); only the MTUs matter.
    ns.ip(&[
        "link", "add", "ovl0", "mtu", "1450", "type", "veth", "peer", "name", "ovl0p",
    ])
    .unwrap();
    ns.ip(&[
        "link", "add", "eth0", "mtu", "1500", "type", "veth", "peer", "name", "eth0p",
    ])
    .unwrap();
    ns.in_netns(|| {
        // SAFETY: C strings; if_nametoindex resolves in this thread's namespace.
        let (host, underlay) = unsafe {
            (
                libc::if_nametoindex(c"ovl0".as_ptr()),
                libc::if_nametoindex(c"eth0".as_ptr()),
            )
        };
        assert!(host != 0 && underlay != 0);
        let mut dp = Loaded::node(A, &[B]);
        let frame_of = |ip_len: usize| {
            pod_frame(&udp_packet(
                host_addr(A, 5),
                host_addr(B, 7),
                64,
                1,
                ip_len - 28,
            ))
        };
        for (host_ifindex, via) in [
            (host, "host device MTU 1450"),
            (0, "underlay MTU 1500 - 50"),
        ] {
            dp.update_config(|c| {
                c.host_ifindex = host_ifindex;
                c.underlay_ifindex = underlay;
            });
            let fits = dp.run(POD_EGRESS, &frame_of(1450));
            assert_eq!(fits.verdict, TC_ACT_REDIRECT, "{via}: 1450 bytes fit");
            assert_eq!(fits.out.len(), 14 + 1500);
            let too_big = frame_of(1451);
            let run = dp.run(POD_EGRESS, &too_big);
            assert_eq!(
                (run.verdict, &run.out),
                (TC_ACT_OK, &too_big),
                "{via}: 1451 bytes go to the kernel"
            );
        }
        dp.assert_counters(&[(Reason::EncapPod, 2), (Reason::StackMtu, 2)]);
        Ok(())
    })
    .unwrap();
}

/// Sends `frame` out of `ifname` with a packet socket in this thread's namespace and returns
/// the first incoming frame `want` accepts within `timeout`.
fn send_and_receive(
    ifname: &std::ffi::CStr,
    frame: &[u8],
    timeout: Duration,
    want: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<Vec<u8>> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket calls on a descriptor we own; buffers outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sll: libc::sockaddr_ll = zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
        if sll.sll_ifindex == 0 {
            bail!("no interface {ifname:?}");
        }
        let len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        if libc::bind(fd.as_raw_fd(), (&raw const sll).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error()).context("bind");
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        let tv_len = size_of::<libc::timeval>() as libc::socklen_t;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            tv_len,
        );
        if libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const sll).cast(),
            len,
        ) < 0
        {
            return Err(std::io::Error::last_os_error()).context("send");
        }
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            let mut from: libc::sockaddr_ll = zeroed();
            let mut from_len = len;
            let n = libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &mut from_len,
            );
            if n < 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let got = &buf[..n as usize];
            if want(got) {
                return Ok(got.to_vec());
            }
        }
        bail!("no matching frame within {timeout:?}")
    }
}

/// Interop at the packet level with a stock kernel VXLAN device: our encapsulated ping from the
/// host of node A goes to a namespace where node B is a stock flannel node (`flannel.1` made as
/// flanneld makes it); its kernel must accept the frame and answer; the answer, a kernel-made
/// VXLAN frame, must decapsulate through `underlay_ingress` to the ping reply.
#[test]
fn a_stock_flannel_node_accepts_our_frame_and_we_accept_its_answer() {
    require_root("packet_vxlan");
    let id = unique_id();
    let snd = NetNs::new(format!("{id}-a")).unwrap();
    let rcv = NetNs::new(format!("{id}-b")).unwrap();
    add_veth(&snd, "eth0", &rcv, "eth0").unwrap();
    snd.ip(&["addr", "add", "198.18.0.1/24", "dev", "eth0"])
        .unwrap();
    snd.ip(&["link", "set", "eth0", "up"]).unwrap();
    rcv.ip(&["addr", "add", "198.18.0.2/24", "dev", "eth0"])
        .unwrap();
    rcv.ip(&["link", "set", "eth0", "up"]).unwrap();
    // Node B as flanneld sets it up (flannel-compat.md §4).
    let vtep_a = "0e:00:00:00:00:01";
    let a_lease = StockPeer {
        subnet: "172.17.1.0/24".parse().unwrap(),
        public_ip: Ipv4Addr::new(198, 18, 0, 1),
        vtep_mac: vtep_a,
    };
    let (local_b, subnet_b) = (
        Ipv4Addr::new(198, 18, 0, 2),
        "172.17.2.0/24".parse().unwrap(),
    );
    stock_vxlan_node(&rcv, local_b, subnet_b, "0e:00:00:00:00:02", &[a_lease]).unwrap();

    // Our frame: the host of A (172.17.1.0) pings B's flannel.1 address, through host_egress.
    let a = Loaded::node(A, &[B]);
    let inner = ipv4_packet(
        A.subnet,
        B.subnet,
        IPPROTO_ICMP,
        64,
        0,
        &icmp_echo(8, 0x4242, 1, b"overlay interop"),
    );
    let run = a.run(HOST_EGRESS, &ether(HOST_MAC, HOST_MAC, ETH_P_IP, &inner));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    let mut frame = run.out;
    // What bpf_redirect_neigh would put there.
    frame[..6].copy_from_slice(&parse_mac(&rcv.mac("eth0").unwrap()));
    frame[6..12].copy_from_slice(&parse_mac(&snd.mac("eth0").unwrap()));

    let is_vxlan_from_b = |f: &[u8]| {
        f.len() > 64
            && be16(f, 12) == ETH_P_IP
            && f[23] == IPPROTO_UDP
            && f[26..30] == B.local_ip.octets()
            && be16(f, 36) == PORT
    };
    let reply = snd
        .in_netns(|| send_and_receive(c"eth0", &frame, Duration::from_secs(3), is_vxlan_from_b))
        .expect("the stock node answers our VXLAN ping with VXLAN");
    let rx = rcv
        .run("cat", &["/sys/class/net/flannel.1/statistics/rx_packets"])
        .unwrap();
    assert_eq!(rx.trim(), "1", "flannel.1 received our frame");

    // The kernel's answer, as our decapsulation sees it.
    assert_eq!(
        &reply[42..50],
        &[0x08, 0, 0, 0, 0, 0, 1, 0],
        "VXLAN header from flannel.1"
    );
    assert_eq!(&reply[50..56], &A.vtep, "to our VtepMAC");
    let reply_inner = reply[64..].to_vec();
    assert_eq!(
        &reply_inner[12..20],
        &[172, 17, 2, 0, 172, 17, 1, 0],
        "reply 172.17.2.0 -> 172.17.1.0"
    );
    assert_eq!(
        (reply_inner[9], reply_inner[20]),
        (IPPROTO_ICMP, 0),
        "ICMP echo reply"
    );
    assert_eq!(be16(&reply_inner, 24), 0x4242, "our echo id");
    let a = Loaded::node(A, &[B]);
    let run = a.run(UNDERLAY_INGRESS, &reply);
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
    assert_eq!(&run.out[..6], &HOST_MAC);
    assert_eq!(&run.out[14..], &reply_inner[..]);
    a.assert_counters(&[(Reason::UnderlayRx, 1), (Reason::DecapHost, 1)]);
}

/// The agent's `Datapath` API end to end: attach to real devices in a namespace, configure,
/// add and remove peers, and check with the programs themselves (test runs against the maps
/// the agent wrote) that encapsulation, member checks and delivery follow.
#[test]
fn the_agent_datapath_drives_the_programs() {
    use overlay_agent::datapath::{Datapath, DatapathError, NodeConfig};
    use overlay_tests::AttachKind::{TcxEgress, TcxIngress};

    require_root("packet_vxlan");
    let ns = NetNs::new(format!("{}-dp", unique_id())).unwrap();
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])
    .unwrap();
    ns.ip(&["link", "add", "cni0", "type", "bridge"]).unwrap();
    ns.ip(&[
        "link",
        "add",
        "ovl0",
        "mtu",
        "1450",
        "address",
        "02:aa:00:00:00:10",
        "type",
        "veth",
        "peer",
        "name",
        "ovl0p",
    ])
    .unwrap();
    let attached = |ifname: &str| {
        let mut progs: Vec<(overlay_tests::AttachKind, String)> =
            overlay_tests::attached_programs(&ns, ifname)
                .unwrap()
                .into_iter()
                .map(|p| (p.kind, p.name))
                .collect();
        progs.sort_by_key(|(k, n)| (k.to_string(), n.clone()));
        progs
    };
    let net = |s: &str| -> ipnet::Ipv4Net { s.parse().unwrap() };

    ns.in_netns(|| {
        let mut dp = Datapath::load()?;
        dp.attach_underlay("eth0")?;
        dp.attach_pod_bridge("cni0")?;
        dp.attach_host_device("ovl0")?;
        assert_eq!(
            attached("eth0"),
            [
                (TcxEgress, UNDERLAY_EGRESS.to_owned()),
                (TcxIngress, UNDERLAY_INGRESS.to_owned())
            ]
        );
        assert_eq!(attached("cni0"), [(TcxIngress, POD_EGRESS.to_owned())]);
        assert_eq!(attached("ovl0"), [(TcxEgress, HOST_EGRESS.to_owned())]);

        let to_b = pod_frame(&udp_packet(host_addr(A, 5), host_addr(B, 7), 64, 1, 10));
        let from_b_to_pod =
            Vxlan::between(B, A).frame(&udp_packet(host_addr(B, 5), host_addr(A, 7), 64, 1, 10));
        let from_b_to_host =
            Vxlan::between(B, A).frame(&udp_packet(host_addr(B, 5), A.subnet, 64, 1, 10));

        // Not configured yet: everything passes.
        assert_eq!(run_prog(dp.ebpf(), POD_EGRESS, &to_b).verdict, TC_ACT_OK);
        let node = NodeConfig::new(
            VNI,
            PORT,
            A.local_ip,
            A.vtep,
            net("172.17.1.1/24"),
            net("172.17.0.0/16"),
        );
        dp.set_config(&node)?;
        dp.upsert_peer(net("172.17.2.0/24"), B.local_ip, B.vtep)?;
        let encapsulated = run_prog(dp.ebpf(), POD_EGRESS, &to_b);
        assert_eq!(encapsulated.verdict, TC_ACT_REDIRECT);
        assert_vxlan(
            &encapsulated.out,
            A,
            B,
            &with_ttl_decremented(&to_b[14..], 1),
        );
        assert_eq!(
            run_prog(dp.ebpf(), UNDERLAY_INGRESS, &from_b_to_pod).verdict,
            TC_ACT_REDIRECT
        );
        let to_host = run_prog(dp.ebpf(), UNDERLAY_INGRESS, &from_b_to_host);
        assert_eq!(to_host.verdict, TC_ACT_REDIRECT);
        assert_eq!(
            &to_host.out[..6],
            &[0x02, 0xaa, 0, 0, 0, 0x10],
            "ovl0's MAC, read by the agent"
        );

        // B also holds 172.17.5.0/24; dropping 172.17.2.0/24 keeps B a member.
        dp.upsert_peer(net("172.17.5.0/24"), B.local_ip, B.vtep)?;
        dp.remove_peer(net("172.17.2.0/24"))?;
        assert_eq!(dp.peers().node_refs(B.local_ip), 1);
        assert_eq!(
            run_prog(dp.ebpf(), POD_EGRESS, &to_b).verdict,
            TC_ACT_OK,
            "no route to 172.17.2.0/24 any more"
        );
        let to_b5 = pod_frame(&udp_packet(
            host_addr(A, 5),
            Ipv4Addr::new(172, 17, 5, 7),
            64,
            1,
            10,
        ));
        assert_eq!(
            run_prog(dp.ebpf(), POD_EGRESS, &to_b5).verdict,
            TC_ACT_REDIRECT
        );
        // B speaks for its remaining subnet only (drop_inner_source otherwise).
        let from_b5_to_pod = Vxlan::between(B, A).frame(&udp_packet(
            Ipv4Addr::new(172, 17, 5, 5),
            host_addr(A, 7),
            64,
            1,
            10,
        ));
        assert_eq!(
            run_prog(dp.ebpf(), UNDERLAY_INGRESS, &from_b5_to_pod).verdict,
            TC_ACT_REDIRECT,
            "B is still a member"
        );
        dp.remove_peer(net("172.17.5.0/24"))?;
        assert_eq!(
            run_prog(dp.ebpf(), UNDERLAY_INGRESS, &from_b_to_pod).verdict,
            TC_ACT_SHOT,
            "B is no member any more"
        );

        // The bridge goes away: pod traffic from peers is dropped, and the program detached.
        dp.upsert_peer(net("172.17.2.0/24"), B.local_ip, B.vtep)?;
        dp.detach_pod_bridge()?;
        assert_eq!(attached("cni0"), []);
        assert_eq!(
            run_prog(dp.ebpf(), UNDERLAY_INGRESS, &from_b_to_pod).verdict,
            TC_ACT_SHOT
        );
        dp.attach_pod_bridge("cni0")?;
        assert_eq!(attached("cni0"), [(TcxIngress, POD_EGRESS.to_owned())]);
        assert_eq!(
            run_prog(dp.ebpf(), UNDERLAY_INGRESS, &from_b_to_pod).verdict,
            TC_ACT_REDIRECT
        );

        assert!(matches!(
            dp.upsert_peer(net("172.17.1.0/24"), B.local_ip, B.vtep),
            Err(DatapathError::OwnSubnet { .. })
        ));
        assert!(matches!(
            dp.attach_pod_bridge("nonexistent0"),
            Err(DatapathError::Device { .. })
        ));

        let counters: BTreeMap<&str, u64> = dp
            .counters()?
            .into_iter()
            .filter(|(_, c)| c.packets != 0)
            .map(|(r, c)| (r.name(), c.packets))
            .collect();
        let expected: BTreeMap<&str, u64> = [
            ("underlay_rx", 6),
            ("encap_pod", 2),
            ("decap_pod", 3),
            ("decap_host", 1),
            ("drop_unknown_peer", 1),
            ("drop_no_bridge", 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(counters, expected);
        Ok(())
    })
    .unwrap();
}
