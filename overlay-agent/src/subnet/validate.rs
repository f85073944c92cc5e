//! Which peer records this node installs: a lease record from etcd is written by
//! another node, or by anyone with write access to the prefix, so before its subnet is routed
//! it must make sense for this network. flannel installs whatever it reads; we refuse, with one
//! warning naming the key and the reason:
//!
//! - a subnet outside the network (`Network`): it would be routed to a node for addresses that
//!   are not the cluster's;
//! - a prefix length other than `SubnetLen`: every lease is exactly one node subnet, so two
//!   valid records never overlap; a /25 or a /32 inside a live node's subnet would win the
//!   longest-prefix match and cut that node (or part of it) off;
//! - a PublicIP that is not a unicast address (unspecified, broadcast, multicast, loopback):
//!   no node lives there;
//! - a PublicIP inside the network: VXLAN to it would be routed into the overlay itself (a
//!   node configured with `--iface` on a pod bridge or `ovl0`, or a wrong `--public-ip`);
//! - this node's own PublicIP under another subnet: a second node configured with our
//!   address (a cloned machine), or a stale lease of ours; routed, the subnet's traffic would
//!   be sent to ourselves;
//! - a record that overwrites a live node's lease (same key, same creation revision, an etcd
//!   lease behind it) with another PublicIP: flannel never does that (a node re-leasing a
//!   subnet deletes and creates the key, which shows as a new creation), and the node that
//!   holds the lease restores its record (see `SubnetManager::run_lease_keeper`). The last good
//!   record stays in force, also when the new record claims another backend type (skipped as
//!   such, it would remove the live node). Reservations (no etcd lease) are the
//!   administrator's to move.
//!
//! Records of another backend type are not refused but not ours to route either: they are
//! skipped, also with one warning (a stock host-gw node in a vxlan network is worth knowing
//! about).

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::subnet::config::NetworkConfig;

/// Why a peer record is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    OutsideNetwork {
        subnet: Ipv4Net,
        network: Ipv4Net,
    },
    PrefixLength {
        subnet: Ipv4Net,
        subnet_len: u8,
    },
    NotUnicast {
        public_ip: Ipv4Addr,
    },
    OwnAddress {
        public_ip: Ipv4Addr,
    },
    InsideNetwork {
        public_ip: Ipv4Addr,
        network: Ipv4Net,
    },
    Overwrite {
        live: Ipv4Addr,
        public_ip: Ipv4Addr,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutsideNetwork { subnet, network } => {
                write!(f, "subnet {subnet} is outside the network {network}")
            }
            Self::PrefixLength { subnet, subnet_len } => write!(
                f,
                "subnet {subnet} is not a /{subnet_len} (the network's SubnetLen): it would \
                 overlap other nodes' subnets"
            ),
            Self::NotUnicast { public_ip } => {
                write!(f, "PublicIP {public_ip} is not a unicast address")
            }
            Self::InsideNetwork { public_ip, network } => write!(
                f,
                "PublicIP {public_ip} is inside the network {network}: VXLAN to it would be \
                 routed into the overlay"
            ),
            Self::OwnAddress { public_ip } => write!(
                f,
                "PublicIP {public_ip} is this node's own (a second node with this address, or \
                 a stale lease of this node)"
            ),
            Self::Overwrite { live, public_ip } => write!(
                f,
                "it overwrites the live lease of {live} with PublicIP {public_ip} (its holder \
                 restores it)"
            ),
        }
    }
}

/// Checks the parts of a record that do not depend on what was there before: the subnet its
/// key names, against the network config, and the PublicIP it publishes, against ours
/// (`own_public_ip`) too.
pub fn check_peer(
    config: &NetworkConfig,
    subnet: Ipv4Net,
    public_ip: Ipv4Addr,
    own_public_ip: Ipv4Addr,
) -> Result<(), Refusal> {
    if !config.network.contains(&subnet) {
        return Err(Refusal::OutsideNetwork {
            subnet,
            network: config.network,
        });
    }
    if subnet.prefix_len() != config.subnet_len {
        return Err(Refusal::PrefixLength {
            subnet,
            subnet_len: config.subnet_len,
        });
    }
    check_public_ip(config, public_ip)?;
    if public_ip == own_public_ip {
        return Err(Refusal::OwnAddress { public_ip });
    }
    Ok(())
}

/// Checks a PublicIP, a peer's or this node's own (before its lease is written): a unicast
/// address outside the network.
pub fn check_public_ip(config: &NetworkConfig, public_ip: Ipv4Addr) -> Result<(), Refusal> {
    if public_ip.is_unspecified()
        || public_ip.is_broadcast()
        || public_ip.is_multicast()
        || public_ip.is_loopback()
    {
        return Err(Refusal::NotUnicast { public_ip });
    }
    if config.network.contains(&public_ip) {
        return Err(Refusal::InsideNetwork {
            public_ip,
            network: config.network,
        });
    }
    Ok(())
}

/// What the watcher knows of the record it installed for a subnet, to tell an overwrite from a
/// new lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    pub public_ip: Ipv4Addr,
    /// The key's creation revision: a deleted and re-created key has a new one.
    pub create_revision: i64,
    /// Whether an etcd lease held the key (a live node's lease, not a reservation).
    pub leased: bool,
}

/// Whether a new record for an installed subnet (same key) may replace it: not when it changes
/// the PublicIP of a live lease without the key having been re-created.
pub fn check_replacement(
    installed: &Installed,
    create_revision: i64,
    public_ip: Ipv4Addr,
) -> Result<(), Refusal> {
    if installed.leased
        && installed.create_revision == create_revision
        && installed.public_ip != public_ip
    {
        return Err(Refusal::Overwrite {
            live: installed.public_ip,
            public_ip,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network": "10.10.0.0/16", "Backend": {"Type": "vxlan"}}"#)
            .unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    const IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const OWN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

    #[test]
    fn a_node_subnet_of_the_network_with_a_unicast_address_passes() {
        assert_eq!(check_peer(&config(), net("10.10.7.0/24"), IP, OWN), Ok(()));
    }

    #[test]
    fn subnets_outside_the_network_or_of_another_length_are_refused() {
        let cases = [
            ("10.11.0.0/24", "outside the network 10.10.0.0/16"),
            ("10.0.0.0/8", "outside the network"),
            ("10.10.7.128/25", "is not a /24"),
            ("10.10.7.5/32", "is not a /24"),
            ("10.10.0.0/20", "is not a /24"),
        ];
        for (subnet, expected) in cases {
            let err = check_peer(&config(), net(subnet), IP, OWN).unwrap_err();
            assert!(err.to_string().contains(expected), "{subnet}: {err}");
            assert!(err.to_string().contains(subnet), "{subnet}: {err}");
        }
    }

    #[test]
    fn public_ips_nobody_lives_at_are_refused() {
        for ip in ["0.0.0.0", "255.255.255.255", "224.0.0.1", "127.0.0.1"] {
            let ip: Ipv4Addr = ip.parse().unwrap();
            let err = check_peer(&config(), net("10.10.7.0/24"), ip, OWN).unwrap_err();
            assert_eq!(err, Refusal::NotUnicast { public_ip: ip });
            assert!(err.to_string().contains(&ip.to_string()));
        }
    }

    #[test]
    fn public_ips_inside_the_network_are_refused() {
        for ip in ["10.10.7.1", "10.10.0.0", "10.10.255.255"] {
            let ip: Ipv4Addr = ip.parse().unwrap();
            let err = check_peer(&config(), net("10.10.7.0/24"), ip, OWN).unwrap_err();
            assert_eq!(
                err,
                Refusal::InsideNetwork {
                    public_ip: ip,
                    network: net("10.10.0.0/16")
                }
            );
            assert!(
                err.to_string()
                    .contains(&format!("{ip} is inside the network 10.10.0.0/16"))
            );
        }
        assert_eq!(
            check_public_ip(&config(), Ipv4Addr::new(10, 11, 0, 1)),
            Ok(())
        );
    }

    #[test]
    fn our_own_public_ip_under_another_subnet_is_refused() {
        let err = check_peer(&config(), net("10.10.7.0/24"), OWN, OWN).unwrap_err();
        assert_eq!(err, Refusal::OwnAddress { public_ip: OWN });
        assert!(
            err.to_string().contains("198.18.0.1 is this node's own"),
            "{err}"
        );
    }

    #[test]
    fn only_an_overwrite_of_a_live_lease_with_another_address_is_refused() {
        let live = Installed {
            public_ip: IP,
            create_revision: 10,
            leased: true,
        };
        let other = Ipv4Addr::new(198, 18, 0, 66);
        let err = check_replacement(&live, 10, other).unwrap_err();
        assert_eq!(
            err,
            Refusal::Overwrite {
                live: IP,
                public_ip: other
            }
        );
        assert!(err.to_string().contains("198.18.0.2") && err.to_string().contains("198.18.0.66"));
        // A renewal or a new VtepMAC keeps the address; a re-created key is a new lease; an
        // administrator moves a reservation.
        assert_eq!(check_replacement(&live, 10, IP), Ok(()));
        assert_eq!(check_replacement(&live, 11, other), Ok(()));
        let reservation = Installed {
            leased: false,
            ..live
        };
        assert_eq!(check_replacement(&reservation, 10, other), Ok(()));
    }
}
