//! Types shared by the eBPF programs (`overlay-ebpf`) and the agent (`overlay-agent`).
//!
//! Everything here is `#[repr(C)]` and derives `bytemuck::{Pod, Zeroable}`, which rejects hidden
//! padding at compile time, so both sides agree on every byte of a map key or value. The agent
//! turns on the `user` feature, which adds `aya::Pod` so the types can be used in aya maps.
//!
//! One module per concept: `config` (the node's settings, `CONFIG`), `route` (remote subnets and
//! member nodes, `ROUTE_V4` / `NODE_V4`), `endpoint` (local pods, `ENDPOINT_V4`), `kernel_flow`
//! (flows the kernel forwarded for a pod, `KERNEL_FLOW_V4`), `counters` (`COUNTERS`), `nat`
//! (masquerade: `NAT_CONFIG`, `NAT_EXCLUDE_V4`, `SNAT_V4_CT`, `SNAT_V4_REV`), `events` (sampled
//! drop events, `DROP_EVENTS`), `wire` (VXLAN and protocol constants), `layout` (the
//! fingerprint of the pinned maps' layouts), `names` (the programs' and maps' names, checked
//! against the eBPF crate at compile time).
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod config;
pub mod counters;
pub mod endpoint;
pub mod events;
pub mod kernel_flow;
pub mod layout;
pub mod names;
pub mod nat;
pub mod route;
pub mod wire;
