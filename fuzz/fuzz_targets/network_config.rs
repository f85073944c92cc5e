//! `<prefix>/config` as read from etcd: any bytes, decoded as the agent decodes them. Beyond
//! "no panic": an accepted config satisfies what the lease logic relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_agent::subnet::config::NetworkConfig;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(config) = NetworkConfig::parse(&text) else {
        return;
    };
    let network = config.network;
    assert_eq!(network, network.trunc(), "host bits cleared");
    assert!(network.prefix_len() <= 28, "{network}");
    assert!(
        (network.prefix_len() + 2..=30).contains(&config.subnet_len),
        "SubnetLen {} for {network}",
        config.subnet_len
    );
    assert!(network.contains(&config.subnet_min) && network.contains(&config.subnet_max));
    for addr in [config.subnet_min, config.subnet_max] {
        let subnet = ipnet::Ipv4Net::new(addr, config.subnet_len).unwrap();
        assert_eq!(subnet.network(), addr, "{addr} on a SubnetLen boundary");
        assert!(network.contains(&subnet));
        assert_eq!(config.fits(subnet), config.subnet_min <= config.subnet_max);
    }
    let _ = config
        .backend
        .pod_mtu(u32::from(data.first().copied().unwrap_or(0)) * 64);
    // What the agent logs and writes back must not panic either.
    let _ = format!("{config:?} {}", config.backend);
});
