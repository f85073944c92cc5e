//! The agent's runtime state as operators see it: what `/readyz` answers, what `/metrics` and
//! `overlay-agent status` show beside the pinned maps.
//!
//! The daemon records facts here as they happen (start-up phase, lease and its expiry, each
//! etcd probe, the data path's attachment check, the pod bridge); readiness is computed from
//! them when asked, so it turns back to "not ready" when a fact goes bad, not only once at
//! start. The state is also written to `--status-file` every second for `status`, which runs as
//! another process.

use std::{
    path::Path,
    sync::{
        LazyLock, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Times the peer watcher listed the leases again (after compaction) or re-established its
/// watch (after an error or a closed stream). Counted where it happens (`subnet::watch`).
pub static WATCH_RESYNCS: AtomicU64 = AtomicU64::new(0);

/// SHA-256 of the embedded eBPF object, hex: which data path this binary carries.
pub static OBJECT_SHA256: LazyLock<String> = LazyLock::new(|| {
    Sha256::digest(crate::datapath::OBJECT)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
});

/// The agent's version (the crate's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Shared between the daemon (writer) and the health, metrics and status-file tasks (readers).
#[derive(Debug)]
pub struct Telemetry {
    state: Mutex<State>,
    etcd_timeout: Duration,
}

#[derive(Debug, Default)]
struct State {
    /// `Some(what)` until the node is first ready.
    starting: Option<&'static str>,
    backend: Option<String>,
    network: Option<Ipv4Net>,
    external_interface: Option<String>,
    interface_addr: Option<String>,
    public_ip: Option<String>,
    host_device: Option<String>,
    bridge: Option<String>,
    etcd_endpoints: Vec<String>,
    lease: Option<Ipv4Net>,
    lease_expiration: Option<Instant>,
    renew_margin: Duration,
    etcd_last_ok: Option<Instant>,
    etcd_failing_since: Option<Instant>,
    etcd_error: Option<String>,
    datapath_problem: Option<String>,
    config_changed: Option<String>,
    lease_shared: Option<String>,
    gro_blocked: Option<String>,
    forward: Option<String>,
    repairs: u64,
    nat_enabled: bool,
}

/// What the status file holds (and `status -o json` shows under `agent`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub pid: u32,
    pub version: String,
    pub object_sha256: String,
    /// When this was written (Unix seconds).
    pub updated_at_unix: f64,
    pub ready: bool,
    pub not_ready_reason: Option<String>,
    pub backend: Option<String>,
    pub network: Option<String>,
    pub external_interface: Option<String>,
    /// The external interface's address: the outer source of VXLAN and the masquerade's.
    pub interface_addr: Option<String>,
    /// The PublicIP of the lease (`--public-ip`, else the interface's address).
    pub public_ip: Option<String>,
    pub host_device: Option<String>,
    pub bridge: Option<String>,
    pub lease: Option<LeaseStatus>,
    pub etcd: EtcdStatus,
    pub nat_enabled: bool,
    /// Times the data path was repaired after a device or attachment went away.
    pub repairs: u64,
    /// The FORWARD policy and flanneld's forward rules, as last checked
    /// (`--iptables-forward-rules`). Absent from an older agent's file.
    #[serde(default)]
    pub forward: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LeaseStatus {
    pub subnet: String,
    /// `None` for a reservation (a key without an etcd lease never expires).
    pub expires_at_unix: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EtcdStatus {
    pub endpoints: Vec<String>,
    pub reachable: bool,
    pub last_ok_at_unix: Option<f64>,
    pub unreachable_for_secs: Option<f64>,
    pub last_error: Option<String>,
    pub watch_resyncs: u64,
}

impl Telemetry {
    /// `etcd_timeout`: how long etcd may be unreachable before the node reports not ready.
    #[must_use]
    pub fn new(etcd_timeout: Duration, etcd_endpoints: Vec<String>) -> Self {
        Self {
            state: Mutex::new(State {
                starting: Some("choosing the external interface"),
                etcd_endpoints,
                ..State::default()
            }),
            etcd_timeout,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Start-up progress, shown as the not-ready reason until [`Telemetry::started`].
    pub fn phase(&self, what: &'static str) {
        let mut s = self.state();
        if s.starting.is_some() {
            s.starting = Some(what);
        }
    }

    /// The node carried traffic for the first time: from now on readiness follows the facts.
    pub fn started(&self) {
        self.state().starting = None;
    }

    pub fn set_interface(
        &self,
        name: &str,
        iface_addr: std::net::Ipv4Addr,
        public_ip: std::net::Ipv4Addr,
    ) {
        let mut s = self.state();
        s.external_interface = Some(name.to_owned());
        s.interface_addr = Some(iface_addr.to_string());
        s.public_ip = Some(public_ip.to_string());
    }

    pub fn set_network(&self, backend: &str, network: Ipv4Net, nat_enabled: bool) {
        let mut s = self.state();
        s.backend = Some(backend.to_owned());
        s.network = Some(network);
        s.nat_enabled = nat_enabled;
    }

    /// Our lease: its subnet, when it runs out (`None`: a reservation), and the renew margin
    /// (renewal is due that long before expiry).
    pub fn set_lease(&self, subnet: Ipv4Net, expiration: Option<Instant>, renew_margin: Duration) {
        let mut s = self.state();
        s.lease = Some(subnet);
        s.lease_expiration = expiration;
        s.renew_margin = renew_margin;
    }

    pub fn set_host_device(&self, name: Option<&str>) {
        self.state().host_device = name.map(str::to_owned);
    }

    pub fn set_bridge(&self, name: Option<&str>) {
        self.state().bridge = name.map(str::to_owned);
    }

    /// The outcome of one etcd probe.
    pub fn etcd_probe(&self, result: Result<(), String>) {
        let now = Instant::now();
        let mut s = self.state();
        match result {
            Ok(()) => {
                s.etcd_last_ok = Some(now);
                s.etcd_failing_since = None;
                s.etcd_error = None;
            }
            Err(e) => {
                s.etcd_failing_since.get_or_insert(now);
                s.etcd_error = Some(e);
            }
        }
    }

    /// Another agent publishing our PublicIP writes our lease (`Some`: what the operator is
    /// told): two nodes share one subnet, and their pods' addresses collide.
    pub fn set_lease_shared(&self, what: Option<String>) {
        self.state().lease_shared = what;
    }

    /// Why the GRO device cannot be up (`Some`): another VXLAN device holds our port.
    pub fn set_gro_blocked(&self, why: Option<String>) {
        self.state().gro_blocked = why;
    }

    /// The latest check of the FORWARD policy and flanneld's forward rules, in words.
    pub fn set_forward(&self, what: String) {
        self.state().forward = Some(what);
    }

    /// How the network config in etcd differs from the one the agent runs (`None`: it does
    /// not). Nodes that start with another config refuse this node's lease and it theirs.
    pub fn set_config_changed(&self, change: Option<String>) {
        self.state().config_changed = change;
    }

    /// The attachment check's finding: `None` when every program sits where it should.
    pub fn set_datapath_problem(&self, problem: Option<String>) {
        self.state().datapath_problem = problem;
    }

    pub fn count_repair(&self) {
        self.state().repairs += 1;
    }

    /// The lease's expiry, for the metrics.
    #[must_use]
    pub fn lease_expiry_unix(&self) -> Option<f64> {
        self.state().lease_expiration.map(unix_secs)
    }

    /// Whether the last etcd probe succeeded.
    #[must_use]
    pub fn etcd_reachable(&self) -> bool {
        let s = self.state();
        s.etcd_last_ok.is_some() && s.etcd_failing_since.is_none()
    }

    /// `Ok` when the node carries pod traffic as it should, else why not (one line).
    pub fn readiness(&self) -> Result<(), String> {
        readiness(&self.state(), Instant::now(), self.etcd_timeout)
    }

    /// Everything, for the status file.
    #[must_use]
    pub fn snapshot(&self) -> AgentStatus {
        let now = Instant::now();
        let s = self.state();
        let ready = readiness(&s, now, self.etcd_timeout);
        AgentStatus {
            pid: std::process::id(),
            version: VERSION.to_owned(),
            object_sha256: OBJECT_SHA256.clone(),
            updated_at_unix: unix_secs(now),
            ready: ready.is_ok(),
            not_ready_reason: ready.err(),
            backend: s.backend.clone(),
            network: s.network.map(|n| n.to_string()),
            external_interface: s.external_interface.clone(),
            interface_addr: s.interface_addr.clone(),
            public_ip: s.public_ip.clone(),
            host_device: s.host_device.clone(),
            bridge: s.bridge.clone(),
            lease: s.lease.map(|subnet| LeaseStatus {
                subnet: subnet.to_string(),
                expires_at_unix: s.lease_expiration.map(unix_secs),
            }),
            etcd: EtcdStatus {
                endpoints: s.etcd_endpoints.clone(),
                reachable: s.etcd_last_ok.is_some() && s.etcd_failing_since.is_none(),
                last_ok_at_unix: s.etcd_last_ok.map(unix_secs),
                unreachable_for_secs: s
                    .etcd_failing_since
                    .map(|t| now.duration_since(t).as_secs_f64()),
                last_error: s.etcd_error.clone(),
                watch_resyncs: WATCH_RESYNCS.load(Ordering::Relaxed),
            },
            nat_enabled: s.nat_enabled,
            repairs: s.repairs,
            forward: s.forward.clone(),
        }
    }

    /// Writes [`Telemetry::snapshot`] to `path` atomically (temporary file, then rename).
    pub fn write_status_file(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(&self.snapshot()).map_err(std::io::Error::other)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path)
    }
}

fn readiness(s: &State, now: Instant, etcd_timeout: Duration) -> Result<(), String> {
    if let Some(what) = s.starting {
        return Err(format!("starting: {what}"));
    }
    if let Some(problem) = &s.datapath_problem {
        return Err(format!("data path detached: {problem}"));
    }
    if let Some(change) = &s.config_changed {
        return Err(format!(
            "the network config in etcd changed since start ({change}): restart every agent"
        ));
    }
    if let Some(why) = &s.gro_blocked {
        return Err(why.clone());
    }
    if let Some(what) = &s.lease_shared {
        return Err(format!(
            "{what}: two nodes share one subnet; give each its own PublicIP"
        ));
    }
    if let Some(expiration) = s.lease_expiration {
        if now >= expiration {
            return Err(format!(
                "lease on {} expired {:.0} s ago",
                s.lease.map(|l| l.to_string()).unwrap_or_default(),
                now.duration_since(expiration).as_secs_f64()
            ));
        }
        // Renewal is due `renew_margin` before expiry; half the margin later it is overdue.
        let left = expiration.duration_since(now);
        if left < s.renew_margin / 2 {
            return Err(format!(
                "lease renewal overdue: the lease expires in {:.0} s and should have been \
                 renewed {:.0} s ago",
                left.as_secs_f64(),
                (s.renew_margin - left).as_secs_f64()
            ));
        }
    }
    if let Some(since) = s.etcd_failing_since {
        let down = now.duration_since(since);
        if down >= etcd_timeout {
            return Err(format!(
                "etcd unreachable for {:.0} s (limit {} s): {}",
                down.as_secs_f64(),
                etcd_timeout.as_secs(),
                s.etcd_error.as_deref().unwrap_or("no answer")
            ));
        }
    }
    Ok(())
}

/// An `Instant` as Unix seconds (through the wall clock now).
fn unix_secs(t: Instant) -> f64 {
    let now_wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let now = Instant::now();
    if t >= now {
        now_wall + t.duration_since(now).as_secs_f64()
    } else {
        now_wall - now.duration_since(t).as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> State {
        State {
            lease: Some("172.17.5.0/24".parse().unwrap()),
            renew_margin: Duration::from_secs(3600),
            ..State::default()
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(60);

    #[test]
    fn not_ready_while_starting() {
        let s = State {
            starting: Some("acquiring a subnet lease"),
            ..running()
        };
        let err = readiness(&s, Instant::now(), TIMEOUT).unwrap_err();
        assert!(err.contains("acquiring a subnet lease"), "{err}");
    }

    #[test]
    fn a_changed_network_config_is_named() {
        let s = State {
            config_changed: Some("SubnetLen 24 → 25".to_owned()),
            ..running()
        };
        let err = readiness(&s, Instant::now(), TIMEOUT).unwrap_err();
        assert!(
            err.contains("network config in etcd changed") && err.contains("SubnetLen 24 → 25"),
            "{err}"
        );
    }

    #[test]
    fn a_gro_device_kept_down_is_named() {
        let s = State {
            gro_blocked: Some("VXLAN device flannel.1 holds port 8472".to_owned()),
            ..running()
        };
        let err = readiness(&s, Instant::now(), TIMEOUT).unwrap_err();
        assert!(err.contains("flannel.1 holds port 8472"), "{err}");
    }

    #[test]
    fn a_lease_shared_with_another_agent_is_named() {
        let s = State {
            lease_shared: Some(
                "another agent publishes this node's PublicIP 198.18.0.1 and writes our lease \
                 of 10.10.3.0/24 (etcd lease 7002)"
                    .to_owned(),
            ),
            ..running()
        };
        let err = readiness(&s, Instant::now(), TIMEOUT).unwrap_err();
        assert!(
            err.contains("PublicIP 198.18.0.1") && err.contains("two nodes share one subnet"),
            "{err}"
        );
    }

    #[test]
    fn detached_data_path_is_named() {
        let s = State {
            datapath_problem: Some("underlay_ingress not attached to eth0".to_owned()),
            ..running()
        };
        let err = readiness(&s, Instant::now(), TIMEOUT).unwrap_err();
        assert!(
            err.contains("data path detached") && err.contains("eth0"),
            "{err}"
        );
    }

    #[test]
    fn lease_renewal_overdue_after_half_the_margin() {
        let now = Instant::now();
        let mut s = running();
        s.lease_expiration = Some(now + Duration::from_secs(3000));
        assert_eq!(
            readiness(&s, now, TIMEOUT),
            Ok(()),
            "renewal due, not overdue"
        );
        s.lease_expiration = Some(now + Duration::from_secs(1700));
        let err = readiness(&s, now, TIMEOUT).unwrap_err();
        assert!(err.contains("renewal overdue"), "{err}");
        let err = readiness(&s, now + Duration::from_secs(1800), TIMEOUT).unwrap_err();
        assert!(err.contains("expired"), "{err}");
        s.lease_expiration = None;
        assert_eq!(
            readiness(&s, now, TIMEOUT),
            Ok(()),
            "a reservation never expires"
        );
    }

    #[test]
    fn etcd_down_longer_than_the_limit() {
        let t = Telemetry::new(Duration::from_secs(2), vec![]);
        t.started();
        t.etcd_probe(Ok(()));
        assert!(t.etcd_reachable());
        t.etcd_probe(Err("connection refused".to_owned()));
        assert!(!t.etcd_reachable());
        assert_eq!(t.readiness(), Ok(()), "within the limit");
        let since = t.state().etcd_failing_since.unwrap();
        let later = since + Duration::from_secs(3);
        let err = readiness(&t.state(), later, Duration::from_secs(2)).unwrap_err();
        assert!(
            err.contains("etcd unreachable") && err.contains("connection refused"),
            "{err}"
        );
        t.etcd_probe(Ok(()));
        assert_eq!(readiness(&t.state(), later, Duration::from_secs(2)), Ok(()));
    }

    #[test]
    fn status_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/status.json");
        let t = Telemetry::new(TIMEOUT, vec!["http://198.18.0.254:2379".to_owned()]);
        t.set_lease(
            "172.17.5.0/24".parse().unwrap(),
            Some(Instant::now() + Duration::from_secs(100)),
            Duration::from_secs(10),
        );
        t.started();
        t.write_status_file(&path).unwrap();
        let back: AgentStatus = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(back.ready);
        assert_eq!(back.lease.unwrap().subnet, "172.17.5.0/24");
        assert_eq!(back.object_sha256.len(), 64);
        assert_eq!(back.pid, std::process::id());
    }
}
