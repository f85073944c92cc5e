//! The node's devices the agent manages over netlink.
//!
//! - The host device `ovl0`: one end of a veth pair, ARP off, carrying `<our subnet>.0/32`
//!   (as flanneld gives `flannel.<VNI>`) and the route to the cluster network, so that traffic
//!   the host itself sends to remote pods reaches `host_egress`, which encapsulates it (or, for
//!   direct peers, sends it on unencapsulated). Its MAC is our VtepMAC; its MTU is the pod MTU
//!   (room for the 50 bytes of VXLAN, or the interface's MTU with host-gw). The peer end only exists
//!   so the device has a carrier: nothing is ever sent to it.
//! - The GRO device `ovl-gro` (VXLAN backend): a kernel VXLAN device in collect-metadata mode
//!   on our VXLAN port, never given an address or a route. The kernel's GRO aggregates
//!   UDP-tunnel frames only for a port that has a tunnel socket; this device owns that socket,
//!   so MTU-sized VXLAN frames reach `underlay_ingress` aggregated per inner flow. What the
//!   socket itself receives is dropped by `gro_device_ingress` (attached before the device
//!   goes up), except datagrams reassembled from fragments that `underlay_ingress` handed over,
//!   which it checks and delivers.
//! - The pod bridge (docker0, cni0), which the container runtime creates from the subnet file,
//!   possibly after the agent started: found as the interface holding the subnet's gateway
//!   address, or by name with `--pod-bridge`.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo},
    route::{RouteAttribute, RouteProtocol},
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};
use tokio::task::JoinHandle;

use crate::iface::{self, IfaceError, Interface};

/// Name of the host device, and of its veth peer.
pub const HOST_DEVICE: &str = "ovl0";
const HOST_DEVICE_PEER: &str = "ovl0p";
/// Name of the GRO device.
pub const GRO_DEVICE: &str = "ovl-gro";

#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("cannot open a netlink socket: {0}")]
    Connection(std::io::Error),
    #[error("failed to {action} {device}: {source}")]
    Netlink {
        action: &'static str,
        device: String,
        source: rtnetlink::Error,
    },
    #[error("{device} is missing right after it was created")]
    Vanished { device: String },
    #[error(transparent)]
    Iface(#[from] IfaceError),
}

impl NetdevError {
    /// For `map_err`: the netlink request to `action` `device` failed.
    fn netlink(
        action: &'static str,
        device: &(impl std::fmt::Display + ?Sized),
    ) -> impl FnOnce(rtnetlink::Error) -> Self {
        move |source| Self::Netlink {
            action,
            device: device.to_string(),
            source,
        }
    }
}

/// How the host device must look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostDeviceSpec {
    pub mac: [u8; 6],
    pub mtu: u32,
    /// `<our subnet>.0`, the source address of host-originated traffic to remote pods.
    pub addr: Ipv4Addr,
    /// The cluster network, routed into the device.
    pub network: Ipv4Net,
}

/// A netlink connection of the agent's network namespace.
pub struct Netlink {
    handle: Handle,
    connection: JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Netlink {
    pub fn new() -> Result<Self, NetdevError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(NetdevError::Connection)?;
        Ok(Self {
            handle,
            connection: tokio::spawn(connection),
        })
    }

    pub async fn interfaces(&self) -> Result<Vec<Interface>, NetdevError> {
        Ok(iface::list_interfaces(&self.handle).await?)
    }

    /// Creates or repairs the host device to match `spec`; returns its interface index.
    /// Idempotent: a restarted agent finds the device as it left it and changes nothing.
    pub async fn ensure_host_device(&self, spec: &HostDeviceSpec) -> Result<u32, NetdevError> {
        let err = |action| NetdevError::netlink(action, HOST_DEVICE);
        let mut interfaces = self.interfaces().await?;
        if !interfaces.iter().any(|i| i.name == HOST_DEVICE) {
            self.handle
                .link()
                .add(LinkVeth::new(HOST_DEVICE, HOST_DEVICE_PEER).build())
                .execute()
                .await
                .map_err(err("create"))?;
            interfaces = self.interfaces().await?;
        }
        let find = |name: &str| interfaces.iter().find(|i| i.name == name).cloned();
        let device = find(HOST_DEVICE).ok_or(NetdevError::Vanished {
            device: HOST_DEVICE.into(),
        })?;
        let peer = find(HOST_DEVICE_PEER);

        if device.mac != Some(spec.mac) || device.mtu != spec.mtu || !device.up {
            self.configure_link(device.index, Some(spec.mac), spec.mtu)
                .await
                .map_err(err("configure"))?;
        }
        if let Some(peer) = peer.filter(|p| !p.up || p.mtu != spec.mtu) {
            self.configure_link(peer.index, None, spec.mtu)
                .await
                .map_err(err("bring up the peer of"))?;
        }

        // Exactly one address: ours. An old one (from before a re-acquisition) goes.
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(device.index)
            .execute();
        let mut stale = Vec::new();
        let mut present = false;
        while let Some(msg) = addrs.try_next().await.map_err(err("list addresses of"))? {
            let v4 = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(a))
                | AddressAttribute::Address(IpAddr::V4(a)) => Some(*a),
                _ => None,
            });
            match v4 {
                Some(a) if a == spec.addr && msg.header.prefix_len == 32 => present = true,
                Some(_) => stale.push(msg),
                None => {}
            }
        }
        for msg in stale {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(err("remove an address of"))?;
        }
        if !present {
            self.handle
                .address()
                .add(device.index, IpAddr::V4(spec.addr), 32)
                .replace()
                .execute()
                .await
                .map_err(err("address"))?;
        }

        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(spec.network.network(), spec.network.prefix_len())
            .output_interface(device.index)
            .build();
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(err("route into"))?;
        Ok(device.index)
    }

    /// Sets the link's MAC (when given) and MTU, turns ARP off and brings it up.
    async fn configure_link(
        &self,
        index: u32,
        mac: Option<[u8; 6]>,
        mtu: u32,
    ) -> Result<(), rtnetlink::Error> {
        let mut msg = LinkUnspec::new_with_index(index);
        if let Some(mac) = mac {
            msg = msg.address(mac.to_vec());
        }
        let msg = msg.mtu(mtu).arp(false).up().build();
        self.handle.link().set(msg).execute().await
    }

    /// Whether the kernel's route to `ip` has no gateway (`ip route get <ip>` shows no `via`):
    /// flannel's test that a DirectRouting peer is on our L2 segment. A multipath route counts
    /// as one with gateways.
    pub async fn route_is_on_link(&self, ip: Ipv4Addr) -> Result<bool, NetdevError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .build();
        let mut routes = self.handle.route().get(msg).execute();
        let (mut found, mut via) = (false, false);
        while let Some(route) = routes
            .try_next()
            .await
            .map_err(NetdevError::netlink("look up the route to", &ip))?
        {
            found = true;
            via |= route
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::MultiPath(_)));
        }
        Ok(found && !via)
    }

    /// The IPv4 routes of the main table.
    pub async fn main_routes(&self) -> Result<Vec<iface::Route>, NetdevError> {
        Ok(iface::main_routes(&self.handle).await?)
    }

    /// Deletes `route` from the main table.
    pub async fn delete_route(&self, route: &iface::Route) -> Result<(), NetdevError> {
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(route.destination.addr(), route.destination.prefix_len());
        if let Some(gateway) = route.gateway {
            msg = msg.gateway(gateway);
        }
        if let Some(oif) = route.oif {
            msg = msg.output_interface(oif);
        }
        let mut msg = msg.build();
        // Any protocol: the builder's default (static) would not match a route `ip route add`
        // (boot) or another daemon wrote, and the kernel would answer ESRCH.
        msg.header.protocol = RouteProtocol::Unspec;
        self.handle
            .route()
            .del(msg)
            .execute()
            .await
            .map_err(NetdevError::netlink("delete the route", &route.destination))
    }

    /// Removes the host device (its peer and routes go with it).
    pub async fn remove_host_device(&self) -> Result<bool, NetdevError> {
        self.remove_device(HOST_DEVICE).await
    }

    /// Creates the GRO device for VXLAN on `port` if it is missing or not that (another port,
    /// not in collect-metadata mode, not VXLAN), and leaves it down when it creates it: the
    /// caller attaches `gro_device_ingress` first, then calls [`Netlink::set_up`]. Returns its
    /// interface index. A restarted agent finds it as it left it and changes nothing.
    pub async fn ensure_gro_device(&self, port: u16) -> Result<u32, NetdevError> {
        if let Some(index) = self.index_of(GRO_DEVICE).await? {
            let settings = self.vxlan_settings(index, GRO_DEVICE).await?;
            if settings.collect_metadata && settings.port == Some(port) {
                return Ok(index);
            }
            self.delete_link(index, GRO_DEVICE).await?;
        }
        // `ip link add ovl-gro type vxlan external dstport <port> nolearning`.
        let msg = LinkMessageBuilder::<LinkVxlan>::new(GRO_DEVICE)
            .collect_metadata(true)
            .port(port)
            .learning(false)
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(NetdevError::netlink("create", GRO_DEVICE))?;
        self.index_of(GRO_DEVICE)
            .await?
            .ok_or(NetdevError::Vanished {
                device: GRO_DEVICE.into(),
            })
    }

    /// Removes the GRO device (where the backend has no VXLAN, and at `cleanup`).
    pub async fn remove_gro_device(&self) -> Result<bool, NetdevError> {
        self.remove_device(GRO_DEVICE).await
    }

    /// Brings the link `index` (named `name`, for errors) up.
    pub async fn set_up(&self, index: u32, name: &str) -> Result<(), NetdevError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(NetdevError::netlink("bring up", name))
    }

    /// The interface index of the device `name`, if there is one.
    async fn index_of(&self, name: &str) -> Result<Option<u32>, NetdevError> {
        Ok(self
            .interfaces()
            .await?
            .into_iter()
            .find(|i| i.name == name)
            .map(|i| i.index))
    }

    /// The VXLAN settings of the link `index` (named `name`, for errors; the defaults if it is
    /// not VXLAN).
    async fn vxlan_settings(&self, index: u32, name: &str) -> Result<VxlanSettings, NetdevError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let mut settings = VxlanSettings::default();
        while let Some(msg) = links
            .try_next()
            .await
            .map_err(NetdevError::netlink("look up", name))?
        {
            settings = VxlanSettings::of(&msg.attributes);
        }
        Ok(settings)
    }

    /// The VXLAN devices other than ours that listen on UDP `port`, by name, with their VNI
    /// (`None`: collect-metadata mode, any VNI).
    pub async fn other_vxlan_devices_on(
        &self,
        port: u16,
    ) -> Result<Vec<(String, Option<u32>)>, NetdevError> {
        let mut links = self.handle.link().get().execute();
        let mut found = Vec::new();
        while let Some(msg) = links
            .try_next()
            .await
            .map_err(NetdevError::netlink("list", "links"))?
        {
            let settings = VxlanSettings::of(&msg.attributes);
            let name = msg.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            if let Some(name) = name
                && name != GRO_DEVICE
                && settings.port == Some(port)
            {
                found.push((name, (!settings.collect_metadata).then_some(settings.vni)));
            }
        }
        Ok(found)
    }

    /// Deletes the device `name` if there is one; whether there was.
    async fn remove_device(&self, name: &str) -> Result<bool, NetdevError> {
        let Some(index) = self.index_of(name).await? else {
            return Ok(false);
        };
        self.delete_link(index, name).await?;
        Ok(true)
    }

    async fn delete_link(&self, index: u32, name: &str) -> Result<(), NetdevError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(NetdevError::netlink("delete", name))
    }
}

/// What the agent checks of an existing GRO device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct VxlanSettings {
    collect_metadata: bool,
    port: Option<u16>,
    vni: u32,
}

impl VxlanSettings {
    /// Read from a link's attributes; a link that is not VXLAN has the defaults.
    fn of(attributes: &[LinkAttribute]) -> Self {
        let mut settings = Self::default();
        let infos = attributes.iter().filter_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        });
        for info in infos.flatten() {
            if let LinkInfo::Data(InfoData::Vxlan(data)) = info {
                for d in data {
                    match d {
                        InfoVxlan::CollectMetadata(on) => settings.collect_metadata = *on,
                        InfoVxlan::Port(port) => settings.port = Some(*port),
                        InfoVxlan::Id(vni) => settings.vni = *vni,
                        _ => {}
                    }
                }
            }
        }
        settings
    }
}

/// The pod bridge among `interfaces`: the one named `name` if given, else the one holding the
/// subnet's gateway address (what Docker's `--bip` and the CNI bridge plugin assign).
pub fn find_pod_bridge<'a>(
    interfaces: &'a [Interface],
    name: Option<&str>,
    gateway: Ipv4Addr,
) -> Option<&'a Interface> {
    interfaces.iter().find(|i| match name {
        Some(name) => i.name == name,
        None => i.name != HOST_DEVICE && i.ipv4.contains(&gateway),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gro_device_is_recognised_by_its_vxlan_settings() {
        use netlink_packet_route::link::InfoKind;
        let vxlan = |data: Vec<InfoVxlan>| {
            vec![
                LinkAttribute::IfName("ovl-gro".into()),
                LinkAttribute::LinkInfo(vec![
                    LinkInfo::Kind(InfoKind::Vxlan),
                    LinkInfo::Data(InfoData::Vxlan(data)),
                ]),
            ]
        };
        let ours = VxlanSettings::of(&vxlan(vec![
            InfoVxlan::Id(0),
            InfoVxlan::CollectMetadata(true),
            InfoVxlan::Port(8472),
            InfoVxlan::Learning(false),
        ]));
        assert_eq!(
            ours,
            VxlanSettings {
                collect_metadata: true,
                port: Some(8472),
                vni: 0,
            }
        );
        // flannel.1-like: a VNI, no collect-metadata mode.
        let plain = VxlanSettings::of(&vxlan(vec![InfoVxlan::Id(1), InfoVxlan::Port(8472)]));
        assert!(!plain.collect_metadata);
        assert_eq!(plain.vni, 1);
        // Not VXLAN at all.
        let veth = VxlanSettings::of(&[LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Veth,
        )])]);
        assert_eq!(veth, VxlanSettings::default());
    }

    fn iface(index: u32, name: &str, addrs: &[Ipv4Addr]) -> Interface {
        Interface {
            index,
            name: name.into(),
            mtu: 1450,
            mac: None,
            up: true,
            ipv4: addrs.to_vec(),
            networks: Vec::new(),
        }
    }

    #[test]
    fn bridge_is_the_holder_of_the_gateway_or_the_named_one() {
        let gw = Ipv4Addr::new(172, 17, 5, 1);
        let list = [
            iface(2, "eth0", &[Ipv4Addr::new(198, 18, 0, 1)]),
            iface(3, HOST_DEVICE, &[Ipv4Addr::new(172, 17, 5, 0)]),
            iface(4, "docker0", &[gw]),
            iface(5, "cni0", &[]),
        ];
        assert_eq!(find_pod_bridge(&list, None, gw).map(|i| i.index), Some(4));
        assert_eq!(
            find_pod_bridge(&list, Some("cni0"), gw).map(|i| i.index),
            Some(5)
        );
        assert_eq!(find_pod_bridge(&list[..2], None, gw), None, "no holder yet");
    }
}
