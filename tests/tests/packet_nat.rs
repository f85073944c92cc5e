//! Packet tests of the masquerade (`--ip-masq`) data path: `pod_egress`, `host_egress`,
//! `underlay_ingress` and `underlay_egress` run on crafted frames through `BPF_PROG_TEST_RUN`, and the tests check
//! the bytes (addresses, ports, every checksum), the verdicts, the flow maps and the counters.
//!
//! The programs look up routes (`bpf_fib_lookup`) in the network namespace they run in, so every
//! test runs them from a thread inside a namespace of its own (`ovl-<pid>-…`, removed on drop)
//! set up as a node: `eth0` (a veth whose peer stays in the namespace) 198.18.0.1/24 with the default route via 198.18.0.254,
//! the pod bridge `cni0` 172.17.1.1/24, forwarding on; for flannel's last rule (outside →
//! remote pod) also the host device `ovl0` 172.17.1.0/32 with the route to the cluster network
//! and two peers, one VXLAN and one direct. Root only; fails, never skips, without it.
//! The object is `$OVERLAY_EBPF_OBJECT` or `target/bpfel-unknown-none/release/overlay`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, TcpListener, UdpSocket},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, TestRun, TestRunOptions,
    maps::{Array, HashMap, LpmTrie},
    programs::SchedClassifier,
};
use overlay_common::names;
use overlay_common::{
    config::{CONFIG_F_DIRECT, CONFIG_F_READY, Config},
    endpoint::Endpoint,
    nat::{
        IPPROTO_DCCP, IPPROTO_SCTP, IPPROTO_UDPLITE, NAT_CLOSE_WINDOW, NAT_E_TO_CLUSTER,
        NAT_F_KEEP_PORT, NAT_S_FIN, NAT_S_REPLIED, NAT_S_RST, NatConfig, NatEntryV4, NatKeyV4,
        SNAT_V4_CAPACITY, SNAT_V4_NEW_CAPACITY,
    },
    route::{MemberNode, NextHopV4, RemoteNode, route_key},
};
use overlay_tests::{
    NetNs,
    packet::{
        BRIDGE_MAC, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, POD_MAC, SRC_PORT_MAX, SRC_PORT_MIN,
        TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, VXLAN_PORT, be16, checksum, counters, ipv4_packet,
        load_object, nat_config, pin_to_one_cpu, require_root, set_endpoint,
    },
    unique_id,
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const POD: Ipv4Addr = Ipv4Addr::new(172, 17, 1, 5);
const POD2: Ipv4Addr = Ipv4Addr::new(172, 17, 1, 6);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const PORT_MIN: u16 = 1024;
const PORT_MAX: u16 = 32767;
/// The host device's address (`<subnet>.0`): the masquerade address towards VXLAN peers.
const HOST_DEV_IP: Ipv4Addr = Ipv4Addr::new(172, 17, 1, 0);
const HOST_MAC: [u8; 6] = [0x02, 0x0d, 0, 0, 0, 1];
const VTEP_MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 1];
/// A VXLAN peer (PublicIP 198.18.0.2, subnet 172.17.2.0/24) and one of its pods.
const VXLAN_PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const VXLAN_PEER_MAC: [u8; 6] = [0x0e, 0, 0, 0, 0, 2];
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(172, 17, 2, 5);
/// A direct peer (host-gw / DirectRouting; PublicIP 198.18.0.3, subnet 172.17.3.0/24), its pod.
const DIRECT_PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const DIRECT_POD: Ipv4Addr = Ipv4Addr::new(172, 17, 3, 7);
/// Where the VXLAN payload (the inner Ethernet frame) starts in an encapsulated frame.
const INNER_ETH: usize = 14 + 20 + 8 + 8;

// ---------------------------------------------------------------------------------------------
// A node namespace with the object loaded

struct Node {
    ns: NetNs,
    ebpf: Ebpf,
    eth0: u32,
    cni0: u32,
}

impl Node {
    fn new(nat: NatConfig) -> Self {
        require_root("packet_nat");
        let ns = NetNs::new(format!("{}-pkt", unique_id())).unwrap();
        ns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
        ])
        .unwrap();
        ns.link_up("eth0p").unwrap();
        ns.add_addr("eth0", &format!("{NODE_IP}/24")).unwrap();
        ns.link_up("eth0").unwrap();
        ns.add_default_route("198.18.0.254", "eth0").unwrap();
        ns.add_bridge("cni0").unwrap();
        ns.set_mtu("cni0", 1450).unwrap();
        ns.add_addr("cni0", "172.17.1.1/24").unwrap();
        ns.link_up("cni0").unwrap();
        ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        let (eth0, cni0) = (ns.ifindex("eth0").unwrap(), ns.ifindex("cni0").unwrap());

        let ebpf = load_object("packet_nat");
        let mut node = Self {
            ns,
            ebpf,
            eth0,
            cni0,
        };
        let cfg = Config {
            flags: CONFIG_F_READY,
            vni: 1,
            underlay_ifindex: eth0,
            bridge_ifindex: cni0,
            host_ifindex: 0,
            local_ip: NODE_IP.octets(),
            public_ip: NODE_IP.octets(),
            subnet: [172, 17, 1, 0],
            subnet_mask: [255, 255, 255, 0],
            network: [172, 17, 0, 0],
            network_mask: [255, 255, 0, 0],
            vtep_mac: [0x0e, 0, 0, 0, 0, 1],
            host_mac: [0; 6],
            port: VXLAN_PORT,
            src_port_min: SRC_PORT_MIN,
            src_port_max: SRC_PORT_MAX,
            bridge_mac: BRIDGE_MAC,
            xdp_cookie: 0,
            route_gen: 0,
        };
        let mut a: Array<_, Config> =
            Array::try_from(node.ebpf.map_mut(names::CONFIG).unwrap()).unwrap();
        a.set(0, cfg, 0).unwrap();
        node.set_nat(nat);
        node
    }

    /// [`Node::new`] plus the host device `ovl0` (172.17.1.0/32, route to 172.17.0.0/16), a
    /// VXLAN peer and a direct peer: the setting of flannel's last rule.
    fn with_peers(nat: NatConfig) -> Self {
        let mut node = Self::new(nat);
        node.ns
            .ip(&[
                "link", "add", "ovl0", "type", "veth", "peer", "name", "ovl0p",
            ])
            .unwrap();
        node.ns.link_up("ovl0p").unwrap();
        node.ns
            .add_addr("ovl0", &format!("{HOST_DEV_IP}/32"))
            .unwrap();
        node.ns.link_up("ovl0").unwrap();
        node.ns
            .ip(&["route", "add", "172.17.0.0/16", "dev", "ovl0"])
            .unwrap();
        let ovl0 = node.ns.ifindex("ovl0").unwrap();
        let mut a: Array<_, Config> =
            Array::try_from(node.ebpf.map_mut(names::CONFIG).unwrap()).unwrap();
        let mut cfg = a.get(&0, 0).unwrap();
        cfg.flags |= CONFIG_F_DIRECT;
        cfg.host_ifindex = ovl0;
        cfg.host_mac = HOST_MAC;
        a.set(0, cfg, 0).unwrap();
        for (subnet, peer) in [
            (
                Ipv4Addr::new(172, 17, 2, 0),
                RemoteNode::vxlan(VXLAN_PEER.octets(), VXLAN_PEER_MAC),
            ),
            (
                Ipv4Addr::new(172, 17, 3, 0),
                RemoteNode::direct(DIRECT_PEER.octets(), [0; 6]),
            ),
        ] {
            let mut routes: LpmTrie<_, [u8; 4], RemoteNode> =
                LpmTrie::try_from(node.ebpf.map_mut(names::ROUTE_V4).unwrap()).unwrap();
            routes.insert(&route_key(subnet, 24), peer, 0).unwrap();
            let mut nodes: HashMap<_, [u8; 4], MemberNode> =
                HashMap::try_from(node.ebpf.map_mut(names::NODE_V4).unwrap()).unwrap();
            nodes
                .insert(peer.public_ip, MemberNode { routes: 1 }, 0)
                .unwrap();
        }
        node
    }

    /// Publishes `public_ip` (`--public-ip`) instead of the interface address.
    fn set_public_ip(&mut self, public_ip: Ipv4Addr) {
        let mut a: Array<_, Config> =
            Array::try_from(self.ebpf.map_mut(names::CONFIG).unwrap()).unwrap();
        let mut cfg = a.get(&0, 0).unwrap();
        cfg.public_ip = public_ip.octets();
        a.set(0, cfg, 0).unwrap();
    }

    /// Sets `CONFIG.route_gen`, as the agent does when routing changes.
    fn set_route_gen(&mut self, route_gen: u32) {
        let mut a: Array<_, Config> =
            Array::try_from(self.ebpf.map_mut(names::CONFIG).unwrap()).unwrap();
        let mut cfg = a.get(&0, 0).unwrap();
        cfg.route_gen = route_gen;
        a.set(0, cfg, 0).unwrap();
    }

    /// The route cached in the CT entry of the pod's flow from source port `sport`.
    #[track_caller]
    fn cached_route(&self, sport: u16) -> NextHopV4 {
        let flows = self.ct_flows();
        let (_, e) = flows
            .iter()
            .find(|(k, _)| k.sport == sport.to_be_bytes())
            .unwrap_or_else(|| panic!("no flow from port {sport} in {flows:?}"));
        e.route
    }

    fn set_nat(&mut self, nat: NatConfig) {
        let mut a: Array<_, NatConfig> =
            Array::try_from(self.ebpf.map_mut(names::NAT_CONFIG).unwrap()).unwrap();
        a.set(0, nat, 0).unwrap();
    }

    fn exclude(&mut self, net: Ipv4Addr, len: u32) {
        let mut t: LpmTrie<_, [u8; 4], u8> =
            LpmTrie::try_from(self.ebpf.map_mut(names::NAT_EXCLUDE_V4).unwrap()).unwrap();
        t.insert(&aya::maps::lpm_trie::Key::new(len, net.octets()), 1, 0)
            .unwrap();
    }

    /// Runs `prog` on `frame` (with `mark` in the skb) from a thread in the node namespace.
    fn run_marked(&self, prog: &str, frame: &[u8], mark: u32) -> (u32, Vec<u8>) {
        let program: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        self.ns
            .in_netns(|| {
                let mut out = vec![0u8; frame.len() + 256];
                // struct __sk_buff up to `mark`: len, pkt_type (must be 0), mark.
                let mut ctx = [0u8; 12];
                ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
                let r = program
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut out),
                        ctx_in: Some(&ctx),
                        ..TestRunOptions::default()
                    })
                    .map_err(|e| anyhow::anyhow!("test run of {prog}: {e:?}"))?;
                out.truncate(r.data_size_out as usize);
                Ok((r.return_value, out))
            })
            .unwrap()
    }

    fn run(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_marked(prog, frame, 0)
    }

    /// Runs `count` frames from one thread in the node namespace, the `i`th through the
    /// program and frame `make(i)` gives; how many runs returned each verdict.
    fn run_each(
        &self,
        count: u32,
        make: impl Fn(u32) -> (&'static str, Vec<u8>) + Send + Sync,
    ) -> BTreeMap<u32, u32> {
        self.ns
            .in_netns(|| {
                let mut verdicts = BTreeMap::new();
                let mut out = vec![0u8; 2048];
                for i in 0..count {
                    let (prog, frame) = make(i);
                    let program: &SchedClassifier =
                        self.ebpf.program(prog).unwrap().try_into().unwrap();
                    let r = program
                        .test_run(TestRunOptions {
                            data_in: Some(&frame),
                            data_out: Some(&mut out),
                            ctx_in: Some(&[0u8; 12]),
                            ..TestRunOptions::default()
                        })
                        .map_err(|e| anyhow::anyhow!("test run {i} of {prog}: {e:?}"))?;
                    *verdicts.entry(r.return_value).or_insert(0) += 1;
                }
                Ok(verdicts)
            })
            .unwrap()
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        counters(&self.ebpf)
    }

    fn flows(&self, map: &str) -> Vec<(NatKeyV4, NatEntryV4)> {
        let m: HashMap<_, NatKeyV4, NatEntryV4> =
            HashMap::try_from(self.ebpf.map(map).unwrap()).unwrap();
        m.iter().map(Result::unwrap).collect()
    }

    /// The CT entries of both tiers, assured flows first.
    fn ct_flows(&self) -> Vec<(NatKeyV4, NatEntryV4)> {
        let mut flows = self.flows(names::SNAT_V4_CT);
        flows.extend(self.flows(names::SNAT_V4_CT_NEW));
        flows
    }

    /// The REV entries of both tiers, assured flows first.
    fn rev_flows(&self) -> Vec<(NatKeyV4, NatEntryV4)> {
        let mut flows = self.flows(names::SNAT_V4_REV);
        flows.extend(self.flows(names::SNAT_V4_REV_NEW));
        flows
    }

    /// How many entries each flow table holds: assured CT, REV, then new CT, REV.
    fn tier_sizes(&self) -> [usize; 4] {
        names::NAT_FLOW_MAPS.map(|map| self.flows(map).len())
    }

    /// A TCP handshake from the pod `POD:sport` to `OUTSIDE:dport`: SYN out, SYN-ACK back,
    /// then the pod's packet with `flags` (0x10: the ACK that assures the flow). The
    /// translated port.
    fn handshake(&self, sport: u16, dport: u16, flags: u8) -> u16 {
        let (_, out) = self.run(
            names::POD_EGRESS,
            &frame(&tcp(POD, OUTSIDE, sport, dport, 0x02, b"")),
        );
        let port = be16(&check_ip(&out), 20);
        let (v, _) = self.run(
            names::UNDERLAY_INGRESS,
            &frame(&tcp(OUTSIDE, NODE_IP, dport, port, 0x12, b"")),
        );
        assert_eq!(v, TC_ACT_REDIRECT, "the SYN-ACK translated back");
        let (_, out) = self.run(
            names::POD_EGRESS,
            &frame(&tcp(POD, OUTSIDE, sport, dport, flags, b"")),
        );
        assert_eq!(be16(&check_ip(&out), 20), port);
        port
    }
}

fn nat_on(flags: u32) -> NatConfig {
    nat_config(flags, (PORT_MIN, PORT_MAX))
}

// ---------------------------------------------------------------------------------------------
// Frames and checksums

/// The L4 checksum over the pseudo-header and `seg` (whose checksum field is included).
fn l4_sum(src: [u8; 4], dst: [u8; 4], proto: u8, seg: &[u8]) -> u16 {
    let mut p = Vec::new();
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&u16::try_from(seg.len()).unwrap().to_be_bytes());
    p.extend_from_slice(seg);
    checksum(&p)
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, ttl: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_packet(src, dst, proto, ttl, 0, payload)
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    tcp_seq(src, dst, (sport, dport), flags, (1, 0), data)
}

/// A TCP segment with sequence and acknowledgment numbers `(seq, ack)`.
fn tcp_seq(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    (sport, dport): (u16, u16),
    flags: u8,
    (seq, ack): (u32, u32),
    data: &[u8],
) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&seq.to_be_bytes());
    s.extend_from_slice(&ack.to_be_bytes());
    s.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    s.extend_from_slice(data);
    let c = l4_sum(src.octets(), dst.octets(), IPPROTO_TCP, &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, IPPROTO_TCP, 64, &s)
}

fn udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    data: &[u8],
    zero_csum: bool,
) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&u16::try_from(8 + data.len()).unwrap().to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(data);
    if !zero_csum {
        let c = l4_sum(src.octets(), dst.octets(), IPPROTO_UDP, &s);
        s[6..8].copy_from_slice(&c.to_be_bytes());
    }
    ipv4(src, dst, IPPROTO_UDP, 64, &s)
}

/// A DCCP or UDP-Lite packet (`proto`): ports, then two bytes that leave the checksum covering
/// the whole packet (DCCP: data offset 3, CsCov 0; UDP-Lite: coverage 0), its checksum over
/// the pseudo-header at UDP's offset, and `data`.
fn ported(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    (sport, dport): (u16, u16),
    data: &[u8],
) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(if proto == IPPROTO_DCCP {
        &[3, 0]
    } else {
        &[0, 0]
    });
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(data);
    let c = l4_sum(src.octets(), dst.octets(), proto, &s);
    s[6..8].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, proto, 64, &s)
}

/// An SCTP packet: ports, verification tag, and a CRC32c that leaves out the IP header (any
/// fixed bytes do here: the masquerade must not touch them).
fn sctp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0x12, 0x34, 0x56, 0x78]);
    s.extend_from_slice(b"chunk");
    ipv4(src, dst, IPPROTO_SCTP, 64, &s)
}

fn icmp(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, rest: [u8; 4], data: &[u8]) -> Vec<u8> {
    let mut s = vec![kind, code, 0, 0];
    s.extend_from_slice(&rest);
    s.extend_from_slice(data);
    let c = checksum(&s);
    s[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, IPPROTO_ICMP, 64, &s)
}

/// `ip` with TOS byte `tos` (header checksum recomputed).
fn with_tos(ip: &[u8], tos: u8) -> Vec<u8> {
    let mut ip = ip.to_vec();
    ip[1] = tos;
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip
}

fn frame(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0xbb, 0, 0, 0, 1, 0x02, 0xcc, 0, 0, 0, 5, 0x08, 0x00];
    f.extend_from_slice(ip);
    f
}

/// `inner` (an IPv4 packet) as the VXLAN peer sends it to us: outer IPv4/UDP to port 8472,
/// VNI 1, inner Ethernet from its VtepMAC to ours.
fn vxlan_from_peer(inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![0u8; 8];
    payload[..2].copy_from_slice(&40000u16.to_be_bytes());
    payload[2..4].copy_from_slice(&8472u16.to_be_bytes());
    let udp_len = u16::try_from(8 + 8 + 14 + inner.len()).unwrap();
    payload[4..6].copy_from_slice(&udp_len.to_be_bytes());
    payload.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 1, 0]);
    payload.extend_from_slice(&VTEP_MAC);
    payload.extend_from_slice(&VXLAN_PEER_MAC);
    payload.extend_from_slice(&[0x08, 0x00]);
    payload.extend_from_slice(inner);
    frame(&ipv4(VXLAN_PEER, NODE_IP, IPPROTO_UDP, 64, &payload))
}

/// The IPv4 packet of an output frame, with its header and L4 checksums verified.
#[track_caller]
fn check_ip(out: &[u8]) -> Vec<u8> {
    let ip = out[14..].to_vec();
    assert_eq!(checksum(&ip[..20]), 0, "IPv4 header checksum must verify");
    let seg = &ip[20..];
    let (src, dst) = (
        ip[12..16].try_into().unwrap(),
        ip[16..20].try_into().unwrap(),
    );
    match ip[9] {
        p @ (IPPROTO_TCP | IPPROTO_DCCP | IPPROTO_UDPLITE) => {
            assert_eq!(l4_sum(src, dst, p, seg), 0, "checksum of protocol {p}");
        }
        IPPROTO_UDP if be16(seg, 6) != 0 => {
            assert_eq!(l4_sum(src, dst, IPPROTO_UDP, seg), 0, "UDP checksum");
        }
        IPPROTO_ICMP => assert_eq!(checksum(seg), 0, "ICMP checksum"),
        _ => {}
    }
    ip
}

fn addr(ip: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(ip[off], ip[off + 1], ip[off + 2], ip[off + 3])
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn tcp_is_masqueraded_and_the_reply_translated_back_with_valid_checksums() {
    let node = Node::new(nat_on(0));
    let syn = tcp(POD, OUTSIDE, 40000, 80, 0x02, b"");
    let (v, out) = node.run(names::POD_EGRESS, &frame(&syn));
    assert_eq!(v, TC_ACT_REDIRECT, "sent out of eth0 by bpf_redirect_neigh");
    let ip = check_ip(&out);
    assert_eq!(
        addr(&ip, 12),
        NODE_IP,
        "source = the external interface's address"
    );
    assert_eq!(addr(&ip, 16), OUTSIDE);
    assert_eq!(ip[8], 63, "TTL decremented (we are the forwarding hop)");
    let nat_port = be16(&ip, 20);
    assert!(
        (PORT_MIN..=PORT_MAX).contains(&nat_port),
        "random port in range: {nat_port}"
    );
    assert_eq!(be16(&ip, 22), 80);
    assert_eq!(node.tier_sizes(), [0, 0, 1, 1], "a new flow is not assured");

    // The reply, to the node's address and the translated port, with data.
    let synack = tcp(OUTSIDE, NODE_IP, 80, nat_port, 0x12, b"hello from outside");
    let (v, out) = node.run(names::UNDERLAY_INGRESS, &frame(&synack));
    assert_eq!(
        node.tier_sizes(),
        [0, 0, 1, 1],
        "a reply alone assures nothing"
    );
    assert_eq!(v, TC_ACT_REDIRECT, "sent to the pod bridge");
    let ip = check_ip(&out);
    assert_eq!(addr(&ip, 16), POD, "destination = the pod again");
    assert_eq!(be16(&ip, 22), 40000, "destination port = the pod's");
    assert_eq!(
        (addr(&ip, 12), be16(&ip, 20)),
        (OUTSIDE, 80),
        "source untouched"
    );
    assert_eq!(ip[8], 63);
    assert_eq!(&ip[40..], b"hello from outside");

    // The same flow again uses the same port; the pod's ACK of the reply assures the flow.
    let (_, out) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 40000, 80, 0x10, b"x")),
    );
    assert_eq!(be16(&check_ip(&out), 20), nat_port);
    assert_eq!(node.tier_sizes(), [1, 1, 0, 0], "moved by the ACK");
    let c = node.counters();
    assert_eq!(
        (c["nat_snat"], c["nat_rev"], c["nat_new_flow"]),
        (2, 1, 1),
        "{c:?}"
    );
}

#[test]
fn a_reply_for_a_known_pod_goes_straight_into_it() {
    let mut node = Node::new(nat_on(0));
    // The endpoint's veth must exist for the MTU check: any device of the namespace will do.
    let veth = node.cni0;
    set_endpoint(&mut node.ebpf, POD, Some(Endpoint::new(veth, POD_MAC)));
    let (_, out) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 40001, 80, 0x02, b"")),
    );
    let nat_port = be16(&check_ip(&out), 20);
    let synack = tcp(OUTSIDE, NODE_IP, 80, nat_port, 0x12, b"");
    let (v, out) = node.run(names::UNDERLAY_INGRESS, &frame(&synack));
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(&out[..6], &POD_MAC, "destination MAC: the pod's");
    assert_eq!(&out[6..12], &BRIDGE_MAC, "source MAC: the bridge's");
    let ip = check_ip(&out);
    assert_eq!((addr(&ip, 16), be16(&ip, 22)), (POD, 40001));
    assert_eq!(ip[8], 63);
    let c = node.counters();
    assert_eq!((c["nat_rev"], c["nat_rev_endpoint"]), (1, 1), "{c:?}");
}

/// The idle connection of [`floods_of_flows_never_assured_evict_no_assured_flow`] still holds
/// its port both ways, and it alone is assured.
#[track_caller]
fn idle_connection_intact(node: &Node, port: u16) {
    let (_, out) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 1111, 80, 0x10, b"later")),
    );
    assert_eq!(be16(&check_ip(&out), 20), port, "the same translated port");
    let (v, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&tcp(OUTSIDE, NODE_IP, 80, port, 0x10, b"still here")),
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    let ip = check_ip(&out);
    assert_eq!((addr(&ip, 16), be16(&ip, 22)), (POD, 1111));
    let [ct, rev, ct_new, rev_new] = node.tier_sizes();
    assert_eq!((ct, rev), (1, 1), "only the connection is assured");
    let cap = SNAT_V4_NEW_CAPACITY as usize;
    assert!(
        (cap / 2..=cap).contains(&ct_new) && (cap / 2..=cap).contains(&rev_new),
        "the flood's flows evicted each other: {ct_new} CT, {rev_new} REV of {cap}"
    );
}

#[test]
fn floods_of_flows_never_assured_evict_no_assured_flow() {
    // Own ports kept, so the test knows the half-open flows' reply tuples.
    let node = Node::new(nat_on(NAT_F_KEEP_PORT));
    // An assured connection, idle from here on.
    let port = node.handshake(1111, 80, 0x10);
    assert_eq!(node.tier_sizes(), [1, 1, 0, 0], "assured by the ACK");
    let flood = 2 * SNAT_V4_CAPACITY;
    let dst = |flow: u32, net: u8| {
        (
            Ipv4Addr::new(198, 19, net + (flow / 60_000) as u8, 1),
            1 + (flow % 60_000) as u16,
        )
    };

    // A scan: another pod opens twice as many flows as the assured table holds, none is
    // answered, each SYN is sent again once (a retransmission, which the LRU counts as a
    // use). In one table, the idle connection was then the least recently used entry and was
    // evicted.
    let verdicts = node.run_each(2 * flood, |i| {
        let (addr, dport) = dst(i / 2, 1);
        (
            names::POD_EGRESS,
            frame(&tcp(POD2, addr, 2222, dport, 0x02, b"")),
        )
    });
    assert_eq!(verdicts, BTreeMap::from([(TC_ACT_REDIRECT, 2 * flood)]));
    idle_connection_intact(&node, port);

    // Half-open flows: every SYN answered by a SYN-ACK, sent again since the pod never
    // acknowledges it. Promoted at their first reply (as in 69b4b25), these filled the
    // assured table (65,409 of its 65,536 entries here), where the next such flood evicts
    // connections.
    let verdicts = node.run_each(3 * flood, |i| {
        let (addr, dport) = dst(i / 3, 10);
        if i % 3 == 0 {
            (
                names::POD_EGRESS,
                frame(&tcp(POD2, addr, 3333, dport, 0x02, b"")),
            )
        } else {
            (
                names::UNDERLAY_INGRESS,
                frame(&tcp(addr, NODE_IP, dport, 3333, 0x12, b"")),
            )
        }
    });
    assert_eq!(
        verdicts,
        BTreeMap::from([(TC_ACT_REDIRECT, 3 * flood)]),
        "every SYN sent, every SYN-ACK translated back"
    );
    idle_connection_intact(&node, port);
    let half_open: Vec<_> = node
        .flows(names::SNAT_V4_CT_NEW)
        .into_iter()
        .filter(|(k, _)| k.sport == 3333u16.to_be_bytes())
        .collect();
    assert!(half_open.len() > SNAT_V4_NEW_CAPACITY as usize / 2);
    for (_, e) in half_open {
        assert_eq!(e.state, NAT_S_REPLIED, "half-open: {e:?}");
    }
    assert_eq!(node.counters()["nat_new_flow"], u64::from(2 * flood) + 1);
}

#[test]
fn a_flow_is_assured_when_its_originator_sends_after_a_reply_that_is_not_a_reset() {
    let mut node = Node::new(nat_on(0));
    // TCP: a reset in reply is delivered and leaves the flow unassured, whatever the pod sends.
    let syn = frame(&tcp(POD, OUTSIDE, 1111, 81, 0x02, b""));
    let (_, out) = node.run(names::POD_EGRESS, &syn);
    let port = be16(&check_ip(&out), 20);
    let (v, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&tcp(OUTSIDE, NODE_IP, 81, port, 0x14, b"")),
    );
    assert_eq!((v, be16(&check_ip(&out), 22)), (TC_ACT_REDIRECT, 1111));
    node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 1111, 81, 0x10, b"")),
    );
    assert_eq!(node.tier_sizes(), [0, 0, 1, 1], "a reset assures nothing");
    let (_, ct) = node.flows(names::SNAT_V4_CT_NEW)[0];
    assert_eq!(ct.state, NAT_S_REPLIED | NAT_S_RST, "its state is kept");
    // The pod tries again: SYN, SYN-ACK, ACK. The ACK assures it, on the same port.
    let (_, out) = node.run(names::POD_EGRESS, &syn);
    assert_eq!(be16(&check_ip(&out), 20), port);
    node.run(
        names::UNDERLAY_INGRESS,
        &frame(&tcp(OUTSIDE, NODE_IP, 81, port, 0x12, b"")),
    );
    assert_eq!(
        node.tier_sizes(),
        [0, 0, 1, 1],
        "a SYN-ACK alone assures nothing"
    );
    let (_, out) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 1111, 81, 0x10, b"")),
    );
    assert_eq!(be16(&check_ip(&out), 20), port);
    assert_eq!(
        node.tier_sizes(),
        [1, 1, 0, 0],
        "assured by the handshake's ACK"
    );
    // A FIN with the handshake's ACK (a pod that only closes): not assured.
    node.handshake(1112, 81, 0x11);
    assert_eq!(
        node.tier_sizes(),
        [1, 1, 1, 1],
        "a closing flow is not assured"
    );
    let (closing, e) = node.flows(names::SNAT_V4_CT_NEW)[0];
    assert_eq!(e.state, NAT_S_REPLIED | NAT_S_FIN);
    {
        // Out of the way of the counts below.
        let mut ct: HashMap<_, NatKeyV4, NatEntryV4> =
            HashMap::try_from(node.ebpf.map_mut(names::SNAT_V4_CT_NEW).unwrap()).unwrap();
        ct.remove(&closing).unwrap();
        let mut rev: HashMap<_, NatKeyV4, NatEntryV4> =
            HashMap::try_from(node.ebpf.map_mut(names::SNAT_V4_REV_NEW).unwrap()).unwrap();
        rev.remove(&closing.reply(e.addr, e.port)).unwrap();
    }

    // UDP and ICMP echo: a query and its answer stay unassured (a DNS lookup); the pod's next
    // datagram or echo request of the same flow assures it.
    let query = frame(&udp(POD, OUTSIDE, 5353, 53, b"query", false));
    let (_, out) = node.run(names::POD_EGRESS, &query);
    let uport = be16(&check_ip(&out), 20);
    let req = frame(&icmp(POD, OUTSIDE, 8, 0, [0x12, 0x34, 0, 1], b"ping"));
    let (_, out) = node.run(names::POD_EGRESS, &req);
    let id = be16(&check_ip(&out), 24);
    for reply in [
        udp(OUTSIDE, NODE_IP, 53, uport, b"answer", false),
        icmp(
            OUTSIDE,
            NODE_IP,
            0,
            0,
            [(id >> 8) as u8, id as u8, 0, 1],
            b"ping",
        ),
    ] {
        let (v, out) = node.run(names::UNDERLAY_INGRESS, &frame(&reply));
        assert_eq!((v, addr(&check_ip(&out), 16)), (TC_ACT_REDIRECT, POD));
    }
    assert_eq!(
        node.tier_sizes(),
        [1, 1, 2, 2],
        "answered once: not assured"
    );
    let (_, out) = node.run(names::POD_EGRESS, &query);
    assert_eq!(be16(&check_ip(&out), 20), uport);
    let (_, out) = node.run(names::POD_EGRESS, &req);
    assert_eq!(be16(&check_ip(&out), 24), id);
    assert_eq!(node.tier_sizes(), [3, 3, 0, 0], "both assured");
    for (_, e) in node.ct_flows().iter().chain(&node.rev_flows()) {
        assert_ne!(e.state & NAT_S_REPLIED, 0, "{e:?}");
    }
    // And replies still find them.
    let (v, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&udp(OUTSIDE, NODE_IP, 53, uport, b"again", false)),
    );
    assert_eq!((v, be16(&check_ip(&out), 22)), (TC_ACT_REDIRECT, 5353));
    assert_eq!(node.counters()["nat_new_flow"], 4);
}

#[test]
fn an_assured_flow_that_lost_its_reply_tuple_to_a_new_flow_moves_to_another_port() {
    let mut node = Node::new(nat_on(0));
    // An assured flow, whose reply entry is then evicted (removed here by hand)…
    let port = node.handshake(1111, 80, 0x10);
    assert_eq!(node.tier_sizes(), [1, 1, 0, 0]);
    let (reply_key, mine) = node.flows(names::SNAT_V4_REV)[0];
    // …and a new flow of another pod has claimed that reply tuple in the other tier since.
    let theirs = NatEntryV4 {
        addr: POD2.octets(),
        port: 3333u16.to_be_bytes(),
        ..mine
    };
    {
        let mut rev: HashMap<_, NatKeyV4, NatEntryV4> =
            HashMap::try_from(node.ebpf.map_mut(names::SNAT_V4_REV).unwrap()).unwrap();
        rev.remove(&reply_key).unwrap();
        let mut rev_new: HashMap<_, NatKeyV4, NatEntryV4> =
            HashMap::try_from(node.ebpf.map_mut(names::SNAT_V4_REV_NEW).unwrap()).unwrap();
        rev_new.insert(reply_key, theirs, 0).unwrap();
    }
    // The assured flow's next packet that must touch its reply entry (a FIN) cannot claim the
    // tuple back: it takes another port, and the new flow keeps the tuple.
    let (v, out) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 1111, 80, 0x11, b"")),
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_ne!(
        be16(&check_ip(&out), 20),
        port,
        "the tuple is the other flow's"
    );
    assert_eq!(
        node.flows(names::SNAT_V4_REV_NEW)
            .into_iter()
            .find(|(k, _)| *k == reply_key),
        Some((reply_key, theirs))
    );
    assert!(
        node.flows(names::SNAT_V4_REV)
            .iter()
            .all(|(k, _)| *k != reply_key),
        "not held in both tiers"
    );
    let (_, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&tcp(OUTSIDE, NODE_IP, 80, port, 0x10, b"")),
    );
    assert_eq!(
        (addr(&check_ip(&out), 16), be16(&check_ip(&out), 22)),
        (POD2, 3333),
        "its replies go to the tuple's holder"
    );
}

#[test]
fn udp_with_and_without_checksum_and_icmp_echo_are_translated() {
    let node = Node::new(nat_on(NAT_F_KEEP_PORT));
    // UDP with a checksum; the port is kept (fully-random disabled) since it is free.
    let (v, out) = node.run(
        names::POD_EGRESS,
        &frame(&udp(POD, OUTSIDE, 5353, 53, b"query", false)),
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    let ip = check_ip(&out);
    assert_eq!((addr(&ip, 12), be16(&ip, 20)), (NODE_IP, 5353), "port kept");
    assert_ne!(be16(&ip, 26), 0);
    let (v, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&udp(OUTSIDE, NODE_IP, 53, 5353, b"answer", false)),
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    let ip = check_ip(&out);
    assert_eq!((addr(&ip, 16), be16(&ip, 22)), (POD, 5353));

    // UDP without a checksum: it must stay zero both ways.
    let (_, out) = node.run(
        names::POD_EGRESS,
        &frame(&udp(POD, OUTSIDE, 6000, 9999, b"no csum", true)),
    );
    let ip = check_ip(&out);
    assert_eq!(addr(&ip, 12), NODE_IP);
    assert_eq!(be16(&ip, 26), 0, "a zero UDP checksum stays zero");
    let port = be16(&ip, 20);
    let (_, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&udp(OUTSIDE, NODE_IP, 9999, port, b"r", true)),
    );
    let ip = check_ip(&out);
    assert_eq!(
        (addr(&ip, 16), be16(&ip, 22), be16(&ip, 26)),
        (POD, 6000, 0)
    );

    // ICMP echo: the identifier is the port.
    let req = icmp(POD, OUTSIDE, 8, 0, [0x12, 0x34, 0, 1], b"ping data");
    let (v, out) = node.run(names::POD_EGRESS, &frame(&req));
    assert_eq!(v, TC_ACT_REDIRECT);
    let ip = check_ip(&out);
    assert_eq!(addr(&ip, 12), NODE_IP);
    let id = be16(&ip, 24);
    assert_eq!(id, 0x1234, "identifier kept while free");
    let (v, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&icmp(
            OUTSIDE,
            NODE_IP,
            0,
            0,
            [0x12, 0x34, 0, 1],
            b"ping data",
        )),
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    let ip = check_ip(&out);
    assert_eq!((addr(&ip, 16), be16(&ip, 24)), (POD, 0x1234));

    // A second pod with the same source port to the same service gets another port.
    let (_, out) = node.run(
        names::POD_EGRESS,
        &frame(&udp(POD2, OUTSIDE, 5353, 53, b"query", false)),
    );
    let ip = check_ip(&out);
    assert_eq!(addr(&ip, 12), NODE_IP);
    let other = be16(&ip, 20);
    assert_ne!(other, 5353, "collision resolved");
    let (_, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&udp(OUTSIDE, NODE_IP, 53, other, b"a2", false)),
    );
    assert_eq!(addr(&check_ip(&out), 16), POD2, "each reply to its own pod");
    let (_, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&udp(OUTSIDE, NODE_IP, 53, 5353, b"a1", false)),
    );
    assert_eq!(addr(&check_ip(&out), 16), POD);
}

#[test]
fn icmp_errors_about_a_flow_are_translated_back_inner_header_and_checksums_included() {
    let node = Node::new(nat_on(0));
    for proto in [IPPROTO_UDP, IPPROTO_TCP, IPPROTO_ICMP] {
        let sent = match proto {
            IPPROTO_UDP => udp(POD, OUTSIDE, 7000, 7001, b"datagram payload", false),
            IPPROTO_TCP => tcp(POD, OUTSIDE, 7000, 7001, 0x02, b""),
            _ => icmp(POD, OUTSIDE, 8, 0, [0x77, 0x77, 0, 1], b"echo"),
        };
        let (_, out) = node.run(names::POD_EGRESS, &frame(&sent));
        let on_wire = check_ip(&out);
        // What a router or the remote sends back: port unreachable / fragmentation needed,
        // quoting the packet as it saw it (translated).
        let (kind, code, rest) = if proto == IPPROTO_TCP {
            (3, 4, [0, 0, 0x05, 0x78])
        } else {
            (3, 3, [0; 4])
        };
        let err = icmp(OUTSIDE, NODE_IP, kind, code, rest, &on_wire);
        let entries = || {
            let mut all = node.ct_flows();
            all.extend(node.rev_flows());
            all.sort_by_key(|(key, _)| format!("{key:?}"));
            all
        };
        let before = entries();
        let (v, out) = node.run(names::UNDERLAY_INGRESS, &frame(&err));
        assert_eq!(v, TC_ACT_REDIRECT, "proto {proto}");
        // Related to the flow, not a reply (conntrack's RELATED): an unanswered SYN or
        // datagram keeps its state (not answered) and its short timeout.
        assert_eq!(
            entries(),
            before,
            "the error changes no flow entry (proto {proto})"
        );
        assert!(before.iter().all(|(_, e)| e.state & NAT_S_REPLIED == 0));
        let ip = check_ip(&out);
        assert_eq!(addr(&ip, 16), POD, "outer destination = the pod");
        let inner = &ip[28..];
        assert_eq!(
            checksum(&inner[..20]),
            0,
            "inner IPv4 checksum (proto {proto})"
        );
        assert_eq!(addr(inner, 12), POD, "inner source = the pod");
        assert_eq!(addr(inner, 16), OUTSIDE);
        let seg = &inner[20..];
        match proto {
            IPPROTO_ICMP => {
                assert_eq!(be16(seg, 4), 0x7777, "inner identifier = the pod's");
                assert_eq!(checksum(seg), 0, "inner ICMP checksum");
            }
            _ => {
                assert_eq!(
                    be16(seg, 0),
                    7000,
                    "inner source port = the pod's (proto {proto})"
                );
                let sum = l4_sum(POD.octets(), OUTSIDE.octets(), proto, seg);
                assert_eq!(sum, 0, "inner L4 checksum (proto {proto})");
            }
        }
        // Everything else in the quote is unchanged: it is the pod's original packet.
        let mut original = sent.clone();
        original[8] -= 1; // it left with the TTL we decremented
        original[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&original[..20]);
        original[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(
            inner,
            &original[..],
            "the quote is the pod's packet again (proto {proto})"
        );
    }
}

/// With the pod's port kept (fully-random disabled), a reply tuple that a socket of the node's
/// own stack owns is not given to the pod's flow (the host socket's packets would go into the
/// pod): a UDP socket bound to that port and a TCP listener on it make the flow take another
/// port; a free port is still kept.
#[test]
fn a_port_a_host_socket_holds_is_never_given_to_a_pods_flow() {
    let node = Node::new(nat_on(NAT_F_KEEP_PORT));
    let (udp_port, tcp_port, free_port) = (5400, 5401, 5402);
    let sockets = node
        .ns
        .in_netns(|| {
            Ok((
                UdpSocket::bind((Ipv4Addr::UNSPECIFIED, udp_port))?,
                TcpListener::bind((Ipv4Addr::UNSPECIFIED, tcp_port))?,
            ))
        })
        .unwrap();
    let sent = [
        (udp(POD, OUTSIDE, udp_port, 53, b"query", false), udp_port),
        (tcp(POD, OUTSIDE, tcp_port, 80, 0x02, b""), tcp_port),
    ];
    for (packet, host_port) in &sent {
        let (v, out) = node.run(names::POD_EGRESS, &frame(packet));
        assert_eq!(v, TC_ACT_REDIRECT);
        let ip = check_ip(&out);
        assert_eq!(addr(&ip, 12), NODE_IP);
        let port = be16(&ip, 20);
        assert_ne!(port, *host_port, "the host socket's port went to the pod");
        // The flow works on its port: the reply goes back to the pod's own port.
        let reply = if ip[9] == IPPROTO_UDP {
            udp(OUTSIDE, NODE_IP, 53, port, b"answer", false)
        } else {
            tcp(OUTSIDE, NODE_IP, 80, port, 0x12, b"")
        };
        let (v, out) = node.run(names::UNDERLAY_INGRESS, &frame(&reply));
        assert_eq!(v, TC_ACT_REDIRECT);
        let ip = check_ip(&out);
        assert_eq!((addr(&ip, 16), be16(&ip, 22)), (POD, *host_port));
    }
    let (_, out) = node.run(
        names::POD_EGRESS,
        &frame(&udp(POD, OUTSIDE, free_port, 53, b"query", false)),
    );
    assert_eq!(be16(&check_ip(&out), 20), free_port, "a free port is kept");
    drop(sockets);
}

#[test]
fn what_flannel_does_not_masquerade_is_left_alone() {
    let mut node = Node::new(nat_on(0));
    node.exclude(Ipv4Addr::new(10, 96, 0, 0), 12);
    let cases: [(&str, Vec<u8>, u32); 5] = [
        (
            "marked 0x4000 by kube-proxy",
            tcp(POD, OUTSIDE, 1000, 80, 0x02, b""),
            0x4000,
        ),
        (
            "to the cluster network",
            tcp(POD, Ipv4Addr::new(172, 17, 9, 9), 1000, 80, 0x02, b""),
            0,
        ),
        (
            "multicast",
            udp(
                POD,
                Ipv4Addr::new(224, 0, 0, 251),
                5353,
                5353,
                b"mdns",
                false,
            ),
            0,
        ),
        (
            "an excluded CIDR",
            tcp(POD, Ipv4Addr::new(10, 96, 0, 1), 1000, 443, 0x02, b""),
            0,
        ),
        (
            "from outside the cluster",
            tcp(Ipv4Addr::new(198, 19, 0, 7), OUTSIDE, 1000, 80, 0x02, b""),
            0,
        ),
    ];
    for (what, ip, mark) in &cases {
        let f = frame(ip);
        let (v, out) = node.run_marked(names::POD_EGRESS, &f, *mark);
        assert_eq!((v, &out), (TC_ACT_OK, &f), "{what}: passed on untouched");
        let (v, out) = node.run_marked(names::UNDERLAY_EGRESS, &f, *mark);
        assert_eq!(
            (v, &out),
            (TC_ACT_OK, &f),
            "{what}: not translated at egress either"
        );
    }
    // A reply for no flow goes on to the kernel untouched.
    let stray = frame(&tcp(OUTSIDE, NODE_IP, 80, 2000, 0x12, b""));
    assert_eq!(
        node.run(names::UNDERLAY_INGRESS, &stray),
        (TC_ACT_OK, stray.clone())
    );
    assert!(node.ct_flows().is_empty());

    // Masquerade off: nothing is translated at all.
    let mut off = nat_on(0);
    off.flags = 0;
    node.set_nat(off);
    let f = frame(&tcp(POD, OUTSIDE, 1000, 80, 0x02, b""));
    assert_eq!(node.run(names::POD_EGRESS, &f), (TC_ACT_OK, f.clone()));
    assert!(
        node.counters().keys().all(|k| !k.starts_with("nat_")),
        "{:?}",
        node.counters()
    );
}

#[test]
fn kernel_routed_traffic_is_masqueraded_at_egress_and_replies_go_back_to_the_kernel() {
    let node = Node::new(nat_on(0));
    let f = frame(&udp(POD, OUTSIDE, 4444, 53, b"routed by the kernel", false));
    let (v, out) = node.run(names::UNDERLAY_EGRESS, &f);
    assert_eq!(v, TC_ACT_OK, "translated in place");
    let ip = check_ip(&out);
    assert_eq!(addr(&ip, 12), NODE_IP);
    assert_eq!(ip[8], 64, "the kernel already decremented the TTL");
    let port = be16(&ip, 20);
    let (v, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&udp(OUTSIDE, NODE_IP, 53, port, b"r", false)),
    );
    assert_eq!(
        v, TC_ACT_OK,
        "a kernel flow's reply goes back through the kernel"
    );
    let ip = check_ip(&out);
    assert_eq!((addr(&ip, 16), be16(&ip, 22), ip[8]), (POD, 4444, 64));
}

/// At a pod's port (`pod_port_egress`) a flow's first packet goes on to the bridge untouched,
/// where netfilter may still DNAT it (kube-proxy under `br_netfilter`); `pod_egress` creates
/// the flow, and the port finishes the flow's later packets itself.
#[test]
fn the_port_leaves_a_new_flow_to_the_bridge_and_finishes_its_later_packets() {
    pin_to_one_cpu();
    let mut node = Node::new(nat_on(0));
    node.set_route_gen(1);
    let syn = frame(&tcp(POD, OUTSIDE, 40000, 80, 0x02, b""));
    let (v, out) = node.run(names::POD_PORT_EGRESS, &syn);
    assert_eq!((v, &out), (TC_ACT_OK, &syn), "on to the bridge, untouched");
    assert_eq!(
        node.tier_sizes(),
        [0, 0, 0, 0],
        "no flow created at the port"
    );
    let (v, out) = node.run(names::POD_EGRESS, &syn);
    assert_eq!(v, TC_ACT_REDIRECT);
    let nat_port = be16(&check_ip(&out), 20);
    assert_eq!(node.tier_sizes(), [0, 0, 1, 1]);

    let ack = frame(&tcp(POD, OUTSIDE, 40000, 80, 0x10, b"x"));
    let (v, out) = node.run(names::POD_PORT_EGRESS, &ack);
    assert_eq!(v, TC_ACT_REDIRECT, "a known flow: finished at the port");
    let ip = check_ip(&out);
    assert_eq!((addr(&ip, 12), be16(&ip, 20)), (NODE_IP, nat_port));
    let c = node.counters();
    assert_eq!(
        (c["nat_snat"], c["nat_new_flow"], c["pod_port"]),
        (2, 1, 1),
        "{c:?}"
    );
}

/// A connection the node's netfilter DNATed from its own address into a pod (a published port:
/// `docker run -p`, a hostPort): `pod_ingress` files it as the kernel sends it into the pod,
/// and the pod's replies go on to the kernel untouched (whose conntrack gives them the node's
/// address and port back), where they were masqueraded as a new flow before. Only what comes
/// from outside the cluster network is filed; the pod's own new flows to the same host are
/// masqueraded as ever.
#[test]
fn replies_in_a_connection_the_kernel_delivered_into_a_pod_are_left_to_the_kernel() {
    pin_to_one_cpu();
    let mut node = Node::new(nat_on(0));
    node.set_route_gen(1);
    let syn = frame(&tcp(OUTSIDE, POD, 51000, 8080, 0x02, b""));
    assert_eq!(node.run(names::POD_INGRESS, &syn), (TC_ACT_OK, syn.clone()));
    let data = frame(&tcp(OUTSIDE, POD, 51000, 8080, 0x10, b"x"));
    assert_eq!(
        node.run(names::POD_INGRESS, &data),
        (TC_ACT_OK, data.clone())
    );
    let query = frame(&udp(OUTSIDE, POD, 52000, 53, b"q", true));
    node.run(names::POD_INGRESS, &query);
    assert_eq!(node.counters()["kernel_flow_new"], 2, "filed once per flow");

    let syn_ack = frame(&tcp(POD, OUTSIDE, 8080, 51000, 0x12, b""));
    let answer = frame(&udp(POD, OUTSIDE, 53, 52000, b"a", true));
    for f in [&syn_ack, &answer] {
        let (v, out) = node.run(names::POD_PORT_EGRESS, f);
        assert_eq!(
            (v, &out),
            (TC_ACT_OK, f),
            "no flow of ours: on to the bridge"
        );
        let (v, out) = node.run(names::POD_EGRESS, f);
        assert_eq!((v, &out), (TC_ACT_OK, f), "the kernel's, untouched");
    }
    let c = node.counters();
    assert_eq!(c["to_stack_kernel_flow"], 2, "{c:?}");
    assert_eq!(node.tier_sizes(), [0, 0, 0, 0], "no flow created");

    // The pod's own connection to the same host (another tuple) is masqueraded.
    let (v, out) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 40000, 51000, 0x02, b"")),
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(addr(&check_ip(&out), 12), NODE_IP);

    // Not filed: what comes from a cluster address (a remote pod, the host device) or from
    // the node's own address, and what goes to the host's own addresses in the subnet.
    for f in [
        tcp(REMOTE_POD, POD, 51001, 8080, 0x02, b""),
        tcp(HOST_DEV_IP, POD, 51002, 8080, 0x02, b""),
        tcp(NODE_IP, POD, 51003, 8080, 0x02, b""),
        tcp(OUTSIDE, HOST_DEV_IP, 51004, 8080, 0x02, b""),
        tcp(
            OUTSIDE,
            Ipv4Addr::new(172, 17, 1, 1),
            51005,
            8080,
            0x02,
            b"",
        ),
        tcp(OUTSIDE, REMOTE_POD, 51006, 8080, 0x02, b""),
    ] {
        node.run(names::POD_INGRESS, &frame(&f));
    }
    assert_eq!(
        node.counters()["kernel_flow_new"],
        2,
        "{:?}",
        node.counters()
    );
}

/// Connections into a pod from outside the cluster network that no DNAT touched: their
/// replies are never masqueraded, as MASQUERADE touches only new connections.
/// - A stock host-gw node's host connects from its interface address (a member's PublicIP),
///   delivered straight into the pod: no conntrack saw it, so `pod_egress` sends the pod's
///   replies on itself, untranslated (`nat_inbound_reply`), where it would have masqueraded
///   them as a new flow.
/// - An outside host that routes the cluster network through the node, delivered by the
///   kernel (`pod_ingress` files it): the pod's reply, which the kernel then routes out, is
///   left alone by `underlay_egress`.
/// - An outside host whose packets a member forwards over VXLAN unmasqueraded (a node
///   without `--ip-masq`), decapsulated straight into the pod: filed as direct delivery's,
///   the replies leave untranslated too.
///
/// The pod's own new connection to the same hosts is masqueraded as ever.
#[test]
fn replies_to_connections_from_outside_the_cluster_are_not_masqueraded() {
    pin_to_one_cpu();
    let mut node = Node::with_peers(nat_on(0));
    node.set_route_gen(1);
    // Addressed to this host at L2 (in a test run: loopback's MAC), as direct delivery needs.
    let to_host = |ip: &[u8]| {
        let mut f = frame(ip);
        f[..6].fill(0);
        f
    };
    let syn = to_host(&tcp(DIRECT_PEER, POD, 45000, 9090, 0x02, b""));
    assert_eq!(node.run(names::UNDERLAY_INGRESS, &syn).0, TC_ACT_REDIRECT);
    let syn_ack = frame(&tcp(POD, DIRECT_PEER, 9090, 45000, 0x12, b""));
    let (v, out) = node.run(names::POD_PORT_EGRESS, &syn_ack);
    assert_eq!(
        (v, &out),
        (TC_ACT_OK, &syn_ack),
        "no flow: on to the bridge"
    );
    let (v, out) = node.run(names::POD_EGRESS, &syn_ack);
    assert_eq!(v, TC_ACT_REDIRECT, "sent on by the data path");
    let ip = check_ip(&out);
    assert_eq!(
        (addr(&ip, 12), be16(&ip, 20), ip[8]),
        (POD, 9090, 63),
        "untranslated, TTL decremented"
    );
    let c = node.counters();
    assert_eq!(
        (
            c["kernel_flow_new"],
            c["deliver_direct_pod"],
            c["nat_inbound_reply"]
        ),
        (1, 1, 1),
        "{c:?}"
    );
    assert_eq!(node.tier_sizes(), [0, 0, 0, 0], "no flow created");

    let routed_in = frame(&tcp(OUTSIDE, POD, 46000, 9091, 0x02, b""));
    assert_eq!(node.run(names::POD_INGRESS, &routed_in).0, TC_ACT_OK);
    let reply = frame(&tcp(POD, OUTSIDE, 9091, 46000, 0x12, b""));
    assert_eq!(
        node.run(names::UNDERLAY_EGRESS, &reply),
        (TC_ACT_OK, reply.clone()),
        "the kernel's reply leaves untranslated"
    );
    assert_eq!(node.tier_sizes(), [0, 0, 0, 0], "no flow created");

    let forwarded = vxlan_from_peer(&tcp(OUTSIDE, POD, 47000, 9094, 0x02, b""));
    assert_eq!(
        node.run(names::UNDERLAY_INGRESS, &forwarded).0,
        TC_ACT_REDIRECT
    );
    let syn_ack = frame(&tcp(POD, OUTSIDE, 9094, 47000, 0x12, b""));
    let (v, out) = node.run(names::POD_EGRESS, &syn_ack);
    assert_eq!(v, TC_ACT_REDIRECT, "sent on by the data path");
    assert_eq!(
        (addr(&check_ip(&out), 12), be16(&check_ip(&out), 20)),
        (POD, 9094),
        "untranslated"
    );
    let c = node.counters();
    assert_eq!(
        (c["kernel_flow_new"], c["decap_pod"], c["nat_inbound_reply"]),
        (3, 1, 2),
        "{c:?}"
    );
    assert_eq!(node.tier_sizes(), [0, 0, 0, 0], "no flow created");

    for (dst, sport) in [(DIRECT_PEER, 9092), (OUTSIDE, 9093)] {
        let (v, out) = node.run(
            names::POD_EGRESS,
            &frame(&tcp(POD, dst, sport, 45000, 0x02, b"")),
        );
        assert_eq!(v, TC_ACT_REDIRECT, "{dst}");
        assert_eq!(
            addr(&check_ip(&out), 12),
            NODE_IP,
            "a new flow: masqueraded"
        );
    }
    assert_eq!(node.counters()["nat_new_flow"], 2);
}

/// With `--public-ip` (a node behind a NAT) the masquerade still translates to the external
/// interface's address, as the kernel's MASQUERADE does: the PublicIP may not even be the
/// node's, and the NAT in front of it translates the interface address.
#[test]
fn with_another_public_ip_pods_are_masqueraded_to_the_interface_address() {
    const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
    let mut node = Node::new(nat_on(0));
    node.set_public_ip(PUBLIC_IP);
    let (v, out) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 40000, 80, 0x02, b"")),
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    let ip = check_ip(&out);
    assert_eq!(
        addr(&ip, 12),
        NODE_IP,
        "pod_egress: the interface's address"
    );
    let nat_port = be16(&ip, 20);
    let (v, out) = node.run(
        names::UNDERLAY_EGRESS,
        &frame(&udp(POD, OUTSIDE, 4444, 53, b"routed by the kernel", false)),
    );
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(
        addr(&check_ip(&out), 12),
        NODE_IP,
        "underlay_egress: the interface's address"
    );
    // The reply comes back to the interface address and reaches the pod.
    let (v, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&tcp(OUTSIDE, NODE_IP, 80, nat_port, 0x12, b"")),
    );
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(
        (addr(&check_ip(&out), 16), be16(&check_ip(&out), 22)),
        (POD, 40000)
    );
    // Nothing was masqueraded to the PublicIP: a packet to it is no reply of ours.
    let to_public = frame(&tcp(OUTSIDE, PUBLIC_IP, 80, nat_port, 0x12, b""));
    assert_eq!(
        node.run(names::UNDERLAY_INGRESS, &to_public),
        (TC_ACT_OK, to_public.clone()),
        "left to the kernel untouched"
    );
    let c = node.counters();
    assert_eq!((c["nat_snat"], c["nat_rev"]), (2, 1), "{c:?}");
}

#[test]
fn port_exhaustion_is_dropped_and_counted_without_disturbing_the_flow_that_holds_the_port() {
    let mut nat = nat_on(0);
    (nat.port_min, nat.port_max) = (2000, 2000);
    let node = Node::new(nat);
    let (_, out) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 1111, 80, 0x02, b"")),
    );
    assert_eq!(be16(&check_ip(&out), 20), 2000);
    let (v, _) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD2, OUTSIDE, 2222, 80, 0x02, b"")),
    );
    assert_eq!(v, TC_ACT_SHOT, "no port left: dropped");
    assert_eq!(node.counters()["drop_nat_exhausted"], 1);
    // The first flow is intact, both ways; to another service the port is free again.
    let (_, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&tcp(OUTSIDE, NODE_IP, 80, 2000, 0x12, b"")),
    );
    let ip = check_ip(&out);
    assert_eq!((addr(&ip, 16), be16(&ip, 22)), (POD, 1111));
    let (v, out) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD2, OUTSIDE, 2222, 443, 0x02, b"")),
    );
    assert_eq!((v, be16(&check_ip(&out), 20)), (TC_ACT_REDIRECT, 2000));
    assert_eq!(node.rev_flows().len(), 2);
}

#[test]
fn an_idle_flow_is_dead_for_the_data_path() {
    let mut nat = nat_on(0);
    nat.tcp_transient = 1;
    let node = Node::new(nat);
    let (_, out) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 1111, 80, 0x02, b"")),
    );
    let port = be16(&check_ip(&out), 20);
    // A half-open flow (SYN answered, never acknowledged): not assured, so TCP's transient
    // timeout, not the established one (5 days here).
    let (_, out) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 2222, 80, 0x02, b"")),
    );
    let half_open = be16(&check_ip(&out), 20);
    let synack = frame(&tcp(OUTSIDE, NODE_IP, 80, half_open, 0x12, b""));
    assert_eq!(
        node.run(names::UNDERLAY_INGRESS, &synack).0,
        TC_ACT_REDIRECT
    );
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(
        node.run(names::UNDERLAY_INGRESS, &synack),
        (TC_ACT_OK, synack.clone()),
        "the half-open flow expired"
    );
    // The SYN was never answered and has been idle for longer than its timeout: the late
    // answer is not translated, and the entries are gone.
    let late = frame(&tcp(OUTSIDE, NODE_IP, 80, port, 0x12, b""));
    assert_eq!(
        node.run(names::UNDERLAY_INGRESS, &late),
        (TC_ACT_OK, late.clone())
    );
    assert!(node.rev_flows().is_empty(), "{:?}", node.rev_flows());
    assert!(node.ct_flows().is_empty(), "{:?}", node.ct_flows());
    let _ = (node.eth0, node.cni0);
}

#[test]
fn a_reset_flow_expires_on_the_reset_timeout_a_closing_one_on_the_transient_one() {
    let mut nat = nat_on(0);
    nat.tcp_close = 1;
    let node = Node::new(nat);
    // Two assured connections; the pod resets the first and closes the second with a FIN.
    let reset = node.handshake(1111, 80, 0x10);
    let closing = node.handshake(2222, 80, 0x10);
    let (v, _) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 1111, 80, 0x04, b"")),
    );
    assert_eq!(v, TC_ACT_REDIRECT, "the RST translated");
    let (v, _) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 2222, 80, 0x11, b"")),
    );
    assert_eq!(v, TC_ACT_REDIRECT, "the FIN translated");
    // Past the reset timeout (1 s and the refresh lag), well inside the transient one (120 s).
    std::thread::sleep(Duration::from_millis(1300));
    let late = frame(&tcp(OUTSIDE, NODE_IP, 80, reset, 0x10, b""));
    assert_eq!(
        node.run(names::UNDERLAY_INGRESS, &late),
        (TC_ACT_OK, late.clone()),
        "the reset flow is gone: its late answer is left to the node"
    );
    let (v, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&tcp(OUTSIDE, NODE_IP, 80, closing, 0x11, b"")),
    );
    assert_eq!(v, TC_ACT_REDIRECT, "the closing flow still answers");
    let ip = check_ip(&out);
    assert_eq!((addr(&ip, 16), be16(&ip, 22)), (POD, 2222));
}

/// Stop 24's finding: a reply RST set a flow's reset state (10 s to live) whatever its sequence
/// number, so spoofed resets sprayed over the translated ports ended every idle connection to
/// the spoofed remote. Now an assured flow closes only on a FIN or RST at or just past the
/// pod's last acknowledgment; one elsewhere is still delivered (the pod's kernel judges it)
/// and counted, and the flow stays as it was.
#[test]
fn a_reply_reset_or_fin_closes_an_assured_flow_only_near_the_pods_acknowledgment() {
    let node = Node::new(nat_on(0));
    let port = node.handshake(1111, 80, 0x10);
    let ack = 0xffff_f000_u32;
    node.run(
        names::POD_EGRESS,
        &frame(&tcp_seq(POD, OUTSIDE, (1111, 80), 0x18, (7, ack), b"req")),
    );
    let ct = node.ct_flows();
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].1.orig_ack, ack, "the pod's acknowledgment is kept");
    let rev_of =
        |seq: u32, flags: u8| frame(&tcp_seq(OUTSIDE, NODE_IP, (80, port), flags, (seq, 0), b""));

    // Out of the window: behind the acknowledgment, or a window's width past it (across the
    // sequence numbers' wrap), as RSTs and as a FIN.
    let outside = [
        (ack - 1, 0x04),
        (ack.wrapping_add(NAT_CLOSE_WINDOW), 0x04),
        (ack.wrapping_add(1 << 31), 0x14),
        (ack.wrapping_add(NAT_CLOSE_WINDOW), 0x11),
    ];
    for (i, (seq, flags)) in outside.into_iter().enumerate() {
        let (v, out) = node.run(names::UNDERLAY_INGRESS, &rev_of(seq, flags));
        let ip = check_ip(&out);
        assert_eq!(
            (v, addr(&ip, 16), be16(&ip, 22)),
            (TC_ACT_REDIRECT, POD, 1111),
            "delivered to the pod all the same: seq {seq:#x}"
        );
        assert_eq!(
            node.counters()["nat_close_out_of_window"],
            i as u64 + 1,
            "counted: seq {seq:#x}"
        );
        let [(st, _), (rev_st, _)] = entry_times(&node, 1111);
        assert_eq!(
            (st, rev_st),
            (NAT_S_REPLIED, NAT_S_REPLIED),
            "not closed: seq {seq:#x} flags {flags:#x}"
        );
    }

    // In the window (across the wrap): a FIN closes, then a RST resets.
    for (seq, flags, state) in [
        (ack.wrapping_add(0x2000), 0x11, NAT_S_REPLIED | NAT_S_FIN),
        (ack, 0x04, NAT_S_REPLIED | NAT_S_FIN | NAT_S_RST),
    ] {
        let (v, _) = node.run(names::UNDERLAY_INGRESS, &rev_of(seq, flags));
        assert_eq!(v, TC_ACT_REDIRECT);
        let [(st, _), (rev_st, _)] = entry_times(&node, 1111);
        assert_eq!(
            (st, rev_st),
            (state, state),
            "seq {seq:#x} flags {flags:#x}"
        );
    }
    assert_eq!(node.counters()["nat_close_out_of_window"], 4);

    // A flow not assured yet has no stream to judge by: a reset in answer to its SYN (a
    // refused connection) closes it whatever its number, as before.
    let (_, out) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 2222, 80, 0x02, b"")),
    );
    let new_port = be16(&check_ip(&out), 20);
    node.run(
        names::UNDERLAY_INGRESS,
        &frame(&tcp_seq(
            OUTSIDE,
            NODE_IP,
            (80, new_port),
            0x14,
            (0, 1),
            b"",
        )),
    );
    let (_, e) = node.flows(names::SNAT_V4_CT_NEW)[0];
    assert_eq!(e.state, NAT_S_REPLIED | NAT_S_RST);
    assert_eq!(node.counters()["nat_close_out_of_window"], 4);
}

/// The CT and REV entries of the pod's flow from source port `sport`: (state, last seen) each.
#[track_caller]
fn entry_times(node: &Node, sport: u16) -> [(u8, u64); 2] {
    let ct = node.ct_flows();
    let (key, e) = ct
        .iter()
        .find(|(k, _)| k.sport == sport.to_be_bytes())
        .expect("the CT entry");
    let rev = node.rev_flows();
    let (_, r) = rev
        .iter()
        .find(|(k, _)| *k == key.reply(e.addr, e.port))
        .expect("the REV entry");
    [(e.state, e.last_seen), (r.state, r.last_seen)]
}

#[test]
fn both_entries_of_a_flow_are_refreshed_together_on_a_new_state_or_after_the_interval() {
    let node = Node::new(nat_on(0));
    let (_, out) = node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 1111, 80, 0x02, b"")),
    );
    let port = be16(&check_ip(&out), 20);
    let data = frame(&tcp(POD, OUTSIDE, 1111, 80, 0x18, b"x"));
    let reply = frame(&tcp(OUTSIDE, NODE_IP, 80, port, 0x18, b"y"));
    let [(s0, t0), rev0] = entry_times(&node, 1111);
    assert_eq!(rev0, (s0, t0), "created together");

    // A packet that changes the state refreshes both entries at once (the first reply).
    std::thread::sleep(Duration::from_millis(20));
    node.run(names::UNDERLAY_INGRESS, &reply);
    let [(s1, t1), rev1] = entry_times(&node, 1111);
    assert_eq!(s1, NAT_S_REPLIED);
    assert!(t1 > t0, "refreshed: {t0} → {t1}");
    assert_eq!(rev1, (s1, t1));
    // The pod's next packet assures the flow: both entries move, with that packet's time.
    std::thread::sleep(Duration::from_millis(20));
    node.run(names::POD_EGRESS, &data);
    assert_eq!(node.tier_sizes(), [1, 1, 0, 0]);
    let [(s_a, t_a), rev_a] = entry_times(&node, 1111);
    assert!(t_a > t1, "moved with the packet's time: {t1} → {t_a}");
    assert_eq!((s_a, rev_a), (s1, (s1, t_a)));

    // Packets that leave the state as it is, within the refresh interval, write nothing. A
    // thread delayed past the interval would refresh rightly: such an attempt is retried.
    let mut checked = false;
    for _ in 0..3 {
        let [before, _] = entry_times(&node, 1111);
        let start = Instant::now();
        node.run(names::POD_EGRESS, &data);
        node.run(names::UNDERLAY_INGRESS, &reply);
        let after = entry_times(&node, 1111);
        if start.elapsed() < Duration::from_millis(50) {
            assert_eq!(
                after,
                [before, before],
                "nothing rewritten within the interval"
            );
            checked = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
        node.run(names::POD_EGRESS, &data);
    }
    assert!(checked, "three attempts took longer than 50 ms");

    // After the interval, any packet refreshes both.
    std::thread::sleep(Duration::from_millis(150));
    let [(_, t2), _] = entry_times(&node, 1111);
    node.run(names::POD_EGRESS, &data);
    let [(s3, t3), rev3] = entry_times(&node, 1111);
    assert!(t3 > t2, "refreshed after the interval: {t2} → {t3}");
    assert_eq!(rev3, (s3, t3));

    // A FIN right after: the new state reaches both entries at once.
    node.run(
        names::POD_EGRESS,
        &frame(&tcp(POD, OUTSIDE, 1111, 80, 0x11, b"")),
    );
    let [(s4, _), (rev_s4, _)] = entry_times(&node, 1111);
    assert_eq!(
        (s4, rev_s4),
        (NAT_S_REPLIED | NAT_S_FIN, NAT_S_REPLIED | NAT_S_FIN)
    );
}

#[test]
fn a_masqueraded_flow_keeps_its_next_hop_while_the_routing_generation_lasts() {
    let mut node = Node::new(nat_on(0));
    let gw = |last| NextHopV4 {
        route_gen: 0,
        next_hop: [198, 18, 0, last],
    };
    let syn = frame(&tcp(POD, OUTSIDE, 1111, 80, 0x02, b""));
    let data = frame(&tcp(POD, OUTSIDE, 1111, 80, 0x18, b"x"));
    // Generation 0: nothing is cached.
    assert_eq!(node.run(names::POD_EGRESS, &syn).0, TC_ACT_REDIRECT);
    assert_eq!(node.cached_route(1111), NextHopV4::default());

    // Generation 7: the flow's next packet caches the default route's gateway.
    node.set_route_gen(7);
    assert_eq!(node.run(names::POD_EGRESS, &data).0, TC_ACT_REDIRECT);
    assert_eq!(
        node.cached_route(1111),
        NextHopV4 {
            route_gen: 7,
            ..gw(254)
        }
    );

    // The route goes but the generation stays: the flow's packets (ECN bits too, which do not
    // route) still leave by the cached next hop, where a lookup now finds no route, as a new
    // flow shows.
    node.ns.ip(&["route", "del", "default"]).unwrap();
    assert_eq!(
        node.run(names::POD_EGRESS, &data).0,
        TC_ACT_REDIRECT,
        "cached"
    );
    let ecn = frame(&with_tos(&tcp(POD, OUTSIDE, 1111, 80, 0x18, b"x"), 0x02));
    assert_eq!(node.run(names::POD_EGRESS, &ecn).0, TC_ACT_REDIRECT, "ECN");
    let other = frame(&tcp(POD2, OUTSIDE, 2222, 80, 0x02, b""));
    assert_eq!(
        node.run(names::POD_EGRESS, &other).0,
        TC_ACT_OK,
        "no route: the kernel's"
    );
    // A DSCP value may route differently: such packets are looked up, and cache nothing.
    let dscp = frame(&with_tos(&tcp(POD, OUTSIDE, 1111, 80, 0x18, b"x"), 0xb8));
    assert_eq!(
        node.run(names::POD_EGRESS, &dscp).0,
        TC_ACT_OK,
        "DSCP: looked up"
    );

    // A new generation: looked up again (no route), then a new gateway is cached.
    node.set_route_gen(8);
    assert_eq!(
        node.run(names::POD_EGRESS, &data).0,
        TC_ACT_OK,
        "looked up again"
    );
    node.ns.add_default_route("198.18.0.253", "eth0").unwrap();
    node.set_route_gen(9);
    let (v, out) = node.run(names::POD_EGRESS, &data);
    assert_eq!((v, addr(&check_ip(&out), 12)), (TC_ACT_REDIRECT, NODE_IP));
    assert_eq!(
        node.cached_route(1111),
        NextHopV4 {
            route_gen: 9,
            ..gw(253)
        }
    );
    let dscp_syn = frame(&with_tos(&tcp(POD, OUTSIDE, 3333, 80, 0x02, b""), 0xb8));
    assert_eq!(node.run(names::POD_EGRESS, &dscp_syn).0, TC_ACT_REDIRECT);
    assert_eq!(
        node.cached_route(3333),
        NextHopV4::default(),
        "a DSCP flow caches nothing"
    );
}

// ---------------------------------------------------------------------------------------------
// flannel's last rule: `! -s <cluster> -d <cluster> -j MASQUERADE` (outside → remote pod)

#[test]
fn outside_to_a_remote_vxlan_pod_is_masqueraded_to_the_host_device_address_and_routed_back() {
    let node = Node::with_peers(nat_on(0));
    // An outside host's SYN that the kernel forwarded into ovl0 (case b).
    let syn = tcp(OUTSIDE, REMOTE_POD, 5555, 80, 0x02, b"");
    let (v, out) = node.run(names::HOST_EGRESS, &frame(&syn));
    assert_eq!(v, TC_ACT_REDIRECT, "encapsulated and sent to the peer");
    assert_eq!(addr(&out, 14 + 16), VXLAN_PEER, "outer destination");
    let inner = check_ip(&out[INNER_ETH..]);
    assert_eq!(
        addr(&inner, 12),
        HOST_DEV_IP,
        "source = the host device's address, as flannel.1's"
    );
    assert_eq!(addr(&inner, 16), REMOTE_POD);
    assert_eq!(inner[8], 64, "the kernel routed it: TTL left alone");
    let nat_port = be16(&inner, 20);
    assert!((PORT_MIN..=PORT_MAX).contains(&nat_port), "{nat_port}");
    assert_eq!(be16(&inner, 22), 80);
    let flows = node.ct_flows();
    assert_eq!(flows.len(), 1);
    assert_eq!(
        flows[0].0.saddr,
        OUTSIDE.octets(),
        "keyed by the outside source"
    );
    assert_eq!(flows[0].1.flags & NAT_E_TO_CLUSTER, NAT_E_TO_CLUSTER);

    // The pod's answer, encapsulated by the peer, to .0 and the translated port.
    let synack = tcp(
        REMOTE_POD,
        HOST_DEV_IP,
        80,
        nat_port,
        0x12,
        b"hello from a pod",
    );
    let (v, out) = node.run(names::UNDERLAY_INGRESS, &vxlan_from_peer(&synack));
    assert_eq!(v, TC_ACT_REDIRECT, "routed back out");
    assert_ne!(&out[..6], &HOST_MAC, "not handed to the host device");
    let ip = check_ip(&out);
    assert_eq!(
        (addr(&ip, 16), be16(&ip, 22)),
        (OUTSIDE, 5555),
        "the outside host again"
    );
    assert_eq!(
        (addr(&ip, 12), be16(&ip, 20)),
        (REMOTE_POD, 80),
        "source untouched"
    );
    assert_eq!(ip[8], 63, "we are the forwarding hop");
    assert_eq!(&ip[40..], b"hello from a pod");

    // Leaving through the external interface, that reply is not a new pod flow to masquerade.
    let (v, again) = node.run(names::UNDERLAY_EGRESS, &out);
    assert_eq!(
        (v, &again),
        (TC_ACT_OK, &out),
        "the reply keeps the pod's source"
    );
    // Whereas a remote pod's packet that belongs to no flow still is (rule 5, unchanged).
    let other = frame(&tcp(REMOTE_POD, OUTSIDE, 81, 5555, 0x02, b""));
    let (v, out) = node.run(names::UNDERLAY_EGRESS, &other);
    assert_eq!((v, addr(&check_ip(&out), 12)), (TC_ACT_OK, NODE_IP));

    // An ICMP error from the pod about the flow (UDP to a closed port) goes back too, its
    // quote translated with every checksum.
    let (_, out) = node.run(
        names::HOST_EGRESS,
        &frame(&udp(
            OUTSIDE,
            REMOTE_POD,
            7000,
            9,
            b"to a closed port",
            false,
        )),
    );
    let quoted = check_ip(&out[INNER_ETH..]);
    assert_eq!(addr(&quoted, 12), HOST_DEV_IP);
    let err = icmp(REMOTE_POD, HOST_DEV_IP, 3, 3, [0; 4], &quoted);
    let (v, out) = node.run(names::UNDERLAY_INGRESS, &vxlan_from_peer(&err));
    assert_eq!(v, TC_ACT_REDIRECT);
    let ip = check_ip(&out);
    assert_eq!(addr(&ip, 16), OUTSIDE);
    let q = &ip[28..];
    assert_eq!(checksum(&q[..20]), 0, "quoted IPv4 checksum");
    assert_eq!(
        (addr(q, 12), be16(q, 20)),
        (OUTSIDE, 7000),
        "quote = what it sent"
    );
    assert_eq!(
        l4_sum(OUTSIDE.octets(), REMOTE_POD.octets(), IPPROTO_UDP, &q[20..]),
        0
    );

    let c = node.counters();
    assert_eq!((c["nat_snat"], c["nat_rev"]), (3, 2), "{c:?}");
    assert_eq!(c["encap_host"], 2, "{c:?}");
}

#[test]
fn a_host_socket_bound_to_the_node_address_is_masqueraded_and_answered_locally() {
    let node = Node::with_peers(nat_on(0));
    // `ping -I 198.18.0.1 <remote pod>` (case a): the kernel sends it through ovl0.
    let req = icmp(NODE_IP, REMOTE_POD, 8, 0, [0x42, 0x42, 0, 1], b"ping -I");
    let (v, out) = node.run(names::HOST_EGRESS, &frame(&req));
    assert_eq!(v, TC_ACT_REDIRECT);
    let inner = check_ip(&out[INNER_ETH..]);
    assert_eq!(addr(&inner, 12), HOST_DEV_IP);
    let id = be16(&inner, 24);
    let [hi, lo] = id.to_be_bytes();
    let reply = icmp(REMOTE_POD, HOST_DEV_IP, 0, 0, [hi, lo, 0, 1], b"ping -I");
    let (v, out) = node.run(names::UNDERLAY_INGRESS, &vxlan_from_peer(&reply));
    assert_eq!(v, TC_ACT_REDIRECT, "to the host device's ingress");
    assert_eq!(&out[..6], &HOST_MAC, "addressed to the host device");
    let ip = check_ip(&out);
    assert_eq!((addr(&ip, 16), be16(&ip, 24)), (NODE_IP, 0x4242));
    assert_eq!(ip[8], 64, "delivered locally: no forwarding hop");

    // TCP with data, both ways.
    let (_, out) = node.run(
        names::HOST_EGRESS,
        &frame(&tcp(NODE_IP, REMOTE_POD, 45000, 80, 0x18, b"request")),
    );
    let inner = check_ip(&out[INNER_ETH..]);
    assert_eq!(addr(&inner, 12), HOST_DEV_IP);
    assert_eq!(&inner[40..], b"request");
    let port = be16(&inner, 20);
    let (_, out) = node.run(
        names::UNDERLAY_INGRESS,
        &vxlan_from_peer(&tcp(REMOTE_POD, HOST_DEV_IP, 80, port, 0x18, b"response")),
    );
    let ip = check_ip(&out);
    assert_eq!((addr(&ip, 16), be16(&ip, 22)), (NODE_IP, 45000));
    assert_eq!(&ip[40..], b"response");

    // The host's own traffic from .0 (a cluster source) is not translated, nor a reply to .0
    // that belongs to no flow: both as before.
    let own = tcp(HOST_DEV_IP, REMOTE_POD, 46000, 80, 0x02, b"");
    let (_, out) = node.run(names::HOST_EGRESS, &frame(&own));
    assert_eq!(&out[INNER_ETH + 14..], &own[..], "inner packet untouched");
    let back = tcp(REMOTE_POD, HOST_DEV_IP, 80, 46000, 0x12, b"");
    let (v, out) = node.run(names::UNDERLAY_INGRESS, &vxlan_from_peer(&back));
    assert_eq!((v, &out[..6]), (TC_ACT_REDIRECT, &HOST_MAC[..]));
    assert_eq!(&out[14..], &back[..], "untouched");
}

#[test]
fn what_the_last_rule_does_not_masquerade_is_left_alone() {
    let mut node = Node::with_peers(nat_on(0));
    let to_pod = tcp(OUTSIDE, REMOTE_POD, 1000, 80, 0x02, b"");
    let (_, out) = node.run_marked(names::HOST_EGRESS, &frame(&to_pod), 0x4000);
    assert_eq!(
        &out[INNER_ETH + 14..],
        &to_pod[..],
        "marked 0x4000 by kube-proxy"
    );
    node.exclude(Ipv4Addr::new(172, 17, 2, 0), 24);
    let (_, out) = node.run(names::HOST_EGRESS, &frame(&to_pod));
    assert_eq!(
        &out[INNER_ETH + 14..],
        &to_pod[..],
        "an excluded destination"
    );
    let mut off = nat_on(0);
    off.flags = 0;
    node.set_nat(off);
    let direct = udp(OUTSIDE, DIRECT_POD, 1000, 53, b"q", false);
    let (v, out) = node.run(names::HOST_EGRESS, &frame(&direct));
    assert_eq!(
        (v, &out[14..]),
        (TC_ACT_REDIRECT, &direct[..]),
        "masquerade off"
    );
    assert!(node.ct_flows().is_empty());
    assert!(
        node.counters().keys().all(|k| !k.starts_with("nat_")),
        "{:?}",
        node.counters()
    );
}

#[test]
fn outside_to_a_direct_peer_pod_is_masqueraded_to_the_external_address_and_routed_back() {
    let node = Node::with_peers(nat_on(0));
    // Case b towards a host-gw / DirectRouting peer: unencapsulated, the node's address.
    let (v, out) = node.run(
        names::HOST_EGRESS,
        &frame(&udp(OUTSIDE, DIRECT_POD, 6000, 53, b"query", false)),
    );
    assert_eq!(v, TC_ACT_REDIRECT, "forwarded to the direct peer");
    let ip = check_ip(&out);
    assert_eq!(addr(&ip, 12), NODE_IP, "the external interface's address");
    assert_eq!((addr(&ip, 16), ip[8]), (DIRECT_POD, 64));
    let port = be16(&ip, 20);
    let (v, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&udp(DIRECT_POD, NODE_IP, 53, port, b"answer", false)),
    );
    assert_eq!(v, TC_ACT_REDIRECT, "routed back out");
    let ip = check_ip(&out);
    assert_eq!((addr(&ip, 16), be16(&ip, 22), ip[8]), (OUTSIDE, 6000, 63));
    assert_eq!(&ip[28..], b"answer");

    // Case a: a host socket on the node's address keeps the address, gets a translated port,
    // and the answer goes to the host stack with the socket's port.
    let (_, out) = node.run(
        names::HOST_EGRESS,
        &frame(&tcp(NODE_IP, DIRECT_POD, 45000, 80, 0x02, b"")),
    );
    let ip = check_ip(&out);
    assert_eq!(addr(&ip, 12), NODE_IP);
    let port = be16(&ip, 20);
    assert_ne!(port, 45000, "random port (fully random)");
    let (v, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&tcp(DIRECT_POD, NODE_IP, 80, port, 0x12, b"")),
    );
    assert_eq!(v, TC_ACT_OK, "to the host stack");
    let ip = check_ip(&out);
    assert_eq!((addr(&ip, 16), be16(&ip, 22), ip[8]), (NODE_IP, 45000, 64));
}

/// Issue 12, item 1: with masquerade on, a pod's UDP to a member node's VXLAN port would leave
/// with this node's address and pass for this node's tunnel traffic at the member (which then
/// delivers whatever it carries). It is dropped and counted instead, at both places where pod
/// traffic is masqueraded; UDP to that port elsewhere is masqueraded as usual.
#[test]
fn a_pods_vxlan_to_a_member_node_is_dropped_not_masqueraded() {
    let node = Node::with_peers(nat_on(0));
    let vxlan = udp(
        POD,
        VXLAN_PEER,
        40000,
        8472,
        &[0x08, 0, 0, 0, 0, 0, 1, 0],
        false,
    );
    for prog in [names::POD_EGRESS, names::UNDERLAY_EGRESS] {
        let (v, _) = node.run(prog, &frame(&vxlan));
        assert_eq!(v, TC_ACT_SHOT, "{prog}: a pod's VXLAN to a member");
    }
    assert_eq!(node.counters()["drop_pod_vxlan"], 2);
    assert!(node.ct_flows().is_empty(), "no flow created");

    // Another port of the member, and the VXLAN port of a host that is no member: as usual.
    for ip in [
        udp(POD, VXLAN_PEER, 40000, 8473, b"x", false),
        udp(POD, OUTSIDE, 40000, 8472, b"x", false),
    ] {
        let (v, out) = node.run(names::POD_EGRESS, &frame(&ip));
        assert_eq!(v, TC_ACT_REDIRECT);
        assert_eq!(addr(&check_ip(&out), 12), NODE_IP, "masqueraded");
    }
    assert_eq!(node.counters()["drop_pod_vxlan"], 2);
}

/// The IPv4 packet `ip` as fragment `(offset in 8-byte units, more fragments)` with identifier
/// `id`, its header checksum recomputed.
fn as_fragment(ip: &[u8], id: u16, offset: u16, more: bool) -> Vec<u8> {
    let mut p = ip.to_vec();
    p[4..6].copy_from_slice(&id.to_be_bytes());
    let flags = offset | if more { 0x2000 } else { 0 };
    p[6..8].copy_from_slice(&flags.to_be_bytes());
    let len = u16::try_from(p.len()).unwrap();
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

/// Issue 12, item 3: a fragmented reply of a masqueraded flow reaches the pod whole: the first
/// fragment (which has the ports) is translated back and leaves the datagram's identity, and
/// the later fragments (which have none) follow it. Later fragments of datagrams never
/// translated, or arriving before their first, go on to the kernel untouched.
#[test]
fn later_fragments_of_a_reply_follow_the_first_one_to_the_pod() {
    let node = Node::new(nat_on(0));
    let (_, out) = node.run(
        names::POD_EGRESS,
        &frame(&udp(POD, OUTSIDE, 7100, 9000, b"big question", false)),
    );
    let port = be16(&check_ip(&out), 20);

    // A 64-byte reply (8 + 56 data) cut into 32 + 32 bytes of IP payload.
    let data: Vec<u8> = (0..56u8).collect();
    let whole = udp(OUTSIDE, NODE_IP, 9000, port, &data, false);
    let (head, tail) = (&whole[20..52], &whole[52..]);
    let first = as_fragment(&[&whole[..20], head].concat(), 0x4242, 0, true);
    let second = as_fragment(&[&whole[..20], tail].concat(), 0x4242, 4, false);

    let (v, out) = node.run(names::UNDERLAY_INGRESS, &frame(&first));
    assert_eq!(v, TC_ACT_REDIRECT, "first fragment: to the pod");
    let ip = out[14..].to_vec();
    assert_eq!(checksum(&ip[..20]), 0);
    assert_eq!((addr(&ip, 16), be16(&ip, 22)), (POD, 7100));
    let (v, out) = node.run(names::UNDERLAY_INGRESS, &frame(&second));
    assert_eq!(v, TC_ACT_REDIRECT, "later fragment: to the pod too");
    let ip2 = out[14..].to_vec();
    assert_eq!(
        checksum(&ip2[..20]),
        0,
        "header checksum of the later fragment"
    );
    assert_eq!(addr(&ip2, 16), POD, "later fragment's destination");
    assert_eq!(&ip2[20..], tail, "its payload untouched");
    // Put together again, the datagram's UDP checksum verifies at the pod.
    let mut seg = ip[20..].to_vec();
    seg.extend_from_slice(&ip2[20..]);
    assert_eq!(
        l4_sum(OUTSIDE.octets(), POD.octets(), IPPROTO_UDP, &seg),
        0,
        "UDP checksum of the reassembled datagram"
    );
    assert_eq!(node.counters()["nat_rev"], 2);

    // A later fragment of another datagram (its first never seen): untouched, to the kernel.
    let stray = frame(&as_fragment(
        &[&whole[..20], tail].concat(),
        0x4343,
        4,
        false,
    ));
    assert_eq!(
        node.run(names::UNDERLAY_INGRESS, &stray),
        (TC_ACT_OK, stray.clone())
    );
    assert_eq!(node.counters()["nat_rev"], 2);
}

/// Issue 12, item 3: an ICMP error a pod sends about a reply of its masqueraded flow (the
/// socket is gone: "port unreachable") is related to the flow, as conntrack says: it leaves
/// with the node's address, and the reply it quotes gets the translated address and port
/// back, every checksum valid, so the pod's address never leaks. An error about a packet of
/// no flow is left alone.
#[test]
fn icmp_errors_a_pod_sends_about_a_flow_leave_translated() {
    let node = Node::new(nat_on(0));
    for proto in [IPPROTO_UDP, IPPROTO_TCP, IPPROTO_ICMP] {
        let sent = match proto {
            IPPROTO_UDP => udp(POD, OUTSIDE, 7200, 41111, b"request", false),
            IPPROTO_TCP => tcp(POD, OUTSIDE, 7200, 41111, 0x02, b""),
            _ => icmp(POD, OUTSIDE, 8, 0, [0x72, 0x72, 0, 1], b"echo"),
        };
        let (_, out) = node.run(names::POD_EGRESS, &frame(&sent));
        let on_wire = check_ip(&out);
        let nat_port = if proto == IPPROTO_ICMP {
            be16(&on_wire, 24)
        } else {
            be16(&on_wire, 20)
        };
        // The reply as the remote sends it, and as it reaches the pod.
        let reply = match proto {
            IPPROTO_UDP => udp(OUTSIDE, NODE_IP, 41111, nat_port, b"answer", false),
            IPPROTO_TCP => tcp(OUTSIDE, NODE_IP, 41111, nat_port, 0x12, b""),
            _ => {
                let mut rest = nat_port.to_be_bytes().to_vec();
                rest.extend_from_slice(&[0, 1]);
                icmp(OUTSIDE, NODE_IP, 0, 0, rest.try_into().unwrap(), b"echo")
            }
        };
        let (_, delivered) = node.run(names::UNDERLAY_INGRESS, &frame(&reply));
        let at_pod = check_ip(&delivered);
        assert_eq!(addr(&at_pod, 16), POD);

        // The pod answers with an error quoting what it received.
        let err = icmp(POD, OUTSIDE, 3, 3, [0; 4], &at_pod);
        let (v, out) = node.run(names::POD_EGRESS, &frame(&err));
        assert_eq!(v, TC_ACT_REDIRECT, "proto {proto}: sent out");
        let ip = check_ip(&out);
        assert_eq!(
            addr(&ip, 12),
            NODE_IP,
            "proto {proto}: outer source = the node"
        );
        assert_eq!(addr(&ip, 16), OUTSIDE);
        let quote = &ip[28..];
        assert_eq!(
            checksum(&quote[..20]),
            0,
            "proto {proto}: quoted IPv4 checksum"
        );
        assert_eq!(
            (addr(quote, 12), addr(quote, 16)),
            (OUTSIDE, NODE_IP),
            "proto {proto}: the quote is the reply as the remote sent it"
        );
        let seg = &quote[20..];
        match proto {
            IPPROTO_ICMP => {
                assert_eq!(be16(seg, 4), nat_port, "quoted identifier");
                assert_eq!(checksum(seg), 0, "quoted ICMP checksum");
            }
            _ => {
                assert_eq!(be16(seg, 2), nat_port, "proto {proto}: quoted port");
                let sum = l4_sum(OUTSIDE.octets(), NODE_IP.octets(), proto, seg);
                assert_eq!(sum, 0, "proto {proto}: quoted L4 checksum");
            }
        }
        // Apart from the TTL the pod saw (we forwarded it), the quote is the reply as sent.
        assert_eq!(&quote[20..], &reply[20..], "proto {proto}: quoted payload");
        assert!(
            !out.windows(4).any(|w| w == POD.octets()),
            "proto {proto}: the pod's address appears nowhere in what leaves"
        );
    }
    let snat = node.counters()["nat_snat"];

    // An error about a packet of no flow (an outside host that reached the pod directly):
    // nothing to translate, it goes on as it is.
    let unrelated = udp(OUTSIDE, POD, 41111, 7300, b"direct", false);
    let err = frame(&icmp(POD, OUTSIDE, 3, 3, [0; 4], &unrelated));
    assert_eq!(node.run(names::POD_EGRESS, &err), (TC_ACT_OK, err.clone()));
    assert_eq!(node.counters()["nat_snat"], snat);
}

/// GRE: IP protocol 47, no ports (a GRE header with no options, then the tunnelled bytes).
const IPPROTO_GRE: u8 = 47;
const GRE_PAYLOAD: &[u8] = &[0, 0, 0x08, 0x00, 0x45, 0, 0, 20, 1, 2, 3, 4];

/// Masquerade of what conntrack tracks beyond TCP, UDP and ICMP, as MASQUERADE translates it:
/// a protocol without ports (GRE) on its address alone, the reply back to the pod and a second
/// pod's flow to the same host refused while the first lives (conntrack's clash), an ICMP
/// error about it translated back; SCTP with its ports and CRC32c untouched; DCCP and UDP-Lite
/// with their ports kept and their pseudo-header checksums valid both ways. Portless traffic to a
/// member node leaves with the pod's address: its reply tuple would be the member's own
/// tunnel traffic.
#[test]
fn protocols_other_than_tcp_udp_and_icmp_are_masqueraded_as_conntrack_does() {
    let node = Node::with_peers(nat_on(0));
    let gre = ipv4(POD, OUTSIDE, IPPROTO_GRE, 64, GRE_PAYLOAD);
    let (v, out) = node.run(names::POD_EGRESS, &frame(&gre));
    assert_eq!(v, TC_ACT_REDIRECT, "GRE out");
    let ip = check_ip(&out);
    assert_eq!(addr(&ip, 12), NODE_IP, "GRE masqueraded to the node");
    assert_eq!(&ip[20..], GRE_PAYLOAD, "GRE header and payload untouched");
    let (v, out) = node.run(
        names::UNDERLAY_INGRESS,
        &frame(&ipv4(OUTSIDE, NODE_IP, IPPROTO_GRE, 64, GRE_PAYLOAD)),
    );
    assert_eq!(v, TC_ACT_REDIRECT, "the GRE reply to the pod");
    let ip = check_ip(&out);
    assert_eq!(addr(&ip, 16), POD);
    assert_eq!(&ip[20..], GRE_PAYLOAD);
    assert!(
        node.ct_flows()
            .iter()
            .any(|(k, e)| k.proto == IPPROTO_GRE && e.state & NAT_S_REPLIED != 0),
        "the GRE flow is answered: {:?}",
        node.ct_flows()
    );

    // Another pod's GRE to the same host: one reply tuple, held by the first pod.
    let gre2 = ipv4(POD2, OUTSIDE, IPPROTO_GRE, 64, GRE_PAYLOAD);
    let (v, _) = node.run(names::POD_EGRESS, &frame(&gre2));
    assert_eq!(v, TC_ACT_SHOT, "second pod's GRE to the same host");
    assert_eq!(node.counters()["drop_nat_exhausted"], 1);
    let elsewhere = Ipv4Addr::new(198, 19, 0, 2);
    let (v, out) = node.run(
        names::POD_EGRESS,
        &frame(&ipv4(POD2, elsewhere, IPPROTO_GRE, 64, GRE_PAYLOAD)),
    );
    assert_eq!(v, TC_ACT_REDIRECT, "second pod's GRE to another host");
    assert_eq!(addr(&check_ip(&out), 12), NODE_IP);

    // An ICMP error about the first pod's GRE reaches it quoting its own packet.
    let (_, out) = node.run(names::POD_EGRESS, &frame(&gre));
    let on_wire = check_ip(&out);
    let err = icmp(OUTSIDE, NODE_IP, 3, 4, [0, 0, 0x05, 0x78], &on_wire);
    let (v, out) = node.run(names::UNDERLAY_INGRESS, &frame(&err));
    assert_eq!(v, TC_ACT_REDIRECT, "ICMP error about GRE to the pod");
    let ip = check_ip(&out);
    assert_eq!(addr(&ip, 16), POD);
    let mut original = gre.clone();
    original[8] -= 1;
    original[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&original[..20]);
    original[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        &ip[28..],
        &original[..],
        "the quote is the pod's GRE packet"
    );

    // GRE to a member node, whole or a later fragment: left with the pod's address.
    let to_member = ipv4(POD, VXLAN_PEER, IPPROTO_GRE, 64, GRE_PAYLOAD);
    let later = as_fragment(&to_member, 0x5151, 2, false);
    for prog in [names::POD_EGRESS, names::UNDERLAY_EGRESS] {
        for ip in [&to_member, &later] {
            let f = frame(ip);
            assert_eq!(
                node.run(prog, &f),
                (TC_ACT_OK, f.clone()),
                "{prog}: GRE to a member"
            );
        }
    }

    // SCTP: ports kept, so the second pod with the same ports is refused and another port
    // is not; the CRC32c-covered bytes never change.
    let (v, out) = node.run(names::POD_EGRESS, &frame(&sctp(POD, OUTSIDE, 5000, 80)));
    assert_eq!(v, TC_ACT_REDIRECT, "SCTP out");
    let ip = check_ip(&out);
    assert_eq!(addr(&ip, 12), NODE_IP);
    assert_eq!(
        &ip[20..],
        &sctp(POD, OUTSIDE, 5000, 80)[20..],
        "SCTP bytes untouched"
    );
    let (v, _) = node.run(names::POD_EGRESS, &frame(&sctp(POD2, OUTSIDE, 5000, 80)));
    assert_eq!(v, TC_ACT_SHOT, "second pod's SCTP on the same ports");
    assert_eq!(node.counters()["drop_nat_exhausted"], 2);
    let (v, out) = node.run(names::POD_EGRESS, &frame(&sctp(POD2, OUTSIDE, 5001, 80)));
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(be16(&check_ip(&out), 20), 5001, "SCTP port kept");
    for (port, pod) in [(5000, POD), (5001, POD2)] {
        let reply = sctp(OUTSIDE, NODE_IP, 80, port);
        let (v, out) = node.run(names::UNDERLAY_INGRESS, &frame(&reply));
        assert_eq!(v, TC_ACT_REDIRECT, "SCTP reply to port {port}");
        let ip = check_ip(&out);
        assert_eq!(addr(&ip, 16), pod, "SCTP reply to port {port}");
        assert_eq!(&ip[20..], &reply[20..]);
    }

    // DCCP and UDP-Lite: ports kept as SCTP's are, pseudo-header checksums valid both ways.
    for (n, proto) in [IPPROTO_DCCP, IPPROTO_UDPLITE].into_iter().enumerate() {
        for (pod, sport) in [(POD, 6000), (POD2, 6001)] {
            let sent = ported(pod, OUTSIDE, proto, (sport, 7000), b"request");
            let (v, out) = node.run(names::POD_EGRESS, &frame(&sent));
            assert_eq!(v, TC_ACT_REDIRECT, "proto {proto} out");
            let ip = check_ip(&out);
            assert_eq!(
                (addr(&ip, 12), be16(&ip, 20)),
                (NODE_IP, sport),
                "proto {proto} masqueraded, port kept"
            );
            assert_eq!(&ip[28..], b"request");
        }
        let (v, _) = node.run(
            names::POD_EGRESS,
            &frame(&ported(POD2, OUTSIDE, proto, (6000, 7000), b"clash")),
        );
        assert_eq!(v, TC_ACT_SHOT, "proto {proto}: the first pod's tuple");
        assert_eq!(node.counters()["drop_nat_exhausted"], 3 + n as u64);
        for (pod, sport) in [(POD, 6000), (POD2, 6001)] {
            let reply = ported(OUTSIDE, NODE_IP, proto, (7000, sport), b"answer");
            let (v, out) = node.run(names::UNDERLAY_INGRESS, &frame(&reply));
            assert_eq!(v, TC_ACT_REDIRECT, "proto {proto} reply");
            let ip = check_ip(&out);
            assert_eq!(
                (addr(&ip, 16), be16(&ip, 22)),
                (pod, sport),
                "proto {proto} reply to the pod's port"
            );
        }
    }
}
