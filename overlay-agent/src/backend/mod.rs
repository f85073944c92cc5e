//! The backends, after flannel's `pkg/backend/<name>`: what differs between `vxlan` and
//! `host-gw`, as pure functions tested without root, etcd or netlink.
//!
//! The agent's pipeline reads from the folder names: `subnet` (etcd → the network config and
//! [`PeerEvent`]s) → `backend` (config and events → lease attributes and [`RouteChange`]s) →
//! `datapath` (routes → BPF maps). This module owns:
//! - the start-up checks of a backend ([`check`], flannel's messages);
//! - the attributes this node publishes in its lease ([`lease_attrs`]);
//! - the node's encapsulation settings for the data path ([`tunnel`]);
//! - the conversion of a peer into a data-path route, the DirectRouting decision included
//!   ([`route_change`], [`wants_on_link`]).
//!
//! It may call the types of `subnet` (records, the network config) and `datapath`
//! ([`Routing`]) and `overlay_common` (the map values), never I/O: the one fact it needs from
//! the kernel (is a peer's PublicIP on our L2 segment) is asked by the caller and passed in.

pub mod host_gw;
pub mod vxlan;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use overlay_common::{
    route::RemoteNode,
    wire::{DEFAULT_VNI, DEFAULT_VXLAN_PORT},
};

pub use self::host_gw::HOST_GW_NAT_MESSAGE;
use crate::{
    datapath::Routing,
    subnet::{LeaseAttrs, Mac, PeerEvent, config::Backend},
};

/// Why a backend cannot run on this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// flannel's refusal to run host-gw behind NAT, word for word.
    #[error("{HOST_GW_NAT_MESSAGE}")]
    HostGwBehindNat,
    #[error(
        "the vxlan option MTU {mtu} is above the MTU {iface_mtu} of {iface}: pods would send \
         packets whose encapsulated frames cannot leave it; set MTU to at most {iface_mtu} or \
         leave it out"
    )]
    MtuAboveInterface {
        mtu: u32,
        iface: String,
        iface_mtu: u32,
    },
}

/// Why a peer's lease cannot become a route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("its lease has no VtepMAC; it is not reachable")]
    NoVtepMac,
}

/// What a peer event asks of the data path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChange {
    /// Route `subnet` to `node` (added or replaced).
    Upsert { subnet: Ipv4Net, node: RemoteNode },
    /// Forget these subnets.
    Remove(Vec<Ipv4Net>),
}

/// The backend's own start-up checks: `public_ip` is what the lease publishes, `iface_addr`
/// the external interface's own address.
pub fn check(
    backend: &Backend,
    public_ip: Ipv4Addr,
    iface_addr: Ipv4Addr,
) -> Result<(), BackendError> {
    match backend {
        Backend::Vxlan { .. } => Ok(()),
        Backend::HostGw => host_gw::check(public_ip, iface_addr),
    }
}

/// The vxlan `MTU` option plans for an underlay path smaller than the external interface
/// `iface` (MTU `iface_mtu`); above it, pods get an MTU whose encapsulated frames the interface
/// cannot send.
pub fn check_mtu(backend: &Backend, iface: &str, iface_mtu: u32) -> Result<(), BackendError> {
    match *backend {
        Backend::Vxlan { mtu: Some(mtu), .. } if mtu > iface_mtu => {
            Err(BackendError::MtuAboveInterface {
                mtu,
                iface: iface.to_owned(),
                iface_mtu,
            })
        }
        _ => Ok(()),
    }
}

/// The attributes this node's lease publishes.
pub fn lease_attrs(backend: &Backend, public_ip: Ipv4Addr, vtep_mac: [u8; 6]) -> LeaseAttrs {
    match backend {
        Backend::Vxlan { vni, .. } => vxlan::lease_attrs(public_ip, *vni, Mac::from(vtep_mac)),
        Backend::HostGw => host_gw::lease_attrs(public_ip),
    }
}

/// VNI, UDP port and routing mode for the data path's `CONFIG`. host-gw has no VNI or port; the
/// defaults only keep the (unused) VXLAN fields valid.
pub const fn tunnel(backend: &Backend) -> (u32, u16, Routing) {
    match *backend {
        Backend::Vxlan {
            vni,
            port,
            direct_routing,
            ..
        } => (vni, port, vxlan::routing(direct_routing)),
        Backend::HostGw => (DEFAULT_VNI, DEFAULT_VXLAN_PORT, Routing::HostGw),
    }
}

/// Whether the route to a peer depends on its PublicIP being on our L2 segment (flannel's
/// DirectRouting test): the caller asks the kernel and passes the answer to [`route_change`].
pub const fn wants_on_link(backend: &Backend) -> bool {
    matches!(
        backend,
        Backend::Vxlan {
            direct_routing: true,
            ..
        }
    )
}

/// The data-path change `event` asks for. `on_link` is the kernel's answer for an added or
/// changed peer when [`wants_on_link`] (else ignored); `installed` the subnets the data path
/// routes now (for [`PeerEvent::Synced`], which removes those that left while no agent ran).
pub fn route_change(
    backend: &Backend,
    event: &PeerEvent,
    on_link: bool,
    installed: impl IntoIterator<Item = Ipv4Net>,
) -> Result<RouteChange, PeerError> {
    match event {
        PeerEvent::Added(peer) | PeerEvent::Changed(peer) => {
            let node = match backend {
                Backend::HostGw => host_gw::route(peer),
                Backend::Vxlan { direct_routing, .. } => {
                    vxlan::route(peer, *direct_routing && on_link)?
                }
            };
            Ok(RouteChange::Upsert {
                subnet: peer.subnet,
                node,
            })
        }
        PeerEvent::Removed(subnet) => Ok(RouteChange::Remove(vec![*subnet])),
        PeerEvent::Synced(current) => Ok(RouteChange::Remove(
            installed
                .into_iter()
                .filter(|s| !current.contains(s))
                .collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet::Peer;

    const VXLAN: Backend = Backend::DEFAULT_VXLAN;
    const DIRECT: Backend = Backend::Vxlan {
        vni: 1,
        port: 8472,
        mtu: None,
        direct_routing: true,
    };

    fn peer(mac: Option<u8>) -> Peer {
        Peer {
            subnet: "10.10.2.0/24".parse().unwrap(),
            public_ip: Ipv4Addr::new(198, 18, 0, 2),
            backend_type: "vxlan".to_owned(),
            vtep_mac: mac.map(|m| Mac([2, 0, 0, 0, 0, m])),
            vni: Some(1),
        }
    }

    fn upsert(backend: &Backend, peer: Peer, on_link: bool) -> Result<RemoteNode, PeerError> {
        match route_change(backend, &PeerEvent::Added(peer), on_link, [])? {
            RouteChange::Upsert { node, .. } => Ok(node),
            other => panic!("not an upsert: {other:?}"),
        }
    }

    #[test]
    fn host_gw_behind_nat_is_refused_with_flannels_message() {
        let ip = Ipv4Addr::new(198, 18, 0, 1);
        let nat = Ipv4Addr::new(203, 0, 113, 1);
        assert_eq!(check(&Backend::HostGw, ip, ip), Ok(()));
        let err = check(&Backend::HostGw, nat, ip).unwrap_err();
        assert_eq!(err.to_string(), HOST_GW_NAT_MESSAGE);
        assert_eq!(check(&VXLAN, nat, ip), Ok(()), "vxlan works behind NAT");
    }

    #[test]
    fn a_vxlan_mtu_option_above_the_interfaces_is_refused_naming_both() {
        let vxlan = |mtu| Backend::Vxlan {
            vni: 1,
            port: 8472,
            mtu,
            direct_routing: false,
        };
        assert_eq!(check_mtu(&vxlan(None), "eth0", 1500), Ok(()));
        assert_eq!(check_mtu(&vxlan(Some(1400)), "eth0", 1500), Ok(()));
        assert_eq!(check_mtu(&vxlan(Some(1500)), "eth0", 1500), Ok(()));
        let err = check_mtu(&vxlan(Some(9001)), "eth0", 1500).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the vxlan option MTU 9001 is above the MTU 1500 of eth0"),
            "{err}"
        );
        assert_eq!(check_mtu(&Backend::HostGw, "eth0", 1500), Ok(()));
    }

    #[test]
    fn lease_attrs_carry_the_backend_and_vtep_mac() {
        let ip = Ipv4Addr::new(198, 18, 0, 1);
        let mac = [2, 0, 0, 0, 0, 1];
        let attrs = lease_attrs(&VXLAN, ip, mac);
        assert_eq!(attrs, LeaseAttrs::vxlan(ip, 1, Mac(mac)));
        assert_eq!(
            lease_attrs(&Backend::HostGw, ip, mac),
            LeaseAttrs::host_gw(ip)
        );
    }

    #[test]
    fn tunnel_settings_follow_the_backend() {
        assert_eq!(tunnel(&VXLAN), (1, 8472, Routing::Vxlan));
        assert_eq!(tunnel(&DIRECT), (1, 8472, Routing::VxlanDirect));
        assert_eq!(
            tunnel(&Backend::HostGw),
            (DEFAULT_VNI, DEFAULT_VXLAN_PORT, Routing::HostGw)
        );
    }

    #[test]
    fn direct_routing_routes_on_link_peers_directly_and_others_through_vxlan() {
        let ip = [198, 18, 0, 2];
        let mac = [2, 0, 0, 0, 0, 7];
        assert!(wants_on_link(&DIRECT) && !wants_on_link(&VXLAN));
        assert_eq!(
            upsert(&DIRECT, peer(Some(7)), true),
            Ok(RemoteNode::direct(ip, mac))
        );
        assert_eq!(
            upsert(&DIRECT, peer(Some(7)), false),
            Ok(RemoteNode::vxlan(ip, mac))
        );
        assert_eq!(
            upsert(&VXLAN, peer(Some(7)), true),
            Ok(RemoteNode::vxlan(ip, mac)),
            "without DirectRouting the answer is ignored"
        );
        assert_eq!(
            upsert(&Backend::HostGw, peer(None), false),
            Ok(RemoteNode::direct(ip, [0; 6]))
        );
    }

    #[test]
    fn a_vxlan_peer_without_vtep_mac_is_not_routed() {
        assert_eq!(upsert(&VXLAN, peer(None), false), Err(PeerError::NoVtepMac));
    }

    #[test]
    fn removal_and_sync_remove_what_left() {
        let a: Ipv4Net = "10.10.1.0/24".parse().unwrap();
        let b: Ipv4Net = "10.10.2.0/24".parse().unwrap();
        assert_eq!(
            route_change(&VXLAN, &PeerEvent::Removed(a), false, [a, b]),
            Ok(RouteChange::Remove(vec![a]))
        );
        assert_eq!(
            route_change(&VXLAN, &PeerEvent::Synced(vec![b]), false, [a, b]),
            Ok(RouteChange::Remove(vec![a]))
        );
    }
}
