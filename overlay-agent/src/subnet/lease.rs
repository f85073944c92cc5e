//! Subnet lease keys and records, byte-compatible with flanneld (flannel-compat.md §2).
//!
//! Key: `<prefix>/subnets/172.16.57.0-24` (a dual-stack flanneld appends `&<v6addr>-<len>`).
//! Value, written exactly so:
//! `{"PublicIP":"10.4.7.22","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"d6:51:2e:80:5c:69"}}`
//! host-gw records carry no `BackendData` at all. Records written by stock flanneld are read
//! leniently (field names in any case, extra fields ignored), as Go's decoder does.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::json_ci::{Fields, describe};

/// `BackendType` of vxlan leases.
pub const VXLAN_BACKEND_TYPE: &str = "vxlan";
/// `BackendType` of host-gw leases.
pub const HOST_GW_BACKEND_TYPE: &str = "host-gw";

/// The key of the network config: `<prefix>/config`.
pub fn config_key(prefix: &str) -> String {
    format!("{}/config", trim_prefix(prefix))
}

/// The prefix under which all leases live: `<prefix>/subnets/`.
pub fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", trim_prefix(prefix))
}

/// The key of the lease for `subnet`: `<prefix>/subnets/172.16.57.0-24`.
pub fn subnet_key(prefix: &str, subnet: Ipv4Net) -> String {
    format!(
        "{}{}-{}",
        subnets_prefix(prefix),
        subnet.addr(),
        subnet.prefix_len()
    )
}

/// flannel joins paths with Go's `path.Join`, which drops a trailing slash from the prefix.
fn trim_prefix(prefix: &str) -> &str {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() && prefix.starts_with('/') {
        ""
    } else {
        trimmed
    }
}

/// A key under `<prefix>/subnets/` that does not name a subnet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{key:?} is not a subnet lease key (expected <prefix>/subnets/a.b.c.d-len): {reason}",
    key = super::registry::cut_for_log(.key)
)]
pub struct KeyError {
    pub key: String,
    pub reason: &'static str,
}

/// The IPv4 subnet a lease key names. The last path element is parsed, so a full key and a
/// bare `172.16.57.0-24` both work; a dual-stack suffix `&fd00::-64` is checked and dropped.
pub fn parse_subnet_key(key: &str) -> Result<Ipv4Net, KeyError> {
    let fail = |reason| KeyError {
        key: key.to_owned(),
        reason,
    };
    let name = key.rsplit('/').next().unwrap_or(key);
    let (v4, v6) = match name.split_once('&') {
        Some((v4, v6)) => (v4, Some(v6)),
        None => (name, None),
    };
    if let Some(v6) = v6 {
        let (addr, len) = v6.rsplit_once('-').ok_or(fail("IPv6 part has no -len"))?;
        addr.parse::<Ipv6Addr>()
            .map_err(|_| fail("IPv6 part is not an address"))?;
        parse_len(len, 128).ok_or(fail("IPv6 prefix length is not 0..128"))?;
    }
    let (addr, len) = v4.rsplit_once('-').ok_or(fail("no -len suffix"))?;
    let addr = addr
        .parse::<Ipv4Addr>()
        .map_err(|_| fail("not an IPv4 address"))?;
    let len = parse_len(len, 32).ok_or(fail("prefix length is not 0..32"))?;
    let subnet = Ipv4Net::new(addr, len).map_err(|_| fail("prefix length is not 0..32"))?;
    if subnet.addr() != subnet.network() {
        return Err(fail("address has host bits set"));
    }
    Ok(subnet)
}

/// The IPv4 subnet of `key`, a key read under `subnets` (what [`subnets_prefix`] gives): only a
/// key directly under it names a subnet. flannel writes no other; a deeper key such as
/// `<prefix>/subnets/x/10.10.5.0-24` would otherwise name a live node's subnet a second time.
pub fn parse_lease_key(subnets: &str, key: &str) -> Result<Ipv4Net, KeyError> {
    let name = key
        .strip_prefix(subnets)
        .filter(|name| !name.contains('/'))
        .ok_or_else(|| KeyError {
            key: key.to_owned(),
            reason: "not directly under <prefix>/subnets/",
        })?;
    parse_subnet_key(name).map_err(|e| KeyError {
        key: key.to_owned(),
        ..e
    })
}

fn parse_len(text: &str, max: u8) -> Option<u8> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u8>().ok().filter(|len| *len <= max)
}

/// An Ethernet address; serialized as lowercase colon-separated hex (`d6:51:2e:80:5c:69`),
/// as Go's `net.HardwareAddr` prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// The VtepMAC of the node reached at `public_ip`: a locally administered unicast address
    /// derived from the address, so it stays the same across agent restarts (flanneld's etcd
    /// mode picks a new one each start, leaving stale neighbour entries on peers). PublicIPs
    /// are unique in a cluster, so the MACs are too, up to a 2^-46 hash collision.
    pub fn for_public_ip(public_ip: Ipv4Addr) -> Self {
        // FNV-1a 64 over a fixed tag and the address: stable across releases and platforms.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in b"overlay-vtep".iter().chain(&public_ip.octets()) {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        // FNV alone barely mixes the last input bytes into the high ones; finish with
        // MurmurHash3's fmix64 so neighbouring addresses get unrelated MACs.
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        hash ^= hash >> 33;
        let h = hash.to_be_bytes();
        Self([(h[0] & 0xfc) | 0x02, h[1], h[2], h[3], h[4], h[5]])
    }

    /// A random locally administered unicast address, as the kernel gives a new VXLAN device.
    pub fn random() -> Self {
        let mut bytes: [u8; 6] = rand::random();
        bytes[0] = (bytes[0] & 0xfe) | 0x02;
        Self(bytes)
    }
}

impl From<[u8; 6]> for Mac {
    fn from(bytes: [u8; 6]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not a 6-byte MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a MAC address (expected six hex bytes like d6:51:2e:80:5c:69)")]
pub struct MacParseError {
    pub value: String,
}

impl FromStr for Mac {
    type Err = MacParseError;

    /// Accepts what Go's `net.ParseMAC` accepts for 6-byte addresses, in any case:
    /// `d6:51:2e:80:5c:69`, `d6-51-2e-80-5c-69` and `d651.2e80.5c69`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = || MacParseError {
            value: text.to_owned(),
        };
        let hex: String = if text.contains('.') {
            let groups: Vec<&str> = text.split('.').collect();
            if groups.len() != 3 || groups.iter().any(|g| g.len() != 4) {
                return Err(fail());
            }
            groups.concat()
        } else {
            let sep = if text.contains('-') { '-' } else { ':' };
            let groups: Vec<&str> = text.split(sep).collect();
            if groups.len() != 6 || groups.iter().any(|g| g.len() != 2) {
                return Err(fail());
            }
            groups.concat()
        };
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(fail());
        }
        let mut bytes = [0u8; 6];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| fail())?;
        }
        Ok(Self(bytes))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a vxlan lease publishes in `BackendData`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanData {
    /// The publisher's VNI; `None` when a (foreign) record leaves it out.
    pub vni: Option<u32>,
    /// The MAC of the publisher's VTEP: inner destination MAC of frames sent to it.
    pub vtep_mac: Mac,
}

/// The `BackendData` of a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendData {
    /// No `BackendData` key (host-gw).
    None,
    Vxlan(VxlanData),
    /// Data of a backend we do not speak, kept as read.
    Other(Value),
}

/// The value of a lease key: who holds the subnet and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAttrs {
    pub public_ip: Ipv4Addr,
    /// `vxlan`, `host-gw`, or whatever another node's backend wrote.
    pub backend_type: String,
    pub backend_data: BackendData,
}

/// A lease value that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not valid JSON: {reason}")]
    Json { reason: String },
    #[error("not a JSON object: {found}")]
    NotAnObject { found: String },
    #[error("field {first} appears twice (also as {second})")]
    DuplicateField { first: String, second: String },
    #[error("no {field} field")]
    Missing { field: &'static str },
    #[error("invalid {field}: {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
}

#[derive(Serialize)]
struct WireRecord<'a> {
    #[serde(rename = "PublicIP")]
    public_ip: Ipv4Addr,
    /// Always `null`: we are IPv4 only, and flannel writes the key even then.
    #[serde(rename = "PublicIPv6")]
    public_ipv6: Option<Ipv6Addr>,
    /// `omitempty` in flannel.
    #[serde(rename = "BackendType", skip_serializing_if = "str::is_empty")]
    backend_type: &'a str,
    #[serde(rename = "BackendData", skip_serializing_if = "Option::is_none")]
    backend_data: Option<WireData<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum WireData<'a> {
    Vxlan {
        #[serde(rename = "VNI", skip_serializing_if = "Option::is_none")]
        vni: Option<u32>,
        #[serde(rename = "VtepMAC")]
        vtep_mac: Mac,
    },
    Other(&'a Value),
}

impl LeaseAttrs {
    /// The record of a vxlan node.
    pub fn vxlan(public_ip: Ipv4Addr, vni: u32, vtep_mac: Mac) -> Self {
        Self {
            public_ip,
            backend_type: VXLAN_BACKEND_TYPE.to_owned(),
            backend_data: BackendData::Vxlan(VxlanData {
                vni: Some(vni),
                vtep_mac,
            }),
        }
    }

    /// The record of a host-gw node.
    pub fn host_gw(public_ip: Ipv4Addr) -> Self {
        Self {
            public_ip,
            backend_type: HOST_GW_BACKEND_TYPE.to_owned(),
            backend_data: BackendData::None,
        }
    }

    /// The JSON text stored in etcd, byte for byte what flanneld writes.
    pub fn to_json(&self) -> String {
        let backend_data = match &self.backend_data {
            BackendData::None => None,
            BackendData::Vxlan(data) => Some(WireData::Vxlan {
                vni: data.vni,
                vtep_mac: data.vtep_mac,
            }),
            BackendData::Other(value) => Some(WireData::Other(value)),
        };
        let record = WireRecord {
            public_ip: self.public_ip,
            public_ipv6: None,
            backend_type: &self.backend_type,
            backend_data,
        };
        // Serializing plain strings, numbers and JSON values into a String cannot fail.
        serde_json::to_string(&record).unwrap_or_default()
    }

    /// Reads a record written by us or by stock flanneld. A vxlan record must carry a usable
    /// `VtepMAC`, since a peer cannot be reached without it; `PublicIPv6` and
    /// `BackendV6Data` are ignored (IPv4 only).
    pub fn from_json(bytes: &[u8]) -> Result<Self, RecordError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| RecordError::Json {
            reason: e.to_string(),
        })?;
        let object = value.as_object().ok_or_else(|| RecordError::NotAnObject {
            found: describe(&value),
        })?;
        let fields = Fields::new(object).map_err(|dup| RecordError::DuplicateField {
            first: dup.first,
            second: dup.second,
        })?;

        let public_ip = match fields.get("publicip") {
            None => return Err(RecordError::Missing { field: "PublicIP" }),
            Some((_, Value::String(text))) => {
                text.parse::<Ipv4Addr>().map_err(|_| RecordError::Invalid {
                    field: "PublicIP",
                    value: text.clone(),
                    reason: "not an IPv4 address".to_owned(),
                })?
            }
            Some((_, other)) => return Err(invalid("PublicIP", other, "not a string")),
        };
        let backend_type = match fields.get("backendtype") {
            None => String::new(),
            Some((_, Value::String(text))) => text.clone(),
            Some((_, other)) => return Err(invalid("BackendType", other, "not a string")),
        };
        let data = fields.get("backenddata").map(|(_, value)| value);
        let backend_data = if backend_type == VXLAN_BACKEND_TYPE {
            BackendData::Vxlan(parse_vxlan_data(data)?)
        } else {
            data.map_or(BackendData::None, |value| BackendData::Other(value.clone()))
        };
        Ok(Self {
            public_ip,
            backend_type,
            backend_data,
        })
    }

    /// The VXLAN data, when this is a vxlan record.
    pub fn vxlan_data(&self) -> Option<&VxlanData> {
        match &self.backend_data {
            BackendData::Vxlan(data) => Some(data),
            _ => None,
        }
    }
}

fn invalid(field: &'static str, value: &Value, reason: &str) -> RecordError {
    RecordError::Invalid {
        field,
        value: describe(value),
        reason: reason.to_owned(),
    }
}

fn parse_vxlan_data(data: Option<&Value>) -> Result<VxlanData, RecordError> {
    let Some(data) = data else {
        return Err(RecordError::Missing {
            field: "BackendData",
        });
    };
    let object = data
        .as_object()
        .ok_or_else(|| invalid("BackendData", data, "not an object"))?;
    let fields = Fields::new(object).map_err(|dup| RecordError::DuplicateField {
        first: dup.first,
        second: dup.second,
    })?;
    let vni = match fields.get("vni") {
        None => None,
        Some((_, value)) => Some(
            value
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    invalid("BackendData.VNI", value, "not a 32-bit unsigned integer")
                })?,
        ),
    };
    let vtep_mac = match fields.get("vtepmac") {
        None => {
            return Err(RecordError::Missing {
                field: "BackendData.VtepMAC",
            });
        }
        Some((_, Value::String(text))) => {
            text.parse::<Mac>().map_err(|e| RecordError::Invalid {
                field: "BackendData.VtepMAC",
                value: text.clone(),
                reason: e.to_string(),
            })?
        }
        Some((_, other)) => return Err(invalid("BackendData.VtepMAC", other, "not a string")),
    };
    Ok(VxlanData { vni, vtep_mac })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn vtep_mac_is_stable_unicast_local_and_distinct_per_public_ip() {
        let ip = Ipv4Addr::new(198, 18, 0, 1);
        assert_eq!(
            Mac::for_public_ip(ip),
            Mac::for_public_ip(ip),
            "same node, same MAC"
        );
        let mut seen = std::collections::HashSet::new();
        for n in 0..65_536u32 {
            let mac = Mac::for_public_ip(Ipv4Addr::from(0xc612_0000 + n)).octets();
            assert_eq!(
                mac[0] & 0x03,
                0x02,
                "{mac:02x?} must be locally administered unicast"
            );
            assert!(
                seen.insert(mac),
                "MAC {mac:02x?} repeats for 198.18.0.0/16 + {n}"
            );
        }
    }

    use super::*;

    const VXLAN_RECORD: &str = r#"{"PublicIP":"10.4.7.22","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"d6:51:2e:80:5c:69"}}"#;
    const HOST_GW_RECORD: &str =
        r#"{"PublicIP":"198.18.0.5","PublicIPv6":null,"BackendType":"host-gw"}"#;

    fn mac() -> Mac {
        Mac([0xd6, 0x51, 0x2e, 0x80, 0x5c, 0x69])
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn vxlan_record_bytes_are_flannels() {
        let attrs = LeaseAttrs::vxlan("10.4.7.22".parse().unwrap(), 1, mac());
        assert_eq!(attrs.to_json(), VXLAN_RECORD);
        assert_eq!(
            LeaseAttrs::from_json(VXLAN_RECORD.as_bytes()).unwrap(),
            attrs
        );
    }

    #[test]
    fn host_gw_record_has_no_backend_data() {
        let attrs = LeaseAttrs::host_gw("198.18.0.5".parse().unwrap());
        assert_eq!(attrs.to_json(), HOST_GW_RECORD);
        assert!(!attrs.to_json().contains("BackendData"));
        assert_eq!(
            LeaseAttrs::from_json(HOST_GW_RECORD.as_bytes()).unwrap(),
            attrs
        );
    }

    #[test]
    fn stock_records_are_read_leniently() {
        // Other field case, upper-case MAC, extra fields, dual-stack parts, pretty-printed.
        let text = r#"{
            "publicip": "198.18.0.7",
            "PublicIPv6": "fd00::7",
            "backendtype": "vxlan",
            "backenddata": {"vni": 4096, "vtepmac": "AA:BB:CC:DD:EE:0F"},
            "BackendV6Data": {"VNI": 4096, "VtepMAC": "aa:bb:cc:dd:ee:10"},
            "SomethingNew": 1
        }"#;
        let attrs = LeaseAttrs::from_json(text.as_bytes()).unwrap();
        assert_eq!(attrs.public_ip, Ipv4Addr::new(198, 18, 0, 7));
        assert_eq!(
            attrs.vxlan_data(),
            Some(&VxlanData {
                vni: Some(4096),
                vtep_mac: Mac([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f])
            })
        );
    }

    #[test]
    fn vxlan_record_without_vni_is_accepted() {
        let attrs = LeaseAttrs::from_json(
            br#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"d6:51:2e:80:5c:69"}}"#,
        )
        .unwrap();
        assert_eq!(attrs.vxlan_data().unwrap().vni, None);
        // Written back without VNI rather than with an invented one.
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VtepMAC":"d6:51:2e:80:5c:69"}}"#
        );
    }

    #[test]
    fn foreign_backend_data_is_kept() {
        let text = br#"{"PublicIP":"10.0.0.1","BackendType":"udp","BackendData":{"Port":8285}}"#;
        let attrs = LeaseAttrs::from_json(text).unwrap();
        assert_eq!(attrs.backend_type, "udp");
        assert_eq!(
            attrs.backend_data,
            BackendData::Other(json!({"Port": 8285}))
        );
        assert_eq!(attrs.vxlan_data(), None);
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"udp","BackendData":{"Port":8285}}"#
        );
    }

    #[test]
    fn foreign_backend_data_comes_back_exactly() {
        // Found by fuzzing (lease_record): a number beyond u64 came back as another float.
        let text = br#"{"PublicIP":"10.0.0.1","BackendType":"udp","BackendData":{"n":18282222222222222222222,"f":0.1}}"#;
        let attrs = LeaseAttrs::from_json(text).unwrap();
        assert_eq!(
            LeaseAttrs::from_json(attrs.to_json().as_bytes()).unwrap(),
            attrs
        );
    }

    #[test]
    fn missing_backend_type_is_empty_and_omitted() {
        let attrs = LeaseAttrs::from_json(br#"{"PublicIP":"10.0.0.1"}"#).unwrap();
        assert_eq!(attrs.backend_type, "");
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"10.0.0.1","PublicIPv6":null}"#
        );
    }

    #[test]
    fn malformed_records_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "not valid JSON"),
            (b"{", "not valid JSON"),
            (b"\xff\xfe", "not valid JSON"),
            (b"[]", "not a JSON object"),
            (b"{}", "no PublicIP field"),
            (br#"{"PublicIP":"10.0.0"}"#, "invalid PublicIP: 10.0.0"),
            (br#"{"PublicIP":"fd00::1"}"#, "invalid PublicIP"),
            (br#"{"PublicIP":7}"#, "invalid PublicIP: 7"),
            (br#"{"PublicIP":"10.0.0.1","BackendType":3}"#, "invalid BackendType"),
            (br#"{"PublicIP":"10.0.0.1","BackendType":"vxlan"}"#, "no BackendData field"),
            (
                br#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":[]}"#,
                "invalid BackendData",
            ),
            (
                br#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1}}"#,
                "no BackendData.VtepMAC field",
            ),
            (
                br#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz:51:2e:80:5c:69"}}"#,
                "invalid BackendData.VtepMAC: zz:51:2e:80:5c:69",
            ),
            (
                br#"{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":-1,"VtepMAC":"d6:51:2e:80:5c:69"}}"#,
                "invalid BackendData.VNI: -1",
            ),
            (
                br#"{"PublicIP":"10.0.0.1","publicip":"10.0.0.2"}"#,
                "appears twice",
            ),
        ];
        for (bytes, expected) in cases {
            let err = LeaseAttrs::from_json(bytes).expect_err(&String::from_utf8_lossy(bytes));
            assert!(
                err.to_string().contains(expected),
                "{}: {err} does not contain {expected}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(
            subnet_key("/coreos.com/network", net("172.16.57.0/24")),
            "/coreos.com/network/subnets/172.16.57.0-24"
        );
        assert_eq!(
            subnet_key("/coreos.com/network/", net("172.16.57.0/24")),
            "/coreos.com/network/subnets/172.16.57.0-24"
        );
        assert_eq!(
            config_key("/coreos.com/network"),
            "/coreos.com/network/config"
        );
        assert_eq!(config_key("/x/"), "/x/config");
        assert_eq!(
            subnets_prefix("/coreos.com/network"),
            "/coreos.com/network/subnets/"
        );
        for subnet in ["172.16.57.0/24", "10.0.0.0/8", "10.1.2.252/30", "0.0.0.0/0"] {
            let subnet = net(subnet);
            assert_eq!(parse_subnet_key(&subnet_key("/p", subnet)).unwrap(), subnet);
        }
        assert_eq!(
            parse_subnet_key("172.16.57.0-24").unwrap(),
            net("172.16.57.0/24")
        );
    }

    #[test]
    fn dual_stack_keys_yield_the_ipv4_part() {
        assert_eq!(
            parse_subnet_key("/coreos.com/network/subnets/10.244.1.0-24&fd00:10:244:1::-64")
                .unwrap(),
            net("10.244.1.0/24")
        );
        assert!(parse_subnet_key("/p/subnets/10.244.1.0-24&fd00::").is_err());
        assert!(parse_subnet_key("/p/subnets/10.244.1.0-24&zz::-64").is_err());
        assert!(parse_subnet_key("/p/subnets/10.244.1.0-24&fd00::-129").is_err());
    }

    #[test]
    fn only_keys_directly_under_the_subnets_prefix_are_leases() {
        let subnets = subnets_prefix("/p");
        for key in ["/p/subnets/10.0.5.0-24", "/p/subnets/10.0.5.0-24&fd00::-64"] {
            assert_eq!(
                parse_lease_key(&subnets, key),
                Ok(net("10.0.5.0/24")),
                "{key}"
            );
        }
        for key in [
            "/p/subnets/x/10.0.5.0-24",
            "/p/subnets//10.0.5.0-24",
            "/other/subnets/10.0.5.0-24",
            "/p/subnets/10.0.5.0-24/",
        ] {
            let err = parse_lease_key(&subnets, key).unwrap_err();
            assert_eq!(err.key, key);
            assert!(err.to_string().contains(key), "{err}");
        }
        // The reason of a bad name under the prefix is kept, with the whole key.
        let err = parse_lease_key(&subnets, "/p/subnets/10.0.5.1-24").unwrap_err();
        assert_eq!(
            (err.key.as_str(), err.reason),
            ("/p/subnets/10.0.5.1-24", "address has host bits set")
        );
    }

    #[test]
    fn bad_keys_are_errors() {
        for key in [
            "/p/subnets/",
            "/p/subnets/10.0.0.0",
            "/p/subnets/10.0.0.0-",
            "/p/subnets/10.0.0.0-33",
            "/p/subnets/10.0.0.0-+8",
            "/p/subnets/10.0.0-24",
            "/p/subnets/10.0.0.1-24",
            "/p/subnets/garbage",
            "/p/subnets/10.0.0.0_24",
        ] {
            let err = parse_subnet_key(key).expect_err(key);
            assert_eq!(err.key, key);
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn mac_formats() {
        assert_eq!(mac().to_string(), "d6:51:2e:80:5c:69");
        assert_eq!(format!("{:?}", mac()), "d6:51:2e:80:5c:69");
        for text in [
            "d6:51:2e:80:5c:69",
            "D6:51:2E:80:5C:69",
            "d6-51-2e-80-5c-69",
            "d651.2e80.5c69",
        ] {
            assert_eq!(text.parse::<Mac>().unwrap(), mac(), "{text}");
        }
        for text in [
            "",
            "d6:51:2e:80:5c",
            "d6:51:2e:80:5c:69:00",
            "d6:51:2e:80:5c:6",
            "g6:51:2e:80:5c:69",
            "d6:51-2e:80:5c:69",
            "d651.2e80.5c6",
            "+6:51:2e:80:5c:69",
        ] {
            assert!(text.parse::<Mac>().is_err(), "{text} accepted");
        }
        assert_eq!(
            serde_json::to_string(&mac()).unwrap(),
            r#""d6:51:2e:80:5c:69""#
        );
        assert_eq!(
            serde_json::from_str::<Mac>(r#""D6:51:2E:80:5C:69""#).unwrap(),
            mac()
        );
        assert!(serde_json::from_str::<Mac>(r#""nope""#).is_err());
    }

    #[test]
    fn random_mac_is_local_unicast() {
        for _ in 0..64 {
            let mac = Mac::random();
            assert_eq!(mac.octets()[0] & 0x01, 0, "{mac} is multicast");
            assert_eq!(
                mac.octets()[0] & 0x02,
                0x02,
                "{mac} is not locally administered"
            );
        }
    }
}
