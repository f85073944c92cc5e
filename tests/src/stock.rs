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

/// flanneld's vxlan backend in `ns`: `flannel.1` (VNI 1, UDP 8472, nolearning, MTU 1450) on
/// `eth0` with source `local`, MAC `vtep_mac` and `<own_subnet>.0/32`; then for every peer
/// `ip neigh replace <peer .0> lladdr <VtepMAC> nud permanent`, `bridge fdb append <VtepMAC>
/// dst <PublicIP> self permanent` and `ip route replace <subnet> via <peer .0> onlink`.
pub fn stock_vxlan_node(
    ns: &NetNs,
    local: Ipv4Addr,
    own_subnet: Ipv4Net,
    vtep_mac: &str,
    peers: &[StockPeer<'_>],
) -> Result<()> {
    let local = local.to_string();
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &local,
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ])?;
    ns.ip(&[
        "link",
        "set",
        "flannel.1",
        "mtu",
        "1450",
        "address",
        vtep_mac,
    ])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/32", own_subnet.network()),
        "dev",
        "flannel.1",
    ])?;
    ns.ip(&["link", "set", "flannel.1", "up"])?;
    for peer in peers {
        let gw = peer.subnet.network().to_string();
        ns.ip(&[
            "neigh",
            "replace",
            &gw,
            "lladdr",
            peer.vtep_mac,
            "dev",
            "flannel.1",
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
                "flannel.1",
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
            "flannel.1",
            "onlink",
        ])?;
    }
    Ok(())
}
