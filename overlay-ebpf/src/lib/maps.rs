//! The node's configuration and peer maps (layouts and byte orders in `overlay_common::{config,
//! route}`), with the lookups the programs use. The agent is the only writer.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, lpm_trie::Key},
};
use overlay_common::{
    config::{CONFIG_INDEX, CONFIG_LEN, Config},
    route::{
        MemberNode, NEXT_HOP_V4_CAPACITY, NODE_V4_CAPACITY, NextHopV4, NodeKeyV4,
        ROUTE_V4_CAPACITY, RemoteNode, RouteKeyV4,
    },
};

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(CONFIG_LEN, 0);
named!(CONFIG, overlay_common::names::CONFIG);

#[map]
static ROUTE_V4: LpmTrie<RouteKeyV4, RemoteNode> = LpmTrie::with_max_entries(ROUTE_V4_CAPACITY, 0);
named!(ROUTE_V4, overlay_common::names::ROUTE_V4);

// Not preallocated: a preallocated 64 Ki-entry hash would pin megabytes per agent whatever the
// cluster size, and only the agent inserts (never the data path), so allocation is off the fast
// path.
#[map]
static NODE_V4: HashMap<NodeKeyV4, MemberNode> =
    HashMap::with_max_entries(NODE_V4_CAPACITY, BPF_F_NO_PREALLOC);
named!(NODE_V4, overlay_common::names::NODE_V4);

// The one map the programs write besides counters and flows: a cache, never pinned (a new
// agent starts with an empty one), each entry replaced whole.
#[map]
static NEXT_HOP_V4: LruHashMap<[u8; 4], NextHopV4> =
    LruHashMap::with_max_entries(NEXT_HOP_V4_CAPACITY, 0);
named!(NEXT_HOP_V4, overlay_common::names::NEXT_HOP_V4);

/// The next hop cached for `peer` (a PublicIP, network order) under routing generation
/// `route_gen`, if any.
#[inline(always)]
pub fn cached_next_hop(peer: [u8; 4], route_gen: u32) -> Option<[u8; 4]> {
    // SAFETY: the value is read at once, by copy; an update replaces the element, not its bytes.
    let entry = unsafe { NEXT_HOP_V4.get(&peer) }?;
    (entry.route_gen == route_gen).then_some(entry.next_hop)
}

/// Caches `next_hop` for `peer` under `route_gen` (a full map only evicts its least recently
/// used entry; a failed update just means the next packet looks it up again).
#[inline(always)]
pub fn cache_next_hop(peer: [u8; 4], route_gen: u32, next_hop: [u8; 4]) {
    let _ = NEXT_HOP_V4.insert(
        &peer,
        &NextHopV4 {
            route_gen,
            next_hop,
        },
        0,
    );
}

/// The routing generation (`Config::route_gen`; 0: cache nothing), for a next-hop cache.
/// Read once per packet, before the FIB lookup whose answer it files: the agent bumps it after
/// the kernel changed a route, so a lookup made after reading a generation sees routing at least
/// as new as it, while reading it again for the insert could file an older lookup under a newer
/// generation. Volatile, so the compiler does not read it twice.
#[inline(always)]
pub fn route_gen(cfg: &Config) -> u32 {
    // SAFETY: a field of the CONFIG value, which stays mapped while the program runs.
    unsafe { core::ptr::read_volatile(&raw const cfg.route_gen) }
}

/// The node's configuration, once the agent has written a complete one.
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(CONFIG_INDEX).filter(|cfg| cfg.is_ready())
}

/// The peer whose subnet covers `daddr` (network order), if any.
#[inline(always)]
pub fn route_v4(daddr: [u8; 4]) -> Option<RemoteNode> {
    ROUTE_V4.get(Key::new(32, daddr)).copied()
}

/// Whether `saddr` (network order) is a member node's PublicIP.
#[inline(always)]
pub fn is_member(saddr: [u8; 4]) -> bool {
    NODE_V4.get_ptr(saddr).is_some()
}

/// Whether `addr` lies in `net`/`mask` (all network order).
#[inline(always)]
pub fn in_subnet(addr: [u8; 4], net: [u8; 4], mask: [u8; 4]) -> bool {
    // The byte order of the u32 does not matter for a bitwise AND, as long as all three agree.
    u32::from_ne_bytes(addr) & u32::from_ne_bytes(mask) == u32::from_ne_bytes(net)
}
