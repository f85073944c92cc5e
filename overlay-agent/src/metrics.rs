//! `/metrics` in the Prometheus text format, served on the health listener (`--healthz-port`).
//!
//! Built at each scrape from the truth: the pinned maps under `--bpf-dir` (counters, peers, the
//! NAT table), the kernel (programs attached per device) and the agent's [`Telemetry`] (lease,
//! etcd, readiness). Nothing is cached, so a scrape never shows stale numbers; it costs one walk
//! of the NAT table (at most its capacity of entries).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `overlay_packets_total`, `overlay_bytes_total` | counter | `reason` (every counter reason; drops start with `drop_`) |
//! | `overlay_nat_entries`, `overlay_nat_capacity` | gauge | assured flows' table |
//! | `overlay_nat_unassured_entries`, `overlay_nat_unassured_capacity` | gauge | the other |
//! | `overlay_nat_port_exhaustion_total` | counter | |
//! | `overlay_peers` | gauge | `mode` (`vxlan`, `direct`) |
//! | `overlay_lease_expiry_timestamp_seconds` | gauge | |
//! | `overlay_etcd_reachable`, `overlay_ready` | gauge | |
//! | `overlay_watch_resyncs_total`, `overlay_datapath_repairs_total` | counter | |
//! | `overlay_programs_attached` | gauge | `device` |
//! | `overlay_build_info` | info | `version`, `object_sha256` |

use std::{path::Path, sync::atomic::AtomicU64};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use crate::{
    datapath::{nat::pinned_nat_flows, pinned_counters, pinned_peers},
    status::attached_programs,
    telemetry::{OBJECT_SHA256, Telemetry, VERSION, WATCH_RESYNCS},
};

type Labels = Vec<(String, String)>;

fn label(name: &str, value: &str) -> Labels {
    vec![(name.to_owned(), value.to_owned())]
}

/// The metrics text for one scrape. Parts whose source cannot be read (no pinned data path
/// yet) are left out and logged at debug level.
#[must_use]
pub fn render(bpf_dir: &Path, telemetry: &Telemetry) -> String {
    let mut registry = Registry::with_prefix("overlay");
    let status = telemetry.snapshot();

    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let exhausted = Counter::<u64>::default();
    match pinned_counters(bpf_dir) {
        Ok(counters) => {
            for (reason, c) in counters {
                packets
                    .get_or_create(&label("reason", reason.name()))
                    .inc_by(c.packets);
                bytes
                    .get_or_create(&label("reason", reason.name()))
                    .inc_by(c.bytes);
                if reason == overlay_common::counters::Reason::DropNatExhausted {
                    exhausted.inc_by(c.packets);
                }
            }
        }
        Err(e) => tracing::debug!("metrics: no counters: {e}"),
    }
    registry.register(
        "packets",
        "Packets per data path counter reason (drop reasons start with drop_)",
        packets,
    );
    registry.register("bytes", "Bytes per data path counter reason", bytes);
    registry.register(
        "nat_port_exhaustion",
        "New masqueraded flows dropped for want of a free port",
        exhausted,
    );

    let nat_entries = Gauge::<i64>::default();
    let nat_capacity = Gauge::<i64>::default();
    let nat_unassured = Gauge::<i64>::default();
    let nat_unassured_capacity = Gauge::<i64>::default();
    match pinned_nat_flows(bpf_dir) {
        Ok(table) => {
            nat_entries.set(i64::try_from(table.assured()).unwrap_or(i64::MAX));
            nat_capacity.set(i64::from(table.capacity));
            nat_unassured.set(i64::try_from(table.unassured()).unwrap_or(i64::MAX));
            nat_unassured_capacity.set(i64::from(table.unassured_capacity));
        }
        Err(e) => tracing::debug!("metrics: no NAT table: {e}"),
    }
    registry.register(
        "nat_entries",
        "Assured masqueraded flows (their table's filling evicts live connections)",
        nat_entries,
    );
    registry.register(
        "nat_capacity",
        "Capacity of the assured flows' table",
        nat_capacity,
    );
    registry.register(
        "nat_unassured_entries",
        "Masqueraded flows not assured yet (their own table)",
        nat_unassured,
    );
    registry.register(
        "nat_unassured_capacity",
        "Capacity of the table of flows not assured yet",
        nat_unassured_capacity,
    );

    let peers = Family::<Labels, Gauge>::default();
    for mode in ["vxlan", "direct"] {
        peers.get_or_create(&label("mode", mode)).set(0);
    }
    match pinned_peers(bpf_dir) {
        Ok(list) => {
            for (_, node) in list {
                let mode = if node.is_direct() { "direct" } else { "vxlan" };
                peers.get_or_create(&label("mode", mode)).inc();
            }
        }
        Err(e) => tracing::debug!("metrics: no peers: {e}"),
    }
    registry.register(
        "peers",
        "Remote subnets in the data path, by delivery mode",
        peers,
    );

    if let Some(expiry) = telemetry.lease_expiry_unix() {
        let g = Gauge::<f64, AtomicU64>::default();
        g.set(expiry);
        registry.register(
            "lease_expiry_timestamp_seconds",
            "When this node's subnet lease expires unless renewed (Unix time)",
            g,
        );
    }
    let reachable = Gauge::<i64>::default();
    reachable.set(i64::from(status.etcd.reachable));
    registry.register(
        "etcd_reachable",
        "Whether the last etcd probe succeeded (1) or not (0)",
        reachable,
    );
    let ready = Gauge::<i64>::default();
    ready.set(i64::from(status.ready));
    registry.register("ready", "What /readyz says: 1 ready, 0 not", ready);
    let resyncs = Counter::<u64>::default();
    resyncs.inc_by(WATCH_RESYNCS.load(std::sync::atomic::Ordering::Relaxed));
    registry.register(
        "watch_resyncs",
        "Times the peer watch was re-established or the leases listed again",
        resyncs,
    );
    let repairs = Counter::<u64>::default();
    repairs.inc_by(status.repairs);
    registry.register(
        "datapath_repairs",
        "Times the data path was re-attached or ovl0 re-created after going away",
        repairs,
    );

    let attached = Family::<Labels, Gauge>::default();
    for device in [
        &status.external_interface,
        &status.host_device,
        &status.bridge,
    ]
    .into_iter()
    .flatten()
    {
        let count = attached_programs(device).map_or(0, |p| p.iter().filter(|p| p.ours).count());
        attached
            .get_or_create(&label("device", device))
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    registry.register(
        "programs_attached",
        "The agent's programs the kernel reports attached, per device",
        attached,
    );

    registry.register(
        "build",
        "The agent's version and the SHA-256 of its eBPF object",
        Info::new(vec![
            ("version".to_owned(), VERSION.to_owned()),
            ("object_sha256".to_owned(), OBJECT_SHA256.clone()),
        ]),
    );

    let mut out = String::new();
    if let Err(e) = encode(&mut out, &registry) {
        tracing::warn!("cannot encode the metrics: {e}");
    }
    out
}
