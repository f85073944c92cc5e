//! flanneld's FORWARD accept rules (`--iptables-forward-rules`, on by default as in flanneld),
//! written only on a node whose FORWARD policy is not ACCEPT (Docker sets it to DROP).
//!
//! The data path bypasses FORWARD for what it forwards itself (pod to pod, host-gw, the
//! masquerade). What it leaves to the kernel's forwarding still meets the chain:
//! - a connection to a Kubernetes Service after kube-proxy's DNAT (`to_stack_dnat`): its first
//!   packet is NEW, which kube-proxy's own FORWARD rules do not accept;
//! - a pod's traffic to the outside without `--ip-masq` (or to an `--ip-masq-exclude` range);
//! - an outside host's traffic that the underlay routes to the cluster network through this node.
//!
//! Under a DROP policy these die unless a rule accepts them. flanneld appends a jump to its
//! chain `FLANNEL-FWD` to FORWARD, holding `-s <network> -j ACCEPT` and `-d <network> -j
//! ACCEPT`; we write exactly those, under the same names, so a node moving between flanneld and
//! this agent keeps one set. Appended at the end of FORWARD they only change what would
//! otherwise meet the policy, so a node whose policy is ACCEPT gets none. They are checked again
//! every `--iptables-resync` seconds (flanneld's 5 s) and, as flanneld leaves them, stay at exit.
//!
//! No BPF program can do this instead: a packet must pass every netfilter hook, and a program
//! attached at one (BPF_PROG_TYPE_NETFILTER) can drop it there but not accept it for the rest.
//!
//! `iptables` runs as a command, as in flanneld, kube-proxy and Docker, so that the rules land in
//! the backend (legacy or nft) that the node's other rules use; each call has a time limit.
//! A node can hold rules in both backends: Docker or kube-proxy in a container, or an older
//! distribution, may set the DROP policy through the other one than the node's `iptables`
//! command, and a packet must pass both. So the other backend is checked too where it holds a
//! filter table ([`other_backend`]), and the rules go wherever the policy drops.

use std::{future::Future, sync::Arc, time::Duration};

use ipnet::Ipv4Net;
use tokio::process::Command;
use tracing::{info, warn};

use crate::telemetry::Telemetry;

/// flanneld's chain, jumped to from the end of FORWARD.
pub const CHAIN: &str = "FLANNEL-FWD";
/// flanneld's comment on each of its forward rules.
const COMMENT: &str = "flanneld forward";
/// How long one `iptables` call may wait for the xtables lock (its `--wait`).
const LOCK_WAIT_SECS: &str = "5";
/// How long one `iptables` call may take in all before it is killed.
const CALL_LIMIT: Duration = Duration::from_secs(15);
/// How long the first check may hold the start-up back; later checks go on in the background.
const FIRST_CHECK_LIMIT: Duration = Duration::from_secs(20);

/// The node's own command; the other backend's is [`other_backend`]'s choice.
pub const IPTABLES: &str = "iptables";
/// Where the kernel lists the legacy (x_tables) tables of this network namespace. Reading it
/// creates nothing, where listing with `iptables-legacy` would create an empty filter table.
const LEGACY_TABLES: &str = "/proc/net/ip_tables_names";

#[derive(Debug, thiserror::Error)]
pub enum ForwardRulesError {
    #[error("`{command} {args}` failed: {message}")]
    Command {
        command: &'static str,
        args: String,
        message: String,
    },
    #[error("`{command} -S FORWARD` printed no policy line (`-P FORWARD <policy>`): {output:?}")]
    NoPolicy {
        command: &'static str,
        output: String,
    },
}

/// How one `iptables` call ended: exit status 0 or not, and what it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs one backend's `iptables` command with arguments (the table is always given). A trait
/// so that the decisions below are unit-tested against an in-memory rule set.
pub trait Iptables {
    /// The command, for messages.
    fn command(&self) -> &'static str;
    fn call(&self, args: &[&str]) -> impl Future<Output = Result<CallOutput, String>> + Send;
}

/// A real command (`iptables`, `iptables-legacy`, `iptables-nft`), in the agent's network
/// namespace.
#[derive(Debug, Clone, Copy)]
pub struct IptablesCommand(pub &'static str);

impl IptablesCommand {
    /// Runs the command with `args` as they are, within [`CALL_LIMIT`].
    async fn output(self, args: &[&str]) -> Result<std::process::Output, CommandError> {
        let mut command = Command::new(self.0);
        command.args(args).kill_on_drop(true);
        tokio::time::timeout(CALL_LIMIT, command.output())
            .await
            .map_err(|_| CommandError::Hung)?
            .map_err(CommandError::Spawn)
    }
}

/// Why a command gave no output.
#[derive(Debug)]
enum CommandError {
    Hung,
    Spawn(std::io::Error),
}

impl CommandError {
    fn describe(&self, command: &str) -> String {
        match self {
            Self::Hung => format!("no answer within {CALL_LIMIT:?}"),
            Self::Spawn(e) => format!("cannot run {command}: {e}"),
        }
    }
}

impl Iptables for IptablesCommand {
    fn command(&self) -> &'static str {
        self.0
    }

    async fn call(&self, args: &[&str]) -> Result<CallOutput, String> {
        let args = [&["--wait", LOCK_WAIT_SECS][..], args].concat();
        let output = self.output(&args).await.map_err(|e| e.describe(self.0))?;
        Ok(CallOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// The two backends of iptables 1.8 and later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

/// The backend that `iptables --version` names: `iptables v1.8.9 (nf_tables)` or `(legacy)`;
/// releases before 1.8 print neither and have only the legacy one.
fn backend_of(version: &str) -> Backend {
    if version.contains("(nf_tables)") {
        Backend::Nft
    } else {
        Backend::Legacy
    }
}

/// The command of the other backend, to check besides the node's `iptables` (of backend
/// `own`). The legacy one only where this namespace has a legacy filter table: listing through
/// `iptables-legacy` would create one, and every packet would then cross it. The nft one
/// always: `iptables-nft` lists a missing table as an accepting FORWARD and creates nothing.
#[must_use]
pub fn other_backend(own: Backend, legacy_filter_table: bool) -> Option<&'static str> {
    match own {
        Backend::Nft if legacy_filter_table => Some("iptables-legacy"),
        Backend::Nft => None,
        Backend::Legacy => Some("iptables-nft"),
    }
}

/// Whether this namespace has a legacy filter table.
fn legacy_filter_table() -> bool {
    std::fs::read_to_string(LEGACY_TABLES).is_ok_and(|names| names.lines().any(|n| n == "filter"))
}

/// The commands to check: the node's `iptables`, and the other backend's where
/// [`other_backend`] says so and its command runs; else, the other command with why it cannot
/// be checked. A missing `iptables-nft` beside a legacy `iptables` is no finding (releases
/// before 1.8 have none); a missing `iptables-legacy` beside a legacy filter table is, since
/// its rules cannot be checked.
async fn commands() -> (Vec<IptablesCommand>, Option<(&'static str, String)>) {
    let mut commands = vec![IptablesCommand(IPTABLES)];
    let own = match IptablesCommand(IPTABLES).output(&["--version"]).await {
        Ok(out) => backend_of(&String::from_utf8_lossy(&out.stdout)),
        // `ensure` will report what is wrong with the command itself.
        Err(_) => return (commands, None),
    };
    let Some(other) = other_backend(own, legacy_filter_table()) else {
        return (commands, None);
    };
    let unchecked = match IptablesCommand(other).output(&["--version"]).await {
        Ok(_) => {
            commands.push(IptablesCommand(other));
            None
        }
        Err(CommandError::Spawn(e))
            if e.kind() == std::io::ErrorKind::NotFound && own == Backend::Legacy =>
        {
            None
        }
        Err(e) if own == Backend::Nft => Some(format!(
            "this namespace has legacy iptables tables ({LEGACY_TABLES}) that cannot be \
             checked: {}",
            e.describe(other)
        )),
        Err(e) => Some(e.describe(other)),
    };
    (commands, unchecked.map(|why| (other, why)))
}

/// What one check found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The policy accepts: no rule is needed, none was written.
    NotNeeded { policy: String },
    /// The policy does not accept: the rules are in place; `added` names what this check wrote
    /// (empty when everything was there).
    InPlace { policy: String, added: Vec<String> },
}

impl Outcome {
    /// One line for `overlay-agent status`.
    #[must_use]
    pub fn summary(&self) -> String {
        match self {
            Self::NotNeeded { policy } => format!("policy {policy}: no rule needed"),
            Self::InPlace { policy, .. } => {
                format!("policy {policy}: flanneld's forward rules in place (chain {CHAIN})")
            }
        }
    }
}

/// One check of every backend: each command and what it found (or why it could not tell).
pub type Check = Vec<(&'static str, Result<Outcome, String>)>;

/// What `overlay-agent status` shows for a check: the node's `iptables` as before, any other
/// backend named.
fn status_line(check: &Check) -> String {
    check
        .iter()
        .map(|(command, outcome)| {
            let line = match outcome {
                Ok(outcome) => outcome.summary(),
                Err(e) => format!("CHECK FAILED: {e}"),
            };
            if *command == IPTABLES {
                line
            } else {
                format!("{command}: {line}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The rules, as `(chain, rule)`: the two accepts in [`CHAIN`], then the jump at the end of
/// FORWARD (flanneld's order and wording).
#[must_use]
pub fn rules(network: Ipv4Net) -> [(&'static str, Vec<String>); 3] {
    let accept = |direction: &str| {
        [
            direction,
            &network.to_string(),
            "-m",
            "comment",
            "--comment",
            COMMENT,
            "-j",
            "ACCEPT",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let jump = ["-m", "comment", "--comment", COMMENT, "-j", CHAIN]
        .map(str::to_owned)
        .to_vec();
    [
        (CHAIN, accept("-s")),
        (CHAIN, accept("-d")),
        ("FORWARD", jump),
    ]
}

/// Reads the FORWARD policy and, unless it is ACCEPT, writes what is missing of [`rules`].
pub async fn ensure(ipt: &impl Iptables, network: Ipv4Net) -> Result<Outcome, ForwardRulesError> {
    let listed = run(ipt, &["-t", "filter", "-S", "FORWARD"]).await?;
    let policy = policy_of(&listed.stdout).ok_or_else(|| ForwardRulesError::NoPolicy {
        command: ipt.command(),
        output: listed.stdout.clone(),
    })?;
    if policy == "ACCEPT" {
        return Ok(Outcome::NotNeeded { policy });
    }
    let mut added = Vec::new();
    if !succeeds(ipt, &["-t", "filter", "-S", CHAIN]).await? {
        run(ipt, &["-t", "filter", "-N", CHAIN]).await?;
        added.push(format!("chain {CHAIN}"));
    }
    for (chain, rule) in rules(network) {
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        let check = [&["-t", "filter", "-C", chain][..], &rule].concat();
        if !succeeds(ipt, &check).await? {
            run(ipt, &[&["-t", "filter", "-A", chain][..], &rule].concat()).await?;
            added.push(format!("-A {chain} {}", quoted(&rule)));
        }
    }
    Ok(Outcome::InPlace { policy, added })
}

/// A call whose exit status is the answer (`-S` of a chain, `-C`): only failing to run it is
/// an error.
async fn succeeds(ipt: &impl Iptables, args: &[&str]) -> Result<bool, ForwardRulesError> {
    Ok(call(ipt, args).await?.success)
}

/// A call that must succeed.
async fn run(ipt: &impl Iptables, args: &[&str]) -> Result<CallOutput, ForwardRulesError> {
    let out = call(ipt, args).await?;
    if out.success {
        Ok(out)
    } else {
        Err(command_error(ipt, args, out.stderr))
    }
}

async fn call(ipt: &impl Iptables, args: &[&str]) -> Result<CallOutput, ForwardRulesError> {
    ipt.call(args)
        .await
        .map_err(|message| command_error(ipt, args, message))
}

fn command_error(ipt: &impl Iptables, args: &[&str], message: String) -> ForwardRulesError {
    ForwardRulesError::Command {
        command: ipt.command(),
        args: quoted(args),
        message,
    }
}

/// Arguments as one would type them (the comment quoted).
fn quoted(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                (*a).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The policy from `iptables -S FORWARD`'s first line, `-P FORWARD <policy>`.
fn policy_of(listing: &str) -> Option<String> {
    listing.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("-P"), Some("FORWARD"), Some(policy)) => Some(policy.to_owned()),
            _ => None,
        }
    })
}

/// Checks every backend [`commands`] finds once.
async fn check_all(network: Ipv4Net) -> Check {
    let (commands, unchecked) = commands().await;
    let mut check = Vec::new();
    for ipt in commands {
        let outcome = ensure(&ipt, network).await.map_err(|e| e.to_string());
        check.push((ipt.command(), outcome));
    }
    if let Some((command, why)) = unchecked {
        check.push((command, Err(why)));
    }
    check
}

/// Keeps the rules for `network` every `every`, logging what changes: rules written again after
/// someone removed them, a policy that changed, failures (once until the next success); the
/// status shows the latest. `last` is the first check. Runs until aborted.
pub async fn keep(network: Ipv4Net, every: Duration, mut last: Check, telemetry: Arc<Telemetry>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = check_all(network).await;
        record(network, Some(&last), &now, &telemetry);
        last = now;
    }
}

/// The first check, before the node is reported ready (at most [`FIRST_CHECK_LIMIT`]: a stuck
/// `iptables` must not hold the node back); it seeds [`keep`].
pub async fn first_check(network: Ipv4Net, telemetry: &Telemetry) -> Check {
    let now = tokio::time::timeout(FIRST_CHECK_LIMIT, check_all(network))
        .await
        .unwrap_or_else(|_| {
            vec![(
                IPTABLES,
                Err(format!("no outcome within {FIRST_CHECK_LIMIT:?}")),
            )]
        });
    record(network, None, &now, telemetry);
    now
}

/// Shows `now` in the status, and logs, backend by backend, where it differs from `before` in a
/// way an operator should know.
fn record(network: Ipv4Net, before: Option<&Check>, now: &Check, telemetry: &Telemetry) {
    telemetry.set_forward(status_line(now));
    for (command, outcome) in now {
        let before = before.and_then(|b| b.iter().find(|(c, _)| c == command).map(|(_, o)| o));
        record_one(network, command, before, outcome);
    }
}

fn record_one(
    network: Ipv4Net,
    command: &str,
    before: Option<&Result<Outcome, String>>,
    now: &Result<Outcome, String>,
) {
    let policy_before = match before {
        Some(Ok(Outcome::NotNeeded { policy } | Outcome::InPlace { policy, .. })) => Some(policy),
        _ => None,
    };
    match now {
        Ok(Outcome::NotNeeded { policy }) => {
            if policy_before != Some(policy) {
                info!(
                    "FORWARD policy {policy} ({command}): no forward rules needed (the kernel \
                     forwards what the data path leaves to it)"
                );
            }
        }
        Ok(Outcome::InPlace { policy, added }) => {
            if policy_before != Some(policy) {
                info!(
                    "FORWARD policy {policy} ({command}): flanneld's forward rules for {network} \
                     in chain {CHAIN} keep what the kernel forwards for pods (Service connections, \
                     traffic to and from outside unmasqueraded) from being dropped; \
                     --iptables-forward-rules=false leaves them out"
                );
            }
            if !added.is_empty() {
                let again = if before.is_some_and(|b| matches!(b, Ok(Outcome::InPlace { .. }))) {
                    " (they had been removed)"
                } else {
                    ""
                };
                info!(
                    "forward rules written ({command}){again}: {}",
                    added.join("; ")
                );
            }
        }
        Err(e) => {
            if before.is_none_or(|b| b.as_ref().err() != Some(e)) {
                warn!(
                    "cannot check the FORWARD chain ({e}); if its policy drops, connections to \
                     Kubernetes Services and unmasqueraded traffic to and from outside fail on \
                     this node. Retrying"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// An in-memory filter table: FORWARD's policy and each chain's rules as argument strings.
    struct FakeTable {
        policy: &'static str,
        chains: Mutex<Vec<(String, Vec<String>)>>,
        calls: Mutex<Vec<String>>,
        fail: Option<&'static str>,
    }

    impl FakeTable {
        fn new(policy: &'static str) -> Self {
            Self {
                policy,
                chains: Mutex::new(vec![("FORWARD".to_owned(), Vec::new())]),
                calls: Mutex::new(Vec::new()),
                fail: None,
            }
        }

        fn writes(&self) -> Vec<String> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.contains(" -A ") || c.contains(" -N "))
                .cloned()
                .collect()
        }

        fn rules_of(&self, chain: &str) -> Vec<String> {
            let chains = self.chains.lock().unwrap();
            chains
                .iter()
                .find(|(c, _)| c == chain)
                .map(|(_, r)| r.clone())
                .unwrap_or_default()
        }
    }

    impl Iptables for FakeTable {
        fn command(&self) -> &'static str {
            IPTABLES
        }

        async fn call(&self, args: &[&str]) -> Result<CallOutput, String> {
            self.calls.lock().unwrap().push(args.join(" "));
            if let Some(message) = self.fail {
                return Err(message.to_owned());
            }
            let ok = |stdout: String| CallOutput {
                success: true,
                stdout,
                stderr: String::new(),
            };
            let no = |stderr: &str| CallOutput {
                success: false,
                stdout: String::new(),
                stderr: stderr.to_owned(),
            };
            let mut chains = self.chains.lock().unwrap();
            let [_, "filter", op, chain, rule @ ..] = args else {
                return Ok(no("bad call"));
            };
            let rule = rule.join(" ");
            let found = chains.iter_mut().find(|(c, _)| c == chain);
            Ok(match (*op, found) {
                ("-S", Some((_, rules))) => {
                    let head = if *chain == "FORWARD" {
                        format!("-P FORWARD {}\n", self.policy)
                    } else {
                        format!("-N {chain}\n")
                    };
                    ok(head
                        + &rules
                            .iter()
                            .map(|r| format!("-A {chain} {r}\n"))
                            .collect::<String>())
                }
                ("-N", None) => {
                    chains.push(((*chain).to_owned(), Vec::new()));
                    ok(String::new())
                }
                ("-C", Some((_, rules))) if rules.contains(&rule) => ok(String::new()),
                ("-A", Some((_, rules))) => {
                    rules.push(rule);
                    ok(String::new())
                }
                ("-C" | "-A" | "-S", None) => no("No chain/target/match by that name."),
                _ => no("Bad rule (does a matching rule exist in that chain?)."),
            })
        }
    }

    fn network() -> Ipv4Net {
        "172.17.0.0/16".parse().unwrap()
    }

    #[tokio::test]
    async fn an_accepting_policy_gets_no_rule() {
        let table = FakeTable::new("ACCEPT");
        let outcome = ensure(&table, network()).await.unwrap();
        assert_eq!(
            outcome,
            Outcome::NotNeeded {
                policy: "ACCEPT".into()
            }
        );
        assert!(table.writes().is_empty(), "{:?}", table.writes());
    }

    #[tokio::test]
    async fn a_dropping_policy_gets_flanneld_s_chain_and_rules_once() {
        let table = FakeTable::new("DROP");
        let Outcome::InPlace { policy, added } = ensure(&table, network()).await.unwrap() else {
            panic!("rules expected");
        };
        assert_eq!(policy, "DROP");
        assert_eq!(added.len(), 4, "{added:?}");
        assert_eq!(
            table.rules_of(CHAIN),
            [
                "-s 172.17.0.0/16 -m comment --comment flanneld forward -j ACCEPT",
                "-d 172.17.0.0/16 -m comment --comment flanneld forward -j ACCEPT",
            ]
        );
        assert_eq!(
            table.rules_of("FORWARD"),
            ["-m comment --comment flanneld forward -j FLANNEL-FWD"]
        );
        assert_eq!(
            added[1],
            "-A FLANNEL-FWD -s 172.17.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT"
        );

        // Checked again: nothing more is written.
        let writes = table.writes().len();
        let again = ensure(&table, network()).await.unwrap();
        assert_eq!(
            again,
            Outcome::InPlace {
                policy: "DROP".into(),
                added: Vec::new()
            }
        );
        assert_eq!(table.writes().len(), writes);
    }

    #[tokio::test]
    async fn only_what_is_missing_is_written_again() {
        let table = FakeTable::new("DROP");
        ensure(&table, network()).await.unwrap();
        // Someone deleted the jump (as `iptables -F FORWARD` would).
        table.chains.lock().unwrap()[0].1.clear();
        let Outcome::InPlace { added, .. } = ensure(&table, network()).await.unwrap() else {
            panic!("rules expected");
        };
        assert_eq!(
            added,
            ["-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD"]
        );
        assert_eq!(table.rules_of(CHAIN).len(), 2, "no duplicate accepts");
    }

    #[tokio::test]
    async fn flanneld_s_rules_already_there_are_taken_as_they_are() {
        let table = FakeTable::new("DROP");
        for (chain, rule) in rules(network()) {
            let mut chains = table.chains.lock().unwrap();
            match chains.iter_mut().find(|(c, _)| c == chain) {
                Some((_, rules)) => rules.push(rule.join(" ")),
                None => chains.push((chain.to_owned(), vec![rule.join(" ")])),
            }
        }
        let outcome = ensure(&table, network()).await.unwrap();
        assert_eq!(
            outcome,
            Outcome::InPlace {
                policy: "DROP".into(),
                added: Vec::new()
            }
        );
        assert!(table.writes().is_empty(), "{:?}", table.writes());
    }

    #[tokio::test]
    async fn a_missing_iptables_is_an_error_naming_the_command() {
        let mut table = FakeTable::new("DROP");
        table.fail = Some("cannot run iptables: No such file or directory (os error 2)");
        let e = ensure(&table, network()).await.unwrap_err().to_string();
        assert!(e.contains("iptables -t filter -S FORWARD"), "{e}");
        assert!(e.contains("No such file"), "{e}");
    }

    #[test]
    fn the_other_backend_is_checked_where_it_can_hold_rules() {
        assert_eq!(backend_of("iptables v1.8.9 (nf_tables)\n"), Backend::Nft);
        assert_eq!(backend_of("iptables v1.8.9 (legacy)\n"), Backend::Legacy);
        assert_eq!(backend_of("iptables v1.6.1\n"), Backend::Legacy);
        // Legacy tables are listed only where they exist: listing would create them.
        assert_eq!(other_backend(Backend::Nft, true), Some("iptables-legacy"));
        assert_eq!(other_backend(Backend::Nft, false), None);
        assert_eq!(other_backend(Backend::Legacy, false), Some("iptables-nft"));
        assert_eq!(other_backend(Backend::Legacy, true), Some("iptables-nft"));
    }

    #[test]
    fn the_status_names_the_other_backend() {
        let check: Check = vec![
            (
                IPTABLES,
                Ok(Outcome::NotNeeded {
                    policy: "ACCEPT".into(),
                }),
            ),
            (
                "iptables-legacy",
                Ok(Outcome::InPlace {
                    policy: "DROP".into(),
                    added: Vec::new(),
                }),
            ),
        ];
        assert_eq!(
            status_line(&check),
            "policy ACCEPT: no rule needed; iptables-legacy: policy DROP: flanneld's forward \
             rules in place (chain FLANNEL-FWD)"
        );
        assert_eq!(
            status_line(&check[..1].to_vec()),
            "policy ACCEPT: no rule needed"
        );
    }

    #[test]
    fn the_policy_is_read_from_the_listing() {
        assert_eq!(
            policy_of("-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n").as_deref(),
            Some("DROP")
        );
        assert_eq!(policy_of("-N FLANNEL-FWD\n"), None);
    }
}
