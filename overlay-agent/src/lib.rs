//! The overlay agent: a flanneld-compatible node daemon whose data path runs in eBPF.
//!
//! - `cli`: flanneld's flags; `iface`: choosing the external interface as flanneld does.
//! - `config`: the network config at `<prefix>/config`; `subnet`: leases, peers, subnet.env.
//! - `datapath`: loading the embedded eBPF object, attaching it, filling its maps;
//!   `netdev`: the host device `ovl0` and finding the pod bridge.
//! - `healthz`: `/healthz` and `/readyz`; `daemon`: the node daemon tying these together.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod endpoints;
pub mod healthz;
pub mod iface;
pub mod netdev;
pub mod subnet;

mod json_ci;
