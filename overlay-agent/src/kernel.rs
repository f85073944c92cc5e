//! The kernel features the data path needs, checked at start so that a kernel too old or built
//! without them is named in one message, instead of a verifier log later.
//!
//! Needed: tcx attachment (Linux 6.6), BTF for the kernel (`/sys/kernel/btf/vmlinux`,
//! `CONFIG_DEBUG_INFO_BTF`), the program and map types the object uses, and every helper its
//! programs call (probed by loading a minimal program per helper, as libbpf's probes do).

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

/// The oldest kernel with everything below (tcx links arrived in 6.6).
pub const MIN_KERNEL: (u32, u32) = (6, 6);

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// The helpers the TC programs call.
const HELPERS: &[(BpfHelper, &str)] = &[
    (BpfHelper::BPF_FUNC_redirect, "bpf_redirect"),
    (BpfHelper::BPF_FUNC_redirect_neigh, "bpf_redirect_neigh"),
    (BpfHelper::BPF_FUNC_skb_adjust_room, "bpf_skb_adjust_room"),
    (BpfHelper::BPF_FUNC_skb_store_bytes, "bpf_skb_store_bytes"),
    (BpfHelper::BPF_FUNC_skb_load_bytes, "bpf_skb_load_bytes"),
    (BpfHelper::BPF_FUNC_skb_pull_data, "bpf_skb_pull_data"),
    (BpfHelper::BPF_FUNC_l3_csum_replace, "bpf_l3_csum_replace"),
    (BpfHelper::BPF_FUNC_l4_csum_replace, "bpf_l4_csum_replace"),
    (BpfHelper::BPF_FUNC_check_mtu, "bpf_check_mtu"),
    (BpfHelper::BPF_FUNC_fib_lookup, "bpf_fib_lookup"),
    (BpfHelper::BPF_FUNC_get_hash_recalc, "bpf_get_hash_recalc"),
    (BpfHelper::BPF_FUNC_get_prandom_u32, "bpf_get_prandom_u32"),
    (BpfHelper::BPF_FUNC_ktime_get_ns, "bpf_ktime_get_ns"),
    (BpfHelper::BPF_FUNC_ringbuf_output, "bpf_ringbuf_output"),
];

const MAPS: &[(MapType, &str)] = &[
    (MapType::Array, "array"),
    (MapType::PerCpuArray, "per-CPU array"),
    (MapType::Hash, "hash"),
    (MapType::LruHash, "LRU hash"),
    (MapType::LpmTrie, "LPM trie"),
    (MapType::RingBuf, "ring buffer"),
];

/// The kernel lacks something; the message names each missing feature.
#[derive(Debug, thiserror::Error)]
#[error(
    "this kernel ({release}) cannot run the data path: missing {}. overlay-agent needs Linux \
     {}.{} or newer, built with BTF (CONFIG_DEBUG_INFO_BTF=y)",
    missing.join(", "), MIN_KERNEL.0, MIN_KERNEL.1
)]
pub struct MissingFeatures {
    pub release: String,
    pub missing: Vec<String>,
}

/// Checks everything listed above; `Ok` with the kernel release when all is there.
pub fn check() -> Result<String, MissingFeatures> {
    let release = kernel_release();
    let mut missing = Vec::new();
    match parse_version(&release) {
        Some(v) if v >= MIN_KERNEL => {}
        Some(_) => missing.push(format!(
            "tcx attachment (Linux {}.{})",
            MIN_KERNEL.0, MIN_KERNEL.1
        )),
        None => missing.push(format!("a kernel version we can read ({release:?})")),
    }
    if !std::path::Path::new(BTF_PATH).exists() {
        missing.push(format!("kernel BTF ({BTF_PATH})"));
    }
    match is_program_supported(ProgramType::SchedClassifier) {
        // Without the right to load programs every probe fails: say that, not "missing".
        Err(e) => missing.push(format!(
            "the right to load BPF programs ({e}; run as root, or with CAP_BPF and CAP_NET_ADMIN)"
        )),
        Ok(false) => missing.push("TC (sched_cls) programs".to_owned()),
        Ok(true) => {
            for (helper, name) in HELPERS {
                if !is_helper_supported(ProgramType::SchedClassifier, *helper).unwrap_or(false) {
                    missing.push(format!("the helper {name}"));
                }
            }
        }
    }
    for (map, name) in MAPS {
        if !is_map_supported(*map).unwrap_or(false) {
            missing.push(format!("{name} maps"));
        }
    }
    if missing.is_empty() {
        Ok(release)
    } else {
        Err(MissingFeatures { release, missing })
    }
}

fn kernel_release() -> String {
    nix::sys::utsname::uname().map_or_else(
        |_| String::from("unknown"),
        |uts| uts.release().to_string_lossy().into_owned(),
    )
}

/// `6.18.0-1-amd64` → (6, 18).
fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_distribution_releases() {
        assert_eq!(parse_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_version("6.6.52"), Some((6, 6)));
        assert_eq!(parse_version("5.15.0-105-generic"), Some((5, 15)));
        assert_eq!(parse_version("garbage"), None);
        assert!((5, 15) < MIN_KERNEL && (6, 18) >= MIN_KERNEL);
    }

    #[test]
    fn the_message_names_what_is_missing_and_the_minimum() {
        let err = MissingFeatures {
            release: "5.10.0".to_owned(),
            missing: vec![
                "tcx attachment (Linux 6.6)".to_owned(),
                "kernel BTF".to_owned(),
            ],
        };
        let msg = err.to_string();
        assert!(
            msg.contains("5.10.0") && msg.contains("tcx") && msg.contains("BTF"),
            "{msg}"
        );
        assert!(msg.contains("Linux 6.6 or newer"), "{msg}");
    }
}
