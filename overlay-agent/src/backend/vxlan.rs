//! The `vxlan` backend: peers are reached through VXLAN to their VtepMAC, or, with
//! DirectRouting, directly when their PublicIP is on our L2 segment. Pure functions; see the
//! parent module for where they sit in the pipeline.

use std::net::Ipv4Addr;

use overlay_common::route::RemoteNode;

use super::PeerError;
use crate::{
    datapath::Routing,
    subnet::{LeaseAttrs, Mac, Peer},
};

/// The lease attributes of a vxlan node: `BackendType` `vxlan`, its VNI and VtepMAC.
pub fn lease_attrs(public_ip: Ipv4Addr, vni: u32, vtep_mac: Mac) -> LeaseAttrs {
    LeaseAttrs::vxlan(public_ip, vni, vtep_mac)
}

/// The data path's routing mode for `DirectRouting` on or off.
pub const fn routing(direct_routing: bool) -> Routing {
    if direct_routing {
        Routing::VxlanDirect
    } else {
        Routing::Vxlan
    }
}

/// The route to `peer`: direct when `direct` (DirectRouting on and the peer on our L2
/// segment), else through VXLAN. A peer without a VtepMAC cannot be reached either way.
pub fn route(peer: &Peer, direct: bool) -> Result<RemoteNode, PeerError> {
    let mac = peer.vtep_mac.ok_or(PeerError::NoVtepMac)?.octets();
    let ip = peer.public_ip.octets();
    Ok(if direct {
        RemoteNode::direct(ip, mac)
    } else {
        RemoteNode::vxlan(ip, mac)
    })
}
