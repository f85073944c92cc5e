//! The overlay agent: a flanneld-compatible node daemon whose data path runs in eBPF.
//!
//! - `cli`: flanneld's flags; `iface`: choosing the external interface as flanneld does.
//! The pipeline: `subnet` (etcd → the network config, leases, peer events, subnet.env) →
//! `backend` (vxlan, host-gw: events → routes, pure) → `datapath` (routes → BPF maps).
//! - `datapath`: loading the embedded eBPF object, attaching it, filling its maps;
//!   `netdev`: the host device `ovl0` and finding the pod bridge.
//! - `healthz`: `/healthz`, `/readyz` and `/metrics`; `daemon`: the node daemon tying these
//!   together.
//! - Operations: `compat` (the rest of flanneld's flags), `kernel` (feature check at start),
//!   `notify` (systemd's sd_notify), `telemetry` (runtime state, honest readiness, the status
//!   file), `metrics` (Prometheus), `status` and `monitor` (the inspection subcommands),
//!   `linkwatch` (netlink link events that trigger the data path's repair).

pub mod backend;
pub mod cli;
pub mod compat;
pub mod daemon;
pub mod datapath;
pub mod endpoints;
pub mod healthz;
pub mod iface;
pub mod kernel;
pub mod linkwatch;
pub mod metrics;
pub mod monitor;
pub mod netdev;
pub mod notify;
pub mod status;
pub mod subnet;
pub mod telemetry;

mod json_ci;
