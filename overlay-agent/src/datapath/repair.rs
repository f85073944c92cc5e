//! Checking the attachments against the kernel, for repairs and for honest readiness.
//!
//! The agent's record of what it attached (`Datapath::links`) can go stale without it knowing:
//! a device deleted (its tcx links die with it), re-created under the same name (a new index),
//! or a link detached by hand (`bpftool link detach`). [`Datapath::attachment_problems`] asks
//! the kernel, for every program the agent attached, whether that very program is still
//! attached where it should be. The daemon runs it every second and on every link event, and
//! re-attaches (or recreates `ovl0`) when something is off.

use aya::programs::{SchedClassifier, TcAttachType};

use super::{
    Datapath, GRO_DEVICE_INGRESS, HOST_EGRESS, POD_EGRESS, POD_INGRESS, UNDERLAY_EGRESS,
    UNDERLAY_INGRESS, UNDERLAY_XDP, classifier,
};

/// A program that is not attached where the agent attached it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub prog: &'static str,
    pub iface: String,
    pub why: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {}: {}", self.prog, self.iface, self.why)
    }
}

fn direction(prog: &str) -> TcAttachType {
    match prog {
        UNDERLAY_EGRESS | HOST_EGRESS | POD_INGRESS => TcAttachType::Egress,
        _ => TcAttachType::Ingress,
    }
}

impl Datapath {
    /// Every attachment the kernel no longer shows, by program (empty when all is well).
    #[must_use]
    pub fn attachment_problems(&mut self) -> Vec<Problem> {
        let attached: Vec<(&'static str, String)> = self
            .links
            .iter()
            .map(|(prog, a)| (*prog, a.iface.clone()))
            .collect();
        let mut problems = Vec::new();
        for (prog, iface) in attached {
            // The XDP link (not tcx) only dies with its device; a device re-created under the
            // same name is seen by the underlay's tcx programs, repaired together.
            if prog == UNDERLAY_XDP {
                if super::ifindex(&iface).is_err() {
                    problems.push(Problem {
                        prog,
                        iface,
                        why: "the device is gone".to_owned(),
                    });
                }
                continue;
            }
            let ours = classifier(&mut self.ebpf, prog)
                .ok()
                .and_then(|p| p.info().ok())
                .map(|info| info.id());
            let why = match SchedClassifier::query_tcx(&iface, direction(prog)) {
                Err(_) if super::ifindex(&iface).is_err() => Some("the device is gone".to_owned()),
                Err(e) => Some(format!("cannot ask the kernel: {e}")),
                Ok((_, programs)) => (!programs.iter().any(|p| Some(p.id()) == ours)).then(|| {
                    "the kernel no longer shows it attached (device re-created or link \
                         detached)"
                        .to_owned()
                }),
            };
            if let Some(why) = why {
                problems.push(Problem { prog, iface, why });
            }
        }
        problems
    }

    /// Whether `prog` is among the programs the agent attached (to any device).
    #[must_use]
    pub fn is_attached(&self, prog: &str) -> bool {
        self.links.contains_key(prog)
    }

    /// The device `prog` was attached to, if it was.
    #[must_use]
    pub fn attached_to(&self, prog: &str) -> Option<&str> {
        self.links.get(prog).map(|a| a.iface.as_str())
    }
}

/// What a repair of some problems concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Affected {
    /// The programs on the external interface.
    pub underlay: bool,
    /// The host device and its program.
    pub host: bool,
    /// The pod bridge's programs.
    pub pod: bool,
    /// The GRO device and its program.
    pub gro: bool,
}

/// Which programs a repair of `problems` concerns.
#[must_use]
pub fn affects(problems: &[Problem]) -> Affected {
    let has = |p: &str| problems.iter().any(|x| x.prog == p);
    Affected {
        underlay: has(UNDERLAY_INGRESS) || has(UNDERLAY_EGRESS) || has(UNDERLAY_XDP),
        host: has(HOST_EGRESS),
        pod: has(POD_EGRESS) || has(POD_INGRESS),
        gro: has(GRO_DEVICE_INGRESS),
    }
}
