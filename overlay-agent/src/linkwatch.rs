//! Netlink link events (RTNLGRP_LINK): the agent hears at once when a device is deleted or
//! (re-)created, so it re-attaches its programs and recreates `ovl0` within the second, not only
//! at the next restart (flannel's users lost `flannel.1` for good this way: flannel issues
//! #869, #877, #1348).
//!
//! The watcher only reports names; deciding what to repair is the daemon's (it checks every
//! attachment against the kernel, see `datapath::repair`). A detach that emits no link event
//! (`bpftool link detach`) is caught by the daemon's periodic check instead.

use futures_util::StreamExt as _;
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use rtnetlink::MulticastGroup;
use rtnetlink::packet_core::NetlinkPayload;
use tokio::{sync::mpsc, task::JoinHandle};

/// A device appeared, changed or went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    pub name: String,
    pub index: u32,
    pub removed: bool,
}

/// A running subscription; dropping it ends the watch.
pub struct LinkWatch {
    pub events: mpsc::Receiver<LinkEvent>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for LinkWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Subscribes to link events of the agent's network namespace.
pub fn subscribe() -> std::io::Result<LinkWatch> {
    let (connection, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
    let (tx, events) = mpsc::channel(256);
    let connection = tokio::spawn(connection);
    let forward = tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            let event = match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    link_event(&link, false)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                    link_event(&link, true)
                }
                _ => None,
            };
            // A full queue only means the daemon has checks pending already.
            if let Some(event) = event
                && let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(event)
            {
                return;
            }
        }
        tracing::warn!("netlink link events ended; repairs rely on the periodic check");
    });
    Ok(LinkWatch {
        events,
        tasks: [connection, forward],
    })
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
