//! A stock flanneld vxlan node's kernel state, built as flanneld builds it
//! (flannel-compat.md §4), for the interop tests: no agent of ours runs there.

use std::net::Ipv4Addr;

use anyhow::Result;
use ipnet::Ipv4Net;

use crate::netns::NetNs;

/// A remote lease as a stock node sees it.
#[derive(Debug, Clone, Copy)]
pub struct StockPeer<'a> {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: &'a str,
}

/// flanneld's vxlan backend in `ns` with the default VNI 1 on UDP 8472: see
/// [`stock_vxlan_node_on`].
pub fn stock_vxlan_node(
    ns: &NetNs,
    local: Ipv4Addr,
    own_subnet: Ipv4Net,
    vtep_mac: &str,
    peers: &[StockPeer<'_>],
) -> Result<()> {
    stock_vxlan_node_on(ns, local, own_subnet, vtep_mac, peers, 1, 8472)
}

/// flanneld's vxlan backend in `ns`: `flannel.<vni>` (UDP `port`, nolearning, MTU 1450) on
/// `eth0` with source `local`, MAC `vtep_mac` and `<own_subnet>.0/32`; then for every peer
/// `ip neigh replace <peer .0> lladdr <VtepMAC> nud permanent`, `bridge fdb append <VtepMAC>
/// dst <PublicIP> self permanent` and `ip route replace <subnet> via <peer .0> onlink`.
pub fn stock_vxlan_node_on(
    ns: &NetNs,
    local: Ipv4Addr,
    own_subnet: Ipv4Net,
    vtep_mac: &str,
    peers: &[StockPeer<'_>],
    vni: u32,
    port: u16,
) -> Result<()> {
    let local = local.to_string();
    let device = format!("flannel.{vni}");
    let device = device.as_str();
    ns.ip(&[
        "link",
        "add",
        device,
        "type",
        "vxlan",
        "id",
        &vni.to_string(),
        "local",
        &local,
        "dev",
        "eth0",
        "dstport",
        &port.to_string(),
        "nolearning",
    ])?;
    ns.ip(&["link", "set", device, "mtu", "1450", "address", vtep_mac])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/32", own_subnet.network()),
        "dev",
        device,
    ])?;
    ns.ip(&["link", "set", device, "up"])?;
    for peer in peers {
        let gw = peer.subnet.network().to_string();
        ns.ip(&[
            "neigh",
            "replace",
            &gw,
            "lladdr",
            peer.vtep_mac,
            "dev",
            device,
            "nud",
            "permanent",
        ])?;
        ns.run(
            "bridge",
            &[
                "fdb",
                "append",
                peer.vtep_mac,
                "dev",
                device,
                "dst",
                &peer.public_ip.to_string(),
                "self",
                "permanent",
            ],
        )?;
        ns.ip(&[
            "route",
            "replace",
            &peer.subnet.to_string(),
            "via",
            &gw,
            "dev",
            device,
            "onlink",
        ])?;
    }
    Ok(())
}
