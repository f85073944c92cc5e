//! The agent under test, run inside a node namespace with its output captured to a log file.

use std::{
    ffi::OsString,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cmd, netns::NetNs};

/// How long [`AgentProcess::kill`] waits after SIGTERM before SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// How much of the log goes into error messages.
const LOG_TAIL: usize = 6000;
/// How much of the log is printed when a test panics.
const LOG_PRINT_MAX: usize = 256 * 1024;

/// A running `overlay-agent` (cheap to clone: clones share the process).
///
/// Its stdout and stderr go to [`AgentProcess::log_path`]. The process is killed when the last
/// clone is dropped, and if that happens while the thread panics (a failing test), the log is
/// printed to stderr so the test's output shows it.
#[derive(Debug, Clone)]
pub struct AgentProcess {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    label: String,
    pid: u32,
    args: Vec<String>,
    child: Mutex<Child>,
    log_path: PathBuf,
}

impl AgentProcess {
    /// Runs `bin args...` inside `ns` (`ip netns exec`), output to `log_path`. `label` names it
    /// in messages (e.g. the node name). `FLANNELD_*` variables of the test's environment are
    /// not passed on (they would act as flags); `NO_COLOR=1`; `RUST_BACKTRACE` defaults to `1`;
    /// `RUST_LOG` passes through from the test's environment (unset: the agent's `-v` decides).
    pub fn spawn(
        ns: &NetNs,
        bin: &Path,
        args: &[String],
        log_path: PathBuf,
        label: &str,
    ) -> Result<Self> {
        Self::spawn_with_env(ns, bin, args, &[], log_path, label)
    }

    /// [`AgentProcess::spawn`] with extra environment variables `envs`, set after the test's
    /// own `FLANNELD_*` and `KUBERNETES_SERVICE_HOST` are removed (so those given here do reach
    /// the agent, e.g. to test flanneld's environment forms of the flags).
    pub fn spawn_with_env(
        ns: &NetNs,
        bin: &Path,
        args: &[String],
        envs: &[(String, String)],
        log_path: PathBuf,
        label: &str,
    ) -> Result<Self> {
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut c = ns.command(bin);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // What the test's own environment would set for every agent: flanneld's variables, and
        // the Service address a Kubernetes pod has (a CI runner in a pod), which the agent
        // checks against `--ip-masq-exclude`. Tests that want them pass them in `envs`.
        let inherited: Vec<OsString> = std::env::vars_os()
            .map(|(k, _)| k)
            .filter(|k| {
                let k = k.to_string_lossy();
                k.starts_with("FLANNELD_") || k == "KUBERNETES_SERVICE_HOST"
            })
            .collect();
        for k in inherited {
            c.env_remove(k);
        }
        // Plain text in the log file (tracing-subscriber honours NO_COLOR), so patterns match.
        c.env("NO_COLOR", "1");
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            c.env("RUST_BACKTRACE", "1");
        }
        c.envs(envs.iter().map(|(k, v)| (k, v)));
        cmd::die_with_parent(&mut c);
        let line = cmd::describe(&c);
        let child = c.spawn().with_context(|| format!("starting `{line}`"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                label: label.to_owned(),
                pid: child.id(),
                args: args.to_vec(),
                child: Mutex::new(child),
                log_path,
            }),
        })
    }

    /// The agent's pid (in the root pid namespace).
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The label given at start (e.g. `n0`).
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// The arguments it was started with.
    pub fn args(&self) -> &[String] {
        &self.inner.args
    }

    /// Its log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.inner.log_path
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.inner.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Its exit status if it has exited (reaps it), None while it runs.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.child().try_wait().ok().flatten()
    }

    /// Whether it is still running.
    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Waits until its log contains `pattern` (a plain substring), at most `timeout`. Fails at
    /// once if the agent exits without having logged it; the error carries the log's tail.
    pub fn wait_for_log(&self, pattern: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.exit_status();
            if self.log().contains(pattern) {
                return Ok(());
            }
            if let Some(status) = exited {
                bail!(
                    "agent {} exited ({status}) without logging {pattern:?}; log:\n{}",
                    self.inner.label,
                    cmd::tail(&self.log(), LOG_TAIL)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent {} did not log {pattern:?} within {timeout:?}; log:\n{}",
                    self.inner.label,
                    cmd::tail(&self.log(), LOG_TAIL)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits at most `timeout` for it to exit by itself (e.g. on a bad flag or config).
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        match cmd::wait_timeout(&mut self.child(), timeout)? {
            Some(status) => Ok(status),
            None => bail!(
                "agent {} still running after {timeout:?}; log:\n{}",
                self.inner.label,
                cmd::tail(&self.log(), LOG_TAIL)
            ),
        }
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) unless it has exited.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let mut child = self.child();
        if child.try_wait()?.is_some() {
            bail!("agent {} has already exited", self.inner.label);
        }
        // While not reaped, the pid cannot be reused.
        cmd::signal(child.id(), signal)
    }

    /// Graceful stop: SIGTERM, wait up to [`TERM_GRACE`], then SIGKILL. Returns the exit status
    /// (also when it had exited before).
    pub fn kill(&self) -> Result<ExitStatus> {
        cmd::terminate(&mut self.child(), TERM_GRACE)
    }

    /// SIGKILL (a crash: no cleanup by the agent). Returns the exit status.
    pub fn kill9(&self) -> Result<ExitStatus> {
        cmd::kill_and_reap(&mut self.child())
    }

    /// Stops several agents together: SIGTERM to all, up to `grace` in total for them to exit,
    /// then SIGKILL for the rest. Errors are printed, not returned (used in teardown).
    pub fn stop_all(agents: &[AgentProcess], grace: Duration) {
        for a in agents {
            if a.is_running() {
                let _ = a.signal(libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        for a in agents {
            let left = deadline.saturating_duration_since(Instant::now());
            let exited = cmd::wait_timeout(&mut a.child(), left)
                .ok()
                .flatten()
                .is_some();
            if !exited && let Err(e) = a.kill9() {
                eprintln!("overlay-tests: could not stop agent {}: {e:#}", a.label());
            }
        }
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.inner
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = cmd::kill_and_reap(child) {
            eprintln!("overlay-tests: could not stop agent {}: {e:#}", self.label);
        }
        if thread::panicking() {
            let log =
                std::fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned());
            match log {
                Ok(log) => eprintln!(
                    "----- agent {} log ({}) -----\n{}\n----- end of agent {} log -----",
                    self.label,
                    self.log_path.display(),
                    cmd::tail(&log, LOG_PRINT_MAX),
                    self.label
                ),
                Err(e) => eprintln!(
                    "overlay-tests: cannot read {}: {e}",
                    self.log_path.display()
                ),
            }
        }
    }
}
