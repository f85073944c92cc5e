//! The inspection subcommands that print the pinned data path (`overlay-agent counters`,
//! `peers`, `nat`, `endpoints`): the text format of what `inspect` reads. Called by `main`;
//! calls only `inspect` and `nat` of this module, never the running agent.

use std::path::Path;

use anyhow::Result;

use super::{nat::pinned_nat_flows, pinned_counters, pinned_endpoints, pinned_peers};
use crate::subnet::Mac;

/// `overlay-agent counters`: the pinned counters, one `<name> <packets> <bytes>` per line.
pub fn counters(bpf_dir: &Path) -> Result<()> {
    for (reason, c) in pinned_counters(bpf_dir)? {
        println!("{} {} {}", reason.name(), c.packets, c.bytes);
    }
    Ok(())
}

/// `overlay-agent nat`: the masqueraded flows, then `entries <n> capacity <max> unassured
/// <n> capacity <max>` (the assured flows' table, then the other; capacities as pinned, 0 for
/// a table an older agent's pins lack).
pub fn nat(bpf_dir: &Path) -> Result<()> {
    let table = pinned_nat_flows(bpf_dir)?;
    for flow in &table.flows {
        println!("{flow}");
    }
    println!(
        "entries {} capacity {} unassured {} capacity {}",
        table.assured(),
        table.capacity,
        table.unassured(),
        table.unassured_capacity
    );
    Ok(())
}

/// `overlay-agent endpoints`: the local pods delivered to directly, one
/// `<pod address> <host-side veth index> <pod MAC>` per line.
pub fn endpoints(bpf_dir: &Path) -> Result<()> {
    for (addr, ep) in pinned_endpoints(bpf_dir)? {
        println!("{addr} {} {}", ep.ifindex, Mac::from(ep.mac));
    }
    Ok(())
}

/// `overlay-agent peers`: the routed subnets, one `<subnet> <public IP> <VtepMAC>` per line
/// (`direct` in place of the VtepMAC for peers routed without encapsulation).
pub fn peers(bpf_dir: &Path) -> Result<()> {
    for (subnet, node) in pinned_peers(bpf_dir)? {
        if node.is_direct() {
            println!("{subnet} {} direct", node.public_ip());
        } else {
            println!("{subnet} {} {}", node.public_ip(), Mac::from(node.vtep_mac));
        }
    }
    Ok(())
}
