//! What the layout fingerprint of the pinned state covers besides the maps' own definitions.
//!
//! The agent derives the layout version of its pinned maps from the eBPF object itself (type,
//! key and value size, capacity and flags of every pinned map, see the agent's
//! `datapath::layout`), so a map added or changed anywhere is covered without a constant to
//! bump. A map's value size does not show a reordering of equally sized fields, though, and the
//! single-entry settings maps are read field by field; their field layouts are listed here.
//! Each list must cover its struct exactly (checked at compile time), so a new field cannot be
//! forgotten.

use crate::{config::Config, names, nat::NatConfig};

/// One field: name, offset, size.
pub type Field = (&'static str, usize, usize);

/// The size of the field `get` returns (for the `fields!` macro; never called).
#[doc(hidden)]
pub const fn field_size<T, F>(_get: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

macro_rules! fields {
    ($t:ty; $($f:ident),* $(,)?) => {
        &[$((stringify!($f), core::mem::offset_of!($t, $f), field_size(|x: &$t| &x.$f))),*]
    };
}

/// `CONFIG`'s value, field by field.
pub const CONFIG_FIELDS: &[Field] = fields!(Config;
    flags, vni, underlay_ifindex, bridge_ifindex, host_ifindex, local_ip, public_ip, subnet,
    subnet_mask, network, network_mask, vtep_mac, host_mac, port, src_port_min, src_port_max,
    bridge_mac, xdp_cookie, route_gen);

/// `NAT_CONFIG`'s value, field by field.
pub const NAT_CONFIG_FIELDS: &[Field] = fields!(NatConfig;
    flags, port_min, port_max, tcp_established, tcp_transient, udp, udp_stream, icmp,
    tcp_close);

/// The settings structs whose field layout belongs to the fingerprint, by map name.
pub const SETTINGS_LAYOUTS: &[(&str, &[Field])] = &[
    (names::CONFIG, CONFIG_FIELDS),
    (names::NAT_CONFIG, NAT_CONFIG_FIELDS),
];

const fn covers(fields: &[Field], size: usize) -> bool {
    let mut sum = 0;
    let mut i = 0;
    while i < fields.len() {
        sum += fields[i].2;
        i += 1;
    }
    sum == size
}
const _: () = assert!(
    covers(CONFIG_FIELDS, size_of::<Config>()),
    "CONFIG_FIELDS must list every field of Config"
);
const _: () = assert!(
    covers(NAT_CONFIG_FIELDS, size_of::<NatConfig>()),
    "NAT_CONFIG_FIELDS must list every field of NatConfig"
);
