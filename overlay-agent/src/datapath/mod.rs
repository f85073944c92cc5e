//! Loading the embedded eBPF object and attaching its programs.
//!
//! The object is compiled by `cargo xtask build-ebpf` and embedded at build time (see build.rs),
//! so the agent binary is all a node needs. Programs attach with tcx links (kernel ≥ 6.6); the
//! links detach when the agent drops them.

use aya::{
    Ebpf, EbpfError,
    maps::{MapError, PerCpuArray},
    programs::{ProgramError, SchedClassifier, TcAttachType},
};
use overlay_common::counters::{Counter, Reason};

/// The eBPF object, aligned for the ELF parser.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("OVERLAY_EBPF_OBJECT"));

/// Names of the TC programs on the external interface.
pub const UNDERLAY_INGRESS: &str = "underlay_ingress";
pub const UNDERLAY_EGRESS: &str = "underlay_egress";
const COUNTERS_MAP: &str = "COUNTERS";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("failed to load the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("failed to load program {prog} into the kernel: {source}")]
    ProgramLoad { prog: &'static str, source: ProgramError },
    #[error("failed to attach {prog} to {iface}: {source}")]
    Attach { prog: &'static str, iface: String, source: ProgramError },
    #[error("failed to read map {map}: {source}")]
    Map { map: &'static str, source: MapError },
}

/// The loaded data path. Dropping it detaches every program it attached.
pub struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the embedded object (maps are created; programs are loaded when attached).
    pub fn load() -> Result<Self, DatapathError> {
        raise_memlock_limit();
        Ok(Self { ebpf: Ebpf::load(OBJECT)? })
    }

    /// Attaches the counting programs to both directions of the external interface.
    pub fn attach_underlay(&mut self, iface: &str) -> Result<(), DatapathError> {
        self.attach_tc(UNDERLAY_INGRESS, iface, TcAttachType::Ingress)?;
        self.attach_tc(UNDERLAY_EGRESS, iface, TcAttachType::Egress)
    }

    fn attach_tc(
        &mut self,
        prog: &'static str,
        iface: &str,
        direction: TcAttachType,
    ) -> Result<(), DatapathError> {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(prog)
            .ok_or(DatapathError::MissingProgram(prog))?
            .try_into()
            .map_err(|source| DatapathError::ProgramLoad { prog, source })?;
        program.load().map_err(|source| DatapathError::ProgramLoad { prog, source })?;
        program
            .attach(iface, direction)
            .map_err(|source| DatapathError::Attach { prog, iface: iface.to_owned(), source })?;
        Ok(())
    }

    /// Every counter, summed over the CPUs, in [`Reason::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>, DatapathError> {
        let map = self.ebpf.map(COUNTERS_MAP).ok_or(DatapathError::MissingMap(COUNTERS_MAP))?;
        let array = PerCpuArray::<_, Counter>::try_from(map)
            .map_err(|source| DatapathError::Map { map: COUNTERS_MAP, source })?;
        Reason::ALL
            .iter()
            .map(|&reason| {
                let per_cpu = array
                    .get(&reason.index(), 0)
                    .map_err(|source| DatapathError::Map { map: COUNTERS_MAP, source })?;
                Ok((reason, per_cpu.iter().fold(Counter::default(), |sum, c| sum.add(*c))))
            })
            .collect()
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use memcg, where raising
/// the limit is unnecessary (and may be refused without CAP_SYS_RESOURCE), so failure only warns.
fn raise_memlock_limit() {
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads the struct we pass and has no other effect on memory.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        tracing::debug!(
            "cannot raise RLIMIT_MEMLOCK ({}); fine on kernels with memcg-based BPF accounting",
            std::io::Error::last_os_error()
        );
    }
}
