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

#[derive(Debug, thiserror::Error)]
pub enum ForwardRulesError {
    #[error("`iptables {args}` failed: {message}")]
    Command { args: String, message: String },
    #[error("`iptables -S FORWARD` printed no policy line (`-P FORWARD <policy>`): {output:?}")]
    NoPolicy { output: String },
}

/// How one `iptables` call ended: exit status 0 or not, and what it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `iptables` with arguments (the table is always given). A trait so that the decisions
/// below are unit-tested against an in-memory rule set.
pub trait Iptables {
    fn call(&self, args: &[&str]) -> impl Future<Output = Result<CallOutput, String>> + Send;
}

/// The real command, in the agent's network namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct IptablesCommand;

impl Iptables for IptablesCommand {
    async fn call(&self, args: &[&str]) -> Result<CallOutput, String> {
        let mut command = Command::new("iptables");
        command.arg("--wait").arg(LOCK_WAIT_SECS).args(args);
        command.kill_on_drop(true);
        let output = tokio::time::timeout(CALL_LIMIT, command.output())
            .await
            .map_err(|_| format!("no answer within {CALL_LIMIT:?}"))?
            .map_err(|e| format!("cannot run iptables: {e}"))?;
        Ok(CallOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
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

/// What `overlay-agent status` shows for a check's result.
fn status_line(outcome: &Result<Outcome, String>) -> String {
    match outcome {
        Ok(outcome) => outcome.summary(),
        Err(e) => format!("CHECK FAILED: {e}"),
    }
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
        Err(command_error(args, out.stderr))
    }
}

async fn call(ipt: &impl Iptables, args: &[&str]) -> Result<CallOutput, ForwardRulesError> {
    ipt.call(args)
        .await
        .map_err(|message| command_error(args, message))
}

fn command_error(args: &[&str], message: String) -> ForwardRulesError {
    ForwardRulesError::Command {
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

/// Keeps the rules for `network` every `every`, logging what changes: rules written again after
/// someone removed them, a policy that changed, failures (once until the next success); the
/// status shows the latest. `last` is the first check's outcome. Runs until aborted.
pub async fn keep(
    network: Ipv4Net,
    every: Duration,
    mut last: Result<Outcome, String>,
    telemetry: Arc<Telemetry>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = ensure(&IptablesCommand, network)
            .await
            .map_err(|e| e.to_string());
        record(network, Some(&last), &now, &telemetry);
        last = now;
    }
}

/// The first check, before the node is reported ready (at most [`FIRST_CHECK_LIMIT`]: a stuck
/// `iptables` must not hold the node back); its outcome seeds [`keep`].
pub async fn first_check(network: Ipv4Net, telemetry: &Telemetry) -> Result<Outcome, String> {
    let now = tokio::time::timeout(FIRST_CHECK_LIMIT, ensure(&IptablesCommand, network))
        .await
        .map_err(|_| format!("no outcome within {FIRST_CHECK_LIMIT:?}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
    record(network, None, &now, telemetry);
    now
}

/// Shows `now` in the status, and logs it where it differs from `before` in a way an operator
/// should know.
fn record(
    network: Ipv4Net,
    before: Option<&Result<Outcome, String>>,
    now: &Result<Outcome, String>,
    telemetry: &Telemetry,
) {
    telemetry.set_forward(status_line(now));
    let policy_before = match before {
        Some(Ok(Outcome::NotNeeded { policy } | Outcome::InPlace { policy, .. })) => Some(policy),
        _ => None,
    };
    match now {
        Ok(Outcome::NotNeeded { policy }) => {
            if policy_before != Some(policy) {
                info!(
                    "FORWARD policy {policy}: no forward rules needed (the kernel forwards what \
                     the data path leaves to it)"
                );
            }
        }
        Ok(Outcome::InPlace { policy, added }) => {
            if policy_before != Some(policy) {
                info!(
                    "FORWARD policy {policy}: flanneld's forward rules for {network} in chain \
                     {CHAIN} keep what the kernel forwards for pods (Service connections, traffic \
                     to and from outside unmasqueraded) from being dropped; \
                     --iptables-forward-rules=false leaves them out"
                );
            }
            if !added.is_empty() {
                let again = if before.is_some_and(|b| matches!(b, Ok(Outcome::InPlace { .. }))) {
                    " (they had been removed)"
                } else {
                    ""
                };
                info!("forward rules written{again}: {}", added.join("; "));
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
    fn the_policy_is_read_from_the_listing() {
        assert_eq!(
            policy_of("-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n").as_deref(),
            Some("DROP")
        );
        assert_eq!(policy_of("-N FLANNEL-FWD\n"), None);
    }
}
