//! flanneld reads a `FLANNELD_*` variable only when it is not empty, so an environment file
//! that sets `FLANNELD_IFACE=` or `FLANNELD_PUBLIC_IP=` means "not given". Its own test binary:
//! the variables are process-wide, and no other test may run beside it.

use std::{ffi::OsString, net::Ipv4Addr};

use overlay_agent::cli::Cli;

#[test]
fn empty_flanneld_variables_count_as_not_given() {
    let empty = [
        "FLANNELD_ETCD_PREFIX",
        "FLANNELD_IFACE",
        "FLANNELD_PUBLIC_IP",
        "FLANNELD_IP_MASQ",
        "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
    ];
    for name in empty {
        // SAFETY: this binary's only test, and it starts no thread before parsing.
        unsafe { std::env::set_var(name, "") };
    }
    // SAFETY: as above.
    unsafe { std::env::set_var("FLANNELD_IFACE_REGEX", "^eth") };
    let argv = || ["overlay-agent"].map(OsString::from);

    let cli = Cli::parse_process_env(argv());
    let f = &cli.flags;
    assert_eq!(f.etcd_prefix, "/coreos.com/network");
    assert!(f.iface.is_empty(), "{:?}", f.iface);
    assert_eq!(f.public_ip, None);
    assert!(!f.ip_masq);
    assert_eq!(f.subnet_lease_renew_margin, 60);
    // A variable with a value still counts.
    assert_eq!(f.iface_regex, ["^eth"]);

    // The command line still wins over a variable.
    let cli =
        Cli::parse_process_env(["overlay-agent", "--public-ip", "198.18.0.9"].map(OsString::from));
    assert_eq!(cli.flags.public_ip, Some(Ipv4Addr::new(198, 18, 0, 9)));

    // Without the rule, clap would take "" as the value: the failure this test guards against.
    let err = Cli::try_parse_env(argv(), |_| false)
        .expect_err("an empty FLANNELD_PUBLIC_IP is not an address");
    assert!(err.to_string().contains("--public-ip"), "{err}");
}
