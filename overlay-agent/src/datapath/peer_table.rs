//! Bookkeeping of the peer maps (`ROUTE_V4`, `NODE_V4`) as a pure state machine: [`PeerTable`]
//! mirrors what the maps hold and turns "subnet S is now at node N" / "subnet S is gone" into the
//! map writes that get the maps there, so the logic is tested without root.
//!
//! Every [`MapOp`] writes an absolute value (an entry, or a node's full reference count), never
//! a delta: if applying a batch fails half-way, the mirror is left as it was and the next change
//! for that subnet rewrites the same values, so maps and mirror converge.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::Ipv4Net;
use overlay_common::route::{MemberNode, RemoteNode};

/// One write to the peer maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// `ROUTE_V4[subnet] = node`.
    SetRoute { subnet: Ipv4Net, node: RemoteNode },
    /// Delete `ROUTE_V4[subnet]`.
    DeleteRoute { subnet: Ipv4Net },
    /// `NODE_V4[ip] = member` (member.routes ≥ 1).
    SetNode { ip: Ipv4Addr, member: MemberNode },
    /// Delete `NODE_V4[ip]`.
    DeleteNode { ip: Ipv4Addr },
}

/// What the peer maps hold: each remote subnet's node, and per PublicIP how many subnets use it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerTable {
    routes: BTreeMap<Ipv4Net, RemoteNode>,
    nodes: BTreeMap<Ipv4Addr, u32>,
}

impl PeerTable {
    /// Records that `subnet` is reached through `node`; returns the map writes, in an order
    /// that never leaves a route to a node decapsulation would not accept (node before route
    /// on the way in, route before node on the way out).
    pub fn upsert(&mut self, subnet: Ipv4Net, node: RemoteNode) -> Vec<MapOp> {
        let subnet = subnet.trunc();
        let previous = self.routes.insert(subnet, node);
        if previous == Some(node) {
            return Vec::new();
        }
        let new_ip = node.public_ip();
        let mut ops = Vec::new();
        let old_ip = previous.map(|p| p.public_ip());
        if old_ip != Some(new_ip) {
            ops.push(self.add_ref(new_ip));
        }
        ops.push(MapOp::SetRoute { subnet, node });
        if let Some(old_ip) = old_ip.filter(|&ip| ip != new_ip) {
            ops.push(self.drop_ref(old_ip));
        }
        ops
    }

    /// Forgets `subnet`; returns the map writes (none if it was unknown).
    pub fn remove(&mut self, subnet: Ipv4Net) -> Vec<MapOp> {
        let subnet = subnet.trunc();
        let Some(previous) = self.routes.remove(&subnet) else {
            return Vec::new();
        };
        vec![
            MapOp::DeleteRoute { subnet },
            self.drop_ref(previous.public_ip()),
        ]
    }

    /// The remote subnets held, in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        self.routes.keys().copied()
    }

    /// The node `subnet` is routed to, if any.
    #[must_use]
    pub fn route(&self, subnet: Ipv4Net) -> Option<RemoteNode> {
        self.routes.get(&subnet.trunc()).copied()
    }

    /// How many subnets use the PublicIP `ip` (0 = not a member).
    #[must_use]
    pub fn node_refs(&self, ip: Ipv4Addr) -> u32 {
        self.nodes.get(&ip).copied().unwrap_or(0)
    }

    /// Number of routed subnets.
    #[must_use]
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    fn add_ref(&mut self, ip: Ipv4Addr) -> MapOp {
        let refs = self.nodes.entry(ip).or_default();
        *refs += 1;
        MapOp::SetNode {
            ip,
            member: MemberNode { routes: *refs },
        }
    }

    fn drop_ref(&mut self, ip: Ipv4Addr) -> MapOp {
        match self.nodes.get_mut(&ip) {
            Some(refs) if *refs > 1 => {
                *refs -= 1;
                MapOp::SetNode {
                    ip,
                    member: MemberNode { routes: *refs },
                }
            }
            _ => {
                self.nodes.remove(&ip);
                MapOp::DeleteNode { ip }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn node(last: u8) -> RemoteNode {
        RemoteNode::vxlan([198, 18, 0, last], [0x0e, 0, 0, 0, 0, last])
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, last)
    }

    fn set_node(last: u8, routes: u32) -> MapOp {
        MapOp::SetNode {
            ip: ip(last),
            member: MemberNode { routes },
        }
    }

    #[test]
    fn add_change_and_remove_a_peer() {
        let mut t = PeerTable::default();
        let s = net("172.17.2.0/24");
        assert_eq!(
            t.upsert(s, node(2)),
            [
                set_node(2, 1),
                MapOp::SetRoute {
                    subnet: s,
                    node: node(2)
                }
            ]
        );
        assert_eq!(t.upsert(s, node(2)), [], "unchanged: nothing to write");

        // Same node, new VtepMAC: only the route changes.
        let mut new_mac = node(2);
        new_mac.vtep_mac[5] = 0x22;
        assert_eq!(
            t.upsert(s, new_mac),
            [MapOp::SetRoute {
                subnet: s,
                node: new_mac
            }]
        );
        assert_eq!(t.node_refs(ip(2)), 1);

        // The subnet moves to another node: new member first, old one last.
        assert_eq!(
            t.upsert(s, node(3)),
            [
                set_node(3, 1),
                MapOp::SetRoute {
                    subnet: s,
                    node: node(3)
                },
                MapOp::DeleteNode { ip: ip(2) }
            ]
        );
        assert_eq!(
            t.remove(s),
            [
                MapOp::DeleteRoute { subnet: s },
                MapOp::DeleteNode { ip: ip(3) }
            ]
        );
        assert_eq!(t.remove(s), [], "already gone");
        assert!(t.is_empty());
        assert_eq!(t, PeerTable::default());
    }

    #[test]
    fn nodes_are_reference_counted_across_subnets() {
        let mut t = PeerTable::default();
        let (s1, s2) = (net("172.17.2.0/24"), net("172.17.5.0/24"));
        t.upsert(s1, node(2));
        assert_eq!(
            t.upsert(s2, node(2)),
            [
                set_node(2, 2),
                MapOp::SetRoute {
                    subnet: s2,
                    node: node(2)
                }
            ]
        );
        assert_eq!(
            t.remove(s1),
            [MapOp::DeleteRoute { subnet: s1 }, set_node(2, 1)]
        );
        assert_eq!(t.node_refs(ip(2)), 1);
        assert_eq!(t.route(s2), Some(node(2)));
        assert_eq!(
            t.remove(s2),
            [
                MapOp::DeleteRoute { subnet: s2 },
                MapOp::DeleteNode { ip: ip(2) }
            ]
        );
        assert_eq!(t.node_refs(ip(2)), 0);
    }

    #[test]
    fn subnets_are_normalised() {
        let mut t = PeerTable::default();
        let ops = t.upsert(net("172.17.2.1/24"), node(2));
        assert!(ops.contains(&MapOp::SetRoute {
            subnet: net("172.17.2.0/24"),
            node: node(2)
        }));
        assert_eq!(t.route(net("172.17.2.0/24")), Some(node(2)));
        assert_eq!(t.remove(net("172.17.2.9/24")).len(), 2);
        assert_eq!(t.len(), 0);
    }
}
