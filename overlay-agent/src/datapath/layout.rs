//! The layout version of the pinned state: an agent never reuses a pinned map of another shape.
//!
//! The version is derived, not declared: a fingerprint (SHA-256, 16 hex digits) over the
//! definition of every pinned map in the embedded object (name, type, key and value size,
//! capacity, flags) and over the field layout of the settings structs
//! (`overlay_common::layout`). A map added or changed in the object changes it by itself.
//! It is kept beside the pins as an empty directory `<bpf-dir>/layout/<fingerprint>` (bpffs
//! holds directories and pins, no plain files).
//!
//! Before loading, [`reconcile`] compares each pinned map with its definition, as the kernel
//! reports it (`BPF_OBJ_GET_INFO_BY_FD`), and, when the fingerprint differs, also treats the
//! settings maps as changed (same size does not mean same fields). What differs is either
//! refused (naming the maps and the command that clears them) or migrated: those pins are
//! removed, so the loader creates the maps anew. Maps that hold state for each other go
//! together: the peer maps (`ROUTE_V4` counts into `NODE_V4`; both are refilled from etcd)
//! and the NAT flow tables (`SNAT_V4_CT`, `SNAT_V4_REV` and their `_NEW` twins point at each
//! other; masqueraded connections are lost). Programs of an older agent keep their old maps
//! until the new agent's programs replace them in the pinned links.

use std::{collections::BTreeMap, fmt, path::Path};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use overlay_common::{
    kernel_flow::{KERNEL_FLOW_OUT, KernelFlowKeyV4, KernelFlowV4},
    layout::SETTINGS_LAYOUTS,
    nat::{NatEntryV4, NatKeyV4},
};
use sha2::{Digest as _, Sha256};

use super::{OBJECT, STATE_MAPS, names, pin::PinDir};
use crate::cli::LayoutMismatch;

/// Maps replaced together (see the module comment).
const GROUPS: &[&[&str]] = &[&[names::ROUTE_V4, names::NODE_V4], &names::NAT_FLOW_MAPS];
/// Maps rewritten whole at every start: replacing them loses nothing.
const SETTINGS: &[&str] = &[names::CONFIG, names::NAT_CONFIG, names::NAT_EXCLUDE_V4];

/// A map's shape as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B entries {} flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read the eBPF object's map definitions: {0}")]
    Object(String),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error(
        "the maps pinned under {dir} have another layout than this agent's ({}), and \
         --pinned-layout-mismatch=refuse. Clear them with `overlay-agent cleanup --bpf-dir {dir}` \
         (removes the data path: pod traffic stops until the agent runs again), or start with \
         --pinned-layout-mismatch=migrate to replace only those maps",
        differences.join("; ")
    )]
    Mismatch {
        dir: String,
        differences: Vec<String>,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// What [`reconcile`] found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub fingerprint: String,
    /// Maps whose pins were removed so they are created anew, with why.
    pub replaced: Vec<(String, String)>,
    /// The flows of replaced NAT flow tables whose entries only grew (`NatEntryV4` gains
    /// fields at its end only, zero meaning unknown), read before their pins were removed:
    /// [`restore_flows`] writes them into the new tables, so masqueraded connections survive
    /// the upgrade.
    pub carried: Vec<(String, Vec<(NatKeyV4, NatEntryV4)>)>,
}

/// The flows of the pinned NAT flow table at `path`, as this agent's entries, if its entries
/// are an earlier, smaller `NatEntryV4` (or the same) in a table of the same type and key:
/// each is copied and zero-filled to this agent's size. `None` for anything else, or when it
/// cannot be read (its flows are then lost, as with any replaced map).
fn older_flows(path: &Path, want: &Shape) -> Option<Vec<(NatKeyV4, NatEntryV4)>> {
    let data = MapData::from_pin(path).ok()?;
    let info = data.info().ok()?;
    let same_kind = info.map_type().ok()? as u32 == want.map_type
        && info.key_size() as usize == size_of::<NatKeyV4>()
        && want.value_size as usize == size_of::<NatEntryV4>();
    if !same_kind {
        return None;
    }
    flows_of_any_layout(&Map::LruHashMap(data), info.value_size())
}

/// Every flow of the NAT flow table `map`, whose entries are `value_size` bytes: this agent's
/// `NatEntryV4`, or an earlier, smaller one (zero-filled to this agent's). `None` for another
/// size or a map that cannot be read as a hash of flows.
pub fn flows_of_any_layout(map: &Map, value_size: u32) -> Option<Vec<(NatKeyV4, NatEntryV4)>> {
    match value_size {
        16 => read_grown::<16>(map),
        24 => read_grown::<24>(map),
        32 => read_grown::<32>(map),
        _ => None,
    }
}

/// Every entry of `map` (values of `N` bytes, a prefix of `NatEntryV4`), zero-filled.
fn read_grown<const N: usize>(map: &Map) -> Option<Vec<(NatKeyV4, NatEntryV4)>> {
    const { assert!(N <= size_of::<NatEntryV4>()) };
    let hash = HashMap::<_, NatKeyV4, [u8; N]>::try_from(map).ok()?;
    Some(
        hash.iter()
            .filter_map(Result::ok)
            .map(|(k, old)| {
                let mut e = NatEntryV4::default();
                bytemuck::bytes_of_mut(&mut e)[..N].copy_from_slice(&old);
                (k, e)
            })
            .collect(),
    )
}

/// Writes the flows [`reconcile`] carried into the new tables pinned under `pins` (after the
/// load created them). Returns how many were written per table.
pub fn restore_flows(
    pins: &PinDir,
    carried: &[(String, Vec<(NatKeyV4, NatEntryV4)>)],
) -> Vec<(String, usize)> {
    let mut written = Vec::new();
    for (name, flows) in carried {
        let restored = MapData::from_pin(pins.map(name)).ok().and_then(|data| {
            let mut hash =
                HashMap::<_, NatKeyV4, NatEntryV4>::try_from(Map::LruHashMap(data)).ok()?;
            Some(
                flows
                    .iter()
                    .filter(|(k, e)| hash.insert(k, e, 0).is_ok())
                    .count(),
            )
        });
        written.push((name.clone(), restored.unwrap_or(0)));
    }
    written
}

/// Moves the inbound connections that agents before `KERNEL_FLOW_IN_V4` filed in
/// `KERNEL_FLOW_V4` (the `way` of their key says which) into the new table, pinned under `pins`
/// once the load created it, so that a published port's connections keep their replies
/// unmasqueraded across the upgrade. Returns how many moved; 0 when a table cannot be read.
pub fn split_inbound_flows(pins: &PinDir) -> usize {
    let open = |name: &str| {
        let data = MapData::from_pin(pins.map(name)).ok()?;
        HashMap::<_, KernelFlowKeyV4, KernelFlowV4>::try_from(Map::LruHashMap(data)).ok()
    };
    let (Some(mut all), Some(mut inbound)) =
        (open(names::KERNEL_FLOW_V4), open(names::KERNEL_FLOW_IN_V4))
    else {
        return 0;
    };
    let moving: Vec<_> = all
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.way != KERNEL_FLOW_OUT)
        .collect();
    moving
        .iter()
        .filter(|(k, v)| inbound.insert(k, v, 0).is_ok() && all.remove(k).is_ok())
        .count()
}

/// The definitions of the pinned maps in the embedded object, by name.
pub fn object_shapes() -> Result<BTreeMap<&'static str, Shape>, LayoutError> {
    let object = aya_obj::Object::parse(OBJECT).map_err(|e| LayoutError::Object(e.to_string()))?;
    STATE_MAPS
        .iter()
        .map(|&name| {
            let map = object.maps.get(name).ok_or(LayoutError::MissingMap(name))?;
            Ok((
                name,
                Shape {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: map.max_entries(),
                    flags: map.map_flags(),
                },
            ))
        })
        .collect()
}

/// The layout fingerprint of `shapes` and the settings structs.
#[must_use]
pub fn fingerprint(shapes: &BTreeMap<&'static str, Shape>) -> String {
    let mut h = Sha256::new();
    for (name, s) in shapes {
        h.update(format!("{name} {s}\n"));
    }
    for (map, fields) in SETTINGS_LAYOUTS {
        for (field, offset, size) in *fields {
            h.update(format!("{map}.{field} {offset} {size}\n"));
        }
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares the pinned maps under `pins` with this agent's layout and, by `policy`, refuses or
/// removes the pins of what differs. Call before loading; then [`mark`] after it.
pub fn reconcile(pins: &PinDir, policy: LayoutMismatch) -> Result<Reconciled, LayoutError> {
    let shapes = object_shapes()?;
    let fingerprint = fingerprint(&shapes);
    let pinned = |name: &str| pins.map(name).exists();
    let stored = stored_fingerprint(pins.root());

    let mut differ: BTreeMap<String, String> = BTreeMap::new();
    for (&name, want) in &shapes {
        if !pinned(name) {
            continue;
        }
        match MapInfo::from_pin(pins.map(name)) {
            Ok(info) => {
                let have = Shape {
                    map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
                    key_size: info.key_size(),
                    value_size: info.value_size(),
                    max_entries: info.max_entries(),
                    flags: info.map_flags(),
                };
                if have != *want {
                    differ.insert(
                        name.to_owned(),
                        format!("{name}: pinned {have}, needs {want}"),
                    );
                }
            }
            Err(e) => {
                differ.insert(
                    name.to_owned(),
                    format!("{name}: pinned but unreadable ({e})"),
                );
            }
        }
    }
    let any_pinned = shapes.keys().any(|n| pinned(n));
    if any_pinned && stored.as_deref() != Some(fingerprint.as_str()) {
        let was = stored.unwrap_or_else(|| "none".to_owned());
        for name in SETTINGS.iter().filter(|n| pinned(n)) {
            differ.entry((*name).to_owned()).or_insert_with(|| {
                format!("{name}: layout version {was}, this agent's is {fingerprint}")
            });
        }
    }
    // A member of a group takes the others with it.
    for group in GROUPS {
        if group.iter().any(|m| differ.contains_key(*m)) {
            for m in group.iter().filter(|m| pinned(m)) {
                differ
                    .entry((*m).to_owned())
                    .or_insert_with(|| format!("{m}: replaced with {}", group.join(" and ")));
            }
        }
    }
    if differ.is_empty() {
        return Ok(Reconciled {
            fingerprint,
            ..Reconciled::default()
        });
    }
    if policy == LayoutMismatch::Refuse {
        return Err(LayoutError::Mismatch {
            dir: pins.root().display().to_string(),
            differences: differ.into_values().collect(),
        });
    }
    let mut replaced = Vec::new();
    let mut carried = Vec::new();
    for (name, why) in differ {
        let path = pins.map(&name);
        if let Some(want) = shapes.get(name.as_str())
            && names::NAT_FLOW_MAPS.contains(&name.as_str())
            && let Some(flows) = older_flows(&path, want)
        {
            carried.push((name.clone(), flows));
        }
        std::fs::remove_file(&path).map_err(|source| LayoutError::Io {
            action: "remove",
            path: path.display().to_string(),
            source,
        })?;
        replaced.push((name, why));
    }
    Ok(Reconciled {
        fingerprint,
        replaced,
        carried,
    })
}

/// Records `fingerprint` as the layout of the maps pinned under `root`.
pub fn mark(root: &Path, fingerprint: &str) -> Result<(), LayoutError> {
    let dir = root.join("layout");
    let io = |action, path: &Path| {
        let path = path.display().to_string();
        move |source| LayoutError::Io {
            action,
            path,
            source,
        }
    };
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if e.file_name() != fingerprint {
                std::fs::remove_dir(e.path()).map_err(io("remove", &e.path()))?;
            }
        }
    }
    let marker = dir.join(fingerprint);
    std::fs::create_dir_all(&marker).map_err(io("create", &marker))
}

/// The fingerprint recorded under `root`, if any.
#[must_use]
pub fn stored_fingerprint(root: &Path) -> Option<String> {
    std::fs::read_dir(root.join("layout"))
        .ok()?
        .flatten()
        .find_map(|e| e.file_name().into_string().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pinned_map_is_in_the_object_and_the_fingerprint_is_stable() {
        let shapes = object_shapes().expect("the embedded object parses");
        assert_eq!(shapes.len(), STATE_MAPS.len());
        let a = fingerprint(&shapes);
        assert_eq!(a.len(), 16);
        assert_eq!(a, fingerprint(&shapes));
        let mut changed = shapes.clone();
        changed.get_mut(names::ROUTE_V4).unwrap().value_size += 4;
        assert_ne!(
            a,
            fingerprint(&changed),
            "a value size is part of the version"
        );
        let mut changed = shapes;
        changed.get_mut(names::SNAT_V4_CT).unwrap().max_entries *= 2;
        assert_ne!(
            a,
            fingerprint(&changed),
            "a capacity is part of the version"
        );
    }

    #[test]
    fn the_refusal_names_the_maps_and_the_command() {
        let err = LayoutError::Mismatch {
            dir: "/sys/fs/bpf/overlay".to_owned(),
            differences: vec!["ROUTE_V4: pinned type 11 key 8 B value 8 B".to_owned()],
        };
        let msg = err.to_string();
        assert!(msg.contains("ROUTE_V4: pinned"), "{msg}");
        assert!(
            msg.contains("overlay-agent cleanup --bpf-dir /sys/fs/bpf/overlay"),
            "{msg}"
        );
    }

    #[test]
    fn the_marker_is_one_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(stored_fingerprint(dir.path()), None);
        mark(dir.path(), "0123456789abcdef").unwrap();
        mark(dir.path(), "fedcba9876543210").unwrap();
        assert_eq!(
            stored_fingerprint(dir.path()).as_deref(),
            Some("fedcba9876543210")
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("layout"))
                .unwrap()
                .count(),
            1
        );
    }
}
