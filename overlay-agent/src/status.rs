//! `overlay-agent status`, and the JSON forms (`-o json`) of `counters`, `peers` and `nat`.
//!
//! `status` puts together what an operator asks first: the agent's own view from its
//! `--status-file` (lease and expiry, etcd reachability, readiness and why not), and the
//! kernel's view, asked directly: the interfaces with the programs attached to them (tcx
//! queries), the peers in the pinned route map with their delivery mode, and NAT pressure. It
//! works while the agent is down (then it says so), since the data path outlives the agent.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use overlay_common::counters::Reason;
use serde::Serialize;

use crate::{
    datapath::{
        foreign::our_program, nat::pinned_nat_flows, pinned_counters, pinned_peers,
        pinned_route_gen,
    },
    netdev::{GRO_DEVICE, HOST_DEVICE},
    subnet::Mac,
    telemetry::AgentStatus,
};

/// A status file older than this means the agent is not running (it rewrites it every second).
const STALE_AFTER: Duration = Duration::from_secs(5);

/// One program the kernel reports on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgramStatus {
    pub name: String,
    /// `tcx_ingress` or `tcx_egress`.
    pub attach: &'static str,
    pub id: u32,
    /// One of the agent's programs.
    pub ours: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    /// `underlay`, `host` (ovl0), `bridge`, or `other` (programs of ours found elsewhere).
    pub role: &'static str,
    pub programs: Vec<ProgramStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub subnet: String,
    pub public_ip: String,
    /// `vxlan` or `direct`.
    pub mode: &'static str,
    pub vtep_mac: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NatStatus {
    /// Assured flows (`SNAT_V4_CT`): the table whose filling evicts live connections.
    pub entries: usize,
    pub capacity: u32,
    pub used_percent: f64,
    /// Flows not assured yet (`SNAT_V4_CT_NEW`), and that table's capacity.
    pub unassured_entries: usize,
    pub unassured_capacity: u32,
    pub exhausted_drops: u64,
}

/// Everything `status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// The agent's process is alive and its status file fresh.
    pub agent_running: bool,
    pub status_file: String,
    /// What the agent last wrote; `None` when there is no status file.
    pub agent: Option<AgentStatus>,
    /// Maps pinned under --bpf-dir (a data path exists on this node).
    pub pinned: bool,
    pub interfaces: Vec<InterfaceStatus>,
    pub bridge: Option<String>,
    pub peers: Vec<PeerStatus>,
    /// Delivery modes in use: peers per mode.
    pub modes: BTreeMap<&'static str, usize>,
    pub nat: Option<NatStatus>,
    /// The routing generation of the programs' next-hop cache, from the pinned `CONFIG`: it
    /// grows at every route, rule, address or link event and each second while an agent runs.
    pub routing_generation: Option<u32>,
}

/// The programs the kernel has attached to `iface` (tcx ingress, then egress).
pub fn attached_programs(iface: &str) -> Result<Vec<ProgramStatus>> {
    let mut out = Vec::new();
    for (direction, attach) in [
        (TcAttachType::Ingress, "tcx_ingress"),
        (TcAttachType::Egress, "tcx_egress"),
    ] {
        let (_, programs) = SchedClassifier::query_tcx(iface, direction)
            .with_context(|| format!("asking the kernel for the programs on {iface}"))?;
        for p in programs {
            let kernel_name = p.name_as_str().unwrap_or_default();
            // The kernel keeps 15 characters of a name (`underlay_ingres`): ours by prefix.
            let ours = our_program(kernel_name);
            out.push(ProgramStatus {
                ours: ours.is_some(),
                name: ours.map_or_else(|| kernel_name.to_owned(), |full| (*full).to_owned()),
                attach,
                id: p.id(),
            });
        }
    }
    Ok(out)
}

/// Collects the node's status.
pub fn collect(bpf_dir: &Path, status_file: &Path) -> NodeStatus {
    let agent: Option<AgentStatus> = std::fs::read(status_file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let agent_running = agent.as_ref().is_some_and(|a| {
        Path::new(&format!("/proc/{}", a.pid)).exists()
            && now - a.updated_at_unix < STALE_AFTER.as_secs_f64()
    });

    let mut roles: Vec<(String, &'static str)> = Vec::new();
    if let Some(a) = &agent {
        if let Some(i) = &a.external_interface {
            roles.push((i.clone(), "underlay"));
        }
        roles.push((
            a.host_device.clone().unwrap_or(HOST_DEVICE.to_owned()),
            "host",
        ));
        if let Some(b) = &a.bridge {
            roles.push((b.clone(), "bridge"));
        }
        // Listed below only if it exists (not with host-gw).
        roles.push((GRO_DEVICE.to_owned(), "gro"));
    }
    let mut interfaces = Vec::new();
    for (index, name) in interface_list() {
        let programs = attached_programs(&name).unwrap_or_default();
        let role = roles.iter().find(|(n, _)| *n == name).map(|(_, r)| *r);
        if role.is_some() || programs.iter().any(|p| p.ours) {
            interfaces.push(InterfaceStatus {
                role: role.unwrap_or("other"),
                name,
                ifindex: index,
                programs,
            });
        }
    }

    let peers: Vec<PeerStatus> = pinned_peers(bpf_dir)
        .unwrap_or_default()
        .into_iter()
        .map(|(subnet, node)| PeerStatus {
            subnet: subnet.to_string(),
            public_ip: node.public_ip().to_string(),
            mode: if node.is_direct() { "direct" } else { "vxlan" },
            vtep_mac: (!node.is_direct()).then(|| Mac::from(node.vtep_mac).to_string()),
        })
        .collect();
    let mut modes = BTreeMap::new();
    for p in &peers {
        *modes.entry(p.mode).or_insert(0) += 1;
    }
    let exhausted = pinned_counters(bpf_dir).ok().and_then(|c| {
        c.into_iter()
            .find(|(r, _)| *r == Reason::DropNatExhausted)
            .map(|(_, c)| c.packets)
    });
    let nat = pinned_nat_flows(bpf_dir).ok().map(|table| {
        let assured = table.assured();
        NatStatus {
            entries: assured,
            capacity: table.capacity,
            used_percent: 100.0 * assured as f64 / f64::from(table.capacity.max(1)),
            unassured_entries: table.unassured(),
            unassured_capacity: table.unassured_capacity,
            exhausted_drops: exhausted.unwrap_or(0),
        }
    });
    NodeStatus {
        agent_running,
        status_file: status_file.display().to_string(),
        bridge: agent.as_ref().and_then(|a| a.bridge.clone()),
        agent,
        pinned: bpf_dir.join("maps").is_dir(),
        interfaces,
        peers,
        modes,
        nat,
        routing_generation: pinned_route_gen(bpf_dir).ok(),
    }
}

/// Every interface of this network namespace: (index, name).
fn interface_list() -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = nix::net::if_::if_nameindex()
        .map(|list| {
            list.iter()
                .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// `overlay-agent status`.
pub fn print_status(bpf_dir: &Path, status_file: &Path, json: bool) -> Result<()> {
    let s = collect(bpf_dir, status_file);
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    match &s.agent {
        Some(a) => {
            println!(
                "agent:      {} (pid {}, version {}, eBPF object {})",
                if s.agent_running {
                    "running"
                } else {
                    "NOT RUNNING (stale status file)"
                },
                a.pid,
                a.version,
                &a.object_sha256[..a.object_sha256.len().min(12)]
            );
            match &a.not_ready_reason {
                _ if !s.agent_running => println!("ready:      NO: the agent is not running"),
                None => println!("ready:      yes"),
                Some(why) => println!("ready:      NO: {why}"),
            }
            if let Some(l) = &a.lease {
                let expiry = l.expires_at_unix.map_or_else(
                    || "never (reservation)".to_owned(),
                    |t| format!("in {:.0} s", t - now),
                );
                println!("lease:      {} (expires {expiry})", l.subnet);
            }
            println!(
                "backend:    {} network {}",
                a.backend.as_deref().unwrap_or("-"),
                a.network.as_deref().unwrap_or("-")
            );
            // They differ with `--public-ip` (a node behind NAT): VXLAN leaves from the
            // interface's address and is accepted to both.
            println!(
                "underlay:   {} address {} PublicIP {}",
                a.external_interface.as_deref().unwrap_or("-"),
                a.interface_addr.as_deref().unwrap_or("-"),
                a.public_ip.as_deref().unwrap_or("-")
            );
            let etcd = if a.etcd.reachable {
                "reachable".to_owned()
            } else {
                format!(
                    "UNREACHABLE for {:.0} s: {}",
                    a.etcd.unreachable_for_secs.unwrap_or_default(),
                    a.etcd.last_error.as_deref().unwrap_or("-")
                )
            };
            println!(
                "etcd:       {etcd} ({}; {} watch resyncs)",
                a.etcd.endpoints.join(","),
                a.etcd.watch_resyncs
            );
            println!("repairs:    {}", a.repairs);
            println!("forward:    {}", a.forward.as_deref().unwrap_or("-"));
        }
        None => println!("agent:      no status file at {}", s.status_file),
    }
    match (s.pinned, s.routing_generation) {
        (true, Some(generation)) => println!("pinned:     yes (routing generation {generation})"),
        (pinned, _) => println!("pinned:     {}", if pinned { "yes" } else { "no" }),
    }
    for i in &s.interfaces {
        let progs: Vec<String> = i
            .programs
            .iter()
            .map(|p| format!("{} ({}, id {})", p.name, p.attach, p.id))
            .collect();
        println!(
            "interface:  {} [{}] index {}: {}",
            i.name,
            i.role,
            i.ifindex,
            if progs.is_empty() {
                "no programs".to_owned()
            } else {
                progs.join(", ")
            }
        );
    }
    println!("bridge:     {}", s.bridge.as_deref().unwrap_or("none"));
    let modes: Vec<String> = s.modes.iter().map(|(m, n)| format!("{m} {n}")).collect();
    println!(
        "peers:      {} ({})",
        s.peers.len(),
        if modes.is_empty() {
            "none".to_owned()
        } else {
            modes.join(", ")
        }
    );
    for p in &s.peers {
        println!(
            "  {} via {} {}{}",
            p.subnet,
            p.public_ip,
            p.mode,
            p.vtep_mac
                .as_deref()
                .map(|m| format!(" {m}"))
                .unwrap_or_default()
        );
    }
    if let Some(n) = &s.nat {
        println!(
            "nat:        {} of {} entries ({:.1} %), {} of {} not assured yet, {} drops for \
             want of a port",
            n.entries,
            n.capacity,
            n.used_percent,
            n.unassured_entries,
            n.unassured_capacity,
            n.exhausted_drops
        );
    }
    Ok(())
}

/// `counters -o json`: `[{"reason", "drop", "packets", "bytes"}]`.
pub fn print_counters_json(bpf_dir: &Path) -> Result<()> {
    let rows: Vec<serde_json::Value> = pinned_counters(bpf_dir)?
        .into_iter()
        .map(|(r, c)| {
            serde_json::json!({
                "reason": r.name(), "drop": r.is_drop(), "packets": c.packets, "bytes": c.bytes,
            })
        })
        .collect();
    println!("{}", serde_json::to_string_pretty(&rows)?);
    Ok(())
}

/// `peers -o json`: `[{"subnet", "public_ip", "mode", "vtep_mac"}]`.
pub fn print_peers_json(bpf_dir: &Path) -> Result<()> {
    let rows: Vec<PeerStatus> = pinned_peers(bpf_dir)?
        .into_iter()
        .map(|(subnet, node)| PeerStatus {
            subnet: subnet.to_string(),
            public_ip: node.public_ip().to_string(),
            mode: if node.is_direct() { "direct" } else { "vxlan" },
            vtep_mac: (!node.is_direct()).then(|| Mac::from(node.vtep_mac).to_string()),
        })
        .collect();
    println!("{}", serde_json::to_string_pretty(&rows)?);
    Ok(())
}

/// `nat -o json`: `{"entries", "capacity", "unassured_entries", "unassured_capacity",
/// "flows": [...]}` (entries and capacity: the assured flows' table).
pub fn print_nat_json(bpf_dir: &Path) -> Result<()> {
    let table = pinned_nat_flows(bpf_dir)?;
    let rows: Vec<serde_json::Value> = table
        .flows
        .iter()
        .map(|f| {
            serde_json::json!({
                "proto": f.proto, "pod": f.pod.to_string(), "remote": f.remote.to_string(),
                "translated": f.translated.to_string(), "state": f.state,
                "via_kernel": f.via_kernel, "to_cluster": f.to_cluster,
                "assured": f.assured, "idle_secs": f.idle.as_secs_f64(), "ack": f.ack,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "entries": table.assured(), "capacity": table.capacity,
        "unassured_entries": table.unassured(), "unassured_capacity": table.unassured_capacity,
        "flows": rows,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
