//! The subnet file (`--subnet-file`) as a previous run, or anything else, left it: parsed as
//! the agent parses it at start (its FLANNEL_SUBNET is the fallback lease). Beyond "no panic":
//! a file with all four values (and a subnet the agent could lease) renders to a file that
//! parses to the same values.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use overlay_agent::subnet::file::{SubnetEnv, parse_subnet_env};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("/run/flannel/subnet.env");
    let Ok(contents) = parse_subnet_env(path, &text) else {
        return;
    };
    if let Some(subnet) = contents.subnet {
        assert_eq!(subnet, subnet.trunc());
    }
    let (Some(network), Some(subnet), Some(mtu), Some(ip_masq)) = (
        contents.network,
        contents.subnet,
        contents.mtu,
        contents.ip_masq,
    ) else {
        return;
    };
    // The agent writes leases of SubnetLen ≤ 30 only: a /31 or /32 has no first usable
    // address to write as FLANNEL_SUBNET (as the fallback subnet it is refused anyway).
    if subnet.prefix_len() > 30 {
        return;
    }
    let env = SubnetEnv {
        network,
        subnet,
        mtu,
        ip_masq,
    };
    let again = parse_subnet_env(path, &env.render()).expect("what we write parses");
    assert_eq!(
        (again.network, again.subnet, again.mtu, again.ip_masq),
        (Some(network), Some(subnet), Some(mtu), Some(ip_masq)),
        "round trip of {env:?}"
    );
});
