//! The `host-gw` backend: every peer is reached directly, next hop its PublicIP, so the node
//! must not be behind NAT. Pure functions; see the parent module for where they sit in the
//! pipeline.

use std::net::Ipv4Addr;

use overlay_common::route::RemoteNode;

use super::BackendError;
use crate::subnet::{LeaseAttrs, Peer};

/// flannel's refusal to run host-gw behind NAT, word for word.
pub const HOST_GW_NAT_MESSAGE: &str = "your PublicIP differs from interface IP, meaning that probably you're on a NAT, which is not supported by host-gw backend";

/// host-gw routes to PublicIPs, so the published one must be the interface's own.
pub fn check(public_ip: Ipv4Addr, iface_addr: Ipv4Addr) -> Result<(), BackendError> {
    if public_ip == iface_addr {
        Ok(())
    } else {
        Err(BackendError::HostGwBehindNat)
    }
}

/// The lease attributes of a host-gw node: `BackendType` `host-gw`, no backend data.
pub fn lease_attrs(public_ip: Ipv4Addr) -> LeaseAttrs {
    LeaseAttrs::host_gw(public_ip)
}

/// The route to `peer`: directly to its PublicIP (no VtepMAC needed).
pub fn route(peer: &Peer) -> RemoteNode {
    RemoteNode::direct(peer.public_ip.octets(), [0; 6])
}
