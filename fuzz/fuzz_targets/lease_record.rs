//! A subnet lease as another node (or anyone who can write the prefix) leaves it in etcd:
//! the first line is the key, the rest the value. Key and value are parsed as the peer watcher
//! and the lease manager parse them, checked as the watcher checks peers, and cut for the log.
//! Beyond "no panic": a record that parses comes back the same from the JSON we would write.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_agent::{
    subnet::{
        config::NetworkConfig,
        lease::{LeaseAttrs, parse_subnet_key},
        registry::{KeyValue, LOG_TEXT_MAX, cut_for_log},
        validate::{Installed, check_peer, check_replacement},
    },
};

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let key = String::from_utf8_lossy(&data[..split]).into_owned();
    let value = data.get(split + 1..).unwrap_or_default().to_vec();

    let subnet = parse_subnet_key(&key);
    if let Ok(subnet) = subnet {
        assert_eq!(subnet, subnet.trunc(), "{key}: host bits");
    }
    let kv = KeyValue {
        key,
        value,
        lease: None,
        create_revision: 1,
        mod_revision: 1,
        version: 1,
    };
    assert!(kv.value_lossy().len() <= LOG_TEXT_MAX * 3 + 32);
    assert!(kv.key_for_log().len() <= LOG_TEXT_MAX + 32);
    assert!(cut_for_log(&kv.key).len() <= LOG_TEXT_MAX + 32);

    let Ok(attrs) = LeaseAttrs::from_json(&kv.value) else {
        return;
    };
    let again = LeaseAttrs::from_json(attrs.to_json().as_bytes())
        .expect("the JSON we write for a record parses");
    assert_eq!(again, attrs, "round trip");

    let config =
        NetworkConfig::parse(r#"{"Network": "10.0.0.0/8", "SubnetLen": 24}"#).expect("config");
    if let Ok(subnet) = parse_subnet_key(&kv.key) {
        let checked = check_peer(&config, subnet, attrs.public_ip);
        if checked.is_ok() {
            assert!(config.network.contains(&subnet) && subnet.prefix_len() == 24);
        }
        let installed = Installed {
            public_ip: attrs.public_ip,
            create_revision: 1,
            leased: true,
        };
        assert!(check_replacement(&installed, 1, attrs.public_ip).is_ok());
        let _ = checked.map_err(|e| e.to_string());
    }
});
