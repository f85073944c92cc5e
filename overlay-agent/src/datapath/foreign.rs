//! Programs of ours that another agent attached: one running on this node with another
//! `--bpf-dir`, or one that stopped and left its data path pinned in another directory.
//!
//! tcx runs a device's programs in turn, and ours end the chain (they pass, redirect or drop),
//! so of two agents' programs on one device only the first ever runs: a second agent would
//! serve nothing, fight the first over `ovl0` and the GRO device, and remove both if its start
//! failed. A program is ours or another agent's by the link that holds it: ours are pinned
//! under our `--bpf-dir`.

use std::collections::BTreeSet;
use std::fmt;

use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
};

use super::{PROGRAMS, pin::PinDir};

/// What the kernel keeps of a program's name (BPF_OBJ_NAME_LEN - 1).
pub const KERNEL_NAME_LEN: usize = 15;

/// Which of our programs the kernel knows by `kernel_name` (cut to [`KERNEL_NAME_LEN`]).
#[must_use]
pub fn our_program(kernel_name: &str) -> Option<&'static str> {
    PROGRAMS.into_iter().find(|full| {
        *full == kernel_name
            || (kernel_name.len() == KERNEL_NAME_LEN && full.starts_with(kernel_name))
    })
}

/// One of our programs on a device, held by a link that is not pinned under our directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignProgram {
    pub program: &'static str,
    pub id: u32,
}

impl fmt::Display for ForeignProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (program id {})", self.program, self.id)
    }
}

/// Our programs on `iface` (tcx ingress and egress) that no link pinned under `pins` holds.
/// A device that does not exist carries none.
pub fn foreign_programs(
    iface: &str,
    pins: Option<&PinDir>,
) -> Result<Vec<ForeignProgram>, ProgramError> {
    if nix::net::if_::if_nametoindex(iface).is_err() {
        return Ok(Vec::new());
    }
    let ours = pinned_program_ids(pins);
    let mut found = Vec::new();
    for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
        let (_, attached) = SchedClassifier::query_tcx(iface, direction)?;
        for info in attached {
            if ours.contains(&info.id()) {
                continue;
            }
            if let Some(program) = info.name_as_str().and_then(our_program) {
                found.push(ForeignProgram {
                    program,
                    id: info.id(),
                });
            }
        }
    }
    Ok(found)
}

/// The programs behind the links pinned under `pins` (an unreadable pin holds none).
fn pinned_program_ids(pins: Option<&PinDir>) -> BTreeSet<u32> {
    let Some(pins) = pins else {
        return BTreeSet::new();
    };
    pins.links()
        .into_iter()
        .filter_map(|path| PinnedLink::from_pin(&path).ok())
        .filter_map(|link| FdLink::from(link).info().ok())
        .map(|info| info.program_id())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_programs_are_known_by_the_kernels_cut_names_and_no_other_is() {
        assert_eq!(our_program("underlay_ingres"), Some("underlay_ingress"));
        assert_eq!(our_program("underlay_egress"), Some("underlay_egress"));
        assert_eq!(our_program("gro_device_ingr"), Some("gro_device_ingress"));
        assert_eq!(our_program("host_egress"), Some("host_egress"));
        // A shorter name is matched whole, not as a prefix.
        assert_eq!(our_program("host"), None);
        assert_eq!(our_program("cil_from_netdev"), None);
    }
}
