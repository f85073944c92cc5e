//! The randomised test of the data path: every program runs on generated frames,
//! half of them mutated, through `BPF_PROG_TEST_RUN`, in four node settings (VXLAN,
//! DirectRouting, host-gw, VXLAN with the pod bridge and host device gone). For every frame:
//!
//! - it is accounted for exactly once: dropped under exactly one drop reason (`TC_ACT_SHOT`),
//!   delivered under exactly one delivery reason (`TC_ACT_REDIRECT`), or passed on with at most
//!   one hand-back reason (`TC_ACT_OK`); `underlay_rx`/`underlay_tx` count every frame of their
//!   hook, `xdp_decap` what XDP decapsulated, `pod_port` what the port program settled;
//! - the verdict, the counters (packets and bytes) and the frame that comes out are the ones
//!   the reference model (`overlay_tests::model`) computes from the node's settings and maps.
//!
//! Counters are read per frame (`OVERLAY_RANDOM_BATCH=1`, the default) or summed over batches
//! of frames for speed in long runs; a batch whose sums differ from the model's is replayed
//! frame by frame to name the frame. The suite runs a short round; the long run is
//! `OVERLAY_RANDOM_FRAMES=250000 OVERLAY_RANDOM_BATCH=64 cargo xtask test packet_random`
//! (frames per program and setting, so 1,000,000 per program). `OVERLAY_RANDOM_SEED` repeats a
//! run. Masquerade is off here (its translations have random ports and per-flow state:
//! `packet_nat.rs` checks them byte for byte); the load-time probe is not part of the data path
//! (`packet_vxlan.rs` checks it).
//!
//! The programs run in a namespace of their own (`ovl-<pid>-…`, removed on drop) set up as a
//! node, so the MTU checks see real devices: `eth0` (MTU 1500), `cni0` and `ovl0` (MTU 1450).

use std::sync::Mutex;
use std::{collections::BTreeMap, net::Ipv4Addr, time::Instant};

use aya::{
    Ebpf, TestRun, TestRunOptions,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuValues},
    programs::{SchedClassifier, Xdp},
    util::nr_cpus,
};
use ipnet::Ipv4Net;
use overlay_common::names;
use overlay_common::{
    config::{CONFIG_F_DIRECT, CONFIG_F_NO_VXLAN, CONFIG_F_READY, Config},
    counters::{Counter, Reason},
    endpoint::Endpoint,
    kernel_flow::{KernelFlowKeyV4, KernelFlowV4},
    nat::NatConfig,
    route::{MemberNode, RemoteNode, route_key},
};
use overlay_tests::{
    NetNs,
    model::{self, Node, Outcome},
    packet::{
        BRIDGE_MAC, HOST_MAC, POD_MAC, SRC_PORT_MAX, SRC_PORT_MIN, VXLAN_PORT, checksum,
        counters_by_reason, load_object, nat_config,
    },
    unique_id,
};

const LOCAL_IP: [u8; 4] = [198, 18, 0, 1];
/// The PublicIP published in the VXLAN and DirectRouting settings (`--public-ip`, as behind a
/// NAT); host-gw publishes `LOCAL_IP`, as it must.
const PUBLIC_IP: [u8; 4] = [198, 18, 100, 1];
const SUBNET: [u8; 4] = [172, 17, 1, 0];
const VTEP: [u8; 6] = [0x0e, 0, 0, 0, 0, 1];
const PORT: u16 = VXLAN_PORT;
const SRC_PORTS: (u16, u16) = (SRC_PORT_MIN, SRC_PORT_MAX);
/// Peers: (PublicIP, subnet, VtepMAC). B and C hold subnets; D is a member without one.
const B: ([u8; 4], [u8; 4], [u8; 6]) = ([198, 18, 0, 2], [172, 17, 2, 0], [0x0e, 0, 0, 0, 0, 2]);
const C: ([u8; 4], [u8; 4], [u8; 6]) = ([198, 18, 0, 3], [172, 17, 3, 0], [0x0e, 0, 0, 0, 0, 3]);
const D_IP: [u8; 4] = [198, 18, 0, 4];
/// A local pod with an `ENDPOINT_V4` entry (the others take the bridge).
const KNOWN_POD: [u8; 4] = [172, 17, 1, 5];
const KNOWN_POD_MAC: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 0x05];

/// The programs under test: the TC programs the model knows and the XDP one. Not
/// `gro_device_ingress`, which drops every frame whatever it holds (`packet_vxlan`).
/// In this order within a setting: the egress programs file flows the kernel forwarded
/// (`KERNEL_FLOW_V4`) before `underlay_ingress` looks them up, and the bridge's program runs
/// before the port's, whose notes of what it passed on it would otherwise read.
const TC_PROGRAMS: [&str; 6] = [
    names::UNDERLAY_EGRESS,
    names::HOST_EGRESS,
    names::POD_INGRESS,
    names::UNDERLAY_INGRESS,
    names::POD_EGRESS,
    names::POD_PORT_EGRESS,
];
const XDP_PROGRAM: &str = names::UNDERLAY_XDP;

// ---------------------------------------------------------------------------------------------
// Randomness (deterministic per seed)

/// splitmix64: small, fast, and good enough to pick frames.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Frames

fn host(net: [u8; 4], last: u8) -> [u8; 4] {
    [net[0], net[1], net[2], last]
}

/// An IPv4 packet with a valid header (`options` 32-bit words of options after it).
fn ipv4(
    rng: &mut Rng,
    src: [u8; 4],
    dst: [u8; 4],
    (ttl, tos, options): (u8, u8, usize),
) -> Vec<u8> {
    let proto = rng.pick(&[1u8, 6, 17, 17, 47]);
    let payload_len = if rng.chance(8) {
        rng.below(1500)
    } else {
        rng.below(120)
    };
    let mut payload = rng.bytes(payload_len);
    if proto == 17 && payload.len() >= 8 {
        let len = payload.len() as u16;
        payload[4..6].copy_from_slice(&len.to_be_bytes());
    }
    let ihl = 20 + 4 * options;
    let tot = (ihl + payload.len()) as u16;
    let mut p = vec![0x40 | (ihl / 4) as u8, tos];
    p.extend_from_slice(&tot.to_be_bytes());
    p.extend_from_slice(&rng.bytes(2));
    p.extend_from_slice(&if rng.chance(2) { [0x40, 0] } else { [0, 0] });
    p.extend_from_slice(&[ttl, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    for _ in 0..options {
        p.extend_from_slice(&[1, 1, 1, 1]);
    }
    fix_ipv4(&mut p, 0);
    p.extend_from_slice(&payload);
    p
}

/// Recomputes the checksum of the IPv4 header at `at` (as far as the packet holds it).
fn fix_ipv4(p: &mut [u8], at: usize) {
    if p.len() < at + 20 {
        return;
    }
    let ihl = (usize::from(p[at] & 0x0f) * 4).max(20);
    if p.len() < at + ihl {
        return;
    }
    p[at + 10..at + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&p[at..at + ihl]);
    p[at + 10..at + 12].copy_from_slice(&c.to_be_bytes());
}

fn ether(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A VXLAN frame from one of the nodes (or a stranger) to us, carrying `inner`.
fn vxlan_frame(rng: &mut Rng, outer_src: [u8; 4], inner_src_mac: [u8; 6], inner: &[u8]) -> Vec<u8> {
    let dst_mac = if rng.chance(10) {
        rng.pick(&[B.2, [0xff; 6], [0x0e, 0, 0, 0, 0, 9]])
    } else {
        VTEP
    };
    let mut vx = vec![0x08, 0, 0, 0];
    vx.extend_from_slice(&(if rng.chance(20) { 2u32 } else { 1 } << 8).to_be_bytes());
    let inner_type = if rng.chance(20) { 0x86dd } else { 0x0800 };
    vx.extend_from_slice(&ether(dst_mac, inner_src_mac, inner_type, inner));
    let mut udp = rng.bytes(2);
    udp.extend_from_slice(&PORT.to_be_bytes());
    udp.extend_from_slice(&((8 + vx.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&vx);
    let tot = (20 + udp.len()) as u16;
    let outer_dst = if rng.chance(20) {
        [198, 18, 0, 7]
    } else {
        rng.pick(&[LOCAL_IP, LOCAL_IP, PUBLIC_IP])
    };
    let mut ip = vec![0x45, rng.pick(&[0, 0, 1, 2, 3])];
    ip.extend_from_slice(&tot.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&outer_src);
    ip.extend_from_slice(&outer_dst);
    fix_ipv4(&mut ip, 0);
    ip.extend_from_slice(&udp);
    ether(
        [0x02, 0x11, 0, 0, 0, 1],
        [0x02, 0x22, 0, 0, 0, 1],
        0x0800,
        &ip,
    )
}

/// A frame of one of the kinds the programs meet, valid as it is built.
fn frame(rng: &mut Rng) -> Vec<u8> {
    let local = |rng: &mut Rng| host(SUBNET, rng.pick(&[0, 1, 5, 5, 6, 7, 77, 200, 254, 255]));
    let peer_pod = |rng: &mut Rng| {
        let (_, net, _) = rng.pick(&[B, C]);
        host(net, rng.pick(&[0, 2, 9, 255]))
    };
    let outside = |rng: &mut Rng| {
        rng.pick(&[
            [198, 19, 0, 1],
            [8, 8, 8, 8],
            [224, 0, 0, 251],
            [255, 255, 255, 255],
            LOCAL_IP,
        ])
    };
    let cluster_unrouted = |rng: &mut Rng| [172, 17, 200, rng.byte()];
    let ttl = |rng: &mut Rng| rng.pick(&[0u8, 1, 2, 64, 255]);
    let tos = |rng: &mut Rng| {
        if rng.chance(3) {
            rng.byte()
        } else {
            rng.pick(&[0u8, 1, 2, 3])
        }
    };
    let options = |rng: &mut Rng| if rng.chance(10) { 1 + rng.below(10) } else { 0 };
    // TTL, TOS and option words of a header.
    let header = |rng: &mut Rng| (ttl(rng), tos(rng), options(rng));
    match rng.below(9) {
        // VXLAN from a member (or not), inner packets of every sort.
        0..=2 => {
            let (outer, own_net, mac) = match rng.below(5) {
                0 | 1 => B,
                2 => C,
                3 => (D_IP, [172, 17, 250, 0], [0x0e, 0, 0, 0, 0, 4]),
                _ => ([198, 18, 0, 9], [172, 17, 251, 0], [0x0e, 0, 0, 0, 0, 9]),
            };
            let src = match rng.below(10) {
                0..=5 => host(own_net, rng.pick(&[0, 2, 3, 100])),
                6 => peer_pod(rng),
                7 => local(rng),
                _ => {
                    let unrouted = cluster_unrouted(rng);
                    rng.pick(&[[198, 19, 0, 1], unrouted, LOCAL_IP, PUBLIC_IP])
                }
            };
            let dst = if rng.chance(8) {
                peer_pod(rng)
            } else {
                local(rng)
            };
            let inner = {
                let h = header(rng);
                ipv4(rng, src, dst, h)
            };
            vxlan_frame(rng, outer, mac, &inner)
        }
        // Plain IPv4 on the underlay: direct traffic for our pods, anything else.
        3 => {
            let src = match rng.below(6) {
                0..=2 => peer_pod(rng),
                3 => rng.pick(&[B.0, C.0, D_IP]),
                4 => cluster_unrouted(rng),
                _ => outside(rng),
            };
            let dst = if rng.chance(4) { LOCAL_IP } else { local(rng) };
            let dst_mac = rng.pick(&[[0; 6], [0; 6], [0x02, 0x11, 0, 0, 0, 1], [0xff; 6]]);
            let ip = {
                let h = header(rng);
                ipv4(rng, src, dst, h)
            };
            ether(dst_mac, [0x02, 0x22, 0, 0, 0, 2], 0x0800, &ip)
        }
        // From a pod, to anywhere, of any size (around the MTUs too).
        4..=5 => {
            let dst = match rng.below(5) {
                0 | 1 => peer_pod(rng),
                2 => cluster_unrouted(rng),
                3 => outside(rng),
                _ => local(rng),
            };
            let dst_mac = rng.pick(&[BRIDGE_MAC, BRIDGE_MAC, BRIDGE_MAC, [0xff; 6], POD_MAC]);
            let mut ip = {
                let (h, src) = (header(rng), local(rng));
                ipv4(rng, src, dst, h)
            };
            if rng.chance(6) {
                // Around the tunnel and underlay MTUs (1450 and 1500 with their headers).
                let size = 1430 + rng.below(90);
                ip.resize(size, 0x5a);
                let len = ip.len() as u16;
                ip[2..4].copy_from_slice(&len.to_be_bytes());
                fix_ipv4(&mut ip, 0);
            }
            ether(dst_mac, POD_MAC, 0x0800, &ip)
        }
        // From the host device.
        6..=7 => {
            let src = rng.pick(&[SUBNET, LOCAL_IP, [198, 19, 0, 1]]);
            let dst = match rng.below(3) {
                0 => peer_pod(rng),
                1 => cluster_unrouted(rng),
                _ => outside(rng),
            };
            let ip = {
                let h = header(rng);
                ipv4(rng, src, dst, h)
            };
            ether(HOST_MAC, HOST_MAC, 0x0800, &ip)
        }
        // Not IPv4.
        _ => {
            let (ethertype, len) = rng.pick(&[(0x0806u16, 28), (0x86dd, 60), (0x8100, 46)]);
            let payload = rng.bytes(len);
            ether([0xff; 6], POD_MAC, ethertype, &payload)
        }
    }
}

/// Header fields worth hitting: (offset, length) in a VXLAN frame or a plain one.
const FIELDS: [(usize, usize); 22] = [
    (12, 2), // EtherType
    (14, 1), // outer version/IHL
    (15, 1), // outer TOS
    (16, 2), // outer total length
    (20, 2), // outer flags/fragment offset
    (22, 1), // TTL
    (23, 1), // protocol
    (26, 4), // source
    (30, 4), // destination
    (36, 2), // UDP destination port
    (38, 2), // UDP length
    (42, 4), // VXLAN flags
    (46, 4), // VNI and reserved
    (50, 6), // inner destination MAC
    (62, 2), // inner EtherType
    (64, 1), // inner version/IHL
    (65, 1), // inner TOS
    (66, 2), // inner total length
    (72, 1), // inner TTL
    (74, 2), // inner checksum
    (76, 4), // inner source
    (80, 4), // inner destination
];

/// Damages `f` in one to three ways; often repairs the header checksums after, so that the
/// damage reaches the checks behind them.
fn mutate(rng: &mut Rng, f: &mut Vec<u8>) {
    for _ in 0..=rng.below(3) {
        match rng.below(6) {
            0 => {
                let i = rng.below(f.len());
                f[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(f.len());
                f[i] = rng.byte();
            }
            2 => {
                let span = f.len() - 13;
                let keep = 14 + rng.below(span);
                f.truncate(keep);
            }
            3 => {
                let n = 1 + rng.below(64);
                let more = rng.bytes(n);
                f.extend_from_slice(&more);
            }
            _ => {
                let (off, len) = rng.pick(&FIELDS);
                if off + len <= f.len() {
                    let value = match rng.below(4) {
                        0 => vec![0; len],
                        1 => vec![0xff; len],
                        _ => rng.bytes(len),
                    };
                    f[off..off + len].copy_from_slice(&value);
                    if len == 2 && rng.chance(3) {
                        // Off by one of what it was: lengths just wrong.
                        let v = u16::from_be_bytes([f[off], f[off + 1]]).wrapping_add(1);
                        f[off..off + 2].copy_from_slice(&v.to_be_bytes());
                    }
                }
            }
        }
    }
    if rng.chance(2) {
        fix_ipv4(f, 14);
        fix_ipv4(f, 64);
    }
    f.truncate(1600);
    // The kernel's test run refuses an IPv4 or IPv6 frame shorter than its network header
    // (EINVAL): no such frame reaches a program on a real interface either.
    let minimum = match f[12..14] {
        [0x08, 0x00] => 14 + 20,
        [0x86, 0xdd] => 14 + 40,
        _ => 14,
    };
    if f.len() < minimum {
        let pad = rng.bytes(minimum - f.len());
        f.extend_from_slice(&pad);
    }
}

// ---------------------------------------------------------------------------------------------
// The node and its settings

/// The node namespace with the object loaded.
struct Bench {
    ns: NetNs,
    ebpf: Ebpf,
    eth0: u32,
    cni0: u32,
    ovl0: u32,
}

impl Bench {
    fn new() -> Self {
        let ns = NetNs::new(format!("{}-rnd", unique_id())).unwrap();
        for (dev, peer) in [("eth0", "eth0p"), ("ovl0", "ovl0p")] {
            ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", peer])
                .unwrap();
            ns.link_up(peer).unwrap();
        }
        ns.add_addr("eth0", "198.18.0.1/24").unwrap();
        ns.link_up("eth0").unwrap();
        ns.add_default_route("198.18.0.254", "eth0").unwrap();
        ns.set_mtu("ovl0", 1450).unwrap();
        ns.add_addr("ovl0", "172.17.1.0/32").unwrap();
        ns.link_up("ovl0").unwrap();
        ns.add_bridge("cni0").unwrap();
        ns.set_mtu("cni0", 1450).unwrap();
        ns.add_addr("cni0", "172.17.1.1/24").unwrap();
        ns.link_up("cni0").unwrap();
        ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        let (eth0, cni0, ovl0) = (
            ns.ifindex("eth0").unwrap(),
            ns.ifindex("cni0").unwrap(),
            ns.ifindex("ovl0").unwrap(),
        );
        Self {
            ebpf: load_object("packet_random"),
            ns,
            eth0,
            cni0,
            ovl0,
        }
    }

    /// Writes `node`'s settings and maps into the object's maps.
    fn apply(&mut self, node: &Node) {
        let mut config: Array<_, Config> =
            Array::try_from(self.ebpf.map_mut(names::CONFIG).unwrap()).unwrap();
        config.set(0, node.cfg, 0).unwrap();
        let mut routes: LpmTrie<_, [u8; 4], RemoteNode> =
            LpmTrie::try_from(self.ebpf.map_mut(names::ROUTE_V4).unwrap()).unwrap();
        for (net, peer) in &node.routes {
            routes
                .insert(&route_key(net.network(), net.prefix_len()), *peer, 0)
                .unwrap();
        }
        let mut members: HashMap<_, [u8; 4], MemberNode> =
            HashMap::try_from(self.ebpf.map_mut(names::NODE_V4).unwrap()).unwrap();
        for ip in &node.members {
            members.insert(*ip, MemberNode { routes: 1 }, 0).unwrap();
        }
        let mut endpoints: HashMap<_, [u8; 4], Endpoint> =
            HashMap::try_from(self.ebpf.map_mut(names::ENDPOINT_V4).unwrap()).unwrap();
        for (addr, ep) in &node.endpoints {
            endpoints.insert(*addr, *ep, 0).unwrap();
        }
        // What earlier settings' frames left in the programs' own state: filed flows, and the
        // port's note of its last packet (on every CPU: the runs may have moved between them).
        for table in [names::KERNEL_FLOW_V4, names::KERNEL_FLOW_IN_V4] {
            let mut flows: HashMap<_, KernelFlowKeyV4, KernelFlowV4> =
                HashMap::try_from(self.ebpf.map_mut(table).unwrap()).unwrap();
            let keys: Vec<KernelFlowKeyV4> = flows.keys().map(Result::unwrap).collect();
            for key in keys {
                flows.remove(&key).unwrap();
            }
        }
        assert!(node.kernel_flows.lock().unwrap().is_empty());
        let mut passed: PerCpuArray<_, [u8; 16]> =
            PerCpuArray::try_from(self.ebpf.map_mut(names::POD_PORT_PASSED).unwrap()).unwrap();
        let zeros = PerCpuValues::try_from(vec![[0u8; 16]; nr_cpus().unwrap()]).unwrap();
        passed.set(0, zeros, 0).unwrap();
    }
}

/// The node's settings: `routing` 0 VXLAN, 1 DirectRouting (B direct), 2 host-gw (both
/// direct, no VXLAN); `devices` false: the pod bridge and the host device are gone. VXLAN and
/// DirectRouting publish `PUBLIC_IP`, not the interface's address.
fn setting(bench: &Bench, routing: u8, devices: bool) -> Node {
    let mut flags = CONFIG_F_READY;
    if routing >= 1 {
        flags |= CONFIG_F_DIRECT;
    }
    if routing == 2 {
        flags |= CONFIG_F_NO_VXLAN;
    }
    let peer = |(ip, _, mac): ([u8; 4], [u8; 4], [u8; 6]), direct: bool| {
        if direct {
            RemoteNode::direct(ip, mac)
        } else {
            RemoteNode::vxlan(ip, mac)
        }
    };
    let net = |a: [u8; 4]| Ipv4Net::new(Ipv4Addr::from(a), 24).unwrap();
    Node {
        cfg: Config {
            flags,
            vni: 1,
            underlay_ifindex: bench.eth0,
            bridge_ifindex: if devices { bench.cni0 } else { 0 },
            host_ifindex: if devices { bench.ovl0 } else { 0 },
            local_ip: LOCAL_IP,
            public_ip: if routing == 2 { LOCAL_IP } else { PUBLIC_IP },
            subnet: SUBNET,
            subnet_mask: [255, 255, 255, 0],
            network: [172, 17, 0, 0],
            network_mask: [255, 255, 0, 0],
            vtep_mac: VTEP,
            host_mac: HOST_MAC,
            port: PORT,
            src_port_min: SRC_PORTS.0,
            src_port_max: SRC_PORTS.1,
            bridge_mac: BRIDGE_MAC,
            xdp_cookie: 0x5eed_c0de,
            route_gen: 0,
        },
        routes: vec![
            (net(B.1), peer(B, routing >= 1)),
            (net(C.1), peer(C, routing == 2)),
        ],
        members: vec![B.0, C.0, D_IP],
        endpoints: [(KNOWN_POD, Endpoint::new(bench.cni0, KNOWN_POD_MAC))].into(),
        underlay_mtu: 1500,
        host_mtu: 1450,
        kernel_flows: Mutex::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// Running and comparing

fn delta(
    before: &BTreeMap<Reason, Counter>,
    after: &BTreeMap<Reason, Counter>,
) -> BTreeMap<Reason, (u64, u64)> {
    after
        .iter()
        .map(|(r, a)| {
            let b = before[r];
            (*r, (a.packets - b.packets, a.bytes - b.bytes))
        })
        .filter(|(_, d)| *d != (0, 0))
        .collect()
}

fn sum_counts(outcomes: &[Outcome]) -> BTreeMap<Reason, (u64, u64)> {
    let mut sum: BTreeMap<Reason, (u64, u64)> = BTreeMap::new();
    for o in outcomes {
        for (r, bytes) in &o.counts {
            let e = sum.entry(*r).or_default();
            e.0 += 1;
            e.1 += bytes;
        }
    }
    sum
}

/// The reasons that say where a frame went: each frame counts at most one. The others say
/// which hook saw or settled it, or what it left behind (a filed kernel flow).
fn is_fate(r: Reason) -> bool {
    !matches!(
        r,
        Reason::UnderlayRx
            | Reason::UnderlayTx
            | Reason::XdpDecap
            | Reason::PodPort
            | Reason::KernelFlowNew
    )
}

/// `pod_port` counts exactly what the port program settled (redirected or dropped).
fn port_counted_right(prog: &str, verdict: u32, counts: &BTreeMap<Reason, (u64, u64)>) -> bool {
    let settled_at_port = prog == names::POD_PORT_EGRESS && verdict != model::TC_OK;
    counts.get(&Reason::PodPort).map(|c| c.0) == settled_at_port.then_some(1)
}

/// Each frame accounted for exactly once (see the module note), on the counts of one frame.
fn assert_accounted(prog: &str, verdict: u32, counts: &BTreeMap<Reason, (u64, u64)>, hex: &str) {
    if prog == XDP_PROGRAM {
        // XDP passes everything on (TC drops and counts what fails a check), decapsulated or not.
        let decapsulated =
            counts.len() == 1 && counts.get(&Reason::XdpDecap).map(|c| c.0) == Some(1);
        assert!(
            verdict == model::XDP_PASS && (counts.is_empty() || decapsulated),
            "{prog}: verdict {verdict} with counts {counts:?}; frame {hex}"
        );
        return;
    }
    let fates: Vec<Reason> = counts.keys().copied().filter(|r| is_fate(*r)).collect();
    let packets = |r: Reason| counts.get(&r).map_or(0, |c| c.0);
    let entry = match prog {
        names::UNDERLAY_INGRESS => Some(Reason::UnderlayRx),
        names::UNDERLAY_EGRESS => Some(Reason::UnderlayTx),
        _ => None,
    };
    let ok = match verdict {
        model::TC_SHOT => fates.len() == 1 && fates[0].is_drop() && packets(fates[0]) == 1,
        model::TC_REDIRECT => fates.len() == 1 && !fates[0].is_drop() && packets(fates[0]) == 1,
        _ => fates.len() <= 1 && fates.iter().all(|r| !r.is_drop() && packets(*r) == 1),
    } && entry.is_none_or(|e| packets(e) == 1)
        && port_counted_right(prog, verdict, counts)
        && counts.keys().all(|r| {
            Some(*r) == entry || matches!(r, Reason::PodPort | Reason::KernelFlowNew) || is_fate(*r)
        })
        && counts.get(&Reason::KernelFlowNew).is_none_or(|c| c.0 == 1);
    assert!(
        ok,
        "{prog}: verdict {verdict} with counts {counts:?}: not accounted exactly once; frame {hex}"
    );
}

fn hex(f: &[u8]) -> String {
    f.iter().map(|b| format!("{b:02x}")).collect()
}

/// Tallies of one program's run, for the report.
#[derive(Default)]
struct Tally {
    frames: u64,
    mutated: u64,
    verdicts: BTreeMap<u32, u64>,
    reasons: BTreeMap<Reason, u64>,
}

/// Runs `frames` generated frames (half mutated) through `prog` in the node namespace, in
/// batches of `batch`, comparing each with `model`.
fn run_program(
    bench: &Bench,
    node: &Node,
    prog: &str,
    rng: &mut Rng,
    frames: u64,
    batch: usize,
    tally: &mut Tally,
) {
    let xdp: Option<&Xdp> =
        (prog == XDP_PROGRAM).then(|| bench.ebpf.program(prog).unwrap().try_into().unwrap());
    let tc: Option<&SchedClassifier> =
        (prog != XDP_PROGRAM).then(|| bench.ebpf.program(prog).unwrap().try_into().unwrap());
    let run = |frame: &[u8]| -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let result = match (xdp, tc) {
            (Some(p), _) => p.test_run(opts),
            (_, Some(p)) => p.test_run(opts),
            _ => unreachable!(),
        }
        .unwrap_or_else(|e| panic!("{prog}: test run of {}: {e:?}", hex(frame)));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    };
    let model = |f: &[u8]| match prog {
        names::UNDERLAY_INGRESS => node.underlay_ingress(f),
        names::UNDERLAY_EGRESS => node.underlay_egress(f),
        names::POD_EGRESS => node.pod_egress(f, false),
        names::POD_PORT_EGRESS => node.pod_egress(f, true),
        names::HOST_EGRESS => node.host_egress(f),
        names::POD_INGRESS => node.pod_ingress(f),
        _ => node.underlay_xdp(f),
    };
    bench
        .ns
        .in_netns(|| {
            let mut done = 0;
            while done < frames {
                let n = (frames - done).min(batch as u64) as usize;
                let batch_frames: Vec<Vec<u8>> = (0..n)
                    .map(|_| {
                        let mut f = frame(rng);
                        if rng.chance(2) {
                            mutate(rng, &mut f);
                            tally.mutated += 1;
                        }
                        f
                    })
                    .collect();
                let before = counters_by_reason(&bench.ebpf);
                let mut expected = Vec::with_capacity(n);
                for f in &batch_frames {
                    let (verdict, out) = run(f);
                    let want = model(f);
                    assert_eq!(
                        verdict,
                        want.verdict,
                        "{prog}: verdict for frame {} (model: {want:?})",
                        hex(f)
                    );
                    if let Some(why) = model::mismatch(&want.out, f, &out, SRC_PORTS) {
                        panic!(
                            "{prog}: {why}\n  frame in:  {}\n  came out:  {}\n  model:     {want:?}",
                            hex(f),
                            hex(&out)
                        );
                    }
                    *tally.verdicts.entry(verdict).or_default() += 1;
                    for (r, _) in &want.counts {
                        *tally.reasons.entry(*r).or_default() += 1;
                    }
                    expected.push(want);
                }
                let seen = delta(&before, &counters_by_reason(&bench.ebpf));
                if seen != sum_counts(&expected) {
                    // Find the frame: again, one at a time.
                    for (f, want) in batch_frames.iter().zip(&expected) {
                        let before = counters_by_reason(&bench.ebpf);
                        let (verdict, _) = run(f);
                        let seen = delta(&before, &counters_by_reason(&bench.ebpf));
                        let model_counts = sum_counts(std::slice::from_ref(want));
                        assert_eq!(
                            seen,
                            model_counts,
                            "{prog}: counters of frame {} (verdict {verdict})",
                            hex(f)
                        );
                    }
                    panic!("{prog}: a batch's counters differ from the model's, no frame alone does");
                }
                if n == 1 {
                    assert_accounted(prog, expected[0].verdict, &seen, &hex(&batch_frames[0]));
                } else {
                    for want in &expected {
                        assert_accounted(prog, want.verdict, &sum_counts(std::slice::from_ref(want)), "");
                    }
                }
                done += n as u64;
                tally.frames += n as u64;
            }
            Ok(())
        })
        .unwrap();
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

/// `OVERLAY_RANDOM_SEED`, else one from the clock (printed by the tests, to repeat a run).
fn seed() -> u64 {
    env_or(
        "OVERLAY_RANDOM_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    )
}

#[test]
fn every_program_accounts_for_every_frame_as_the_model_says() {
    let frames: u64 = env_or("OVERLAY_RANDOM_FRAMES", 3000);
    let batch: usize = env_or("OVERLAY_RANDOM_BATCH", 1).max(1);
    let seed = seed();
    eprintln!(
        "packet_random: seed {seed} ({frames} frames per program and setting, counters per \
         {batch} frames; OVERLAY_RANDOM_SEED={seed} repeats it)"
    );
    let mut rng = Rng(seed);
    let mut bench = Bench::new();
    let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
    let started = Instant::now();
    for (routing, devices, name) in [
        (0, true, "vxlan"),
        (1, true, "directrouting"),
        (2, true, "host-gw"),
        (0, false, "vxlan, no bridge or host device"),
    ] {
        let node = setting(&bench, routing, devices);
        bench.apply(&node);
        let t = Instant::now();
        for prog in TC_PROGRAMS.iter().copied().chain([XDP_PROGRAM]) {
            run_program(
                &bench,
                &node,
                prog,
                &mut rng,
                frames,
                batch,
                tallies.entry(prog).or_default(),
            );
        }
        eprintln!("packet_random: setting {name}: {:?}", t.elapsed());
    }
    for (prog, t) in &tallies {
        let top: Vec<String> = t
            .reasons
            .iter()
            .map(|(r, n)| format!("{}={n}", r.name()))
            .collect();
        eprintln!(
            "packet_random: {prog}: {} frames ({} mutated), verdicts {:?}, counted {}",
            t.frames,
            t.mutated,
            t.verdicts,
            top.join(" ")
        );
        assert_eq!(t.frames, 4 * frames);
    }
    eprintln!("packet_random: done in {:?}", started.elapsed());
}

/// What with masquerade on counts besides a frame's fate: the translations (a frame may be
/// translated and then delivered, `nat_snat` + `encap_host`, or be delivered by the translation
/// itself) and their annotations (a new flow; of a translation back: into the pod directly, or
/// a FIN or RST outside the close window).
fn nat_role(r: Reason) -> Option<bool> {
    match r {
        Reason::NatSnat | Reason::NatRev => Some(true),
        Reason::NatNewFlow | Reason::NatRevEndpoint | Reason::NatCloseOutOfWindow => Some(false),
        _ => None,
    }
}

/// Exactly-once accounting with masquerade on (see [`nat_role`]), for one frame's counts.
fn assert_accounted_nat(
    prog: &str,
    verdict: u32,
    counts: &BTreeMap<Reason, (u64, u64)>,
    hex: &str,
) {
    let once = |r: &Reason| counts[r].0 == 1;
    let drops: Vec<Reason> = counts.keys().copied().filter(|r| r.is_drop()).collect();
    let fates: Vec<Reason> = counts
        .keys()
        .copied()
        .filter(|r| is_fate(*r) && !r.is_drop() && nat_role(*r).is_none())
        .collect();
    let translations: Vec<Reason> = counts
        .keys()
        .copied()
        .filter(|r| nat_role(*r) == Some(true))
        .collect();
    let annotations_fit = (!counts.contains_key(&Reason::NatNewFlow)
        || counts.contains_key(&Reason::NatSnat))
        && (!counts.contains_key(&Reason::NatRevEndpoint) || counts.contains_key(&Reason::NatRev))
        && (!counts.contains_key(&Reason::NatCloseOutOfWindow)
            || counts.contains_key(&Reason::NatRev));
    let ok = counts.keys().all(once)
        && port_counted_right(prog, verdict, counts)
        && translations.len() <= 1
        && annotations_fit
        && match verdict {
            model::TC_SHOT => drops.len() == 1 && fates.is_empty(),
            model::TC_REDIRECT => {
                drops.is_empty()
                    && (fates.len() == 1 || (fates.is_empty() && translations.len() == 1))
            }
            _ => drops.is_empty() && fates.len() <= 1,
        };
    assert!(
        ok,
        "{prog} (masquerade on): verdict {verdict} with counts {counts:?}: not accounted \
         exactly once; frame {hex}"
    );
}

/// The reply the outside host sends to a translated packet `out` (IPv4 behind Ethernet):
/// addresses and ports swapped, an ICMP echo answered; `None` for what has no reply.
fn reply_to(out: &[u8]) -> Option<Vec<u8>> {
    if out.len() < 34 + 8 || out[14] != 0x45 || u16::from_be_bytes([out[20], out[21]]) & 0x1fff != 0
    {
        return None;
    }
    let mut r = out.to_vec();
    let (src, dst) = (out[26..30].to_vec(), out[30..34].to_vec());
    r[26..30].copy_from_slice(&dst);
    r[30..34].copy_from_slice(&src);
    match out[23] {
        // TCP, UDP, DCCP, SCTP, UDP-Lite: the ports lead the header.
        6 | 17 | 33 | 132 | 136 => {
            let (sp, dp) = (out[34..36].to_vec(), out[36..38].to_vec());
            r[34..36].copy_from_slice(&dp);
            r[36..38].copy_from_slice(&sp);
            // The L4 checksum covers the swapped words only in a different order: unchanged.
        }
        // GRE: no ports, the addresses are the tuple.
        47 => {}
        1 if out[34] == 8 => {
            r[34] = 0;
            let c = u16::from_be_bytes([r[36], r[37]]).wrapping_add(0x0800);
            r[36..38].copy_from_slice(&c.to_be_bytes());
        }
        _ => return None,
    }
    fix_ipv4(&mut r, 14);
    Some(r)
}

/// A pod's packet to a host outside the cluster network (what masquerade translates): TCP,
/// UDP, an ICMP echo, DCCP, UDP-Lite, SCTP or GRE, with a valid IPv4 header.
fn to_outside(rng: &mut Rng) -> Vec<u8> {
    let dst = [198, 19, rng.byte(), 1 + rng.byte() % 250];
    let src = host(SUBNET, rng.pick(&[5u8, 6, 7, 77]));
    let mut ip = ipv4(rng, src, dst, (64, 0, 0));
    ip.resize(ip.len().max(20 + 28), 0);
    let proto = rng.pick(&[1u8, 6, 17, 6, 17, 33, 47, 132, 136]);
    ip[9] = proto;
    if proto == 1 {
        ip[20] = 8;
        ip[21] = 0;
    }
    let len = ip.len() as u16;
    ip[2..4].copy_from_slice(&len.to_be_bytes());
    ip[6..8].copy_from_slice(&[0x40, 0]);
    fix_ipv4(&mut ip, 0);
    ether(BRIDGE_MAC, POD_MAC, 0x0800, &ip)
}

/// The randomised test with masquerade on: every program, random and mutated frames, and the
/// replies to what the pods' traffic was translated into (some mutated too). Each frame is
/// accounted for exactly once (translations included, counters read per frame); what leaves
/// translated carries the node's address with a valid header, and what a reply is translated
/// back to is the pod that sent the original. (Bytes of the translations: `packet_nat.rs`.)
#[test]
fn with_masquerade_on_every_frame_is_accounted_once_and_translations_hold() {
    let frames: u64 = env_or("OVERLAY_RANDOM_FRAMES", 3000);
    let seed = seed();
    eprintln!("packet_random (masquerade): seed {seed}, {frames} frames per program");
    let mut rng = Rng(seed);
    let mut bench = Bench::new();
    let node = setting(&bench, 1, true);
    bench.apply(&node);
    let mut nat: Array<_, NatConfig> =
        Array::try_from(bench.ebpf.map_mut(names::NAT_CONFIG).unwrap()).unwrap();
    nat.set(0, nat_config(0, (1024, 65535)), 0).unwrap();
    let program =
        |name: &str| -> &SchedClassifier { bench.ebpf.program(name).unwrap().try_into().unwrap() };
    let run = |name: &str, frame: &[u8]| -> (u32, Vec<u8>, BTreeMap<Reason, (u64, u64)>) {
        let before = counters_by_reason(&bench.ebpf);
        let mut out = vec![0u8; frame.len() + 256];
        let result = program(name)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("{name}: test run of {}: {e:?}", hex(frame)));
        out.truncate(result.data_size_out as usize);
        let seen = delta(&before, &counters_by_reason(&bench.ebpf));
        assert_accounted_nat(name, result.return_value, &seen, &hex(frame));
        (result.return_value, out, seen)
    };
    let (mut translated, mut back, mut back_portless) = (0u64, 0u64, 0u64);
    bench
        .ns
        .in_netns(|| {
            for _ in 0..frames {
                for prog in TC_PROGRAMS {
                    let mut f = if prog != names::UNDERLAY_INGRESS && rng.chance(2) {
                        to_outside(&mut rng)
                    } else {
                        frame(&mut rng)
                    };
                    if rng.chance(2) {
                        mutate(&mut rng, &mut f);
                    }
                    let (verdict, out, seen) = run(prog, &f);
                    let snat = seen.contains_key(&Reason::NatSnat);
                    if prog == names::POD_EGRESS && snat && verdict == model::TC_REDIRECT {
                        translated += 1;
                        assert_eq!(&out[26..30], &LOCAL_IP, "translated source: {}", hex(&out));
                        // Updated incrementally: valid where the pod's header was.
                        let valid = f[14] == 0x45 && checksum(&f[14..34]) == 0;
                        if valid {
                            assert_eq!(checksum(&out[14..34]), 0, "translated: {}", hex(&out));
                        }
                        let Some(mut reply) = reply_to(&out) else {
                            continue;
                        };
                        let mutated = rng.chance(3);
                        if mutated {
                            mutate(&mut rng, &mut reply);
                        }
                        let (_, back_out, seen) = run(names::UNDERLAY_INGRESS, &reply);
                        if !mutated && seen.contains_key(&Reason::NatRev) {
                            back += 1;
                            if f[23] == 47 {
                                back_portless += 1;
                            }
                            assert_eq!(&back_out[30..34], &f[26..30], "translated back to the pod");
                            if valid {
                                assert_eq!(checksum(&back_out[14..34]), 0, "{}", hex(&back_out));
                            }
                        }
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "packet_random (masquerade): {frames} frames per TC program, {translated} pod packets \
         translated, {back} replies translated back ({back_portless} of GRE)"
    );
    assert!(
        translated > 0 && back > 0 && back_portless > 0,
        "the run exercised the masquerade, a protocol without ports included"
    );
}
