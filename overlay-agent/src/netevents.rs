//! The agent's one netlink event source: a single subscription to the link, neighbour, IPv4
//! route, rule and address groups of its network namespace, feeding three consumers:
//! - the daemon's repairs ([`NetlinkEvents::links`]): it hears at once when a device is deleted
//!   or (re-)created, so it re-attaches its programs and recreates `ovl0` within the second,
//!   not only at the next restart (flannel's users lost `flannel.1` for good this way: flannel
//!   issues #869, #877, #1348). Only names are reported; deciding what to repair is the
//!   daemon's (see `datapath::repair`). A detach that emits no link event (`bpftool link
//!   detach`) is caught by the daemon's periodic check instead.
//! - the endpoint watcher (`endpoints`, [`NetlinkEvents::messages`]): every message, for the
//!   pods on the bridge, with the connection's [`Handle`] for its dumps.
//! - the next-hop cache of the programs ([`NetlinkEvents::routing`]): any route, rule, address
//!   or link change may move the next hop towards a peer, so the daemon bumps the routing
//!   generation in `CONFIG` (see `overlay_common::route::NextHopV4`). Changes coalesce: one
//!   pending signal stands for any number of them.
//!
//! Owned by the daemon; dropping it ends the subscription.

use futures_util::StreamExt as _;
use netlink_packet_core::NetlinkMessage;
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use rtnetlink::{Handle, MulticastGroup, packet_core::NetlinkPayload};
use tokio::{
    sync::{broadcast, mpsc},
    task::JoinHandle,
};

/// A device appeared, changed or went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    pub name: String,
    pub index: u32,
    pub removed: bool,
}

/// Room for a burst of messages before a slow endpoint watcher lags (it then dumps again).
const MESSAGE_QUEUE: usize = 1024;

/// The running subscription.
pub struct NetlinkEvents {
    /// Link events, for the daemon's repairs.
    pub links: mpsc::Receiver<LinkEvent>,
    /// Something that routing depends on changed (coalesced).
    pub routing: mpsc::Receiver<()>,
    messages: broadcast::Sender<NetlinkMessage<RouteNetlinkMessage>>,
    handle: Handle,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for NetlinkEvents {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl NetlinkEvents {
    /// Subscribes to the events of the agent's network namespace.
    pub fn subscribe() -> std::io::Result<Self> {
        let (connection, handle, mut incoming) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Neigh,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv4Rule,
            MulticastGroup::Ipv4Ifaddr,
        ])?;
        let (tx, links) = mpsc::channel(256);
        let (routing_tx, routing) = mpsc::channel(1);
        let (messages, _) = broadcast::channel(MESSAGE_QUEUE);
        let connection = tokio::spawn(connection);
        let fan_out = messages.clone();
        let forward = tokio::spawn(async move {
            while let Some((message, _)) = incoming.next().await {
                let event = match &message.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                        link_event(link, false)
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                        link_event(link, true)
                    }
                    _ => None,
                };
                if event.is_some() || changes_routing(&message.payload) {
                    // Full: a signal is pending already, which covers this change too.
                    let _ = routing_tx.try_send(());
                }
                // No endpoint watcher listening (none yet, or between restarts) is fine.
                let _ = fan_out.send(message);
                // A full queue only means the daemon has checks pending already.
                if let Some(event) = event
                    && let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(event)
                {
                    return;
                }
            }
            tracing::warn!("netlink events ended; repairs rely on the periodic check");
        });
        Ok(Self {
            links,
            routing,
            messages,
            handle,
            tasks: [connection, forward],
        })
    }

    /// Every message from now on, for one consumer.
    pub fn messages(&self) -> broadcast::Receiver<NetlinkMessage<RouteNetlinkMessage>> {
        self.messages.subscribe()
    }

    /// A handle on the same connection, for dumps.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }
}

/// Whether a message reports a change of IPv4 routes, rules or addresses.
fn changes_routing(payload: &NetlinkPayload<RouteNetlinkMessage>) -> bool {
    matches!(
        payload,
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewRoute(_)
                | RouteNetlinkMessage::DelRoute(_)
                | RouteNetlinkMessage::NewRule(_)
                | RouteNetlinkMessage::DelRule(_)
                | RouteNetlinkMessage::NewAddress(_)
                | RouteNetlinkMessage::DelAddress(_)
        )
    )
}

fn link_event(link: &LinkMessage, removed: bool) -> Option<LinkEvent> {
    let name = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })?;
    Some(LinkEvent {
        name,
        index: link.header.index,
        removed,
    })
}
