//! Local pods for the data path's `ENDPOINT_V4`: where each pod address on the pod bridge is
//! reached (its host-side veth and its MAC), learnt from netlink events as the container runtime
//! adds and removes pods, so that traffic for a local pod is delivered straight into its
//! namespace (`bpf_redirect_peer`) instead of crossing the bridge's transmit path.
//!
//! Three kernel tables say where a pod is, and each is watched (`RTMGRP_LINK`, `RTMGRP_NEIGH`,
//! through the agent's one subscription in `netevents`) after one dump:
//! - links: the bridge's ports that can be endpoints: up, veth, peer in another namespace
//!   (`bpf_redirect_peer` needs exactly that);
//! - the bridge's forwarding database: pod MAC → port (learnt from the pod's own frames);
//! - the bridge's neighbour table: pod address → MAC (the pod's ARP, or the node's).
//!
//! An address becomes an endpoint when all three agree, and stops being one as soon as the port
//! goes away or down, the MAC moves to another port, or the address gets another MAC. What the
//! kernel forgets is no such change: the bridge's FDB entry ages out, and a stale neighbour
//! entry is garbage-collected once the kernel holds more than `gc_thresh1` (128) neighbours,
//! counting every namespace's, because both see little of a pod's traffic once it is
//! delivered straight in. Those are kept, across the periodic dumps too, and so is an address
//! that failed to resolve once (the pod it maps to is still on its port; should the address
//! have left it, the pod's stack drops what arrives for it). Dropping them made endpoints come
//! and go under load, and each time packets crossed the bridge. So a pod
//! removed and its interface index reused by another pod never receives the first pod's
//! traffic: the port's deletion removes the entry, a port re-created with the same index is
//! another device (its own MAC), and the new pod's MAC must be learnt on the port before its
//! own address maps to it. Until an address is an endpoint its traffic takes the bridge, which
//! also makes the kernel learn it.
//!
//! [`EndpointTable`] is the pure logic (unit-tested); [`run_watcher`] feeds it from netlink and
//! publishes the endpoints on a `watch` channel for the daemon to write into the data path.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use futures_util::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
};
use overlay_common::endpoint::Endpoint;
use rtnetlink::Handle;
use tokio::sync::{broadcast, watch};

/// The bridge whose pods are watched, and the node's subnet (only its pod addresses count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgeScope {
    pub ifindex: u32,
    pub subnet: Ipv4Net,
}

/// One fact learnt from netlink about the pod bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// A link exists; `endpoint_port`: it is an up veth port of the bridge whose peer lives in
    /// another namespace; `mac`: its own address, which tells a port re-created with the same
    /// index apart.
    Link {
        index: u32,
        endpoint_port: bool,
        mac: Option<[u8; 6]>,
    },
    /// A link was deleted.
    LinkGone { index: u32 },
    /// The bridge forwards frames for `mac` to port `port`.
    Fdb { mac: [u8; 6], port: u32 },
    /// The bridge forgot `mac` on `port`.
    FdbGone { mac: [u8; 6], port: u32 },
    /// The bridge's neighbour table maps `addr` to `mac`.
    Neigh { addr: Ipv4Addr, mac: [u8; 6] },
    /// The kernel deleted its neighbour entry of `addr` (a stale one garbage-collected, or an
    /// operator's `ip neigh del`) or failed to resolve it once: no news about the pod.
    NeighForgotten { addr: Ipv4Addr },
}

/// What the three tables say, and the endpoints that follow.
#[derive(Debug)]
pub struct EndpointTable {
    subnet: Ipv4Net,
    /// Endpoint ports, with their own MAC.
    ports: BTreeMap<u32, Option<[u8; 6]>>,
    fdb: BTreeMap<[u8; 6], u32>,
    neigh: BTreeMap<Ipv4Addr, [u8; 6]>,
}

impl EndpointTable {
    #[must_use]
    pub fn new(subnet: Ipv4Net) -> Self {
        Self {
            subnet: subnet.trunc(),
            ports: BTreeMap::new(),
            fdb: BTreeMap::new(),
            neigh: BTreeMap::new(),
        }
    }

    /// Takes one observation into account.
    pub fn apply(&mut self, observation: Observation) {
        match observation {
            Observation::Link {
                index,
                endpoint_port: true,
                mac,
            } => {
                if self.ports.insert(index, mac).is_some_and(|old| old != mac) {
                    // Another device under the same index (its deletion went unseen).
                    self.fdb.retain(|_, port| *port != index);
                }
            }
            Observation::Link { index, .. } | Observation::LinkGone { index } => {
                self.ports.remove(&index);
                // Whatever the bridge had learnt behind that port is gone with it (the kernel
                // flushes it too; its messages may come later or not at all).
                self.fdb.retain(|_, port| *port != index);
            }
            Observation::Fdb { mac, port } => {
                self.fdb.insert(mac, port);
            }
            // Kept on purpose: a learnt entry ages out when the bridge sees no frame from the
            // pod for a while, which is what delivery straight into pods (and the port hook)
            // make normal. A pod that goes takes its port with it (`LinkGone`), and a MAC that
            // moves is learnt on its new port (`Fdb`).
            Observation::FdbGone { .. } => {}
            Observation::Neigh { addr, mac } => {
                if self.is_pod_address(addr) {
                    self.neigh.insert(addr, mac);
                }
            }
            // Kept on purpose, as an aged-out FDB entry is.
            Observation::NeighForgotten { .. } => {}
        }
    }

    /// Takes over what `previous` (of the same bridge) knew and a new dump no longer shows: the
    /// FDB entries and neighbours the kernel forgot meanwhile. Called after the dump's links
    /// and before its FDB and neighbour entries, which override it. An FDB entry comes along
    /// only while its port is the same device (same index, same MAC): a re-created port
    /// inherits nothing.
    pub fn carry_over(&mut self, previous: &EndpointTable) {
        if previous.subnet != self.subnet {
            return;
        }
        for (mac, port) in &previous.fdb {
            let same_device = matches!(
                (self.ports.get(port), previous.ports.get(port)),
                (Some(Some(now)), Some(Some(before))) if now == before
            );
            if same_device {
                self.fdb.insert(*mac, *port);
            }
        }
        self.neigh
            .extend(previous.neigh.iter().map(|(addr, mac)| (*addr, *mac)));
    }

    /// Pod addresses: inside the subnet, but not its `.0` (the host device), its gateway `.1`
    /// (the bridge) or its broadcast address.
    fn is_pod_address(&self, addr: Ipv4Addr) -> bool {
        let net = u32::from(self.subnet.network());
        self.subnet.contains(&addr)
            && addr != self.subnet.network()
            && u32::from(addr) != net + 1
            && addr != self.subnet.broadcast()
    }

    /// Every address the three tables agree on, with its port and MAC.
    #[must_use]
    pub fn endpoints(&self) -> BTreeMap<Ipv4Addr, Endpoint> {
        self.neigh
            .iter()
            .filter_map(|(addr, mac)| {
                let port = *self.fdb.get(mac)?;
                self.ports
                    .contains_key(&port)
                    .then(|| (*addr, Endpoint::new(port, *mac)))
            })
            .collect()
    }
}

/// The observation a link message makes for the bridge `bridge` (`deleted`: an RTM_DELLINK).
#[must_use]
pub fn observe_link(msg: &LinkMessage, bridge: u32, deleted: bool) -> Observation {
    let index = msg.header.index;
    if deleted {
        return Observation::LinkGone { index };
    }
    let mut on_bridge = false;
    let mut veth = false;
    let mut peer_elsewhere = false;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            LinkAttribute::Controller(master) => on_bridge = *master == bridge,
            LinkAttribute::LinkInfo(infos) => {
                veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            LinkAttribute::LinkNetNsId(_) => peer_elsewhere = true,
            _ => {}
        }
    }
    let up = msg.header.flags.contains(LinkFlags::Up);
    Observation::Link {
        index,
        endpoint_port: on_bridge && veth && peer_elsewhere && up,
        mac,
    }
}

/// The observation a neighbour message (neighbour table or bridge FDB) makes for the bridge
/// `bridge`, if it concerns it (`deleted`: an RTM_DELNEIGH).
#[must_use]
pub fn observe_neigh(msg: &NeighbourMessage, bridge: u32, deleted: bool) -> Option<Observation> {
    let mac = msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
        _ => None,
    });
    match msg.header.family {
        AddressFamily::Inet if msg.header.ifindex == bridge => {
            let addr = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(addr)) => Some(*addr),
                _ => None,
            })?;
            if deleted || msg.header.state == NeighbourState::Failed {
                return Some(Observation::NeighForgotten { addr });
            }
            let usable = matches!(
                msg.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
                    | NeighbourState::Noarp
            );
            // Being resolved (INCOMPLETE), or without an address: nothing learnt.
            mac.filter(|_| usable)
                .map(|mac| Observation::Neigh { addr, mac })
        }
        AddressFamily::Bridge => {
            // Entries of the bridge (not the ports' own lists) name it as their master; its
            // permanent ones are the ports' own local addresses, not pods.
            let of_bridge = msg
                .attributes
                .iter()
                .any(|a| matches!(a, NeighbourAttribute::Controller(m) if *m == bridge));
            if !of_bridge || msg.header.state == NeighbourState::Permanent {
                return None;
            }
            let mac = mac?;
            let port = msg.header.ifindex;
            Some(if deleted {
                Observation::FdbGone { mac, port }
            } else {
                Observation::Fdb { mac, port }
            })
        }
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("netlink dump of {what} failed: {source}")]
    Dump {
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("the netlink event stream ended")]
    Closed,
}

/// How often the whole state is dumped again, besides the events: a safety net should the
/// kernel ever drop events on a full socket buffer. What the dump no longer shows of a pod
/// that is still there is kept ([`EndpointTable::carry_over`]).
const RESYNC: Duration = Duration::from_secs(60);

/// Watches the pod bridge named by `scope` (none: nothing to watch) and publishes its endpoints
/// on `out` whenever they change, from `events` (the agent's one netlink subscription,
/// `netevents`) and dumps through `handle`. Runs until `out` has no receiver or netlink fails.
pub async fn run_watcher(
    mut scope: watch::Receiver<Option<BridgeScope>>,
    out: watch::Sender<BTreeMap<Ipv4Addr, Endpoint>>,
    handle: Handle,
    mut events: broadcast::Receiver<NetlinkMessage<RouteNetlinkMessage>>,
) -> Result<(), WatchError> {
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut current = *scope.borrow_and_update();
    let mut table: Option<EndpointTable> = None;
    loop {
        // (Re)build from a dump: after a change of bridge or subnet (from nothing), after
        // missed events, and periodically (keeping what the kernel forgot).
        table = match current {
            Some(s) => Some(dump(&handle, s, table.as_ref()).await?),
            None => None,
        };
        publish(&out, table.as_ref());
        loop {
            tokio::select! {
                changed = scope.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let next = *scope.borrow_and_update();
                    if next != current {
                        current = next;
                        table = None;
                        break;
                    }
                }
                _ = resync.tick() => break,
                event = events.recv() => match event {
                    Ok(msg) => {
                        if let (Some(t), Some(s)) = (table.as_mut(), current)
                            && let Some(obs) = observe(msg, s.ifindex)
                        {
                            t.apply(obs);
                            publish(&out, Some(t));
                        }
                    }
                    // Some events were missed: start again from a dump.
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return Err(WatchError::Closed),
                },
                () = out.closed() => return Ok(()),
            }
        }
    }
}

/// Sends the endpoints if they differ from what was last sent.
fn publish(out: &watch::Sender<BTreeMap<Ipv4Addr, Endpoint>>, table: Option<&EndpointTable>) {
    let next = table.map(EndpointTable::endpoints).unwrap_or_default();
    out.send_if_modified(|current| {
        if *current == next {
            return false;
        }
        *current = next;
        true
    });
}

/// The observation an event makes, if it concerns the bridge.
fn observe(msg: NetlinkMessage<RouteNetlinkMessage>, bridge: u32) -> Option<Observation> {
    let NetlinkPayload::InnerMessage(msg) = msg.payload else {
        return None;
    };
    match msg {
        RouteNetlinkMessage::NewLink(l) => Some(observe_link(&l, bridge, false)),
        RouteNetlinkMessage::DelLink(l) => Some(observe_link(&l, bridge, true)),
        RouteNetlinkMessage::NewNeighbour(n) => observe_neigh(&n, bridge, false),
        RouteNetlinkMessage::DelNeighbour(n) => observe_neigh(&n, bridge, true),
        _ => None,
    }
}

/// A table filled from dumps of the links, the bridge's FDB and the neighbour table, on top of
/// what `previous` (of the same scope) knew.
async fn dump(
    handle: &Handle,
    scope: BridgeScope,
    previous: Option<&EndpointTable>,
) -> Result<EndpointTable, WatchError> {
    let mut table = EndpointTable::new(scope.subnet);
    let links: Vec<LinkMessage> =
        handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| WatchError::Dump {
                what: "links",
                source,
            })?;
    for link in &links {
        table.apply(observe_link(link, scope.ifindex, false));
    }
    if let Some(previous) = previous {
        table.carry_over(previous);
    }
    for (what, family) in [
        ("the bridge's forwarding database", AddressFamily::Bridge),
        ("the neighbour table", AddressFamily::Inet),
    ] {
        let entries: Vec<NeighbourMessage> = handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(|source| WatchError::Dump { what, source })?;
        for entry in &entries {
            if let Some(obs) = observe_neigh(entry, scope.ifindex, false) {
                table.apply(obs);
            }
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE: u32 = 3;
    const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
    const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];

    fn addr(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(172, 17, 5, last)
    }

    fn table() -> EndpointTable {
        EndpointTable::new("172.17.5.1/24".parse().unwrap())
    }

    /// The own MAC of the host-side veth `port` (`generation` tells re-created ones apart).
    fn port_mac(port: u32, generation: u8) -> Option<[u8; 6]> {
        Some([0x02, 0xee, 0, generation, 0, u8::try_from(port).unwrap()])
    }

    fn port(index: u32, generation: u8) -> Observation {
        Observation::Link {
            index,
            endpoint_port: true,
            mac: port_mac(index, generation),
        }
    }

    fn pod(t: &mut EndpointTable, port: u32, mac: [u8; 6], ip: Ipv4Addr) {
        t.apply(self::port(port, 0));
        t.apply(Observation::Fdb { mac, port });
        t.apply(Observation::Neigh { addr: ip, mac });
    }

    #[test]
    fn a_pod_is_an_endpoint_once_port_mac_and_address_agree() {
        let mut t = table();
        t.apply(Observation::Neigh {
            addr: addr(2),
            mac: MAC_A,
        });
        assert!(t.endpoints().is_empty(), "address alone");
        t.apply(Observation::Fdb {
            mac: MAC_A,
            port: 7,
        });
        assert!(t.endpoints().is_empty(), "no such port yet");
        t.apply(port(7, 0));
        assert_eq!(
            t.endpoints(),
            BTreeMap::from([(addr(2), Endpoint::new(7, MAC_A))])
        );
    }

    #[test]
    fn any_table_dropping_it_removes_the_endpoint() {
        let drops = [
            Observation::LinkGone { index: 7 },
            Observation::Link {
                index: 7,
                endpoint_port: false,
                mac: port_mac(7, 0),
            },
            // Re-created under the same index (its deletion unseen).
            port(7, 1),
            Observation::Fdb {
                mac: MAC_A,
                port: 8,
            },
            // The address answers from another MAC (not learnt on any port).
            Observation::Neigh {
                addr: addr(2),
                mac: MAC_B,
            },
        ];
        for drop in drops {
            let mut t = table();
            pod(&mut t, 7, MAC_A, addr(2));
            assert_eq!(t.endpoints().len(), 1);
            t.apply(drop);
            assert!(t.endpoints().is_empty(), "{drop:?} left it");
        }
    }

    #[test]
    fn entries_the_kernel_forgets_keep_the_endpoint() {
        let mut t = table();
        pod(&mut t, 7, MAC_A, addr(2));
        // The FDB entry ages out; the stale neighbour entry is garbage-collected (or failed).
        t.apply(Observation::FdbGone {
            mac: MAC_A,
            port: 7,
        });
        t.apply(Observation::NeighForgotten { addr: addr(2) });
        assert_eq!(
            t.endpoints(),
            BTreeMap::from([(addr(2), Endpoint::new(7, MAC_A))])
        );
    }

    /// A table as `dump` builds it on top of `previous`: the dump's links, what `previous`
    /// knew, then the dump's FDB and neighbour entries.
    fn dumped(
        previous: &EndpointTable,
        links: &[Observation],
        entries: &[Observation],
    ) -> EndpointTable {
        let mut t = table();
        for o in links {
            t.apply(*o);
        }
        t.carry_over(previous);
        for o in entries {
            t.apply(*o);
        }
        t
    }

    #[test]
    fn a_dump_keeps_what_the_kernel_forgot_of_a_pod_still_there() {
        let mut before = table();
        pod(&mut before, 7, MAC_A, addr(2));
        pod(&mut before, 8, MAC_B, addr(3));
        let both = BTreeMap::from([
            (addr(2), Endpoint::new(7, MAC_A)),
            (addr(3), Endpoint::new(8, MAC_B)),
        ]);
        // Neither FDB nor neighbour entries in the dump: aged out, garbage-collected.
        let links = [port(7, 0), port(8, 0)];
        assert_eq!(dumped(&before, &links, &[]).endpoints(), both);

        // But what the dump shows wins: a MAC learnt on another port, an address that answers
        // from another MAC.
        let moved = [
            Observation::Fdb {
                mac: MAC_A,
                port: 8,
            },
            Observation::Neigh {
                addr: addr(3),
                mac: [0x02, 0, 0, 0, 0, 0xc],
            },
        ];
        assert_eq!(
            dumped(&before, &links, &moved).endpoints(),
            BTreeMap::from([(addr(2), Endpoint::new(8, MAC_A))])
        );

        // A port that went, or was re-created under the same index, inherits nothing.
        assert_eq!(
            dumped(&before, &[port(8, 0)], &[]).endpoints(),
            BTreeMap::from([(addr(3), Endpoint::new(8, MAC_B))])
        );
        assert_eq!(
            dumped(&before, &[port(7, 1), port(8, 0)], &[]).endpoints(),
            BTreeMap::from([(addr(3), Endpoint::new(8, MAC_B))])
        );
        // Nor does a table of another subnet.
        let mut other = EndpointTable::new("172.17.6.1/24".parse().unwrap());
        for o in links {
            other.apply(o);
        }
        other.carry_over(&before);
        assert!(other.endpoints().is_empty());
    }

    #[test]
    fn a_reused_ifindex_does_not_inherit_the_old_pods_address() {
        let mut t = table();
        pod(&mut t, 7, MAC_A, addr(2));
        // The pod goes: its port is deleted (the kernel flushes the FDB, maybe silently), and
        // its neighbour entry lingers as STALE.
        t.apply(Observation::LinkGone { index: 7 });
        // Another pod gets a veth with the same index, its own MAC and address.
        pod(&mut t, 7, MAC_B, addr(3));
        assert_eq!(
            t.endpoints(),
            BTreeMap::from([(addr(3), Endpoint::new(7, MAC_B))]),
            "the old address must not reach the new pod"
        );
    }

    #[test]
    fn a_moved_mac_or_readdressed_pod_follows() {
        let mut t = table();
        pod(&mut t, 7, MAC_A, addr(2));
        t.apply(port(8, 0));
        t.apply(Observation::Fdb {
            mac: MAC_A,
            port: 8,
        });
        // The old port's late "gone" for that MAC must not undo the move.
        t.apply(Observation::FdbGone {
            mac: MAC_A,
            port: 7,
        });
        assert_eq!(t.endpoints()[&addr(2)], Endpoint::new(8, MAC_A));
        // The address now answers from another MAC (a new pod took it) that is not learnt yet.
        t.apply(Observation::Neigh {
            addr: addr(2),
            mac: MAC_B,
        });
        assert!(t.endpoints().is_empty());
    }

    #[test]
    fn only_pod_addresses_of_our_subnet_count() {
        let mut t = table();
        for ip in [
            addr(0),
            addr(1),
            addr(255),
            Ipv4Addr::new(172, 17, 6, 2),
            Ipv4Addr::new(10, 0, 0, 2),
        ] {
            pod(&mut t, 7, MAC_A, ip);
        }
        assert!(t.endpoints().is_empty(), "{:?}", t.endpoints());
    }

    fn link_msg(index: u32, attrs: Vec<LinkAttribute>, up: bool) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        if up {
            msg.header.flags = LinkFlags::Up;
        }
        msg.attributes = attrs;
        msg
    }

    #[test]
    fn endpoint_ports_are_up_veths_on_the_bridge_with_a_foreign_peer() {
        let veth = || LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]);
        let full = || {
            vec![
                LinkAttribute::Controller(BRIDGE),
                veth(),
                LinkAttribute::LinkNetNsId(1),
            ]
        };
        let port = |attrs, up| match observe_link(&link_msg(9, attrs, up), BRIDGE, false) {
            Observation::Link { endpoint_port, .. } => endpoint_port,
            other => panic!("{other:?}"),
        };
        assert!(port(full(), true));
        assert!(!port(full(), false), "down");
        assert!(
            !port(vec![veth(), LinkAttribute::LinkNetNsId(1)], true),
            "no master"
        );
        assert!(
            !port(
                vec![
                    LinkAttribute::Controller(BRIDGE + 1),
                    veth(),
                    LinkAttribute::LinkNetNsId(1)
                ],
                true
            ),
            "another bridge"
        );
        assert!(
            !port(vec![LinkAttribute::Controller(BRIDGE), veth()], true),
            "peer in our namespace"
        );
        assert!(
            !port(
                vec![
                    LinkAttribute::Controller(BRIDGE),
                    LinkAttribute::LinkNetNsId(1)
                ],
                true
            ),
            "not a veth"
        );
        assert_eq!(
            observe_link(&link_msg(9, full(), true), BRIDGE, true),
            Observation::LinkGone { index: 9 }
        );
        let mut own = full();
        own.push(LinkAttribute::Address(MAC_B.to_vec()));
        assert_eq!(
            observe_link(&link_msg(9, own, true), BRIDGE, false),
            Observation::Link {
                index: 9,
                endpoint_port: true,
                mac: Some(MAC_B)
            },
            "the port's own MAC"
        );
    }

    fn neigh_msg(
        family: AddressFamily,
        ifindex: u32,
        state: NeighbourState,
        attrs: Vec<NeighbourAttribute>,
    ) -> NeighbourMessage {
        let mut msg = NeighbourMessage::default();
        msg.header.family = family;
        msg.header.ifindex = ifindex;
        msg.header.state = state;
        msg.attributes = attrs;
        msg
    }

    #[test]
    fn neighbour_and_fdb_messages_of_the_bridge_are_read() {
        let lladdr = NeighbourAttribute::LinkLayerAddress(MAC_A.to_vec());
        let dst = NeighbourAttribute::Destination(NeighbourAddress::Inet(addr(2)));
        let inet = |ifindex, state| {
            neigh_msg(
                AddressFamily::Inet,
                ifindex,
                state,
                vec![dst.clone(), lladdr.clone()],
            )
        };
        assert_eq!(
            observe_neigh(&inet(BRIDGE, NeighbourState::Stale), BRIDGE, false),
            Some(Observation::Neigh {
                addr: addr(2),
                mac: MAC_A
            })
        );
        assert_eq!(
            observe_neigh(&inet(BRIDGE, NeighbourState::Failed), BRIDGE, false),
            Some(Observation::NeighForgotten { addr: addr(2) })
        );
        assert_eq!(
            observe_neigh(&inet(BRIDGE, NeighbourState::Stale), BRIDGE, true),
            Some(Observation::NeighForgotten { addr: addr(2) })
        );
        assert_eq!(
            observe_neigh(&inet(BRIDGE, NeighbourState::Incomplete), BRIDGE, false),
            None,
            "being resolved"
        );
        assert_eq!(
            observe_neigh(&inet(2, NeighbourState::Reachable), BRIDGE, false),
            None,
            "another interface"
        );

        let fdb = |state, master| {
            neigh_msg(
                AddressFamily::Bridge,
                7,
                state,
                vec![lladdr.clone(), NeighbourAttribute::Controller(master)],
            )
        };
        assert_eq!(
            observe_neigh(&fdb(NeighbourState::Reachable, BRIDGE), BRIDGE, false),
            Some(Observation::Fdb {
                mac: MAC_A,
                port: 7
            })
        );
        assert_eq!(
            observe_neigh(&fdb(NeighbourState::Stale, BRIDGE), BRIDGE, true),
            Some(Observation::FdbGone {
                mac: MAC_A,
                port: 7
            })
        );
        assert_eq!(
            observe_neigh(&fdb(NeighbourState::Permanent, BRIDGE), BRIDGE, false),
            None,
            "the port's own address"
        );
        assert_eq!(
            observe_neigh(&fdb(NeighbourState::Reachable, BRIDGE + 1), BRIDGE, false),
            None,
            "another bridge"
        );
    }
}
