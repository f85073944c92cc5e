//! Shared pieces of the packet tests (`packet_vxlan`, `packet_direct`, `packet_nat`) and of the
//! crafted frames in `vxlan_datapath`: loading the eBPF object with every program verified,
//! running a program once through `BPF_PROG_TEST_RUN` (aya's `TestRun`), reading the per-reason
//! counters, and building frames byte by byte, independent of the data path's own header
//! definitions.
//!
//! Like [`crate::checks`], the loading and running helpers panic with a clear message instead
//! of returning errors: a packet test cannot go on without them.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
    maps::{Array, HashMap, LpmTrie, PerCpuArray},
    programs::{SchedClassifier, Xdp},
};
use overlay_common::{
    config::Config,
    counters::{Counter, Reason},
    endpoint::{Endpoint, EndpointKeyV4},
    names,
    nat::{NAT_F_ENABLED, NatConfig},
    route::{MemberNode, NextHopV4, RemoteNode, route_key},
};

/// Masquerade on with `flags`, source ports `ports`, and the agent's default idle timeouts
/// (flows expire as with `--ip-masq` and no tuning).
pub fn nat_config(flags: u32, ports: (u16, u16)) -> NatConfig {
    NatConfig {
        flags: NAT_F_ENABLED | flags,
        port_min: ports.0,
        port_max: ports.1,
        tcp_established: 3600,
        tcp_transient: 120,
        udp: 30,
        udp_stream: 120,
        icmp: 30,
        tcp_close: 10,
    }
}

// TC verdicts (include/uapi/linux/pkt_cls.h).
/// `TC_ACT_OK`: the kernel goes on with the packet.
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_SHOT`: dropped.
pub const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`: redirected (the target is not visible in a test run).
pub const TC_ACT_REDIRECT: u32 = 7;

/// The data path's TC programs (`SchedClassifier`s), the load-time probe among them.
pub const PROGRAMS: [&str; 8] = [
    names::POD_EGRESS,
    names::POD_INGRESS,
    names::POD_PORT_EGRESS,
    names::HOST_EGRESS,
    names::UNDERLAY_INGRESS,
    names::UNDERLAY_EGRESS,
    names::GRO_DEVICE_INGRESS,
    names::PROBE_DECAP_L4_UDP,
];
/// The data path's XDP programs.
pub const XDP_PROGRAMS: [&str; 1] = [names::UNDERLAY_XDP];
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;

/// Test interface indexes. `BPF_PROG_TEST_RUN` does not check redirect targets; the host
/// device's is `lo` (1) because `bpf_check_mtu` looks it up (in the caller's namespace; MTU
/// 65536).
pub const UNDERLAY_IFINDEX: u32 = 11;
/// See [`UNDERLAY_IFINDEX`].
pub const BRIDGE_IFINDEX: u32 = 12;
/// See [`UNDERLAY_IFINDEX`].
pub const HOST_IFINDEX: u32 = 1;
/// The host device's MAC in the tests (distinct from the VtepMAC, to see the rewrite).
pub const HOST_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x10];
/// The pod bridge (gateway) and a pod: the MACs of frames from pods.
pub const GW_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];
/// See [`GW_MAC`].
pub const POD_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x05];
/// flannel's VXLAN port and the kernel's default source port range, as the agent sets them.
pub const VXLAN_PORT: u16 = 8472;
/// See [`VXLAN_PORT`].
pub const SRC_PORT_MIN: u16 = 32768;
/// See [`VXLAN_PORT`].
pub const SRC_PORT_MAX: u16 = 60999;

/// The pod bridge's MAC in the packet tests' `CONFIG`: the source MAC of frames delivered
/// straight into a pod.
pub const BRIDGE_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];

/// EtherType IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// IPv4 protocol numbers.
pub const IPPROTO_ICMP: u8 = 1;
/// See [`IPPROTO_ICMP`].
pub const IPPROTO_TCP: u8 = 6;
/// See [`IPPROTO_ICMP`].
pub const IPPROTO_UDP: u8 = 17;

/// Panics unless the process runs as root, naming the test file `test` and how to run it.
pub fn require_root(test: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test}: these tests load eBPF programs and need root; run them as root (CI does): \
         cargo test -p overlay-tests --test {test} -- --test-threads=1"
    );
}

/// The eBPF object: `$OVERLAY_EBPF_OBJECT`, else `target/bpfel-unknown-none/release/overlay`.
pub fn object_path() -> PathBuf {
    std::env::var_os("OVERLAY_EBPF_OBJECT").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpfel-unknown-none/release/overlay")
        },
        PathBuf::from,
    )
}

/// The object with fresh maps and every one of [`PROGRAMS`] and [`XDP_PROGRAMS`] loaded (so
/// verified by the kernel). Checks for root first ([`require_root`] with `test`).
pub fn load_object(test: &str) -> Ebpf {
    require_root(test);
    let path = object_path();
    assert!(
        path.is_file(),
        "eBPF object {} missing: run `cargo xtask build-ebpf` first",
        path.display()
    );
    let mut ebpf = EbpfLoader::new()
        .load_file(&path)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    for name in PROGRAMS {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("no program {name}"))
            .try_into()
            .unwrap();
        prog.load()
            .unwrap_or_else(|e| panic!("verifier rejected {name}: {e:?}"));
    }
    for name in XDP_PROGRAMS {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("no program {name}"))
            .try_into()
            .unwrap();
        prog.load()
            .unwrap_or_else(|e| panic!("verifier rejected {name}: {e:?}"));
    }
    ebpf
}

/// Runs the loaded XDP program `prog` once on `frame`: its action and what it left, from the
/// start of the metadata it wrote (if any) to the end of the frame.
pub fn run_xdp(ebpf: &Ebpf, prog: &str, frame: &[u8]) -> Run {
    let program: &Xdp = ebpf.program(prog).unwrap().try_into().unwrap();
    run_once(program, prog, frame, None)
}

/// Sets (`Some`) or removes (`None`) the `ENDPOINT_V4` entry of the local pod `addr`.
pub fn set_endpoint(ebpf: &mut Ebpf, addr: Ipv4Addr, endpoint: Option<Endpoint>) {
    let mut map: HashMap<_, EndpointKeyV4, Endpoint> =
        HashMap::try_from(ebpf.map_mut(names::ENDPOINT_V4).unwrap()).unwrap();
    match endpoint {
        Some(ep) => map.insert(addr.octets(), ep, 0).unwrap(),
        None => map.remove(&addr.octets()).unwrap(),
    }
}

/// The eBPF object with fresh maps and every program loaded (so verified by the kernel), and
/// the map writes the packet tests make, with the shared types (the set-up `packet_vxlan` and
/// `packet_direct` share).
pub struct Loaded {
    pub ebpf: Ebpf,
}

impl Loaded {
    /// Loads the object for the test file `test` (checks for root first).
    pub fn new(test: &str) -> Self {
        Self {
            ebpf: load_object(test),
        }
    }

    pub fn set_config(&mut self, cfg: Config) {
        let mut map: Array<_, Config> =
            Array::try_from(self.ebpf.map_mut(names::CONFIG).unwrap()).unwrap();
        map.set(0, cfg, 0).unwrap();
    }

    pub fn config(&self) -> Config {
        let map: Array<_, Config> = Array::try_from(self.ebpf.map(names::CONFIG).unwrap()).unwrap();
        map.get(&0, 0).unwrap()
    }

    pub fn update_config(&mut self, f: impl FnOnce(&mut Config)) {
        let mut cfg = self.config();
        f(&mut cfg);
        self.set_config(cfg);
    }

    /// Routes `subnet/prefix_len` to `node` (`ROUTE_V4`).
    pub fn add_route(&mut self, subnet: Ipv4Addr, prefix_len: u8, node: RemoteNode) {
        let mut map: LpmTrie<_, [u8; 4], RemoteNode> =
            LpmTrie::try_from(self.ebpf.map_mut(names::ROUTE_V4).unwrap()).unwrap();
        map.insert(&route_key(subnet, prefix_len), node, 0).unwrap();
    }

    /// Makes `ip` a member node (`NODE_V4`).
    pub fn add_member(&mut self, ip: Ipv4Addr) {
        let mut map: HashMap<_, [u8; 4], MemberNode> =
            HashMap::try_from(self.ebpf.map_mut(names::NODE_V4).unwrap()).unwrap();
        map.insert(ip.octets(), MemberNode { routes: 1 }, 0)
            .unwrap();
    }

    /// The outer next hop the programs cached for the peer `public_ip` (`NEXT_HOP_V4`).
    pub fn cached_next_hop(&self, public_ip: Ipv4Addr) -> Option<NextHopV4> {
        let map: HashMap<_, [u8; 4], NextHopV4> =
            HashMap::try_from(self.ebpf.map(names::NEXT_HOP_V4).unwrap()).unwrap();
        match map.get(&public_ip.octets(), 0) {
            Ok(entry) => Some(entry),
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(e) => panic!("NEXT_HOP_V4: cannot read the entry of {public_ip}: {e}"),
        }
    }

    pub fn run(&self, prog: &str, frame: &[u8]) -> Run {
        run_prog(&self.ebpf, prog, frame)
    }

    /// [`Loaded::run`] on a packet that carries the mark `mark`.
    pub fn run_marked(&self, prog: &str, frame: &[u8], mark: u32) -> Run {
        run_prog_marked(&self.ebpf, prog, frame, mark)
    }

    /// Packets per reason, summed over the CPUs; reasons that counted nothing are left out.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        counters(&self.ebpf)
    }

    pub fn counters_full(&self) -> BTreeMap<&'static str, Counter> {
        counters_full(&self.ebpf)
    }

    /// Asserts exactly these counters (every other reason counted nothing).
    #[track_caller]
    pub fn assert_counters(&self, expected: &[(Reason, u64)]) {
        let expected: BTreeMap<&'static str, u64> = expected
            .iter()
            .filter(|(_, n)| *n != 0)
            .map(|(r, n)| (r.name(), *n))
            .collect();
        assert_eq!(self.counters(), expected, "counters");
    }
}

/// A result of one program run.
#[derive(Debug)]
pub struct Run {
    /// The program's return value (a TC verdict).
    pub verdict: u32,
    /// The frame as the program left it.
    pub out: Vec<u8>,
    /// The packet mark the program left (TC programs; 0 for XDP).
    pub mark: u32,
}

/// Runs the loaded program `prog` of `ebpf` once on `frame` (in the caller's namespace).
pub fn run_prog(ebpf: &Ebpf, prog: &str, frame: &[u8]) -> Run {
    run_prog_marked(ebpf, prog, frame, 0)
}

/// [`run_prog`] on a packet that carries the mark `mark`.
pub fn run_prog_marked(ebpf: &Ebpf, prog: &str, frame: &[u8], mark: u32) -> Run {
    let program: &SchedClassifier = ebpf.program(prog).unwrap().try_into().unwrap();
    // `struct __sk_buff` up to its `mark` (len and pkt_type must stay 0); the kernel writes the
    // whole of it back, mark at the same offset.
    let mut ctx_in = [0u8; 12];
    ctx_in[8..].copy_from_slice(&mark.to_ne_bytes());
    let mut ctx_out = [0u8; 512];
    let mut run = run_once(program, prog, frame, Some((&ctx_in, &mut ctx_out)));
    run.mark = u32::from_ne_bytes(ctx_out[8..12].try_into().unwrap());
    run
}

/// One `BPF_PROG_TEST_RUN` of `program` (named `prog`, for messages) on `frame`, with the
/// context `ctx` (in, out) when given.
fn run_once<P>(program: &P, prog: &str, frame: &[u8], ctx: Option<(&[u8], &mut [u8])>) -> Run
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let (ctx_in, ctx_out) = ctx.map_or((None, None), |(i, o)| (Some(i), Some(o)));
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in,
            ctx_out,
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("test run of {prog} on {} bytes: {e:?}", frame.len()));
    out.truncate(result.data_size_out as usize);
    Run {
        verdict: result.return_value,
        out,
        mark: 0,
    }
}

/// Every reason's counter in the `COUNTERS` map, summed over the CPUs.
pub fn counters_by_reason(ebpf: &Ebpf) -> BTreeMap<Reason, Counter> {
    let map: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(ebpf.map(names::COUNTERS).unwrap()).unwrap();
    Reason::ALL
        .iter()
        .map(|&reason| {
            let sum = map
                .get(&reason.index(), 0)
                .unwrap()
                .iter()
                .fold(Counter::default(), |sum, c| sum.add(*c));
            (reason, sum)
        })
        .collect()
}

/// The `COUNTERS` map per reason name, summed over the CPUs; reasons that counted nothing are
/// left out.
pub fn counters_full(ebpf: &Ebpf) -> BTreeMap<&'static str, Counter> {
    counters_by_reason(ebpf)
        .into_iter()
        .filter(|(_, sum)| sum.packets != 0)
        .map(|(reason, sum)| (reason.name(), sum))
        .collect()
}

/// Packets per reason of [`counters_full`].
pub fn counters(ebpf: &Ebpf) -> BTreeMap<&'static str, u64> {
    counters_full(ebpf)
        .into_iter()
        .map(|(r, c)| (r, c.packets))
        .collect()
}

/// RFC 1071 checksum field value of `data` (0 when `data` holds a correct checksum).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The big-endian `u16` at `off`.
pub fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// An IPv4 packet `src` → `dst` carrying `payload`: no options, id 0x1234, DF, header checksum
/// filled in.
pub fn ipv4_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    ttl: u8,
    tos: u8,
    payload: &[u8],
) -> Vec<u8> {
    let len = u16::try_from(20 + payload.len()).unwrap();
    let mut p = vec![0x45, tos];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, ttl, proto, 0, 0]); // id, DF, ttl, proto
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// A UDP header and `data`, checksum 0 (none, allowed for IPv4).
pub fn udp_datagram(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&u16::try_from(8 + data.len()).unwrap().to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

/// An Ethernet frame `src` → `dst` of `ethertype` carrying `payload`.
pub fn ether(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The IPv4 packet `ip` with its TTL lowered by `by` and the header checksum recomputed from
/// scratch.
pub fn with_ttl_decremented(ip: &[u8], by: u8) -> Vec<u8> {
    let mut p = ip.to_vec();
    p[8] -= by;
    p[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

/// `aa:bb:cc:dd:ee:ff` (surrounding white space ignored); panics on anything else.
pub fn parse_mac(s: &str) -> [u8; 6] {
    let bytes: Vec<u8> = s
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("bad MAC {s}")))
        .collect();
    bytes.try_into().unwrap_or_else(|_| panic!("bad MAC {s}"))
}

/// The UDP payload of a VXLAN frame (what goes to port 8472): VXLAN header with `vni`, inner
/// Ethernet `src_mac` → `dst_mac`, inner IPv4/UDP `src` → `dst:dport` (source port 40000, no
/// UDP checksum) carrying `data`.
pub fn vxlan_payload(
    vni: u32,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    data: &[u8],
) -> Vec<u8> {
    let mut f = vec![0x08, 0, 0, 0];
    f.extend_from_slice(&(vni << 8).to_be_bytes());
    let mut ip = ipv4_packet(
        src,
        dst,
        IPPROTO_UDP,
        64,
        0,
        &udp_datagram(40000, dport, data),
    );
    // No DF, as the kernel's VXLAN frames from flannel.1 carry pods' packets as they were.
    ip[6] = 0;
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ether(dst_mac, src_mac, ETH_P_IP, &ip));
    f
}

/// Pins the calling thread (and the threads it starts) to one CPU. `POD_PORT_PASSED` is per
/// CPU, as the port and the bridge run on one CPU for one packet: a test that runs
/// `pod_port_egress` and then `pod_egress` must run both there, or a note the port left on one
/// CPU is found by a later, unrelated packet's `pod_egress` on it.
pub fn pin_to_one_cpu() {
    let mut one = nix::sched::CpuSet::new();
    one.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
}
