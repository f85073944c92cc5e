//! Read-only views of a pinned data path, for the `counters`, `peers` and `endpoints` subcommands: they
//! open the maps under `--bpf-dir` directly, so they work whether or not an agent runs.

use std::{net::Ipv4Addr, path::Path};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use ipnet::Ipv4Net;
use overlay_common::{
    config::{CONFIG_INDEX, Config},
    counters::{Counter, Reason},
    endpoint::{Endpoint, EndpointKeyV4},
    route::{RemoteNode, RouteKeyV4},
};

use super::{DatapathError, names, pin::PinDir};

fn open(dir: &PinDir, name: &'static str) -> Result<MapData, DatapathError> {
    MapData::from_pin(dir.map(name)).map_err(|source| DatapathError::Map { map: name, source })
}

/// Every counter of the pinned data path, summed over the CPUs, in [`Reason::ALL`] order.
pub fn pinned_counters(dir: &Path) -> Result<Vec<(Reason, Counter)>, DatapathError> {
    let dir = existing(dir)?;
    sum_counters(&Map::PerCpuArray(open(&dir, names::COUNTERS)?))
}

/// Reads `COUNTERS` (loaded or pinned), summing each reason over the CPUs.
pub(super) fn sum_counters(map: &Map) -> Result<Vec<(Reason, Counter)>, DatapathError> {
    let err = |source| DatapathError::Map {
        map: names::COUNTERS,
        source,
    };
    let array = PerCpuArray::<_, Counter>::try_from(map).map_err(err)?;
    Reason::ALL
        .iter()
        .map(|&reason| {
            let per_cpu = array.get(&reason.index(), 0).map_err(err)?;
            Ok((
                reason,
                per_cpu
                    .iter()
                    .fold(Counter::default(), |sum, c| sum.add(*c)),
            ))
        })
        .collect()
}

/// The remote subnets the pinned data path routes, with their node's PublicIP and VtepMAC.
pub fn pinned_peers(dir: &Path) -> Result<Vec<(Ipv4Net, RemoteNode)>, DatapathError> {
    let dir = existing(dir)?;
    let map = Map::LpmTrie(open(&dir, names::ROUTE_V4)?);
    let trie = LpmTrie::<_, RouteKeyV4, RemoteNode>::try_from(&map).map_err(|source| {
        DatapathError::Map {
            map: names::ROUTE_V4,
            source,
        }
    })?;
    let mut peers = Vec::new();
    for entry in &trie {
        let (key, node) = entry.map_err(|source| DatapathError::Map {
            map: names::ROUTE_V4,
            source,
        })?;
        let len = u8::try_from(key.prefix_len()).unwrap_or(u8::MAX);
        let subnet = Ipv4Net::new(Ipv4Addr::from(key.data()), len).map_err(|_| {
            DatapathError::InvalidConfig(format!("bad ROUTE_V4 key {:?}/{len}", key.data()))
        })?;
        peers.push((subnet, node));
    }
    peers.sort_by_key(|(subnet, _)| *subnet);
    Ok(peers)
}

/// The local pods the pinned data path delivers to directly, by address.
pub fn pinned_endpoints(dir: &Path) -> Result<Vec<(Ipv4Addr, Endpoint)>, DatapathError> {
    let dir = existing(dir)?;
    let map = Map::HashMap(open(&dir, names::ENDPOINT_V4)?);
    let err = |source| DatapathError::Map {
        map: names::ENDPOINT_V4,
        source,
    };
    let hash = HashMap::<_, EndpointKeyV4, Endpoint>::try_from(&map).map_err(err)?;
    let mut endpoints = hash
        .iter()
        .map(|entry| entry.map(|(k, v)| (Ipv4Addr::from(k), v)).map_err(err))
        .collect::<Result<Vec<_>, _>>()?;
    endpoints.sort_by_key(|(addr, _)| *addr);
    Ok(endpoints)
}

/// The routing generation in the pinned `CONFIG`: the agent renews it at every route, rule,
/// address or link event and once a second (`Datapath::routing_changed`); 0 before the first.
pub fn pinned_route_gen(dir: &Path) -> Result<u32, DatapathError> {
    let dir = existing(dir)?;
    let map = Map::Array(open(&dir, names::CONFIG)?);
    let err = |source| DatapathError::Map {
        map: names::CONFIG,
        source,
    };
    let array = Array::<_, Config>::try_from(&map).map_err(err)?;
    Ok(array.get(&CONFIG_INDEX, 0).map_err(err)?.route_gen)
}

fn existing(dir: &Path) -> Result<PinDir, DatapathError> {
    PinDir::existing(dir).ok_or_else(|| {
        DatapathError::InvalidConfig(format!(
            "no pinned data path under {} (is --bpf-dir right, and did an agent run here?)",
            dir.display()
        ))
    })
}
