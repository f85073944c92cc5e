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
//!
//! By subject: this file holds the shared nodes, frame builders and the verifier check;
//! `encap` (pod_egress, host_egress), `decap` (underlay_ingress and its checks), `delivery`
//! (straight into pods), `xdp` (underlay_xdp), `namespaces` (tests on real devices),
//! `public_ip` (a node whose PublicIP is not its interface address).

use std::{
    collections::BTreeMap,
    mem::{size_of, zeroed},
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use aya::programs::SchedClassifier;
use overlay_common::names::{
    self, GRO_DEVICE_INGRESS, HOST_EGRESS, POD_EGRESS, POD_INGRESS, PROBE_DECAP_L4_UDP,
    UNDERLAY_EGRESS, UNDERLAY_INGRESS, UNDERLAY_XDP,
};
use overlay_common::{
    config::{CONFIG_F_READY, Config},
    counters::Reason,
    endpoint::Endpoint,
    route::{NextHopV4, RemoteNode},
    wire::BRIDGE_DELIVERY_MARK,
};
use overlay_tests::{
    NetNs, add_veth,
    packet::{
        BRIDGE_IFINDEX, BRIDGE_MAC, ETH_P_IP, GW_MAC, HOST_IFINDEX, HOST_MAC, IPPROTO_ICMP,
        IPPROTO_TCP, IPPROTO_UDP, Loaded, POD_MAC, SRC_PORT_MAX, SRC_PORT_MIN, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT, UNDERLAY_IFINDEX, VXLAN_PORT as PORT, XDP_PASS, be16,
        checksum, ether, ipv4_packet, parse_mac, require_root, run_prog, run_xdp, set_endpoint,
        udp_datagram, with_ttl_decremented,
    },
    stock::{StockPeer, stock_vxlan_node},
    unique_id,
};

mod decap;
mod delivery;
mod encap;
mod kernel_flow;
mod namespaces;
mod public_ip;
mod xdp;

/// The cookie `underlay_xdp` marks its frames with in the tests.
const XDP_COOKIE: u32 = 0xc0ff_ee01;

/// The 8 bytes of metadata `underlay_xdp` puts in front of a frame it decapsulated.
fn xdp_mark(cookie: u32) -> Vec<u8> {
    let mut mark = cookie.to_ne_bytes().to_vec();
    mark.extend_from_slice(&[0; 4]);
    mark
}

const VNI: u32 = 1;
const NETWORK: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 0);
const NETWORK_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 0, 0);
const SUBNET_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// The underlay NIC's MAC on the receiving side, and a router's: outer MACs of received frames.
const NIC_MAC: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 0x01];
const ROUTER_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0xfe];
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;

/// A node of the test cluster.
#[derive(Clone, Copy)]
struct Node {
    /// The external interface's address: what the node sends VXLAN from.
    local_ip: Ipv4Addr,
    /// The PublicIP of its lease: what peers route to and see VXLAN come from (the interface
    /// address unless the node is behind a NAT or publishes another address, `--public-ip`).
    public_ip: Ipv4Addr,
    subnet: Ipv4Addr,
    vtep: [u8; 6],
}

impl Node {
    /// A node publishing its interface address `ip`.
    const fn at(ip: Ipv4Addr, subnet: Ipv4Addr, vtep: [u8; 6]) -> Self {
        Self {
            local_ip: ip,
            public_ip: ip,
            subnet,
            vtep,
        }
    }
}

const A: Node = Node::at(
    Ipv4Addr::new(198, 18, 0, 1),
    Ipv4Addr::new(172, 17, 1, 0),
    [0x0e, 0, 0, 0, 0, 0x01],
);
const B: Node = Node::at(
    Ipv4Addr::new(198, 18, 0, 2),
    Ipv4Addr::new(172, 17, 2, 0),
    [0x0e, 0, 0, 0, 0, 0x02],
);
/// A node behind a NAT: its interface address is not the PublicIP it publishes.
const N: Node = Node {
    local_ip: Ipv4Addr::new(198, 18, 0, 9),
    public_ip: Ipv4Addr::new(198, 18, 100, 9),
    subnet: Ipv4Addr::new(172, 17, 9, 0),
    vtep: [0x0e, 0, 0, 0, 0, 0x09],
};

fn host_addr(node: Node, last: u8) -> Ipv4Addr {
    let [a, b, c, _] = node.subnet.octets();
    Ipv4Addr::new(a, b, c, last)
}

// ---------------------------------------------------------------------------------------------
// The loaded object

/// The object configured as `node` with `peers` as members and their /24 subnets routed over
/// VXLAN.
fn loaded_node(node: Node, peers: &[Node]) -> Loaded {
    let mut dp = Loaded::new("packet_vxlan");
    dp.set_config(config_for(node));
    for peer in peers {
        dp.add_route(
            peer.subnet,
            24,
            RemoteNode::vxlan(peer.public_ip.octets(), peer.vtep),
        );
        dp.add_member(peer.public_ip);
    }
    dp
}

fn config_for(node: Node) -> Config {
    Config {
        flags: CONFIG_F_READY,
        vni: VNI,
        underlay_ifindex: UNDERLAY_IFINDEX,
        bridge_ifindex: BRIDGE_IFINDEX,
        host_ifindex: HOST_IFINDEX,
        local_ip: node.local_ip.octets(),
        public_ip: node.public_ip.octets(),
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
        // Next hops cached, as under an agent (none are found here: no such device).
        route_gen: 1,
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

/// An ICMP echo request from `from`'s host (the host device's address, `<subnet>.0`) to `dst`.
fn host_echo(from: Node, dst: Ipv4Addr) -> Vec<u8> {
    ipv4_packet(
        from.subnet,
        dst,
        IPPROTO_ICMP,
        64,
        0,
        &icmp_echo(8, 7, 1, b"ping"),
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
    /// What `from` sends to `to`, as `to` receives it: from `from`'s PublicIP (a NAT in front
    /// of `from` translated its interface address) to `to`'s PublicIP (which a NAT in front of
    /// `to` may still translate to `to`'s interface address: tests set `outer_dst`).
    fn between(from: Node, to: Node) -> Self {
        Self {
            outer_src: from.public_ip,
            outer_dst: to.public_ip,
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
    assert_eq!(
        &ip[12..16],
        &from.local_ip.octets(),
        "outer source: the sender's interface address"
    );
    assert_eq!(
        &ip[16..20],
        &to.public_ip.octets(),
        "outer destination: the peer's PublicIP"
    );
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
    let dp = Loaded::new("packet_vxlan");
    for name in [
        POD_EGRESS,
        POD_INGRESS,
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
    let dp = Loaded::new("packet_vxlan");
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
