//! The overlay agent: a flanneld-compatible node daemon whose data path runs in eBPF.
//!
//! `cli` holds flanneld's flags, `datapath` loads and attaches the eBPF programs; the control
//! plane (network config, subnet leases, peer watch, subnet.env) lives in `config` and `subnet`.

pub mod cli;
pub mod datapath;
pub mod healthz;
pub mod iface;
pub mod config;
pub mod subnet;

mod json_ci;
