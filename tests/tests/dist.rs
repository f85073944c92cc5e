//! `dist/` checked as the tools that consume it would: the systemd unit with
//! `systemd-analyze verify`, the Kubernetes manifest against the Kubernetes API types, the CNI
//! configuration against the CNI spec and the plugins' options, and every command line in them
//! against the agent's own flag parser.
//!
//! No root or network needed (nothing runs); they live with the end-to-end tests because they
//! check what is shipped beside the binary.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser as _;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace},
};
use overlay_agent::cli::{Cli, DEFAULT_STATUS_FILE, normalize_go_flags};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

fn dist(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(dist(path)).unwrap_or_else(|e| panic!("dist/{path}: {e}"))
}

/// Parses an agent command line (arguments after the program name) as the agent does, and
/// checks that nothing in it stops the agent.
fn assert_agent_accepts(args: &[String]) -> Cli {
    let argv =
        std::iter::once(OsString::from("overlay-agent")).chain(args.iter().map(OsString::from));
    let cli = Cli::try_parse_from(normalize_go_flags(argv))
        .unwrap_or_else(|e| panic!("the agent refuses {args:?}: {e}"));
    cli.flags
        .compat
        .check()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    cli
}

// ----- systemd ---------------------------------------------------------------------------

/// The unit and its drop-in, with the binary path pointed at the built agent (verify checks
/// that the command exists), in a directory of their own on `SYSTEMD_UNIT_PATH` so the drop-in
/// is loaded too. Returns (exit status, stderr).
fn systemd_verify(unit: &str, dropin: &str) -> (bool, String) {
    let agent = overlay_tests::agent_bin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relocate =
        |s: &str| s.replace("/usr/local/bin/overlay-agent", &agent.display().to_string());
    std::fs::write(dir.path().join("overlay-agent.service"), relocate(unit)).unwrap();
    let d = dir.path().join("overlay-agent.service.d");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("sysconfig.conf"), relocate(dropin)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("overlay-agent.service"))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `systemd-analyze verify` accepts the unit and its drop-in without a word. In this
/// container (systemd is installed but not PID 1) verify exits 0 on unknown keys and only
/// warns, so the test also demands an empty stderr, and first proves on a broken copy that
/// such a mistake does show here.
#[test]
fn systemd_analyze_verify_accepts_the_unit_and_its_dropin() {
    let unit = read("systemd/overlay-agent.service");
    let dropin = read("systemd/overlay-agent.service.d/sysconfig.conf");

    let broken = unit.replace("Type=notify", "Type=notify\nWatchdogSecs=30s");
    let (_, complaint) = systemd_verify(&broken, &dropin);
    assert!(
        complaint.contains("WatchdogSecs"),
        "verify must report an unknown key here, or this test proves nothing: {complaint:?}"
    );
    let (_, complaint) = systemd_verify(&unit, &dropin.replace("ExecStart=\n", "ExecStrat=\n"));
    assert!(
        complaint.contains("ExecStrat"),
        "the drop-in is loaded: {complaint:?}"
    );

    let (ok, stderr) = systemd_verify(&unit, &dropin);
    assert!(
        ok && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

/// What the unit promises a flanneld user: Type=notify, flanneld's environment files, before
/// the container runtimes, the watchdog; and its command lines are accepted by the agent with
/// the variables the files set.
#[test]
fn the_unit_replaces_flanneld_service() {
    let unit = read("systemd/overlay-agent.service");
    for line in [
        "Type=notify",
        "EnvironmentFile=-/run/flannel/options.env",
        "EnvironmentFile=-/etc/sysconfig/flanneld",
        "Before=docker.service containerd.service crio.service kubelet.service",
        "RequiredBy=docker.service containerd.service",
        "Conflicts=flanneld.service",
        "WatchdogSec=30s",
        "ExecStart=/usr/local/bin/overlay-agent $FLANNEL_OPTIONS",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line:?}");
    }
    // $FLANNEL_OPTIONS as Fedora's /etc/sysconfig/flanneld sets it, split as systemd does.
    let options = "-iface=eth0 -ip-masq=true --healthz-port=2401 -logtostderr";
    assert_agent_accepts(
        &options
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>(),
    );

    let dropin = read("systemd/overlay-agent.service.d/sysconfig.conf");
    let exec = dropin
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .find(|l| !l.is_empty())
        .unwrap();
    let expanded = exec
        .replace("${FLANNEL_ETCD_ENDPOINTS}", "http://198.18.0.254:2379")
        .replace("${FLANNEL_ETCD_PREFIX}", "/atomic.io/network")
        .replace("$FLANNEL_OPTIONS", options);
    let args: Vec<String> = expanded
        .split_whitespace()
        .skip(1)
        .map(str::to_owned)
        .collect();
    let cli = assert_agent_accepts(&args);
    assert_eq!(cli.flags.etcd_endpoints, ["http://198.18.0.254:2379"]);
    assert_eq!(cli.flags.etcd_prefix, "/atomic.io/network");
}

// ----- Kubernetes --------------------------------------------------------------------------

/// Deserializes `doc` as the Kubernetes type `T` and serializes it back: a field the API does
/// not know (a typo, a wrong level) is lost on the way and the comparison names it.
fn round_trip<T: DeserializeOwned + Serialize>(kind: &str, doc: &Value) -> T {
    checked::<T>(doc).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

fn checked<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone())
        .map_err(|e| format!("does not match the Kubernetes API: {e}"))?;
    let back = serde_json::to_value(&typed).unwrap();
    if &back != doc {
        return Err(format!(
            "fields the Kubernetes API does not have were dropped:\n{doc:#}\nbecame\n{back:#}"
        ));
    }
    Ok(typed)
}

fn manifest() -> Vec<Value> {
    let text = read("kubernetes/overlay-agent-etcd.yaml");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Every document of the manifest is a valid Kubernetes object (Namespace, ConfigMap,
/// DaemonSet) with no field the API lacks; the DaemonSet has what the agent needs (host
/// network, privileges, /sys/fs/bpf shared both ways, /run/flannel, probes on the health
/// port the agent is told), its arguments are accepted by the agent, and the CNI
/// configuration it installs is dist/cni/10-overlay.conflist.
#[test]
fn the_daemonset_manifest_parses_against_the_kubernetes_api() {
    let docs = manifest();
    let mut kinds = BTreeMap::new();
    for doc in &docs {
        let kind = doc["kind"]
            .as_str()
            .expect("every document has a kind")
            .to_owned();
        *kinds.entry(kind.clone()).or_insert(0) += 1;
        match kind.as_str() {
            "Namespace" => {
                round_trip::<Namespace>(&kind, doc);
            }
            "ConfigMap" => {
                let cm: ConfigMap = round_trip(&kind, doc);
                let data = cm.data.unwrap();
                let shipped: Value =
                    serde_json::from_str(&read("cni/10-overlay.conflist")).unwrap();
                let embedded: Value =
                    serde_json::from_str(&data["10-overlay.conflist"]).expect("conflist is JSON");
                assert_eq!(
                    embedded, shipped,
                    "the ConfigMap carries dist/cni/10-overlay.conflist"
                );
            }
            "DaemonSet" => check_daemonset(&round_trip::<DaemonSet>(&kind, doc)),
            other => panic!("unexpected kind {other}"),
        }
    }
    assert_eq!(kinds.get("DaemonSet"), Some(&1), "{kinds:?}");

    // The check is not a formality: a misspelled field, or a right one at the wrong level,
    // is caught.
    let mut ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap()
        .clone();
    ds["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    assert!(
        checked::<DaemonSet>(&ds).is_err(),
        "a typo must fail the check"
    );
    let mut ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap()
        .clone();
    ds["spec"]["hostNetwork"] = Value::Bool(true);
    assert!(
        checked::<DaemonSet>(&ds).is_err(),
        "a field at the wrong level must fail"
    );
    let mut ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap()
        .clone();
    ds["spec"]["template"]["spec"]["hostNetwork"] = Value::String("yes".into());
    assert!(checked::<DaemonSet>(&ds).is_err(), "a wrong type must fail");
}

fn check_daemonset(ds: &DaemonSet) {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        pod.host_network,
        Some(true),
        "the agent works in the node's namespace"
    );
    let agent = pod
        .containers
        .iter()
        .find(|c| c.name == "overlay-agent")
        .expect("the agent's container");
    let args = agent.args.clone().unwrap_or_default();
    let cli = assert_agent_accepts(&args);
    assert_eq!(cli.flags.healthz_port, 2401);
    assert_eq!(cli.flags.status_file, Path::new(DEFAULT_STATUS_FILE));
    let env: Vec<&str> = agent
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    assert!(env.contains(&"FLANNELD_ETCD_ENDPOINTS"), "{env:?}");
    assert_eq!(
        agent.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    let mounts = agent.volume_mounts.as_ref().unwrap();
    let bpffs = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mount");
    assert_eq!(
        bpffs.mount_propagation.as_deref(),
        Some("Bidirectional"),
        "pins made in the pod must reach the host's bpffs, to outlive the pod"
    );
    assert!(cli.flags.bpf_dir.starts_with("/sys/fs/bpf"));
    assert!(mounts.iter().any(|m| m.mount_path == "/run/flannel"));
    let volumes = pod.volumes.as_ref().unwrap();
    for m in mounts {
        assert!(
            volumes.iter().any(|v| v.name == m.name),
            "mount {} has no volume",
            m.name
        );
    }
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    assert_eq!(host_path(&bpffs.name).as_deref(), Some("/sys/fs/bpf"));
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        (get.path.clone().unwrap_or_default(), get.port.clone())
    };
    let port = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2401);
    assert_eq!(
        probe_path(&agent.liveness_probe),
        ("/healthz".to_owned(), port.clone())
    );
    assert_eq!(
        probe_path(&agent.readiness_probe),
        ("/readyz".to_owned(), port)
    );
}

// ----- CNI ---------------------------------------------------------------------------------

/// A network configuration list, as the CNI specification defines it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfList {
    cni_version: String,
    name: String,
    #[serde(default)]
    disable_check: bool,
    plugins: Vec<Value>,
}

/// flannel's CNI plugin (flannel-io/cni-plugin, `NetConf`): what it reads.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FlannelPlugin {
    #[serde(rename = "type")]
    kind: String,
    subnet_file: Option<String>,
    data_dir: Option<String>,
    delegate: Option<BridgePlugin>,
    runtime_config: Option<Value>,
    capabilities: Option<BTreeMap<String, bool>>,
}

/// The bridge plugin's options (containernetworking/plugins `NetConf`) that flannel's plugin
/// passes on; flannel fills in `ipam` and `mtu` from the subnet file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BridgePlugin {
    #[serde(rename = "type")]
    kind: Option<String>,
    bridge: Option<String>,
    is_gateway: Option<bool>,
    is_default_gateway: Option<bool>,
    force_address: Option<bool>,
    ip_masq: Option<bool>,
    hairpin_mode: Option<bool>,
    promisc_mode: Option<bool>,
    vlan: Option<u16>,
    mtu: Option<u32>,
}

/// The portmap plugin's options.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortmapPlugin {
    #[serde(rename = "type")]
    kind: String,
    capabilities: BTreeMap<String, bool>,
    snat: Option<bool>,
}

/// The conflist is a CNI network configuration list whose plugins take exactly the options
/// they know: flannel's plugin reading the agent's subnet file (where the agent writes it by
/// default) and delegating to the bridge plugin, then portmap.
#[test]
fn the_cni_conflist_parses_against_the_cni_spec_and_the_plugins_options() {
    let list: ConfList =
        serde_json::from_str(&read("cni/10-overlay.conflist")).expect("a CNI conflist");
    assert!(
        ["0.3.1", "0.4.0", "1.0.0", "1.1.0"].contains(&list.cni_version.as_str()),
        "a CNI version the plugins speak: {}",
        list.cni_version
    );
    assert!(
        !list.name.is_empty()
            && list
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)),
        "CNI network names are [a-zA-Z0-9_.-]: {}",
        list.name
    );
    assert!(!list.disable_check);
    assert_eq!(list.plugins.len(), 2);
    let flannel: FlannelPlugin = serde_json::from_value(list.plugins[0].clone())
        .unwrap_or_else(|e| panic!("flannel plugin options: {e}"));
    assert_eq!(flannel.kind, "flannel");
    let defaults = assert_agent_accepts(&[]);
    assert_eq!(
        flannel.subnet_file.as_deref().map(Path::new),
        Some(defaults.flags.subnet_file.as_path()),
        "the plugin reads the subnet file where the agent writes it"
    );
    assert!(flannel.data_dir.is_some() && flannel.runtime_config.is_none());
    assert!(flannel.capabilities.is_none());
    let bridge = flannel.delegate.expect("a delegate");
    assert_eq!(bridge.kind.as_deref(), Some("bridge"));
    assert_eq!(bridge.bridge.as_deref(), Some("cni0"));
    assert_eq!(bridge.is_default_gateway, Some(true));
    assert!(
        bridge.ip_masq.is_none(),
        "flannel's plugin decides ipMasq from FLANNEL_IPMASQ"
    );
    assert!(bridge.mtu.is_none(), "flannel's plugin takes FLANNEL_MTU");
    let _ = (bridge.is_gateway, bridge.force_address, bridge.hairpin_mode);
    let _ = (bridge.promisc_mode, bridge.vlan);
    let portmap: PortmapPlugin = serde_json::from_value(list.plugins[1].clone())
        .unwrap_or_else(|e| panic!("portmap options: {e}"));
    assert_eq!(portmap.kind, "portmap");
    assert_eq!(portmap.capabilities.get("portMappings"), Some(&true));
    assert!(portmap.snat.is_none());

    // And a typo is caught: the schema check is not a formality.
    let typo = read("cni/10-overlay.conflist").replace("isDefaultGateway", "isDefaultGatway");
    let list: ConfList = serde_json::from_str(&typo).unwrap();
    assert!(serde_json::from_value::<FlannelPlugin>(list.plugins[0].clone()).is_err());
}
