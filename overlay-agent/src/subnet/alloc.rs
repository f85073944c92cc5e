//! Picking a free node subnet, as flannel's `allocateSubnet` does: walk SubnetMin..=SubnetMax
//! in SubnetLen steps, keep the first 100 subnets that overlap no existing lease, and choose
//! one of them at random (so that nodes starting together rarely race for the same one).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::Rng;

use crate::subnet::config::NetworkConfig;

/// How many free subnets flannel collects before choosing among them.
pub const CANDIDATES: usize = 100;

/// No subnet is left between SubnetMin and SubnetMax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("out of subnets")]
pub struct OutOfSubnets {
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub subnet_len: u8,
}

/// The first `limit` subnets of the config's range that overlap none of `taken`, in order.
/// `taken` may hold subnets of any length (leases of an older config, reservations).
pub fn free_subnets(config: &NetworkConfig, taken: &[Ipv4Net], limit: usize) -> Vec<Ipv4Net> {
    let size = config.subnet_size();
    let max = u64::from(u32::from(config.subnet_max));
    let busy = merged_ranges(taken);

    let mut free = Vec::new();
    let mut next_busy = busy.iter().peekable();
    let mut start = u64::from(u32::from(config.subnet_min));
    while start <= max && free.len() < limit {
        let end = start + size - 1;
        // Ranges wholly below this candidate can never matter again.
        while next_busy
            .next_if(|(_, busy_end)| *busy_end < start)
            .is_some()
        {}
        match next_busy.peek() {
            Some(&&(busy_start, busy_end)) if busy_start <= end => {
                // Jump past the busy range, staying on the SubnetLen grid that starts at
                // SubnetMin; this keeps huge taken ranges cheap to skip.
                let past = busy_end + 1;
                start += (past - start).div_ceil(size) * size;
            }
            _ => {
                free.push(to_net(start, config.subnet_len));
                start += size;
            }
        }
    }
    free
}

/// Picks a subnet for a new lease: one of the first [`CANDIDATES`] free ones, at random.
pub fn allocate<R: Rng + ?Sized>(
    config: &NetworkConfig,
    taken: &[Ipv4Net],
    rng: &mut R,
) -> Result<Ipv4Net, OutOfSubnets> {
    let free = free_subnets(config, taken, CANDIDATES);
    if free.is_empty() {
        return Err(OutOfSubnets {
            subnet_min: config.subnet_min,
            subnet_max: config.subnet_max,
            subnet_len: config.subnet_len,
        });
    }
    Ok(free[rng.random_range(0..free.len())])
}

/// `taken` as sorted, non-overlapping inclusive ranges of addresses.
fn merged_ranges(taken: &[Ipv4Net]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = taken
        .iter()
        .map(|net| {
            let net = net.trunc();
            (
                u64::from(u32::from(net.network())),
                u64::from(u32::from(net.broadcast())),
            )
        })
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some((_, last_end)) if start <= *last_end + 1 => *last_end = (*last_end).max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

fn to_net(start: u64, len: u8) -> Ipv4Net {
    let addr = Ipv4Addr::from(u32::try_from(start).unwrap_or(u32::MAX));
    // `len` comes from a validated config (<= 30), so this cannot fail.
    Ipv4Net::new(addr, len).unwrap_or_else(|_| Ipv4Net::from(addr))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn config(text: &str) -> NetworkConfig {
        NetworkConfig::parse(text).unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<Ipv4Net> {
        list.iter().map(|s| net(s)).collect()
    }

    #[test]
    fn empty_registry_offers_the_first_hundred_from_subnet_min() {
        let config = config(r#"{"Network": "10.0.0.0/16"}"#);
        let free = free_subnets(&config, &[], CANDIDATES);
        assert_eq!(free.len(), 100);
        assert_eq!(free[0], net("10.0.1.0/24"));
        assert_eq!(free[99], net("10.0.100.0/24"));
    }

    #[test]
    fn taken_subnets_are_skipped() {
        let config = config(r#"{"Network": "10.0.0.0/24", "SubnetLen": 28}"#);
        // Candidates: .16 .. .240 in /28 steps.
        let taken = nets(&["10.0.0.16/28", "10.0.0.64/26", "10.0.0.200/29"]);
        let free = free_subnets(&config, &taken, CANDIDATES);
        assert_eq!(
            free,
            nets(&[
                "10.0.0.32/28",
                "10.0.0.48/28",
                "10.0.0.128/28",
                "10.0.0.144/28",
                "10.0.0.160/28",
                "10.0.0.176/28",
                "10.0.0.208/28",
                "10.0.0.224/28",
                "10.0.0.240/28",
            ])
        );
    }

    #[test]
    fn a_larger_taken_block_covers_many_candidates() {
        let config = config(r#"{"Network": "10.0.0.0/8"}"#);
        let taken = nets(&["10.0.0.0/9"]);
        let free = free_subnets(&config, &taken, 3);
        assert_eq!(
            free,
            nets(&["10.128.0.0/24", "10.128.1.0/24", "10.128.2.0/24"])
        );
    }

    #[test]
    fn respects_subnet_min_and_max() {
        let config = config(
            r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.0.10.0", "SubnetMax": "10.0.12.0"}"#,
        );
        let free = free_subnets(&config, &nets(&["10.0.11.0/24"]), CANDIDATES);
        assert_eq!(free, nets(&["10.0.10.0/24", "10.0.12.0/24"]));
    }

    #[test]
    fn last_subnet_of_the_address_space() {
        let config = config(r#"{"Network": "255.255.255.0/24", "SubnetLen": 26}"#);
        let free = free_subnets(&config, &[], CANDIDATES);
        assert_eq!(
            free,
            nets(&[
                "255.255.255.64/26",
                "255.255.255.128/26",
                "255.255.255.192/26"
            ])
        );
        let taken = nets(&["255.255.255.192/26"]);
        assert_eq!(free_subnets(&config, &taken, CANDIDATES).len(), 2);
    }

    #[test]
    fn out_of_subnets() {
        let config = config(r#"{"Network": "10.0.0.0/28"}"#);
        let taken = nets(&["10.0.0.4/30", "10.0.0.8/30", "10.0.0.12/30"]);
        let err = allocate(&config, &taken, &mut StdRng::seed_from_u64(1)).unwrap_err();
        assert_eq!(err.to_string(), "out of subnets");
        assert_eq!(err.subnet_len, 30);
        // A lease covering everything does too.
        let err = allocate(&config, &nets(&["0.0.0.0/0"]), &mut rand::rng()).unwrap_err();
        assert_eq!(err.subnet_min, "10.0.0.4".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn picks_among_the_first_hundred_only() {
        let config = config(r#"{"Network": "10.0.0.0/8"}"#);
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let subnet = allocate(&config, &[], &mut rng).unwrap();
            assert!(
                subnet >= net("10.0.1.0/24") && subnet <= net("10.0.100.0/24"),
                "{subnet}"
            );
            seen.insert(subnet);
        }
        // Random, not always the first.
        assert!(seen.len() > 50, "only {} distinct picks", seen.len());
    }

    fn arb_config() -> impl Strategy<Value = NetworkConfig> {
        (8u8..=28, any::<u32>(), 0u8..=4, any::<u16>(), any::<u16>()).prop_filter_map(
            "valid config",
            |(prefix, addr, extra, lo, hi)| {
                let network = Ipv4Net::new(Ipv4Addr::from(addr), prefix).ok()?.trunc();
                let subnet_len = (prefix + 2 + extra).min(30);
                let count = 1u64 << (subnet_len - prefix);
                let size = 1u64 << (32 - subnet_len);
                let base = u64::from(u32::from(network.network()));
                let (lo, hi) = (u64::from(lo) % count, u64::from(hi) % count);
                let (lo, hi) = (lo.min(hi), lo.max(hi));
                let text = format!(
                    r#"{{"Network": "{network}", "SubnetLen": {subnet_len}, "SubnetMin": "{}", "SubnetMax": "{}"}}"#,
                    to_net(base + lo * size, 32).addr(),
                    to_net(base + hi * size, 32).addr(),
                );
                NetworkConfig::parse(&text).ok()
            },
        )
    }

    proptest! {
        /// Allocating one subnet after another, as nodes joining do, never hands out an
        /// overlapping subnet and never leaves SubnetMin..=SubnetMax, until the range is full.
        #[test]
        fn allocations_never_overlap_and_stay_in_range(
            config in arb_config(),
            seed in any::<u64>(),
            foreign in proptest::collection::vec((any::<u32>(), 16u8..=32), 0..6),
        ) {
            let mut rng = StdRng::seed_from_u64(seed);
            // Leases of other shapes (old configs, reservations) that must be respected too.
            let foreign: Vec<Ipv4Net> = foreign
                .into_iter()
                .filter_map(|(addr, len)| Ipv4Net::new(Ipv4Addr::from(addr), len).ok())
                .map(|net| net.trunc())
                .collect();
            let mut taken = foreign.clone();
            let mut ours = Vec::new();
            for _ in 0..300 {
                match allocate(&config, &taken, &mut rng) {
                    Ok(subnet) => {
                        prop_assert!(config.fits(subnet), "{subnet} does not fit {config:?}");
                        prop_assert!(subnet.addr() >= config.subnet_min && subnet.addr() <= config.subnet_max);
                        for other in &taken {
                            prop_assert!(
                                !(subnet.contains(&other.network()) || other.contains(&subnet.network())),
                                "{subnet} overlaps {other}"
                            );
                        }
                        taken.push(subnet);
                        ours.push(subnet);
                    }
                    Err(_) => {
                        // Only when nothing in range is free.
                        prop_assert!(free_subnets(&config, &taken, 1).is_empty());
                        break;
                    }
                }
            }
        }

        /// The fast skipping over merged ranges agrees with flannel's plain double loop.
        #[test]
        fn free_subnets_matches_the_naive_scan(
            config in arb_config(),
            taken in proptest::collection::vec((any::<u32>(), 8u8..=32), 0..20),
            limit in 1usize..150,
        ) {
            let taken: Vec<Ipv4Net> = taken
                .into_iter()
                .filter_map(|(addr, len)| Ipv4Net::new(Ipv4Addr::from(addr), len).ok())
                .collect();
            let size = config.subnet_size();
            let mut naive = Vec::new();
            let mut start = u64::from(u32::from(config.subnet_min));
            while start <= u64::from(u32::from(config.subnet_max)) && naive.len() < limit {
                let candidate = to_net(start, config.subnet_len);
                let overlaps = taken.iter().any(|t| {
                    let t = t.trunc();
                    t.contains(&candidate.network()) || candidate.contains(&t.network())
                });
                if !overlaps {
                    naive.push(candidate);
                }
                start += size;
            }
            prop_assert_eq!(free_subnets(&config, &taken, limit), naive);
        }
    }
}
