//! Choosing the external interface as flanneld does: `--iface` (name or IP, first that exists),
//! else `--iface-regex` (matched against addresses, then names), else `--iface-can-reach` (the
//! interface the kernel routes that address through, with the source address it picks); with
//! none of the three given, the interface of the default route. The public IP is `--public-ip`
//! or the interface's address (the one matched or picked, else its first IPv4 address).
//!
//! The choice is a pure function over a snapshot of the interfaces ([`select`]), so it is unit
//! tested without netlink; [`discover`] takes that snapshot from the kernel.

use std::net::Ipv4Addr;

use futures_util::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{LinkAttribute, LinkFlags},
    route::{RouteAddress, RouteAttribute},
};
use regex::Regex;
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::warn;

/// One interface of the node as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
    pub ipv4: Vec<Ipv4Addr>,
    /// The networks its IPv4 addresses are on (address and prefix length, as `ip addr` shows
    /// them): the kernel routes each to this interface.
    pub networks: Vec<Ipv4Net>,
}

/// `--iface-can-reach`: the address, and how the kernel routes it (`None`: no route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanReach {
    pub addr: Ipv4Addr,
    pub route: Option<RouteTo>,
}

/// The answer of `ip route get <address>`: the output interface and the source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTo {
    pub index: u32,
    pub src: Option<Ipv4Addr>,
}

/// The interface inter-node traffic uses, and the address peers reach this node at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<[u8; 6]>,
    /// The interface's own IPv4 address.
    pub iface_addr: Ipv4Addr,
    /// The address published in the lease (`PublicIP`): `--public-ip` or `iface_addr`.
    pub public_ip: Ipv4Addr,
}

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("invalid --iface-regex {regex:?}: {source}")]
    BadRegex { regex: String, source: regex::Error },
    #[error(
        "failed to find interface to use that matches the interfaces and/or regexes provided: --iface {ifaces:?} --iface-regex {regexes:?}{}{}",
        can_reach.map(|a| format!(" --iface-can-reach {a} (no route to it)")).unwrap_or_default(),
        if without_ipv4.is_empty() { String::new() } else {
            format!(" (matched, but without an IPv4 address: {})", without_ipv4.join(", "))
        }
    )]
    NoMatch {
        ifaces: Vec<String>,
        regexes: Vec<String>,
        can_reach: Option<Ipv4Addr>,
        /// Interfaces an `--iface` or `--iface-regex` named that were passed over for want of
        /// an IPv4 address.
        without_ipv4: Vec<String>,
    },
    #[error("--iface-can-reach {value:?} is not an IPv4 address (the agent is IPv4 only)")]
    BadCanReach { value: String },
    #[error("failed to get default interface: no default route (give --iface)")]
    NoDefaultRoute,
    #[error("failed to find IPv4 address for interface {name}")]
    NoIpv4 { name: String },
    #[error("interface {name} has MTU 0")]
    ZeroMtu { name: String },
    #[error("netlink request failed while listing {what}: {source}")]
    Netlink {
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("cannot open a netlink socket: {0}")]
    Connection(std::io::Error),
}

/// Picks the external interface from a snapshot of the node's interfaces (flanneld's order:
/// each `--iface`, then each `--iface-regex`, then `--iface-can-reach`, passing over what has no
/// IPv4 address; when none of them is given, the interface holding `--public-ip` if it is one
/// of the node's addresses, else the default route's).
pub fn select(
    interfaces: &[Interface],
    default_route_index: Option<u32>,
    ifaces: &[String],
    regexes: &[String],
    can_reach: Option<CanReach>,
    public_ip: Option<Ipv4Addr>,
) -> Result<ExternalInterface, IfaceError> {
    let mut without_ipv4 = Vec::new();
    let chosen = if by_default_route(ifaces, regexes, can_reach.is_some()) {
        // flanneld looks `--public-ip` up as an interface address; one that is not the node's
        // own (a NAT in front) makes flanneld exit, and takes the default route here.
        match public_ip.and_then(|ip| holding(interfaces, ip)) {
            Some(found) => Some(found),
            None => {
                let index = default_route_index.ok_or(IfaceError::NoDefaultRoute)?;
                interfaces
                    .iter()
                    .find(|i| i.index == index)
                    .map(|i| (i, None))
            }
        }
    } else {
        let by_route = || {
            let route = can_reach?.route?;
            let iface = interfaces.iter().find(|i| i.index == route.index)?;
            // A source the interface does not hold (a route's `src` elsewhere) is not its address.
            Some((iface, route.src.filter(|a| iface.ipv4.contains(a))))
        };
        match by_name_or_ip(interfaces, ifaces, &mut without_ipv4) {
            Some(found) => Some(found),
            None => by_regex(interfaces, regexes, &mut without_ipv4)?,
        }
        .or_else(by_route)
    };
    let (iface, addr) = chosen.ok_or_else(|| IfaceError::NoMatch {
        ifaces: ifaces.to_vec(),
        regexes: regexes.to_vec(),
        can_reach: can_reach.map(|c| c.addr),
        without_ipv4,
    })?;
    let iface_addr = addr
        .or_else(|| iface.ipv4.first().copied())
        .ok_or_else(|| IfaceError::NoIpv4 {
            name: iface.name.clone(),
        })?;
    if iface.mtu == 0 {
        return Err(IfaceError::ZeroMtu {
            name: iface.name.clone(),
        });
    }
    Ok(ExternalInterface {
        index: iface.index,
        name: iface.name.clone(),
        mtu: iface.mtu,
        mac: iface.mac,
        iface_addr,
        public_ip: public_ip.unwrap_or(iface_addr),
    })
}

/// Whether the default route's interface is the choice: none of `--iface`, `--iface-regex`,
/// `--iface-can-reach` given.
fn by_default_route(ifaces: &[String], regexes: &[String], can_reach: bool) -> bool {
    ifaces.is_empty() && regexes.is_empty() && !can_reach
}

/// The interface holding `ip`, with that address as its own.
fn holding(interfaces: &[Interface], ip: Ipv4Addr) -> Option<(&Interface, Option<Ipv4Addr>)> {
    interfaces
        .iter()
        .find(|i| i.ipv4.contains(&ip))
        .map(|i| (i, Some(ip)))
}

/// `iface` if it has an IPv4 address; else noted in `without_ipv4` and passed over, as flanneld
/// goes on to its next candidate when an interface has none.
fn with_ipv4<'a>(iface: &'a Interface, without_ipv4: &mut Vec<String>) -> Option<&'a Interface> {
    if iface.ipv4.is_empty() {
        if !without_ipv4.contains(&iface.name) {
            without_ipv4.push(iface.name.clone());
        }
        None
    } else {
        Some(iface)
    }
}

/// The first `--iface` (a name, or an address the interface holds) that exists with an IPv4
/// address.
fn by_name_or_ip<'a>(
    interfaces: &'a [Interface],
    ifaces: &[String],
    without_ipv4: &mut Vec<String>,
) -> Option<(&'a Interface, Option<Ipv4Addr>)> {
    ifaces
        .iter()
        .find_map(|want| match want.parse::<Ipv4Addr>() {
            Ok(ip) => holding(interfaces, ip),
            Err(_) => interfaces
                .iter()
                .find(|i| i.name == *want)
                .and_then(|i| with_ipv4(i, without_ipv4))
                .map(|i| (i, None)),
        })
}

/// The first interface an `--iface-regex` matches: by address first, then by name (one with an
/// IPv4 address).
fn by_regex<'a>(
    interfaces: &'a [Interface],
    regexes: &[String],
    without_ipv4: &mut Vec<String>,
) -> Result<Option<(&'a Interface, Option<Ipv4Addr>)>, IfaceError> {
    let compiled = regexes
        .iter()
        .map(|r| {
            Regex::new(r).map_err(|source| IfaceError::BadRegex {
                regex: r.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(compiled.iter().find_map(|re| {
        let by_addr = interfaces.iter().find_map(|i| {
            i.ipv4
                .iter()
                .find(|a| re.is_match(&a.to_string()))
                .map(|a| (i, Some(*a)))
        });
        by_addr.or_else(|| {
            interfaces
                .iter()
                .filter(|i| re.is_match(&i.name))
                .find_map(|i| with_ipv4(i, without_ipv4))
                .map(|i| (i, None))
        })
    }))
}

/// `--iface-can-reach`'s value as an address; empty means not given (flanneld's unit files
/// pass `-iface-can-reach=`).
pub fn parse_can_reach(value: Option<&str>) -> Result<Option<Ipv4Addr>, IfaceError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| IfaceError::BadCanReach {
            value: text.to_owned(),
        }),
    }
}

/// How the kernel routes `addr` (`ip route get`): `None` when it has no route.
async fn route_to(handle: &Handle, addr: Ipv4Addr) -> Option<RouteTo> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(addr, 32)
        .build();
    let route = handle.route().get(msg).execute().try_next().await.ok()??;
    let mut index = None;
    let mut src = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Oif(i) => index = Some(*i),
            RouteAttribute::PrefSource(RouteAddress::Inet(a)) => src = Some(*a),
            _ => {}
        }
    }
    Some(RouteTo { index: index?, src })
}

/// Lists the interfaces of the current network namespace with their IPv4 addresses.
pub async fn list_interfaces(handle: &Handle) -> Result<Vec<Interface>, IfaceError> {
    let netlink = |what| move |source| IfaceError::Netlink { what, source };
    let mut interfaces = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(netlink("links"))? {
        let mut iface = Interface {
            index: msg.header.index,
            name: String::new(),
            mtu: 0,
            mac: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            ipv4: Vec::new(),
            networks: Vec::new(),
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => iface.name = name,
                LinkAttribute::Mtu(mtu) => iface.mtu = mtu,
                LinkAttribute::Address(mac) if mac.len() == 6 => {
                    iface.mac = mac.try_into().ok();
                }
                _ => {}
            }
        }
        interfaces.push(iface);
    }
    let mut addrs = handle.address().get().execute();
    while let Some(msg) = addrs.try_next().await.map_err(netlink("addresses"))? {
        let Some(iface) = interfaces.iter_mut().find(|i| i.index == msg.header.index) else {
            continue;
        };
        for attr in &msg.attributes {
            if let AddressAttribute::Local(std::net::IpAddr::V4(a))
            | AddressAttribute::Address(std::net::IpAddr::V4(a)) = attr
                && !iface.ipv4.contains(a)
            {
                iface.ipv4.push(*a);
                if let Ok(net) = Ipv4Net::new(*a, msg.header.prefix_len) {
                    iface.networks.push(net);
                }
            }
        }
    }
    Ok(interfaces)
}

/// The interfaces and the main table's routes of the current network namespace, over one
/// netlink connection.
pub async fn snapshot() -> Result<(Vec<Interface>, Vec<Route>), IfaceError> {
    with_netlink(async |handle| Ok((list_interfaces(handle).await?, main_routes(handle).await?)))
        .await
}

/// Runs `f` over a netlink connection of its own, closed when it returns.
async fn with_netlink<T>(
    f: impl AsyncFnOnce(&Handle) -> Result<T, IfaceError>,
) -> Result<T, IfaceError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(IfaceError::Connection)?;
    // The connection task ends when `handle` (its only user) is dropped at the end of this call.
    let connection = tokio::spawn(connection);
    let result = f(&handle).await;
    drop(handle);
    connection.abort();
    result
}

/// The interface networks whose route a route of `network` would take over (the same or a
/// wider prefix: replaced, or cut into), by interface and address. Networks strictly inside
/// `network` keep their more specific routes (a pod bridge's `<subnet>.1/24`, `ovl0`'s /32);
/// interfaces named in `spared` are left out (ours, and pod bridges that still carry a
/// runtime's default address until it is restarted with `FLANNEL_SUBNET`).
#[must_use]
pub fn networks_taken_over(
    interfaces: &[Interface],
    network: Ipv4Net,
    spared: &[&str],
) -> Vec<(String, Ipv4Net)> {
    interfaces
        .iter()
        .filter(|i| !spared.contains(&i.name.as_str()))
        .flat_map(|i| i.networks.iter().map(move |net| (i.name.clone(), *net)))
        .filter(|(_, net)| net.contains(&network.network()))
        .collect()
}

/// A route of the main table: destination, output interface, gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: Ipv4Net,
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
}

/// The IPv4 routes of the main table.
pub async fn main_routes(handle: &Handle) -> Result<Vec<Route>, IfaceError> {
    const RT_TABLE_MAIN: u8 = 254;
    let mut out = Vec::new();
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(route) = routes
        .try_next()
        .await
        .map_err(|source| IfaceError::Netlink {
            what: "routes",
            source,
        })?
    {
        if route.header.table != RT_TABLE_MAIN {
            continue;
        }
        let mut destination = Ipv4Addr::UNSPECIFIED;
        let (mut oif, mut gateway) = (None, None);
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => destination = *a,
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(*a),
                _ => {}
            }
        }
        if let Ok(destination) = Ipv4Net::new(destination, route.header.destination_prefix_length) {
            out.push(Route {
                destination,
                oif,
                gateway,
            });
        }
    }
    Ok(out)
}

/// The routes a route of `network` would take over: the same prefix (replaced) or a wider one
/// other than the default route (cut into), except those through an interface in `spared`.
#[must_use]
pub fn routes_taken_over(routes: &[Route], network: Ipv4Net, spared: &[u32]) -> Vec<Route> {
    routes
        .iter()
        .filter(|r| r.destination.prefix_len() > 0 && r.destination.contains(&network.network()))
        .filter(|r| r.oif.is_none_or(|oif| !spared.contains(&oif)))
        .cloned()
        .collect()
}

/// flanneld's routes to peers' subnets (host-gw, and vxlan DirectRouting): `<subnet> via
/// <PublicIP>`, for the subnet and PublicIP of a live peer in `peers`. flanneld deletes one only
/// when the peer's lease goes, and it is not on `flannel.1`, so a node moved from flanneld in
/// place keeps them. More specific than `ovl0`'s route of the whole network, they would send
/// what the kernel forwards to those pods (a Service connection after kube-proxy's DNAT) past
/// `ovl0` and the data path's filing of it.
#[must_use]
pub fn flanneld_peer_routes(routes: &[Route], peers: &[(Ipv4Net, Ipv4Addr)]) -> Vec<Route> {
    routes
        .iter()
        .filter(|r| {
            peers
                .iter()
                .any(|(subnet, ip)| r.destination == *subnet && r.gateway == Some(*ip))
        })
        .cloned()
        .collect()
}

/// The etcd endpoints (`http://198.18.0.5:2379`, `198.18.0.5:2379`) given as an IPv4 address
/// inside `network` that the route of `network` through the host device would capture: no
/// route more specific than `network` leads to them (the default route, a wider one, or one of
/// the same prefix that it replaces). With the address, and the route that leads there now.
/// Endpoints given by name are not resolved here.
#[must_use]
pub fn etcd_endpoints_taken_over<'a>(
    endpoints: &'a [String],
    routes: &[Route],
    network: Ipv4Net,
) -> Vec<(&'a str, Ipv4Addr, Option<Route>)> {
    endpoints
        .iter()
        .filter_map(|endpoint| Some((endpoint.as_str(), endpoint_ipv4(endpoint)?)))
        .filter(|(_, ip)| network.contains(ip))
        .filter_map(|(endpoint, ip)| {
            let now = routes
                .iter()
                .filter(|r| r.destination.contains(&ip))
                .max_by_key(|r| r.destination.prefix_len())
                .cloned();
            let kept = now
                .as_ref()
                .is_some_and(|r| r.destination.prefix_len() > network.prefix_len());
            (!kept).then_some((endpoint, ip, now))
        })
        .collect()
}

/// The IPv4 address of an etcd endpoint URL (scheme and path optional), if it is one.
fn endpoint_ipv4(endpoint: &str) -> Option<Ipv4Addr> {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let authority = rest.split('/').next()?;
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = host.rsplit_once(':').map_or(host, |(host, _)| host);
    host.parse().ok()
}

/// The output interface of the IPv4 default route in the main table, if there is one.
pub async fn default_route_index(handle: &Handle) -> Result<Option<u32>, IfaceError> {
    Ok(main_routes(handle)
        .await?
        .iter()
        .filter(|r| r.destination.prefix_len() == 0)
        .find_map(|r| r.oif))
}

/// Chooses the external interface of this network namespace from the kernel's view.
pub async fn discover(
    ifaces: &[String],
    regexes: &[String],
    can_reach: Option<Ipv4Addr>,
    public_ip: Option<Ipv4Addr>,
) -> Result<ExternalInterface, IfaceError> {
    with_netlink(async |handle| {
        let interfaces = list_interfaces(handle).await?;
        let default = if by_default_route(ifaces, regexes, can_reach.is_some()) {
            default_route_index(handle).await?
        } else {
            None
        };
        let can_reach = match can_reach {
            Some(addr) => Some(CanReach {
                addr,
                route: route_to(handle, addr).await,
            }),
            None => None,
        };
        let chosen = select(&interfaces, default, ifaces, regexes, can_reach, public_ip)?;
        if let Some(holder) = interfaces
            .iter()
            .find(|i| i.index != chosen.index && i.ipv4.contains(&chosen.public_ip))
        {
            warn!(
                "--public-ip {} is an address of {}, not of the chosen interface {}: VXLAN \
                 leaves from {}, and peers running this agent accept VXLAN only from PublicIPs \
                 (drop_unknown_peer); choose {} with --iface, or give --public-ip alone",
                chosen.public_ip, holder.name, chosen.name, chosen.iface_addr, holder.name
            );
        }
        Ok(chosen)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Vec<Interface> {
        let iface = |index, name: &str, addrs: &[[u8; 4]]| Interface {
            index,
            name: name.into(),
            mtu: 1500,
            mac: Some([2, 0, 0, 0, 0, index as u8]),
            up: true,
            ipv4: addrs.iter().map(|a| Ipv4Addr::from(*a)).collect(),
            networks: addrs
                .iter()
                .map(|a| Ipv4Net::new(Ipv4Addr::from(*a), 24).unwrap())
                .collect(),
        };
        vec![
            iface(1, "lo", &[[127, 0, 0, 1]]),
            iface(2, "eth0", &[[198, 18, 0, 1]]),
            iface(3, "eth1", &[[198, 19, 0, 7], [198, 19, 0, 8]]),
        ]
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_string()).collect()
    }

    #[test]
    fn default_route_interface_is_the_default() {
        let e = select(&node(), Some(3), &[], &[], None, None).unwrap();
        assert_eq!(
            (e.name.as_str(), e.iface_addr),
            ("eth1", Ipv4Addr::new(198, 19, 0, 7))
        );
        assert_eq!(e.public_ip, e.iface_addr);
    }

    #[test]
    fn no_default_route_and_no_flags_is_an_error() {
        assert!(matches!(
            select(&node(), None, &[], &[], None, None),
            Err(IfaceError::NoDefaultRoute)
        ));
    }

    #[test]
    fn iface_by_name_or_ip_first_existing_wins() {
        let e = select(&node(), Some(3), &s(&["nope", "eth0"]), &[], None, None).unwrap();
        assert_eq!(e.name, "eth0");
        let e = select(&node(), None, &s(&["198.19.0.8"]), &[], None, None).unwrap();
        assert_eq!(
            (e.name.as_str(), e.iface_addr),
            ("eth1", Ipv4Addr::new(198, 19, 0, 8))
        );
    }

    #[test]
    fn iface_that_matches_nothing_names_the_flags() {
        let err = select(&node(), Some(2), &s(&["wlan9"]), &[], None, None).unwrap_err();
        assert!(err.to_string().contains("wlan9"), "{err}");
    }

    #[test]
    fn regex_matches_addresses_before_names() {
        let e = select(&node(), None, &[], &s(&[r"^198\.19\.0\.8$"]), None, None).unwrap();
        assert_eq!(e.iface_addr, Ipv4Addr::new(198, 19, 0, 8));
        let e = select(&node(), None, &[], &s(&["^eth0$"]), None, None).unwrap();
        assert_eq!(e.name, "eth0");
        let err = select(&node(), None, &[], &s(&["("]), None, None).unwrap_err();
        assert!(matches!(err, IfaceError::BadRegex { ref regex, .. } if regex == "("));
    }

    #[test]
    fn an_iface_that_matches_nothing_falls_through_to_the_regexes_then_can_reach() {
        // flanneld tries each --iface, then each --iface-regex, then --iface-can-reach.
        let e = select(
            &node(),
            Some(2),
            &s(&["wlan9"]),
            &s(&["^eth1$"]),
            None,
            None,
        )
        .unwrap();
        assert_eq!(e.name, "eth1");
        let reach = CanReach {
            addr: Ipv4Addr::new(198, 19, 5, 5),
            route: Some(RouteTo {
                index: 3,
                src: Some(Ipv4Addr::new(198, 19, 0, 8)),
            }),
        };
        let e = select(
            &node(),
            Some(2),
            &s(&["wlan9"]),
            &s(&["^nope$"]),
            Some(reach),
            None,
        )
        .unwrap();
        assert_eq!(
            (e.name.as_str(), e.iface_addr),
            ("eth1", Ipv4Addr::new(198, 19, 0, 8)),
            "the interface and source address of the route"
        );
        // A match before it wins.
        let e = select(&node(), None, &s(&["eth0"]), &[], Some(reach), None).unwrap();
        assert_eq!(e.name, "eth0");
    }

    #[test]
    fn can_reach_alone_takes_the_route_not_the_default() {
        let route = |src| CanReach {
            addr: Ipv4Addr::new(203, 0, 113, 9),
            route: Some(RouteTo { index: 3, src }),
        };
        let e = select(&node(), Some(2), &[], &[], Some(route(None)), None).unwrap();
        assert_eq!(
            (e.name.as_str(), e.iface_addr),
            ("eth1", Ipv4Addr::new(198, 19, 0, 7)),
            "without a source, the interface's first address"
        );
        // A source the interface does not hold is not taken as its address.
        let e = select(
            &node(),
            Some(2),
            &[],
            &[],
            Some(route(Some(Ipv4Addr::new(10, 0, 0, 1)))),
            None,
        )
        .unwrap();
        assert_eq!(e.iface_addr, Ipv4Addr::new(198, 19, 0, 7));
        let unroutable = CanReach {
            addr: Ipv4Addr::new(203, 0, 113, 9),
            route: None,
        };
        let err = select(&node(), Some(2), &[], &[], Some(unroutable), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("--iface-can-reach 203.0.113.9 (no route to it)"),
            "{err}"
        );
    }

    #[test]
    fn can_reach_must_be_an_ipv4_address() {
        assert_eq!(parse_can_reach(None).unwrap(), None);
        assert_eq!(parse_can_reach(Some("")).unwrap(), None);
        assert_eq!(
            parse_can_reach(Some("198.18.0.2")).unwrap(),
            Some(Ipv4Addr::new(198, 18, 0, 2))
        );
        for bad in ["2001:db8::1", "eth0", "198.18.0.0/24"] {
            let err = parse_can_reach(Some(bad)).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("IPv4"), "{err}");
        }
    }

    #[test]
    fn networks_the_same_as_or_wider_than_the_cluster_network_are_taken_over() {
        let iface = |name: &str, nets: &[&str]| Interface {
            index: 1,
            name: name.into(),
            mtu: 1500,
            mac: None,
            up: true,
            ipv4: Vec::new(),
            networks: nets.iter().map(|n| n.parse().unwrap()).collect(),
        };
        let list = [
            iface("eth0", &["198.18.0.1/24"]),
            iface("eth1", &["10.10.0.5/16"]),
            iface("br0", &["10.0.0.1/8"]),
            iface("eth2", &["10.10.5.7/24"]),
            iface("dummy0", &["10.10.9.9/32"]),
            iface("docker0", &["10.10.0.1/16"]),
            iface("ovl0", &["10.10.34.0/32"]),
        ];
        let network: Ipv4Net = "10.10.0.0/16".parse().unwrap();
        let taken = networks_taken_over(&list, network, &["docker0", "ovl0"]);
        let names: Vec<String> = taken.iter().map(|(n, net)| format!("{n} {net}")).collect();
        assert_eq!(names, ["eth1 10.10.0.5/16", "br0 10.0.0.1/8"]);
        // A narrower network: the wider LAN around it is cut into.
        let upper: Ipv4Net = "10.10.128.0/17".parse().unwrap();
        let taken = networks_taken_over(&list, upper, &["docker0", "ovl0"]);
        assert_eq!(taken.len(), 2, "{taken:?}");
        assert!(networks_taken_over(&list, "172.17.0.0/16".parse().unwrap(), &[]).is_empty());
    }

    #[test]
    fn routes_of_the_same_or_a_wider_prefix_are_taken_over_but_the_default() {
        let route = |dest: &str, oif: u32| Route {
            destination: dest.parse().unwrap(),
            oif: Some(oif),
            gateway: None,
        };
        let routes = [
            route("0.0.0.0/0", 2),
            route("10.10.0.0/16", 2),
            route("10.0.0.0/8", 3),
            route("10.10.5.0/24", 2),
            route("172.17.0.0/16", 4),
            route("10.10.0.0/16", 9),
        ];
        let taken = routes_taken_over(&routes, "10.10.0.0/16".parse().unwrap(), &[9]);
        assert_eq!(taken, [route("10.10.0.0/16", 2), route("10.0.0.0/8", 3)]);
    }

    #[test]
    fn etcd_endpoints_inside_the_network_without_a_narrower_route_are_taken_over() {
        let route = |dest: &str, gateway: Option<&str>| Route {
            destination: dest.parse().unwrap(),
            oif: Some(2),
            gateway: gateway.map(|g| g.parse().unwrap()),
        };
        let routes = [
            route("0.0.0.0/0", Some("198.18.0.254")),
            route("10.20.0.0/16", None),
            route("10.30.7.0/24", None),
        ];
        let endpoints: Vec<String> = [
            "http://10.40.0.5:2379",     // through the default route: taken
            "https://10.20.0.9:2379/",   // a route of the Network's own prefix: replaced
            "10.30.7.8:2379",            // a narrower route (a /24 on a bridge): kept
            "http://198.18.0.5:2379",    // outside the Network
            "http://etcd.internal:2379", // a name: not resolved here
        ]
        .map(str::to_owned)
        .into();
        let taken = etcd_endpoints_taken_over(&endpoints, &routes, "10.0.0.0/8".parse().unwrap());
        let shown: Vec<String> = taken
            .iter()
            .map(|(ep, ip, now)| format!("{ep} {ip} {:?}", now.as_ref().map(|r| r.destination)))
            .collect();
        assert_eq!(shown, ["http://10.40.0.5:2379 10.40.0.5 Some(0.0.0.0/0)"],);
        let taken = etcd_endpoints_taken_over(&endpoints, &routes, "10.20.0.0/16".parse().unwrap());
        assert_eq!(taken.len(), 1, "{taken:?}");
        assert_eq!(taken[0].2, Some(route("10.20.0.0/16", None)));
        // Without any route the Network's would be the only one.
        let taken = etcd_endpoints_taken_over(&endpoints, &[], "10.30.0.0/16".parse().unwrap());
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].1, Ipv4Addr::new(10, 30, 7, 8));
        assert_eq!(
            endpoint_ipv4("http://user:pw@10.1.2.3:2379"),
            Some(Ipv4Addr::new(10, 1, 2, 3))
        );
    }

    #[test]
    fn flanneld_routes_to_live_peers_are_found() {
        let route = |dst: &str, gw: Option<[u8; 4]>, oif| Route {
            destination: dst.parse().unwrap(),
            oif,
            gateway: gw.map(Ipv4Addr::from),
        };
        let routes = [
            // flanneld's host-gw route to a peer: found.
            route("172.17.5.0/24", Some([198, 18, 0, 2]), Some(2)),
            // The same subnet through another gateway (an operator's), or another subnet of
            // that peer's PublicIP: left alone.
            route("172.17.6.0/24", Some([198, 18, 0, 9]), Some(2)),
            route("172.17.7.0/25", Some([198, 18, 0, 3]), Some(2)),
            // Ours and the bridge's, without a gateway.
            route("172.17.0.0/16", None, Some(7)),
            route("172.17.1.0/24", None, Some(8)),
        ];
        let peers = [
            (
                "172.17.5.0/24".parse().unwrap(),
                Ipv4Addr::new(198, 18, 0, 2),
            ),
            (
                "172.17.6.0/24".parse().unwrap(),
                Ipv4Addr::new(198, 18, 0, 3),
            ),
            (
                "172.17.7.0/24".parse().unwrap(),
                Ipv4Addr::new(198, 18, 0, 3),
            ),
        ];
        assert_eq!(flanneld_peer_routes(&routes, &peers), [routes[0].clone()]);
    }

    #[test]
    fn public_ip_overrides_the_published_address_only() {
        let public = Ipv4Addr::new(198, 18, 9, 9);
        let e = select(&node(), None, &s(&["eth0"]), &[], None, Some(public)).unwrap();
        assert_eq!(
            (e.iface_addr, e.public_ip),
            (Ipv4Addr::new(198, 18, 0, 1), public)
        );
    }

    #[test]
    fn public_ip_alone_picks_the_interface_holding_it() {
        // As flanneld, which looks --public-ip up as an interface address when no --iface,
        // --iface-regex or --iface-can-reach is given: not the default route's interface.
        let public = Ipv4Addr::new(198, 19, 0, 8);
        let e = select(&node(), Some(2), &[], &[], None, Some(public)).unwrap();
        assert_eq!(
            (e.name.as_str(), e.iface_addr, e.public_ip),
            ("eth1", public, public)
        );
        // Not the node's own (a NAT in front): the default route's interface publishes it.
        let natted = Ipv4Addr::new(203, 0, 113, 5);
        let e = select(&node(), Some(2), &[], &[], None, Some(natted)).unwrap();
        assert_eq!(
            (e.name.as_str(), e.iface_addr, e.public_ip),
            ("eth0", Ipv4Addr::new(198, 18, 0, 1), natted)
        );
        // An --iface still decides the interface.
        let e = select(&node(), Some(2), &s(&["eth0"]), &[], None, Some(public)).unwrap();
        assert_eq!((e.name.as_str(), e.public_ip), ("eth0", public));
    }

    #[test]
    fn candidates_without_ipv4_are_passed_over() {
        let mut n = node();
        n[1].ipv4.clear();
        // flanneld goes on to the next --iface, then the regexes, when one has no IPv4 address.
        let e = select(&n, None, &s(&["eth0", "eth1"]), &[], None, None).unwrap();
        assert_eq!(e.name, "eth1");
        let e = select(&n, None, &s(&["eth0"]), &s(&["^eth"]), None, None).unwrap();
        assert_eq!(e.name, "eth1");
        // Nothing left: the error names what was passed over and why.
        let err = select(&n, None, &s(&["eth0"]), &[], None, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to find interface to use that matches the interfaces and/or regexes \
             provided: --iface [\"eth0\"] --iface-regex [] (matched, but without an IPv4 \
             address: eth0)"
        );
    }

    #[test]
    fn the_default_route_interface_without_ipv4_is_refused() {
        let mut n = node();
        n[1].ipv4.clear();
        let err = select(&n, Some(2), &[], &[], None, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to find IPv4 address for interface eth0"
        );
    }
}
