//! The node's settings as the agent knows them ([`NodeConfig`]) and their encoding into the
//! `CONFIG` map value (`overlay_common::config::Config`), together with the interface indexes the
//! data path learns as it attaches.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use overlay_common::{
    config::{CONFIG_F_DECAP_L4_UDP, CONFIG_F_DIRECT, CONFIG_F_NO_VXLAN, CONFIG_F_READY, Config},
    wire::{DEFAULT_SRC_PORT_MAX, DEFAULT_SRC_PORT_MIN, MAX_VNI},
};

/// What the data path needs to know about this node, from the network config and the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// VXLAN network identifier (flannel's `VNI`, default 1).
    pub vni: u32,
    /// VXLAN UDP port (flannel's `Port`, default 8472).
    pub port: u16,
    /// Outer source address: the external interface's own address (not `--public-ip`, which
    /// may be a NAT address; flannel's vxlan device uses the interface address too). Also the
    /// masquerade's address, and an outer destination decapsulation accepts.
    pub local_ip: Ipv4Addr,
    /// The PublicIP published in the lease (`--public-ip`, else `local_ip`): peers send to it,
    /// so decapsulation accepts it as outer destination too.
    pub public_ip: Ipv4Addr,
    /// The VtepMAC this node publishes in its lease.
    pub vtep_mac: [u8; 6],
    /// This node's lease (pod subnet). Its `.0` is the host device's address, `.1` the bridge's.
    pub subnet: Ipv4Net,
    /// The cluster network (flannel's `Network`).
    pub network: Ipv4Net,
    /// UDP source ports are picked from `[min, max)` by flow hash, as the kernel's VXLAN device
    /// does with `net.ipv4.ip_local_port_range` (the default range unless told otherwise).
    pub src_port_range: (u16, u16),
    /// How peers are reached (default VXLAN only).
    pub routing: Routing,
}

/// How this node reaches its peers, which decides what the programs accept on the external
/// interface besides VXLAN.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Routing {
    /// Every peer through VXLAN; nothing unencapsulated is accepted.
    #[default]
    Vxlan,
    /// VXLAN with DirectRouting: peers on our L2 segment are routed directly, so direct traffic
    /// from them is accepted too.
    VxlanDirect,
    /// host-gw: every peer directly, no VXLAN at all.
    HostGw,
}

impl NodeConfig {
    /// A configuration with the kernel's default source port range, publishing `local_ip`.
    #[must_use]
    pub fn new(
        vni: u32,
        port: u16,
        local_ip: Ipv4Addr,
        vtep_mac: [u8; 6],
        subnet: Ipv4Net,
        network: Ipv4Net,
    ) -> Self {
        Self {
            vni,
            port,
            local_ip,
            public_ip: local_ip,
            vtep_mac,
            subnet,
            network,
            src_port_range: (DEFAULT_SRC_PORT_MIN, DEFAULT_SRC_PORT_MAX),
            routing: Routing::Vxlan,
        }
    }

    /// The same configuration publishing `public_ip` (`--public-ip`) instead of `local_ip`.
    #[must_use]
    pub fn with_public_ip(mut self, public_ip: Ipv4Addr) -> Self {
        self.public_ip = public_ip;
        self
    }

    /// The same configuration with `routing`.
    #[must_use]
    pub fn with_routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }

    /// Why the data path could not work with this configuration, if it could not.
    pub fn validate(&self) -> Result<(), String> {
        if self.vni > MAX_VNI {
            return Err(format!("VNI {} does not fit in 24 bits", self.vni));
        }
        if self.port == 0 {
            return Err("VXLAN port 0".to_owned());
        }
        // The subnet needs a .0 (host device) and a .1 (bridge) besides pods.
        if self.subnet.prefix_len() > 30 {
            return Err(format!("subnet {} is smaller than a /30", self.subnet));
        }
        if !self.network.contains(&self.subnet) {
            return Err(format!(
                "subnet {} is not inside network {}",
                self.subnet, self.network
            ));
        }
        if self.vtep_mac[0] & 0x01 != 0 || self.vtep_mac == [0; 6] {
            return Err("the VtepMAC must be a unicast, non-zero address".to_owned());
        }
        let (min, max) = self.src_port_range;
        if min == 0 || max <= min {
            return Err(format!("bad UDP source port range {min}..{max}"));
        }
        Ok(())
    }
}

/// Interface indexes (0 = absent), the host device's and the bridge's MACs, learnt when
/// attaching, and what the data path found out about the kernel and its XDP program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Devices {
    pub underlay: u32,
    pub bridge: u32,
    pub bridge_mac: [u8; 6],
    pub host: u32,
    pub host_mac: [u8; 6],
    /// The cookie `underlay_xdp` marks decapsulated frames with; 0 while it is not attached.
    pub xdp_cookie: u32,
    /// The kernel accepts `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (probed at load).
    pub decap_l4_udp: bool,
    /// The routing generation (`Config::route_gen`): never 0 once written.
    pub route_gen: u32,
}

/// The `CONFIG` value for `node` and `devices`. Without a node configuration or an underlay
/// device, the entry is not marked ready and the programs leave every packet alone.
pub(crate) fn encode(node: Option<&NodeConfig>, devices: Devices) -> Config {
    let mut cfg = Config {
        underlay_ifindex: devices.underlay,
        bridge_ifindex: devices.bridge,
        bridge_mac: devices.bridge_mac,
        host_ifindex: devices.host,
        host_mac: devices.host_mac,
        xdp_cookie: devices.xdp_cookie,
        route_gen: devices.route_gen,
        ..Config::default()
    };
    if devices.decap_l4_udp {
        cfg.flags |= CONFIG_F_DECAP_L4_UDP;
    }
    let Some(node) = node else {
        return cfg;
    };
    let subnet = node.subnet.trunc();
    let network = node.network.trunc();
    cfg.vni = node.vni;
    cfg.port = node.port;
    cfg.local_ip = node.local_ip.octets();
    cfg.public_ip = node.public_ip.octets();
    cfg.vtep_mac = node.vtep_mac;
    cfg.subnet = subnet.network().octets();
    cfg.subnet_mask = subnet.netmask().octets();
    cfg.network = network.network().octets();
    cfg.network_mask = network.netmask().octets();
    (cfg.src_port_min, cfg.src_port_max) = node.src_port_range;
    match node.routing {
        Routing::Vxlan => {}
        Routing::VxlanDirect => cfg.flags |= CONFIG_F_DIRECT,
        Routing::HostGw => cfg.flags |= CONFIG_F_DIRECT | CONFIG_F_NO_VXLAN,
    }
    if devices.underlay != 0 {
        cfg.flags |= CONFIG_F_READY;
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeConfig {
        NodeConfig::new(
            1,
            8472,
            Ipv4Addr::new(198, 18, 0, 1),
            [0x0e, 0, 0, 0, 0, 1],
            "172.17.1.0/24".parse().unwrap(),
            "172.17.0.0/16".parse().unwrap(),
        )
    }

    const DEVICES: Devices = Devices {
        underlay: 2,
        bridge: 3,
        bridge_mac: [0x02, 0, 0, 0, 0, 3],
        host: 4,
        host_mac: [0x02, 0, 0, 0, 0, 4],
        xdp_cookie: 0x1234_5678,
        decap_l4_udp: false,
        route_gen: 0x0a0b_0c0d,
    };

    /// `--public-ip` of a node behind a NAT: not the interface's address.
    const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);

    #[test]
    fn encodes_every_field_in_its_byte_order() {
        let cfg = encode(Some(&node().with_public_ip(PUBLIC_IP)), DEVICES);
        assert_eq!(cfg.flags, CONFIG_F_READY);
        assert_eq!((cfg.vni, cfg.port), (1, 8472));
        assert_eq!(
            (cfg.underlay_ifindex, cfg.bridge_ifindex, cfg.host_ifindex),
            (2, 3, 4)
        );
        assert_eq!(cfg.local_ip, [198, 18, 0, 1]);
        assert_eq!(cfg.public_ip, [198, 18, 100, 1]);
        assert_eq!(
            (cfg.subnet, cfg.subnet_mask),
            ([172, 17, 1, 0], [255, 255, 255, 0])
        );
        assert_eq!(
            (cfg.network, cfg.network_mask),
            ([172, 17, 0, 0], [255, 255, 0, 0])
        );
        assert_eq!(cfg.vtep_mac, [0x0e, 0, 0, 0, 0, 1]);
        assert_eq!(cfg.host_mac, [0x02, 0, 0, 0, 0, 4]);
        assert_eq!(cfg.bridge_mac, [0x02, 0, 0, 0, 0, 3]);
        assert_eq!(cfg.xdp_cookie, 0x1234_5678);
        assert_eq!(cfg.route_gen, 0x0a0b_0c0d);
        assert_eq!((cfg.src_port_min, cfg.src_port_max), (32768, 60999));

        // The raw layout the eBPF side reads: numbers in host order, addresses as on the wire.
        let bytes = bytemuck::bytes_of(&cfg);
        assert_eq!(bytes.len(), 76);
        assert_eq!(&bytes[62..68], &[0x02, 0, 0, 0, 0, 3]);
        assert_eq!(&bytes[68..72], &0x1234_5678u32.to_ne_bytes());
        assert_eq!(&bytes[72..76], &0x0a0b_0c0du32.to_ne_bytes());
        assert_eq!(&bytes[0..4], &CONFIG_F_READY.to_ne_bytes());
        assert_eq!(&bytes[4..8], &1u32.to_ne_bytes());
        assert_eq!(&bytes[20..24], &[198, 18, 0, 1]);
        assert_eq!(&bytes[24..28], &[198, 18, 100, 1]);
        assert_eq!(&bytes[28..32], &[172, 17, 1, 0]);
        assert_eq!(&bytes[44..50], &[0x0e, 0, 0, 0, 0, 1]);
        assert_eq!(&bytes[56..58], &8472u16.to_ne_bytes());
    }

    #[test]
    fn without_public_ip_the_interface_address_is_published() {
        let cfg = encode(Some(&node()), DEVICES);
        assert_eq!(
            (cfg.local_ip, cfg.public_ip),
            ([198, 18, 0, 1], [198, 18, 0, 1])
        );
        assert!(cfg.is_own_address([198, 18, 0, 1]));
        assert!(!cfg.is_own_address(PUBLIC_IP.octets()));
        let cfg = encode(Some(&node().with_public_ip(PUBLIC_IP)), DEVICES);
        assert!(cfg.is_own_address([198, 18, 0, 1]) && cfg.is_own_address(PUBLIC_IP.octets()));
        assert!(!cfg.is_own_address([198, 18, 0, 2]));
    }

    #[test]
    fn routing_sets_the_direct_and_no_vxlan_flags() {
        let flags = |r| encode(Some(&node().with_routing(r)), DEVICES).flags;
        assert_eq!(flags(Routing::Vxlan), CONFIG_F_READY);
        assert_eq!(
            flags(Routing::VxlanDirect),
            CONFIG_F_READY | CONFIG_F_DIRECT
        );
        assert_eq!(
            flags(Routing::HostGw),
            CONFIG_F_READY | CONFIG_F_DIRECT | CONFIG_F_NO_VXLAN
        );
        // Without an underlay the entry stays not ready, whatever the routing.
        let cfg = encode(
            Some(&node().with_routing(Routing::HostGw)),
            Devices {
                underlay: 0,
                ..DEVICES
            },
        );
        assert_eq!(cfg.flags & CONFIG_F_READY, 0);
    }

    #[test]
    fn the_decap_probe_sets_its_flag() {
        let devices = Devices {
            decap_l4_udp: true,
            ..DEVICES
        };
        let cfg = encode(Some(&node()), devices);
        assert_eq!(cfg.flags, CONFIG_F_READY | CONFIG_F_DECAP_L4_UDP);
        assert!(cfg.decap_clears_tunnel_gso());
    }

    #[test]
    fn host_bits_are_cleared() {
        let mut n = node();
        n.subnet = "172.17.1.1/24".parse().unwrap(); // FLANNEL_SUBNET spelling
        n.network = "172.17.3.4/16".parse().unwrap();
        let cfg = encode(Some(&n), DEVICES);
        assert_eq!(cfg.subnet, [172, 17, 1, 0]);
        assert_eq!(cfg.network, [172, 17, 0, 0]);
    }

    #[test]
    fn not_ready_without_node_or_underlay() {
        let cfg = encode(None, DEVICES);
        assert_eq!(cfg.flags, 0);
        assert_eq!(cfg.bridge_ifindex, 3, "device indexes are kept for later");
        let cfg = encode(
            Some(&node()),
            Devices {
                underlay: 0,
                ..DEVICES
            },
        );
        assert_eq!(cfg.flags, 0);
    }

    #[test]
    fn validation() {
        assert_eq!(node().validate(), Ok(()));
        let bad = |f: fn(&mut NodeConfig)| {
            let mut n = node();
            f(&mut n);
            n.validate().unwrap_err()
        };
        assert!(bad(|n| n.vni = 1 << 24).contains("24 bits"));
        assert!(bad(|n| n.port = 0).contains("port"));
        assert!(bad(|n| n.subnet = "172.17.1.0/31".parse().unwrap()).contains("/30"));
        assert!(bad(|n| n.subnet = "10.0.0.0/24".parse().unwrap()).contains("not inside"));
        assert!(bad(|n| n.vtep_mac = [0x01, 0, 0x5e, 0, 0, 1]).contains("unicast"));
        assert!(bad(|n| n.src_port_range = (5, 5)).contains("range"));
    }
}
