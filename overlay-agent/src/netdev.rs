//! The node's devices the agent manages over netlink.
//!
//! - The host device `ovl0`: one end of a veth pair, ARP off, carrying `<our subnet>.0/32`
//!   (as flanneld gives `flannel.<VNI>`) and the route to the cluster network, so that traffic
//!   the host itself sends to remote pods reaches `host_egress`, which encapsulates it (or, for
//!   direct peers, sends it on unencapsulated). Its MAC is our VtepMAC; its MTU is the pod MTU
//!   (room for the 50 bytes of VXLAN, or the interface's MTU with host-gw). The peer end only exists
//!   so the device has a carrier: nothing is ever sent to it.
//! - The pod bridge (docker0, cni0), which the container runtime creates from the subnet file,
//!   possibly after the agent started: found as the interface holding the subnet's gateway
//!   address, or by name with `--pod-bridge`.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkInfo},
    route::RouteAttribute,
};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tokio::task::JoinHandle;

use crate::iface::{self, IfaceError, Interface};

/// Name of the host device, and of its veth peer.
pub const HOST_DEVICE: &str = "ovl0";
const HOST_DEVICE_PEER: &str = "ovl0p";

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
    #[error("cannot read the offload settings of {device}: {source}")]
    Ethtool {
        device: String,
        source: std::io::Error,
    },
    #[error("{device} is missing right after it was created")]
    Vanished { device: String },
    #[error(transparent)]
    Iface(#[from] IfaceError),
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
        let err = |action, source| NetdevError::Netlink {
            action,
            device: HOST_DEVICE.to_owned(),
            source,
        };
        let mut interfaces = self.interfaces().await?;
        if !interfaces.iter().any(|i| i.name == HOST_DEVICE) {
            self.handle
                .link()
                .add(LinkVeth::new(HOST_DEVICE, HOST_DEVICE_PEER).build())
                .execute()
                .await
                .map_err(|e| err("create", e))?;
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
                .map_err(|e| err("configure", e))?;
        }
        if let Some(peer) = peer.filter(|p| !p.up || p.mtu != spec.mtu) {
            self.configure_link(peer.index, None, spec.mtu)
                .await
                .map_err(|e| err("bring up the peer of", e))?;
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
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(|e| err("list addresses of", e))?
        {
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
                .map_err(|e| err("remove an address of", e))?;
        }
        if !present {
            self.handle
                .address()
                .add(device.index, IpAddr::V4(spec.addr), 32)
                .replace()
                .execute()
                .await
                .map_err(|e| err("address", e))?;
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
            .map_err(|e| err("route into", e))?;
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
            .map_err(|source| NetdevError::Netlink {
                action: "look up the route to",
                device: ip.to_string(),
                source,
            })?
        {
            found = true;
            via |= route
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::MultiPath(_)));
        }
        Ok(found && !via)
    }

    /// Whether frames arrive on the interface `index` (named `name`) at most MTU-sized, so that
    /// only GRO can aggregate them: true for anything but a veth, whose peer hands over TSO
    /// super-packets whole unless TSO is off on the link (`ethtool -K <dev> tso off`, as on
    /// both ends of a NIC-like veth).
    pub async fn receives_mtu_sized_frames(
        &self,
        index: u32,
        name: &str,
    ) -> Result<bool, NetdevError> {
        let err = |source| NetdevError::Netlink {
            action: "look up",
            device: name.to_owned(),
            source,
        };
        let mut links = self.handle.link().get().match_index(index).execute();
        let mut veth = false;
        while let Some(msg) = links.try_next().await.map_err(err)? {
            veth |= msg.attributes.iter().any(|a| {
                matches!(a, LinkAttribute::LinkInfo(infos)
                    if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
            });
        }
        if !veth {
            return Ok(true);
        }
        Ok(!tso_enabled(name).map_err(|source| NetdevError::Ethtool {
            device: name.to_owned(),
            source,
        })?)
    }

    /// Removes the host device (its peer and routes go with it).
    pub async fn remove_host_device(&self) -> Result<bool, NetdevError> {
        let Some(device) = self
            .interfaces()
            .await?
            .into_iter()
            .find(|i| i.name == HOST_DEVICE)
        else {
            return Ok(false);
        };
        self.handle
            .link()
            .del(device.index)
            .execute()
            .await
            .map_err(|source| NetdevError::Netlink {
                action: "delete",
                device: HOST_DEVICE.to_owned(),
                source,
            })?;
        Ok(true)
    }
}

/// Whether TCP segmentation offload is on for `iface` (`ETHTOOL_GTSO`).
fn tso_enabled(iface: &str) -> std::io::Result<bool> {
    /// `struct ethtool_value` of linux/ethtool.h.
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    const ETHTOOL_GTSO: u32 = 0x1e;
    let bytes = iface.as_bytes();
    // SAFETY: a zeroed ifreq is a valid argument.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GTSO,
        data: 0,
    };
    req.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: socket() has no preconditions; the descriptor is owned (and closed) at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL reads the name and the command from `req` and writes `value`, which
    // outlives the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SIOCETHTOOL,
            &mut req,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value.data != 0)
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

    fn iface(index: u32, name: &str, addrs: &[Ipv4Addr]) -> Interface {
        Interface {
            index,
            name: name.into(),
            mtu: 1450,
            mac: None,
            up: true,
            ipv4: addrs.to_vec(),
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
