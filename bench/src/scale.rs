//! Peers that exist only as leases: fake subnets 172.16.16.0/24 onward (inside the cluster
//! network, away from the nodes' 172.16.1.0/24 and 172.16.2.0/24), each with a PublicIP in
//! 198.18.16.0 and up that no namespace holds, so nothing is ever sent to them.
//!
//! - E / EH: the leases are put in etcd, in flannel's record format, and the agents build their
//!   maps from them as from any lease; the bench waits until every node's `ROUTE_V4` has them.
//! - K / H: no flanneld runs here, so the kernel state flanneld would build for those leases is
//!   installed directly with `ip -batch` / `bridge -batch`: for K neigh + fdb + route per peer on
//!   `flannel.1`; for H a route `via <PublicIP> dev eth0 onlink` per peer (`onlink` because the
//!   fake PublicIPs are outside the nodes' /24; a real host-gw cluster of that size has them on
//!   its L2 segment, and the route lookup is the same).
//!
//! Propagation (E and EH): a new lease is put through etcd's JSON gateway and the time until
//! every node's pinned `ROUTE_V4` holds it is measured by polling the maps every 100 µs.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use ipnet::Ipv4Net;
use overlay_tests::cmd;

use crate::{PathId, etcd_http, maps::RouteMap, topo::PathTopo};

/// First fake subnet index (172.16.16.0/24).
const FIRST: u32 = 16;
/// Largest peer count (fakes + the real peer): the /12 holds 4096 /24s, the first 16 are kept
/// free, and propagation takes its leases above the scale levels.
pub const MAX_PEERS: u32 = 4000;
/// Fakes after the scale levels for propagation changes: each is deleted before the next, so
/// a few indexes are reused round-robin.
const PROPAGATION_BASE: u32 = MAX_PEERS;
const PROPAGATION_SLOTS: u32 = 40;

/// Fake peer `i`: (subnet, PublicIP, VtepMAC).
pub fn fake(i: u32) -> (Ipv4Net, Ipv4Addr, String) {
    let subnet = Ipv4Net::new(Ipv4Addr::from(0xac10_0000 + ((FIRST + i) << 8)), 24)
        .unwrap_or_else(|_| unreachable!());
    let ip = Ipv4Addr::new(
        198,
        18,
        u8::try_from(16 + i / 250).unwrap_or(u8::MAX),
        u8::try_from(1 + i % 250).unwrap_or(u8::MAX),
    );
    let [_, _, c, d] = ip.octets();
    let mac = format!(
        "0e:be:{:02x}:{:02x}:{c:02x}:{d:02x}",
        (i >> 8) & 0xff,
        i & 0xff
    );
    (subnet, ip, mac)
}

/// flannel's lease record for fake `i` under the path's backend.
fn lease(path: PathId, i: u32) -> (String, String) {
    let (subnet, ip, mac) = fake(i);
    let key = format!(
        "{}/subnets/{}-{}",
        overlay_tests::DEFAULT_ETCD_PREFIX,
        subnet.network(),
        subnet.prefix_len()
    );
    let value = if path == PathId::E {
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        )
    } else {
        format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"host-gw"}}"#)
    };
    (key, value)
}

/// Adds fakes `from..to` to the path (etcd or kernel) and waits until the data path has them.
pub fn add_peers(p: &PathTopo, from: u32, to: u32) -> Result<()> {
    if from >= to {
        return Ok(());
    }
    let cluster = p.cluster().context("D has no peers")?;
    match p.id {
        PathId::K | PathId::H => {
            let mut ip_batch = String::new();
            let mut fdb_batch = String::new();
            for i in from..to {
                let (subnet, ip, mac) = fake(i);
                if p.id == PathId::K {
                    let gw = subnet.network();
                    ip_batch += &format!(
                        "neigh replace {gw} lladdr {mac} dev flannel.1 nud permanent\n\
                         route replace {subnet} via {gw} dev flannel.1 onlink\n"
                    );
                    fdb_batch +=
                        &format!("fdb append {mac} dev flannel.1 dst {ip} self permanent\n");
                } else {
                    ip_batch += &format!("route replace {subnet} via {ip} dev eth0 onlink\n");
                }
            }
            for node in cluster.nodes() {
                let ns = node.ns().name();
                let limit = Duration::from_secs(120);
                let c = cmd::command("ip", &["-n", ns, "-batch", "-"]);
                cmd::check_with(c, Some(ip_batch.as_bytes()), limit)
                    .with_context(|| format!("ip -batch on {ns}"))?;
                if !fdb_batch.is_empty() {
                    let c = cmd::command("ip", &["netns", "exec", ns, "bridge", "-batch", "-"]);
                    cmd::check_with(c, Some(fdb_batch.as_bytes()), limit)
                        .with_context(|| format!("bridge -batch on {ns}"))?;
                }
            }
            Ok(())
        }
        PathId::E | PathId::EH => {
            let etcd = p.etcd_addr().context("no etcd")?;
            cluster.underlay().in_netns(|| {
                for i in from..to {
                    let (key, value) = lease(p.id, i);
                    etcd_http::put(etcd, &key, &value)?;
                }
                Ok(())
            })?;
            let maps = open_maps(p)?;
            let wait = Duration::from_secs(60 + u64::from(to - from) / 20);
            crate::topo::wait_for(wait, || {
                for map in &maps {
                    // The last lease put is the last one an agent handles.
                    for i in [to - 1, from] {
                        if !map.has(fake(i).0)? {
                            return Ok(false);
                        }
                    }
                }
                Ok(true)
            })
            .context("the agents did not install the fake peers")?;
            for map in &maps {
                for i in from..to {
                    ensure!(map.has(fake(i).0)?, "fake peer {} missing", fake(i).0);
                }
            }
            Ok(())
        }
        PathId::D | PathId::R => unreachable!("{} has no peers to scale", p.id.name()),
    }
}

fn open_maps(p: &PathTopo) -> Result<Vec<RouteMap>> {
    p.bpf_dirs().iter().map(|d| RouteMap::open(d)).collect()
}

/// Times `changes` new leases from the put to the last node's data path (milliseconds), each
/// deleted again (and its removal awaited) before the next.
pub fn propagation(p: &PathTopo, changes: u32) -> Result<Vec<f64>> {
    let cluster = p.cluster().context("D has no nodes")?;
    let etcd: SocketAddrV4 = p.etcd_addr().context("no etcd")?;
    let maps = open_maps(p)?;
    let limit = Duration::from_secs(10);
    cluster.underlay().in_netns(|| {
        let mut times = Vec::new();
        for j in 0..changes {
            let i = PROPAGATION_BASE + j % PROPAGATION_SLOTS;
            let (key, value) = lease(p.id, i);
            let subnet = fake(i).0;
            let start = Instant::now();
            etcd_http::put(etcd, &key, &value)?;
            let mut pending: Vec<&RouteMap> = maps.iter().collect();
            while !pending.is_empty() {
                let mut still = Vec::new();
                for m in pending {
                    if !m.has(subnet)? {
                        still.push(m);
                    }
                }
                pending = still;
                ensure!(
                    start.elapsed() < limit,
                    "lease {key} not in every node's data path within {limit:?}"
                );
                if !pending.is_empty() {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            times.push(start.elapsed().as_secs_f64() * 1e3);
            etcd_http::delete(etcd, &key)?;
            let gone = Instant::now();
            while maps.iter().any(|m| m.has(subnet).unwrap_or(true)) {
                ensure!(
                    gone.elapsed() < limit,
                    "deleted lease {key} still in a data path after {limit:?}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(times)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fakes_are_distinct_and_in_range() {
        let network: Ipv4Net = crate::topo::NETWORK.parse().unwrap();
        let mut subnets = std::collections::HashSet::new();
        let mut ips = std::collections::HashSet::new();
        for i in 0..PROPAGATION_BASE + PROPAGATION_SLOTS {
            let (s, ip, _) = fake(i);
            assert!(network.contains(&s), "{s}");
            assert!(!s.contains(&crate::topo::pod_ip(0)) && !s.contains(&crate::topo::pod_ip(1)));
            assert!(subnets.insert(s) && ips.insert(ip), "fake {i} repeats");
            assert!(ip.octets()[2] >= 16, "{ip} could be a node's");
        }
        assert_eq!(fake(0).0.to_string(), "172.16.16.0/24");
    }
}
