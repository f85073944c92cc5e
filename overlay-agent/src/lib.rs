//! The overlay agent: a flanneld-compatible node daemon whose data path runs in eBPF.
//!
//! The pipeline of a peer, from etcd to a BPF map, reads from the folder names:
//! - `subnet`: etcd to the network config (`subnet::config`), this node's lease and the other
//!   nodes' leases as peer events (`subnet::watch`), `subnet.env`. Calls only the registry
//!   (etcd) and `json_ci`.
//! - `backend` (`vxlan`, `host_gw`): config and peer events to lease attributes, tunnel
//!   settings and route changes; pure functions, no I/O.
//! - `datapath`: routes and settings to the eBPF object's maps, attachments, pinning, the
//!   inspection of pinned state (`inspect`, `print`). Calls aya and the kernel, never etcd.
//!
//! Around it: `daemon` (orchestration only: start-up order, tasks, the main loop; `node`
//! applies decisions to the data path), `cli` (flanneld's flags), `iface` (choosing the
//! external interface), `netdev` (the host device `ovl0`, the pod bridge, netlink queries),
//! `endpoints` (local pods for delivery straight into them), `netevents` (the one netlink
//! subscription: link events for repairs, every message for `endpoints`), `forward_rules`
//! (flanneld's FORWARD accepts where the policy drops), `healthz` (`/healthz`, `/readyz`,
//! `/metrics`).
//! Operations: `compat` (the rest of flanneld's flags), `kernel` (feature check at start),
//! `notify` (systemd's sd_notify), `telemetry` (runtime state, readiness, the status file),
//! `metrics` (Prometheus), `status` and `monitor` (inspection subcommands).

pub mod backend;
pub mod cli;
pub mod compat;
pub mod daemon;
pub mod datapath;
pub mod endpoints;
pub mod forward_rules;
pub mod healthz;
pub mod iface;
pub mod kernel;
pub mod metrics;
pub mod monitor;
pub mod netdev;
pub mod netevents;
pub mod notify;
pub mod status;
pub mod subnet;
pub mod telemetry;

mod json_ci;
