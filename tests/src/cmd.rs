//! Running external commands: every call is bounded in time, its exit status is checked where
//! the caller asks for it, and errors carry the command line and its stderr.

use std::{
    ffi::OsStr,
    fmt::Write as _,
    io::{Read, Write},
    os::unix::process::CommandExt,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Time limit of a short command (ip, sysctl, etcdctl, bpftool, ...).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Makes the child die (SIGKILL) when the thread that spawned it exits, so that a test process
/// killed hard leaves no etcd or agent behind. Guards must therefore live on the thread that
/// created them (the test's own thread; every guard in this crate does).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: getpid is async-signal-safe and has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid) and does not
    // allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The parent died between fork and prctl.
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Runs `cmd` to completion with stdin from `stdin` (or /dev/null), stdout and stderr captured,
/// killing it after `timeout`. The exit status is *not* checked.
pub fn output_with(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    let line = describe(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;

    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            Some(thread::spawn(move || {
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());

    let status = wait_timeout(&mut child, timeout)?;
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let stderr = err.recv_timeout(PIPE_GRACE).unwrap_or_default();
        bail!(
            "`{line}` did not finish within {timeout:?} (killed); stderr: {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    // A background child of the command could keep the pipes open: wait for EOF only briefly.
    let pipe = |rx: mpsc::Receiver<Vec<u8>>, name: &str| {
        rx.recv_timeout(PIPE_GRACE).with_context(|| {
            format!("`{line}` exited but its {name} stayed open (a background child?)")
        })
    };
    Ok(Output {
        status,
        stdout: pipe(out, "stdout")?,
        stderr: pipe(err, "stderr")?,
    })
}

/// How long to wait for a finished command's output pipes to close.
const PIPE_GRACE: Duration = Duration::from_secs(5);

/// [`output_with`] without stdin and with [`DEFAULT_TIMEOUT`].
pub fn output(cmd: Command) -> Result<Output> {
    output_with(cmd, None, DEFAULT_TIMEOUT)
}

/// Runs `cmd` (bounded by `timeout`), fails unless it exits with status 0, returns its stdout.
pub fn check_with(cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<String> {
    let line = describe(&cmd);
    let out = output_with(cmd, stdin, timeout)?;
    ensure_success(&line, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`check_with`] without stdin and with [`DEFAULT_TIMEOUT`].
pub fn check(cmd: Command) -> Result<String> {
    check_with(cmd, None, DEFAULT_TIMEOUT)
}

/// A `Command` for `program args...`.
pub fn command<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// Fails with the command line, exit status, stderr and stdout unless `out` shows success.
pub fn ensure_success(line: &str, out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let mut msg = format!("`{line}` failed ({})", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stderr.trim().is_empty() {
        let _ = write!(msg, "; stderr: {}", stderr.trim());
    }
    if !stdout.trim().is_empty() {
        let _ = write!(msg, "; stdout: {}", tail(stdout.trim(), 2000));
    }
    bail!(msg)
}

/// Waits for `child` at most `timeout`; `None` when it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait().context("waitpid failed")? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: i32) -> Result<()> {
    let pid = i32::try_from(pid).context("pid out of range")?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("kill({pid}, {signal})"));
    }
    Ok(())
}

/// SIGTERM, wait up to `grace`, then SIGKILL and reap. Returns the exit status.
pub fn terminate(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    signal(child.id(), libc::SIGTERM)?;
    if let Some(status) = wait_timeout(child, grace)? {
        return Ok(status);
    }
    kill_and_reap(child)
}

/// SIGKILL and reap (bounded: a SIGKILLed process is reaped at once unless stuck in the kernel).
pub fn kill_and_reap(child: &mut Child) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    let _ = child.kill();
    wait_timeout(child, Duration::from_secs(10))?
        .with_context(|| format!("pid {} survived SIGKILL for 10 s", child.id()))
}

/// The last `max` bytes of `s` (on a char boundary), with a marker when cut.
pub fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("[... {start} bytes cut ...]\n{}", &s[start..])
}

fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

/// A spawned process that is killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    line: String,
}

impl ChildGuard {
    /// Spawns `cmd` (set its stdio first) so that it dies with the spawning thread.
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        let line = describe(&cmd);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start `{line}`"))?;
        Ok(Self { child, line })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The command line it runs.
    pub fn command_line(&self) -> &str {
        &self.line
    }

    /// The child, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits at most `timeout` for it to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        wait_timeout(&mut self.child, timeout)
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        terminate(&mut self.child, grace)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = kill_and_reap(&mut self.child) {
            eprintln!("overlay-tests: could not stop `{}`: {e:#}", self.line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_bounded_and_errors_carry_stderr() {
        let start = Instant::now();
        let err =
            output_with(command("sleep", &["5"]), None, Duration::from_millis(200)).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(3));
        assert!(format!("{err:#}").contains("did not finish"), "{err:#}");

        let err = check(command("sh", &["-c", "echo oops >&2; exit 4"])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("oops") && msg.contains("exit status: 4") && msg.contains("sh -c"),
            "{msg}"
        );

        let out = check_with(
            command("cat", &[] as &[&str]),
            Some(b"through stdin"),
            DEFAULT_TIMEOUT,
        )
        .unwrap();
        assert_eq!(out, "through stdin");
    }

    #[test]
    fn tail_cuts_on_char_boundaries() {
        assert_eq!(tail("abc", 10), "abc");
        let t = tail("ééééé", 3);
        assert!(t.ends_with("é") && t.contains("cut"), "{t}");
    }
}
