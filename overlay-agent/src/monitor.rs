//! `overlay-agent monitor [--type drop]`: the data path's sampled drop events, live.
//!
//! Reads the `DROP_EVENTS` ring buffer pinned under `--bpf-dir` (written by the programs where
//! they count a drop, see `overlay-ebpf/src/lib/events.rs`), so it works beside a running
//! agent or without one. Events already waiting in the ring when the monitor starts are
//! skipped: what it shows happened while it ran. One reader at a time: two monitors would
//! share (split) the events.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Map, MapData, RingBuf};
use nix::time::{ClockId, clock_gettime};
use overlay_common::{
    counters::Reason,
    events::{DropEvent, EVENT_F_IPV4, EVENT_F_PORTS, EVENT_F_VXLAN},
    wire::ip_proto_name,
};
use serde::Serialize;

use crate::datapath::{names, pin::PinDir};

const POLL: Duration = Duration::from_millis(50);

/// One event as shown (`-o json`: one such object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShownEvent {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// When it was dropped, Unix time in milliseconds.
    pub time_ms: u64,
    pub reason: String,
    pub device: String,
    pub ifindex: u32,
    pub len: u32,
    pub proto: Option<String>,
    pub src: Option<String>,
    pub dst: Option<String>,
    /// For VXLAN: the outer addresses and the VNI; src/dst are then the inner packet's.
    pub outer_src: Option<Ipv4Addr>,
    pub outer_dst: Option<Ipv4Addr>,
    pub vni: Option<u32>,
    /// Drops on that CPU left out by the rate limit since its previous event.
    pub suppressed: u32,
}

impl ShownEvent {
    /// Decodes `event`; `mono_to_unix_ns` converts the kernel's monotonic time to wall time.
    #[must_use]
    pub fn new(event: &DropEvent, mono_to_unix_ns: i128) -> Self {
        let reason = Reason::ALL
            .iter()
            .find(|r| r.index() == event.reason)
            .map_or_else(
                || format!("reason_{}", event.reason),
                |r| r.name().to_owned(),
            );
        let ipv4 = event.flags & EVENT_F_IPV4 != 0;
        let ports = event.flags & EVENT_F_PORTS != 0;
        let vxlan = event.flags & EVENT_F_VXLAN != 0;
        let endpoint = |addr: [u8; 4], port: u16| {
            if ports {
                format!("{}:{port}", Ipv4Addr::from(addr))
            } else {
                Ipv4Addr::from(addr).to_string()
            }
        };
        let time_ns = i128::from(event.ktime_ns) + mono_to_unix_ns;
        Self {
            kind: "drop",
            time_ms: u64::try_from(time_ns / 1_000_000).unwrap_or(0),
            reason,
            device: ifname(event.ifindex),
            ifindex: event.ifindex,
            len: event.len,
            proto: ipv4.then(|| proto_name(event.proto)),
            src: ipv4.then(|| endpoint(event.saddr, event.sport)),
            dst: ipv4.then(|| endpoint(event.daddr, event.dport)),
            outer_src: vxlan.then(|| Ipv4Addr::from(event.outer_saddr)),
            outer_dst: vxlan.then(|| Ipv4Addr::from(event.outer_daddr)),
            vni: vxlan.then_some(event.vni),
            suppressed: event.suppressed,
        }
    }
}

impl std::fmt::Display for ShownEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.time_ms / 1000;
        write!(
            f,
            "{:02}:{:02}:{:02}.{:03} drop {} dev {}:",
            (secs / 3600) % 24,
            (secs / 60) % 60,
            secs % 60,
            self.time_ms % 1000,
            self.reason,
            self.device
        )?;
        if let (Some(src), Some(dst), Some(vni)) = (self.outer_src, self.outer_dst, self.vni) {
            write!(f, " vxlan {src} -> {dst} vni {vni}, inner")?;
        }
        match (&self.proto, &self.src, &self.dst) {
            (Some(p), Some(s), Some(d)) => write!(f, " {p} {s} -> {d}")?,
            _ => write!(f, " not IPv4")?,
        }
        write!(f, ", {} bytes", self.len)?;
        if self.suppressed > 0 {
            write!(f, " (+{} earlier drops not shown)", self.suppressed)?;
        }
        Ok(())
    }
}

/// `tcp`, `gre`, ...; `proto-N` for a protocol without a common name.
pub fn proto_name(proto: u8) -> String {
    ip_proto_name(proto).map_or_else(|| format!("proto-{proto}"), str::to_owned)
}

fn ifname(index: u32) -> String {
    nix::net::if_::if_indextoname(index).map_or_else(
        |_| format!("if{index}"),
        |name| name.to_string_lossy().into_owned(),
    )
}

fn clock_ns(clock: ClockId) -> i128 {
    clock_gettime(clock).map_or(0, |ts| {
        i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec())
    })
}

/// Runs the monitor until SIGINT/SIGTERM, `count` events, or `timeout`.
pub async fn run(
    bpf_dir: &Path,
    json: bool,
    count: Option<u64>,
    timeout: Option<Duration>,
) -> Result<()> {
    let Some(pins) = PinDir::existing(bpf_dir) else {
        bail!(
            "no pinned data path under {} (is --bpf-dir right, and did an agent run here?)",
            bpf_dir.display()
        );
    };
    let path = pins.map(names::DROP_EVENTS);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening the drop events at {} (an agent of this version must have run here)",
            path.display()
        )
    })?;
    let ring = RingBuf::try_from(Map::RingBuf(data)).context("DROP_EVENTS is not a ring buffer")?;
    let mut ring = ring;
    let start_mono = clock_ns(ClockId::CLOCK_MONOTONIC);
    let offset = clock_ns(ClockId::CLOCK_REALTIME) - start_mono;
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut shown = 0u64;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // On stderr, so that `-o json` output stays one object per line.
    eprintln!(
        "watching drop events under {} (Ctrl-C to stop)",
        bpf_dir.display()
    );
    loop {
        {
            while let Some(item) = ring.next() {
                let Ok(event) = bytemuck::try_pod_read_unaligned::<DropEvent>(&item) else {
                    continue;
                };
                if i128::from(event.ktime_ns) < start_mono {
                    continue; // waiting in the ring from before we started
                }
                let shown_event = ShownEvent::new(&event, offset);
                if json {
                    println!("{}", serde_json::to_string(&shown_event)?);
                } else {
                    println!("{shown_event}");
                }
                shown += 1;
                if count.is_some_and(|c| shown >= c) {
                    return Ok(());
                }
            }
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left == Some(Duration::ZERO) {
            return Ok(());
        }
        // Polling the ring's positions is a memory read: every 50 ms is live enough for a
        // person and costs nothing.
        tokio::select! {
            () = tokio::time::sleep(left.unwrap_or(POLL).min(POLL)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vxlan_drop_shows_outer_and_inner_addresses() {
        let event = DropEvent {
            ktime_ns: 5_000_000_000,
            reason: Reason::DropUnknownPeer.index(),
            ifindex: 0,
            len: 148,
            flags: EVENT_F_IPV4 | EVENT_F_PORTS | EVENT_F_VXLAN,
            saddr: [172, 17, 9, 2],
            daddr: [172, 17, 1, 2],
            outer_saddr: [198, 18, 0, 9],
            outer_daddr: [198, 18, 0, 1],
            sport: 40000,
            dport: 80,
            proto: 6,
            vni: 1,
            suppressed: 2,
            ..DropEvent::default()
        };
        let shown = ShownEvent::new(&event, 1_000_000_000_000);
        assert_eq!(shown.reason, "drop_unknown_peer");
        assert_eq!(shown.time_ms, 1_005_000);
        let line = shown.to_string();
        assert!(
            line.contains(
                "vxlan 198.18.0.9 -> 198.18.0.1 vni 1, inner tcp 172.17.9.2:40000 -> 172.17.1.2:80"
            ),
            "{line}"
        );
        assert!(line.contains("(+2 earlier drops not shown)"), "{line}");
        let json = serde_json::to_value(&shown).unwrap();
        assert_eq!(json["outer_src"], "198.18.0.9");
        assert_eq!(json["type"], "drop");
    }

    #[test]
    fn a_plain_drop_without_ports() {
        let event = DropEvent {
            reason: Reason::DropNoRoute.index(),
            flags: EVENT_F_IPV4,
            saddr: [172, 17, 1, 0],
            daddr: [172, 17, 200, 1],
            proto: 1,
            ..DropEvent::default()
        };
        let line = ShownEvent::new(&event, 0).to_string();
        assert!(
            line.contains("drop_no_route") && line.contains("icmp 172.17.1.0 -> 172.17.200.1"),
            "{line}"
        );
        assert!(!line.contains("vxlan"), "{line}");
    }
}
