//! The network config stored at `<prefix>/config`, parsed and validated the way flanneld does
//! (flannel-compat.md §1).
//!
//! Field names match case-insensitively, defaults and error messages are flannel's own, word
//! for word. Where we cannot honour an option (IPv6, GBP, learning, backends other than vxlan
//! and host-gw, options flannel does not have) the config is rejected with a message that names
//! it, rather than silently ignored as Go's decoder would. flannel's Windows-only vxlan options
//! `MacPrefix` and `Name`, which a config shared with Windows nodes carries, are taken and
//! ignored, as flanneld on Linux ignores them.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::Ipv4Net;
use overlay_common::wire::{DEFAULT_VNI, DEFAULT_VXLAN_PORT, MAX_VNI};
use serde_json::Value;

use crate::json_ci::{Fields, describe};

/// Bytes VXLAN adds in front of the inner frame ([`overlay_common::wire::VXLAN_OVERHEAD`], 50),
/// as an MTU.
const VXLAN_OVERHEAD: u32 = overlay_common::wire::VXLAN_OVERHEAD as u32;
/// Smallest `MTU` option we accept: room for the overhead plus IPv4's minimum MTU of 68.
const MIN_VXLAN_MTU: u32 = VXLAN_OVERHEAD + 68;

const TOP_LEVEL_FIELDS: &[&str] = &[
    "network",
    "subnetlen",
    "subnetmin",
    "subnetmax",
    "enableipv4",
    "enableipv6",
    "ipv6network",
    "ipv6subnetlen",
    "ipv6subnetmin",
    "ipv6subnetmax",
    "enablenftables",
    "backend",
];
const VXLAN_FIELDS: &[&str] = &[
    "type",
    "vni",
    "port",
    "mtu",
    "directrouting",
    "gbp",
    "learning",
    // Windows only (flannel's vxlan_windows.go): taken and ignored, as on Linux flanneld.
    "macprefix",
    "name",
];
const HOST_GW_FIELDS: &[&str] = &["type"];

const CONFIG: &str = "flannel config";
const BACKEND: &str = "Backend section of the flannel config";
const VXLAN: &str = "vxlan backend config";
const HOST_GW: &str = "host-gw backend config";

/// The backend that carries traffic between nodes, with its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Vxlan {
        vni: u32,
        port: u16,
        /// The `MTU` option: the underlay MTU to plan for instead of the interface's.
        mtu: Option<u32>,
        direct_routing: bool,
    },
    HostGw,
}

impl Backend {
    /// vxlan with flannel's defaults; what a config without `Backend` gets.
    pub const DEFAULT_VXLAN: Self = Self::Vxlan {
        vni: DEFAULT_VNI,
        port: DEFAULT_VXLAN_PORT,
        mtu: None,
        direct_routing: false,
    };

    /// The `BackendType` written into lease records: `vxlan` or `host-gw`.
    pub const fn type_name(&self) -> &'static str {
        match self {
            Self::Vxlan { .. } => "vxlan",
            Self::HostGw => "host-gw",
        }
    }

    /// The MTU pods get (`FLANNEL_MTU`), given the external interface's MTU. For vxlan it is
    /// the `MTU` option (default: the interface MTU) minus the 50 bytes of encapsulation, as
    /// flannel sizes its `flannel.<VNI>` device; host-gw does not encapsulate.
    pub fn pod_mtu(&self, iface_mtu: u32) -> u32 {
        match self {
            Self::Vxlan { mtu, .. } => mtu.unwrap_or(iface_mtu).saturating_sub(VXLAN_OVERHEAD),
            Self::HostGw => iface_mtu,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.type_name())
    }
}

/// A validated network config with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The cluster network (`Network`), with host bits cleared as Go's `net.ParseCIDR` does.
    pub network: Ipv4Net,
    /// Prefix length of each node's subnet.
    pub subnet_len: u8,
    /// First subnet that may be leased (its network address).
    pub subnet_min: Ipv4Addr,
    /// Last subnet that may be leased (its network address).
    pub subnet_max: Ipv4Addr,
    pub backend: Backend,
}

/// Why a network config was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("error decoding the flannel config: {reason}")]
    Json { reason: String },
    #[error("the {location} must be a JSON object, got {found}")]
    NotAnObject {
        location: &'static str,
        found: String,
    },
    #[error(
        "option {first} is given twice in the {location} (also as {second}); option names are case-insensitive"
    )]
    DuplicateField {
        location: &'static str,
        first: String,
        second: String,
    },
    #[error("unknown or unsupported option{} in the {location}: {}", plural(.fields), .fields.join(", "))]
    UnknownFields {
        location: &'static str,
        fields: Vec<String>,
    },
    #[error("invalid {field} in the {location}: expected {expected}, got {value}")]
    InvalidType {
        location: &'static str,
        field: String,
        expected: &'static str,
        value: String,
    },
    #[error("please define a correct Network parameter in the flannel config")]
    MissingNetwork,
    #[error("invalid Network in the flannel config: {value}: {reason}")]
    InvalidNetwork { value: String, reason: String },
    #[error("invalid {field} in the flannel config: {value} is not an IPv4 address")]
    InvalidAddress { field: String, value: String },
    #[error("network is too small. Minimum useful network prefix is /28")]
    NetworkTooSmall { network: Ipv4Net },
    #[error("SubnetLen must be less than /31")]
    SubnetLenTooLong { subnet_len: u64 },
    #[error("network must be able to accommodate at least four subnets")]
    TooFewSubnets { network: Ipv4Net, subnet_len: u8 },
    #[error("SubnetMin is not in the range of the Network")]
    SubnetMinOutOfRange { value: Ipv4Addr, network: Ipv4Net },
    #[error("SubnetMax is not in the range of the Network")]
    SubnetMaxOutOfRange { value: Ipv4Addr, network: Ipv4Net },
    #[error("SubnetMin is not on a SubnetLen boundary: {value}")]
    SubnetMinMisaligned { value: Ipv4Addr, subnet_len: u8 },
    #[error("SubnetMax is not on a SubnetLen boundary: {value}")]
    SubnetMaxMisaligned { value: Ipv4Addr, subnet_len: u8 },
    #[error("unknown backend type: {backend_type}")]
    UnknownBackendType { backend_type: String },
    #[error("invalid {field} in the {location}: {value} (allowed: {allowed})")]
    OutOfRange {
        location: &'static str,
        field: String,
        value: String,
        allowed: &'static str,
    },
    #[error("{option} is not supported: {reason}")]
    Unsupported {
        option: &'static str,
        reason: &'static str,
    },
}

fn plural(items: &[String]) -> &'static str {
    if items.len() == 1 { "" } else { "s" }
}

impl FromStr for NetworkConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl NetworkConfig {
    /// What differs in `now` from `self`, field by field (`Network 10.10.0.0/16 → 10.11.0.0/16,
    /// SubnetLen 24 → 25`); empty when nothing does.
    #[must_use]
    pub fn changes_to(&self, now: &Self) -> String {
        let fields = [
            ("Network", self.network.to_string(), now.network.to_string()),
            (
                "SubnetLen",
                self.subnet_len.to_string(),
                now.subnet_len.to_string(),
            ),
            (
                "SubnetMin",
                self.subnet_min.to_string(),
                now.subnet_min.to_string(),
            ),
            (
                "SubnetMax",
                self.subnet_max.to_string(),
                now.subnet_max.to_string(),
            ),
            (
                "Backend",
                format!("{:?}", self.backend),
                format!("{:?}", now.backend),
            ),
        ];
        fields
            .into_iter()
            .filter(|(_, old, new)| old != new)
            .map(|(name, old, new)| format!("{name} {old} → {new}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Parses and validates the JSON text of `<prefix>/config`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json {
            reason: e.to_string(),
        })?;
        let object = value.as_object().ok_or_else(|| ConfigError::NotAnObject {
            location: CONFIG,
            found: describe(&value),
        })?;
        let fields = object_fields(object, CONFIG)?;
        reject_unknown(&fields, TOP_LEVEL_FIELDS, CONFIG)?;

        let enable_ipv4 = get_bool(&fields, "enableipv4", CONFIG)?.unwrap_or(true);
        let enable_ipv6 = get_bool(&fields, "enableipv6", CONFIG)?.unwrap_or(false);
        // Type-checked like flannel's decoder would, then ignored: we write no nftables rules.
        get_bool(&fields, "enablenftables", CONFIG)?;
        if !enable_ipv4 {
            return Err(ConfigError::Unsupported {
                option: "EnableIPv4=false",
                reason: "this agent supports IPv4 networks only",
            });
        }

        let network = parse_network(&fields)?;
        let subnet_len = subnet_len(&fields, network)?;
        let size = 1u64 << (32 - subnet_len);
        let start = u64::from(u32::from(network.network()));
        let end = start + (1u64 << (32 - network.prefix_len()));

        // As in flannel: the first subnet is skipped by default, because a pod bridge holding
        // the network's own address (10.100.0.0 in 10.100.0.0/16) causes trouble.
        let subnet_min = match get_ipv4(&fields, "subnetmin")? {
            None => to_addr(start + size),
            Some(value) if network.contains(&value) => value,
            Some(value) => return Err(ConfigError::SubnetMinOutOfRange { value, network }),
        };
        let subnet_max = match get_ipv4(&fields, "subnetmax")? {
            None => to_addr(end - size),
            Some(value) if network.contains(&value) => value,
            Some(value) => return Err(ConfigError::SubnetMaxOutOfRange { value, network }),
        };
        if u64::from(u32::from(subnet_min)) % size != 0 {
            return Err(ConfigError::SubnetMinMisaligned {
                value: subnet_min,
                subnet_len,
            });
        }
        if u64::from(u32::from(subnet_max)) % size != 0 {
            return Err(ConfigError::SubnetMaxMisaligned {
                value: subnet_max,
                subnet_len,
            });
        }

        // flannel validates IPv6 after IPv4; we only say we cannot do it.
        if enable_ipv6 {
            return Err(ConfigError::Unsupported {
                option: "EnableIPv6=true",
                reason: "IPv6 is not supported yet; this agent is IPv4 only",
            });
        }

        let backend = parse_backend(fields.get("backend").map(|(_, value)| value))?;
        Ok(Self {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
        })
    }

    /// Number of addresses in one node subnet.
    pub fn subnet_size(&self) -> u64 {
        1u64 << (32 - self.subnet_len)
    }

    /// Whether `subnet` is a node subnet this config could hand out: right length, aligned,
    /// between SubnetMin and SubnetMax. A lease that fails this is deleted or ignored when the
    /// config changed under it (flannel's `isSubnetConfigCompat`, plus the alignment check).
    pub fn fits(&self, subnet: Ipv4Net) -> bool {
        subnet.prefix_len() == self.subnet_len
            && subnet.addr() == subnet.network()
            && self.subnet_min <= subnet.addr()
            && subnet.addr() <= self.subnet_max
    }
}

fn object_fields<'a>(
    object: &'a serde_json::Map<String, Value>,
    location: &'static str,
) -> Result<Fields<'a>, ConfigError> {
    Fields::new(object).map_err(|dup| ConfigError::DuplicateField {
        location,
        first: dup.first,
        second: dup.second,
    })
}

fn reject_unknown(
    fields: &Fields<'_>,
    known: &[&str],
    location: &'static str,
) -> Result<(), ConfigError> {
    let unknown = fields.unknown(known);
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::UnknownFields {
            location,
            fields: unknown,
        })
    }
}

fn invalid_type(
    location: &'static str,
    name: &str,
    expected: &'static str,
    value: &Value,
) -> ConfigError {
    ConfigError::InvalidType {
        location,
        field: name.to_owned(),
        expected,
        value: describe(value),
    }
}

fn get_bool(
    fields: &Fields<'_>,
    lower: &str,
    location: &'static str,
) -> Result<Option<bool>, ConfigError> {
    match fields.get(lower) {
        None => Ok(None),
        Some((_, Value::Bool(b))) => Ok(Some(*b)),
        Some((name, value)) => Err(invalid_type(location, name, "true or false", value)),
    }
}

/// A non-negative integer option, as Go decodes into `uint`/`int` (no fractions, no strings).
fn get_uint(
    fields: &Fields<'_>,
    lower: &str,
    location: &'static str,
) -> Result<Option<(String, u64)>, ConfigError> {
    match fields.get(lower) {
        None => Ok(None),
        Some((name, value)) => match value.as_u64() {
            Some(n) => Ok(Some((name.to_owned(), n))),
            None if value.is_i64() => Err(ConfigError::OutOfRange {
                location,
                field: name.to_owned(),
                value: describe(value),
                allowed: "a non-negative integer",
            }),
            None => Err(invalid_type(location, name, "an integer", value)),
        },
    }
}

fn get_string<'a>(
    fields: &Fields<'a>,
    lower: &str,
    location: &'static str,
) -> Result<Option<(&'a str, &'a str)>, ConfigError> {
    match fields.get(lower) {
        None => Ok(None),
        Some((name, Value::String(s))) => Ok(Some((name, s.as_str()))),
        Some((name, value)) => Err(invalid_type(location, name, "a string", value)),
    }
}

fn parse_network(fields: &Fields<'_>) -> Result<Ipv4Net, ConfigError> {
    let Some((_, text)) = get_string(fields, "network", CONFIG)? else {
        return Err(ConfigError::MissingNetwork);
    };
    let network = match text.parse::<Ipv4Net>() {
        // Go's net.ParseCIDR hands back the network, host bits cleared.
        Ok(net) => net.trunc(),
        Err(_) => {
            let reason = if text.parse::<ipnet::Ipv6Net>().is_ok() {
                "invalid IPv4 CIDR format"
            } else {
                "invalid CIDR address"
            };
            return Err(ConfigError::InvalidNetwork {
                value: text.to_owned(),
                reason: reason.to_owned(),
            });
        }
    };
    // flannel treats 0.0.0.0/0 as "not set".
    if network.prefix_len() == 0 && network.addr().is_unspecified() {
        return Err(ConfigError::MissingNetwork);
    }
    Ok(network)
}

fn subnet_len(fields: &Fields<'_>, network: Ipv4Net) -> Result<u8, ConfigError> {
    let prefix = network.prefix_len();
    match get_uint(fields, "subnetlen", CONFIG)? {
        // 0 is "unset" in flannel.
        None | Some((_, 0)) => {
            if prefix > 28 {
                Err(ConfigError::NetworkTooSmall { network })
            } else if prefix <= 22 {
                Ok(24)
            } else {
                Ok(prefix + 2)
            }
        }
        Some((_, len)) if len > 30 => Err(ConfigError::SubnetLenTooLong { subnet_len: len }),
        Some((_, len)) => {
            // len <= 30 here, so the conversion cannot fail.
            let len = u8::try_from(len).unwrap_or(u8::MAX);
            if len < prefix + 2 {
                Err(ConfigError::TooFewSubnets {
                    network,
                    subnet_len: len,
                })
            } else {
                Ok(len)
            }
        }
    }
}

/// SubnetMin/SubnetMax: `None` when unset or `0.0.0.0` (flannel's zero value).
fn get_ipv4(fields: &Fields<'_>, lower: &str) -> Result<Option<Ipv4Addr>, ConfigError> {
    let Some((name, text)) = get_string(fields, lower, CONFIG)? else {
        return Ok(None);
    };
    match text.parse::<Ipv4Addr>() {
        Ok(addr) if addr.is_unspecified() => Ok(None),
        Ok(addr) => Ok(Some(addr)),
        // Go's net.ParseIP also takes IPv4-mapped IPv6 ("::ffff:10.0.0.0").
        Err(_) => match text
            .parse::<Ipv6Addr>()
            .ok()
            .and_then(|v6| v6.to_ipv4_mapped())
        {
            Some(addr) if addr.is_unspecified() => Ok(None),
            Some(addr) => Ok(Some(addr)),
            None => Err(ConfigError::InvalidAddress {
                field: name.to_owned(),
                value: text.to_owned(),
            }),
        },
    }
}

fn to_addr(value: u64) -> Ipv4Addr {
    // Callers pass addresses inside an IPv4 network, so this never saturates.
    Ipv4Addr::from(u32::try_from(value).unwrap_or(u32::MAX))
}

fn parse_backend(value: Option<&Value>) -> Result<Backend, ConfigError> {
    // Our choice (flannel-compat.md §1): no Backend means vxlan, as flannel's docs say.
    let Some(value) = value else {
        return Ok(Backend::DEFAULT_VXLAN);
    };
    let object = value.as_object().ok_or_else(|| ConfigError::NotAnObject {
        location: BACKEND,
        found: describe(value),
    })?;
    let fields = object_fields(object, BACKEND)?;
    // A Backend without Type decodes to "" in flannel, which no backend registers.
    let backend_type = get_string(&fields, "type", BACKEND)?.map_or("", |(_, t)| t);
    match backend_type.to_ascii_lowercase().as_str() {
        "vxlan" => parse_vxlan(&fields),
        "host-gw" => {
            reject_unknown(&fields, HOST_GW_FIELDS, HOST_GW)?;
            Ok(Backend::HostGw)
        }
        _ => Err(ConfigError::UnknownBackendType {
            backend_type: backend_type.to_owned(),
        }),
    }
}

fn parse_vxlan(fields: &Fields<'_>) -> Result<Backend, ConfigError> {
    reject_unknown(fields, VXLAN_FIELDS, VXLAN)?;
    if get_bool(fields, "gbp", VXLAN)? == Some(true) {
        return Err(ConfigError::Unsupported {
            option: "vxlan option GBP=true",
            reason: "the eBPF data path does not implement VXLAN group-based policy",
        });
    }
    if get_bool(fields, "learning", VXLAN)? == Some(true) {
        return Err(ConfigError::Unsupported {
            option: "vxlan option Learning=true",
            reason: "peers are programmed from the etcd leases, never learned from traffic",
        });
    }
    // Type-checked like flannel's decoder would, then ignored: they only name the device on
    // Windows.
    get_string(fields, "macprefix", VXLAN)?;
    get_string(fields, "name", VXLAN)?;
    let vni = match get_uint(fields, "vni", VXLAN)? {
        None => DEFAULT_VNI,
        Some((name, vni)) => u32::try_from(vni)
            .ok()
            .filter(|vni| *vni <= MAX_VNI)
            .ok_or_else(|| ConfigError::OutOfRange {
                location: VXLAN,
                field: name,
                value: vni.to_string(),
                allowed: "0 to 16777215",
            })?,
    };
    let port = match get_uint(fields, "port", VXLAN)? {
        // 0 leaves the choice to the kernel in flannel, which means 8472.
        None | Some((_, 0)) => DEFAULT_VXLAN_PORT,
        Some((name, port)) => u16::try_from(port).map_err(|_| ConfigError::OutOfRange {
            location: VXLAN,
            field: name,
            value: port.to_string(),
            allowed: "1 to 65535",
        })?,
    };
    let mtu = match get_uint(fields, "mtu", VXLAN)? {
        None | Some((_, 0)) => None,
        Some((name, mtu)) => Some(
            u32::try_from(mtu)
                .ok()
                .filter(|mtu| (MIN_VXLAN_MTU..=65535).contains(mtu))
                .ok_or_else(|| ConfigError::OutOfRange {
                    location: VXLAN,
                    field: name,
                    value: mtu.to_string(),
                    allowed: "118 to 65535, the 50 bytes of VXLAN overhead plus at least 68",
                })?,
        ),
    };
    let direct_routing = get_bool(fields, "directrouting", VXLAN)?.unwrap_or(false);
    Ok(Backend::Vxlan {
        vni,
        port,
        mtu,
        direct_routing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> NetworkConfig {
        NetworkConfig::parse(text).unwrap_or_else(|e| panic!("{text} rejected: {e}"))
    }

    #[test]
    fn changes_are_named_field_by_field() {
        let old = parse(r#"{"Network": "10.10.0.0/16"}"#);
        assert_eq!(old.changes_to(&old.clone()), "");
        let new = parse(r#"{"Network": "10.10.0.0/16", "SubnetLen": 25}"#);
        let changes = old.changes_to(&new);
        assert!(changes.starts_with("SubnetLen 24 → 25"), "{changes}");
        let moved = parse(r#"{"Network": "10.11.0.0/16", "Backend": {"Type": "host-gw"}}"#);
        let changes = old.changes_to(&moved);
        assert!(
            changes.starts_with("Network 10.10.0.0/16 → 10.11.0.0/16, SubnetMin")
                && changes.contains("Backend Vxlan")
                && changes.ends_with("→ HostGw"),
            "{changes}"
        );
    }

    fn error(text: &str) -> ConfigError {
        match NetworkConfig::parse(text) {
            Ok(config) => panic!("{text} accepted as {config:?}"),
            Err(e) => e,
        }
    }

    fn message(text: &str) -> String {
        error(text).to_string()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn seed_vxlan_config() {
        let config = parse(r#"{"Network": "172.17.0.0/16", "Backend": {"Type": "vxlan"}}"#);
        assert_eq!(
            config,
            NetworkConfig {
                network: net("172.17.0.0/16"),
                subnet_len: 24,
                subnet_min: ip("172.17.1.0"),
                subnet_max: ip("172.17.255.0"),
                backend: Backend::Vxlan {
                    vni: 1,
                    port: 8472,
                    mtu: None,
                    direct_routing: false
                },
            }
        );
    }

    #[test]
    fn seed_host_gw_config() {
        let config = parse(r#"{"Network": "172.7.0.0/16", "Backend": {"Type": "host-gw"}}"#);
        assert_eq!(config.backend, Backend::HostGw);
        assert_eq!(config.backend.type_name(), "host-gw");
        assert_eq!(config.subnet_min, ip("172.7.1.0"));
        assert_eq!(config.subnet_max, ip("172.7.255.0"));
    }

    #[test]
    fn seed_direct_routing_config_with_odd_case() {
        let config = parse(
            r#"{"Network": "172.7.0.0/16", "Backend": {"Type": "vxlan", "Directrouting": true}}"#,
        );
        assert_eq!(
            config.backend,
            Backend::Vxlan {
                vni: 1,
                port: 8472,
                mtu: None,
                direct_routing: true
            }
        );
    }

    #[test]
    fn missing_backend_is_vxlan() {
        let config = parse(r#"{"Network": "10.0.0.0/8"}"#);
        assert_eq!(config.backend, Backend::DEFAULT_VXLAN);
        assert_eq!(config.backend.type_name(), "vxlan");
        let config = parse(r#"{"Network": "10.0.0.0/8", "Backend": null}"#);
        assert_eq!(config.backend, Backend::DEFAULT_VXLAN);
    }

    #[test]
    fn field_names_are_case_insensitive() {
        let config = parse(
            r#"{"network": "10.5.0.0/16", "SUBNETLEN": 26, "subnetMin": "10.5.1.0",
                "SubnetMAX": "10.5.2.0", "enableipv4": true, "ENABLEIPV6": false,
                "enableNFTables": true,
                "backend": {"TYPE": "VxLaN", "vni": 7, "PORT": 4789, "mtu": 9000,
                            "directrouting": true, "gbp": false, "LEARNING": false}}"#,
        );
        assert_eq!(
            config,
            NetworkConfig {
                network: net("10.5.0.0/16"),
                subnet_len: 26,
                subnet_min: ip("10.5.1.0"),
                subnet_max: ip("10.5.2.0"),
                backend: Backend::Vxlan {
                    vni: 7,
                    port: 4789,
                    mtu: Some(9000),
                    direct_routing: true
                },
            }
        );
    }

    #[test]
    fn host_gw_type_is_case_insensitive() {
        let config = parse(r#"{"Network": "10.0.0.0/16", "Backend": {"type": "HOST-GW"}}"#);
        assert_eq!(config.backend, Backend::HostGw);
    }

    #[test]
    fn network_host_bits_are_cleared() {
        let config = parse(r#"{"Network": "10.1.2.3/16"}"#);
        assert_eq!(config.network, net("10.1.0.0/16"));
        assert_eq!(config.subnet_min, ip("10.1.1.0"));
    }

    #[test]
    fn subnet_len_defaults() {
        // prefix <= 22: /24
        for (network, len, min, max) in [
            ("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0"),
            ("10.0.0.0/22", 24, "10.0.1.0", "10.0.3.0"),
            // 22 < prefix <= 28: prefix + 2
            ("10.0.0.0/23", 25, "10.0.0.128", "10.0.1.128"),
            ("10.0.0.0/24", 26, "10.0.0.64", "10.0.0.192"),
            ("10.0.0.0/28", 30, "10.0.0.4", "10.0.0.12"),
        ] {
            let config = parse(&format!(r#"{{"Network": "{network}"}}"#));
            assert_eq!(config.subnet_len, len, "{network}");
            assert_eq!(config.subnet_min, ip(min), "{network}");
            assert_eq!(config.subnet_max, ip(max), "{network}");
        }
    }

    #[test]
    fn subnet_len_zero_or_null_means_default() {
        assert_eq!(
            parse(r#"{"Network": "10.0.0.0/16", "SubnetLen": 0}"#).subnet_len,
            24
        );
        assert_eq!(
            parse(r#"{"Network": "10.0.0.0/16", "SubnetLen": null}"#).subnet_len,
            24
        );
    }

    #[test]
    fn network_at_the_top_of_the_address_space() {
        let config = parse(r#"{"Network": "255.255.0.0/16"}"#);
        assert_eq!(config.subnet_max, ip("255.255.255.0"));
        let config = parse(r#"{"Network": "128.0.0.0/1", "SubnetLen": 8}"#);
        assert_eq!(config.subnet_min, ip("129.0.0.0"));
        assert_eq!(config.subnet_max, ip("255.0.0.0"));
    }

    #[test]
    fn explicit_subnet_min_max_zero_means_default() {
        let config =
            parse(r#"{"Network": "10.0.0.0/16", "SubnetMin": "0.0.0.0", "SubnetMax": "0.0.0.0"}"#);
        assert_eq!(config.subnet_min, ip("10.0.1.0"));
        assert_eq!(config.subnet_max, ip("10.0.255.0"));
    }

    #[test]
    fn subnet_min_may_be_the_first_subnet_when_given() {
        let config = parse(r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.0.0.0"}"#);
        assert_eq!(config.subnet_min, ip("10.0.0.0"));
    }

    #[test]
    fn missing_network_message() {
        let text = "please define a correct Network parameter in the flannel config";
        assert_eq!(message(r#"{}"#), text);
        assert_eq!(message(r#"{"Network": null}"#), text);
        assert_eq!(message(r#"{"Network": "0.0.0.0/0"}"#), text);
        assert_eq!(message(r#"{"Backend": {"Type": "vxlan"}}"#), text);
    }

    #[test]
    fn network_too_small_message() {
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/29"}"#),
            "network is too small. Minimum useful network prefix is /28"
        );
        assert_eq!(
            error(r#"{"Network": "10.0.0.0/32"}"#),
            ConfigError::NetworkTooSmall {
                network: net("10.0.0.0/32")
            }
        );
    }

    #[test]
    fn subnet_len_too_long_message() {
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "SubnetLen": 31}"#),
            "SubnetLen must be less than /31"
        );
        assert_eq!(
            error(r#"{"Network": "10.0.0.0/16", "SubnetLen": 4000}"#),
            ConfigError::SubnetLenTooLong { subnet_len: 4000 }
        );
        // /30 is allowed.
        assert_eq!(
            parse(r#"{"Network": "10.0.0.0/16", "SubnetLen": 30}"#).subnet_len,
            30
        );
    }

    #[test]
    fn too_few_subnets_message() {
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "SubnetLen": 17}"#),
            "network must be able to accommodate at least four subnets"
        );
        assert_eq!(
            error(r#"{"Network": "10.0.0.0/16", "SubnetLen": 8}"#),
            ConfigError::TooFewSubnets {
                network: net("10.0.0.0/16"),
                subnet_len: 8
            }
        );
        assert_eq!(
            parse(r#"{"Network": "10.0.0.0/16", "SubnetLen": 18}"#).subnet_len,
            18
        );
    }

    #[test]
    fn subnet_min_max_range_messages() {
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"}"#),
            "SubnetMin is not in the range of the Network"
        );
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "SubnetMax": "11.0.0.0"}"#),
            "SubnetMax is not in the range of the Network"
        );
        assert_eq!(
            error(r#"{"Network": "10.0.0.0/16", "SubnetMin": "9.0.0.0"}"#),
            ConfigError::SubnetMinOutOfRange {
                value: ip("9.0.0.0"),
                network: net("10.0.0.0/16")
            }
        );
    }

    #[test]
    fn subnet_min_max_alignment_messages() {
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.0.1.1"}"#),
            "SubnetMin is not on a SubnetLen boundary: 10.0.1.1"
        );
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "SubnetMax": "10.0.9.128"}"#),
            "SubnetMax is not on a SubnetLen boundary: 10.0.9.128"
        );
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "SubnetLen": 26, "SubnetMax": "10.0.9.32"}"#),
            "SubnetMax is not on a SubnetLen boundary: 10.0.9.32"
        );
    }

    #[test]
    fn unknown_backend_type_message() {
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "udp"}}"#),
            "unknown backend type: udp"
        );
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "WireGuard"}}"#),
            "unknown backend type: WireGuard"
        );
        // A Backend without Type decodes to "" in flannel.
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "Backend": {}}"#),
            "unknown backend type: "
        );
    }

    #[test]
    fn vxlan_option_defaults_and_values() {
        let config = parse(
            r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "VNI": 0, "Port": 0, "MTU": 0}}"#,
        );
        assert_eq!(
            config.backend,
            Backend::Vxlan {
                vni: 0,
                port: 8472,
                mtu: None,
                direct_routing: false
            }
        );
        let config = parse(
            r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "VNI": 16777215, "Port": 65535, "MTU": 118}}"#,
        );
        assert_eq!(
            config.backend,
            Backend::Vxlan {
                vni: MAX_VNI,
                port: 65535,
                mtu: Some(118),
                direct_routing: false
            }
        );
    }

    #[test]
    fn vxlan_option_ranges() {
        for (option, value) in [
            ("VNI", "16777216"),
            ("VNI", "-1"),
            ("Port", "65536"),
            ("MTU", "117"),
            ("MTU", "65536"),
        ] {
            let text = format!(
                r#"{{"Network": "10.0.0.0/16", "Backend": {{"Type": "vxlan", "{option}": {value}}}}}"#
            );
            let err = error(&text);
            assert!(
                matches!(&err, ConfigError::OutOfRange { field, value: v, .. } if field == option && v == value),
                "{text}: {err:?}"
            );
            assert!(err.to_string().contains(option), "{err}");
            assert!(err.to_string().contains(value), "{err}");
        }
    }

    #[test]
    fn gbp_and_learning_are_rejected_when_true() {
        let err =
            message(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "GBP": true}}"#);
        assert!(err.contains("GBP=true is not supported"), "{err}");
        let err = message(
            r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "Learning": true}}"#,
        );
        assert!(err.contains("Learning=true is not supported"), "{err}");
    }

    #[test]
    fn windows_only_options_are_taken_and_ignored() {
        // A config shared with Windows nodes: MacPrefix, Name, and VNI 4096 on port 4789, as
        // flannel's docs tell Windows clusters to use.
        let config = NetworkConfig::parse(
            r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "Learning": false,
                "VNI": 4096, "Port": 4789, "MacPrefix": "0E-2A", "Name": "flannel.4096"}}"#,
        )
        .unwrap();
        let Backend::Vxlan { vni, port, .. } = config.backend else {
            panic!("vxlan expected: {config:?}");
        };
        assert_eq!((vni, port), (4096, 4789));
        // Still type-checked as flannel's decoder would.
        let err =
            message(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "MacPrefix": 7}}"#);
        assert!(err.contains("MacPrefix"), "{err}");
        let err =
            message(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "Name": false}}"#);
        assert!(err.contains("Name"), "{err}");
    }

    #[test]
    fn unknown_top_level_fields_are_named() {
        let err = error(r#"{"Network": "10.0.0.0/16", "Foo": 1, "subnetlength": 24}"#);
        assert_eq!(
            err,
            ConfigError::UnknownFields {
                location: "flannel config",
                fields: vec!["Foo".to_owned(), "subnetlength".to_owned()]
            }
        );
        assert_eq!(
            err.to_string(),
            "unknown or unsupported options in the flannel config: Foo, subnetlength"
        );
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "Networks": ["10.1.0.0/16"]}"#),
            "unknown or unsupported option in the flannel config: Networks"
        );
    }

    #[test]
    fn unknown_backend_fields_are_named() {
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "Vni2": 2}}"#),
            "unknown or unsupported option in the vxlan backend config: Vni2"
        );
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "host-gw", "VNI": 1}}"#),
            "unknown or unsupported option in the host-gw backend config: VNI"
        );
    }

    #[test]
    fn ipv6_is_rejected_clearly() {
        let err = message(
            r#"{"Network": "10.0.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/56"}"#,
        );
        assert!(err.contains("EnableIPv6=true is not supported"), "{err}");
        assert!(err.contains("IPv4 only"), "{err}");
        let err =
            message(r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/56"}"#);
        assert!(err.contains("EnableIPv4=false is not supported"), "{err}");
        // IPv6 fields are ignored while IPv6 is off, as in flannel.
        parse(r#"{"Network": "10.0.0.0/16", "IPv6Network": "fd00::/56", "IPv6SubnetLen": 64}"#);
    }

    #[test]
    fn enable_nftables_is_accepted_and_ignored() {
        parse(r#"{"Network": "10.0.0.0/16", "EnableNFTables": true}"#);
        parse(r#"{"Network": "10.0.0.0/16", "EnableNFTables": false}"#);
    }

    #[test]
    fn wrong_types_are_named() {
        let err = error(r#"{"Network": 10}"#);
        assert_eq!(
            err,
            ConfigError::InvalidType {
                location: "flannel config",
                field: "Network".to_owned(),
                expected: "a string",
                value: "10".to_owned()
            }
        );
        assert_eq!(
            err.to_string(),
            "invalid Network in the flannel config: expected a string, got 10"
        );
        let err = message(r#"{"Network": "10.0.0.0/16", "SubnetLen": "24"}"#);
        assert_eq!(
            err,
            "invalid SubnetLen in the flannel config: expected an integer, got \"24\""
        );
        let err = message(r#"{"Network": "10.0.0.0/16", "SubnetLen": 24.5}"#);
        assert!(err.contains("SubnetLen"), "{err}");
        let err = message(r#"{"Network": "10.0.0.0/16", "EnableIPv4": "yes"}"#);
        assert_eq!(
            err,
            "invalid EnableIPv4 in the flannel config: expected true or false, got \"yes\""
        );
        let err = message(r#"{"Network": "10.0.0.0/16", "Backend": "vxlan"}"#);
        assert_eq!(
            err,
            "the Backend section of the flannel config must be a JSON object, got \"vxlan\""
        );
        let err = message(
            r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": 1}}"#,
        );
        assert_eq!(
            err,
            "invalid DirectRouting in the vxlan backend config: expected true or false, got 1"
        );
    }

    #[test]
    fn bad_network_and_addresses_are_named() {
        assert_eq!(
            error(r#"{"Network": "10.0.0.0"}"#),
            ConfigError::InvalidNetwork {
                value: "10.0.0.0".to_owned(),
                reason: "invalid CIDR address".to_owned()
            }
        );
        assert_eq!(
            message(r#"{"Network": "fd00::/64"}"#),
            "invalid Network in the flannel config: fd00::/64: invalid IPv4 CIDR format"
        );
        assert_eq!(
            message(r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.0.1"}"#),
            "invalid SubnetMin in the flannel config: 10.0.1 is not an IPv4 address"
        );
        // An IPv4-mapped IPv6 address is an IPv4 address to Go.
        assert_eq!(
            parse(r#"{"Network": "10.0.0.0/16", "SubnetMin": "::ffff:10.0.4.0"}"#).subnet_min,
            ip("10.0.4.0")
        );
    }

    #[test]
    fn malformed_json_and_non_objects() {
        assert!(message("{").starts_with("error decoding the flannel config: "));
        assert_eq!(
            message("[1]"),
            "the flannel config must be a JSON object, got [1]"
        );
        let err = message(r#"{"Network": "10.0.0.0/16", "network": "10.1.0.0/16"}"#);
        assert!(err.contains("given twice"), "{err}");
    }

    #[test]
    fn from_str_matches_parse() {
        let config: NetworkConfig = r#"{"Network": "10.0.0.0/16"}"#.parse().unwrap();
        assert_eq!(config.network, net("10.0.0.0/16"));
    }

    #[test]
    fn fits_checks_length_alignment_and_range() {
        let config = parse(
            r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.0.2.0", "SubnetMax": "10.0.9.0"}"#,
        );
        assert!(config.fits(net("10.0.2.0/24")));
        assert!(config.fits(net("10.0.9.0/24")));
        assert!(!config.fits(net("10.0.1.0/24")));
        assert!(!config.fits(net("10.0.10.0/24")));
        assert!(!config.fits(net("10.0.4.0/25")));
        assert!(!config.fits(net("10.0.4.5/24")));
        assert!(!config.fits(net("10.1.4.0/24")));
        assert_eq!(config.subnet_size(), 256);
    }

    #[test]
    fn pod_mtu() {
        assert_eq!(Backend::DEFAULT_VXLAN.pod_mtu(1500), 1450);
        let jumbo = Backend::Vxlan {
            vni: 1,
            port: 8472,
            mtu: Some(9000),
            direct_routing: false,
        };
        assert_eq!(jumbo.pod_mtu(1500), 8950);
        assert_eq!(Backend::HostGw.pod_mtu(1500), 1500);
        assert_eq!(Backend::DEFAULT_VXLAN.pod_mtu(10), 0);
    }
}
