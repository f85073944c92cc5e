//! systemd's readiness protocol (sd_notify(3)): `READY=1` once the node carries pod traffic,
//! `WATCHDOG=1` while it keeps doing so, `STATUS=` lines for `systemctl status`, `STOPPING=1`.
//!
//! The protocol is one datagram per message to the Unix socket named by `$NOTIFY_SOCKET` (a
//! path, or an abstract name written with a leading `@`). It is a handful of lines over
//! `std::os::unix::net::UnixDatagram`, so no crate is needed. Without `$NOTIFY_SOCKET` (not
//! started by systemd with `Type=notify`) every call is a no-op.

use std::{
    io,
    os::unix::net::{SocketAddr, UnixDatagram},
    time::Duration,
};

/// Where and how to notify the service manager.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`. A socket that cannot be
    /// used is an error naming it (systemd would wait for `READY=1` in vain).
    pub fn from_env() -> io::Result<Self> {
        let socket = match std::env::var_os("NOTIFY_SOCKET") {
            Some(path) if !path.is_empty() => {
                let path = path.to_string_lossy().into_owned();
                let addr = socket_addr(&path).map_err(|e| named(&path, e))?;
                let sock = UnixDatagram::unbound().map_err(|e| named(&path, e))?;
                Some((sock, addr))
            }
            _ => None,
        };
        Ok(Self {
            socket,
            watchdog: watchdog_interval(
                std::env::var("WATCHDOG_USEC").ok().as_deref(),
                std::env::var("WATCHDOG_PID").ok().as_deref(),
                std::process::id(),
            ),
        })
    }

    /// Whether a service manager listens.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// How often to send `WATCHDOG=1`: half of `WatchdogSec`, as sd_watchdog_enabled(3)
    /// recommends; `None` when no watchdog is set for this process.
    #[must_use]
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// The node is ready: lease held, subnet file written, data path attached.
    pub fn ready(&self, status: &str) {
        self.send(&format!(
            "READY=1\nSTATUS={status}\nMAINPID={}",
            std::process::id()
        ));
    }

    /// The node is still healthy (only while it is: a stuck agent lets systemd restart it).
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// A one-line status for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// The agent is shutting down.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    fn send(&self, message: &str) {
        if let Some((sock, addr)) = &self.socket
            && let Err(e) = sock.send_to_addr(message.as_bytes(), addr)
        {
            tracing::warn!("cannot notify systemd ({message:?}): {e}");
        }
    }
}

/// `$NOTIFY_SOCKET`'s address: a filesystem path, or `@name` for the abstract namespace.
fn socket_addr(path: &str) -> io::Result<SocketAddr> {
    if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if path.starts_with('/') {
        SocketAddr::from_pathname(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither an absolute path nor an abstract name (@...)",
        ))
    }
}

fn named(path: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("NOTIFY_SOCKET {path}: {e}"))
}

/// The watchdog period from `WATCHDOG_USEC`, if it is set, positive, and meant for this process
/// (`WATCHDOG_PID` absent or equal to `pid`).
fn watchdog_interval(usec: Option<&str>, for_pid: Option<&str>, pid: u32) -> Option<Duration> {
    if let Some(p) = for_pid
        && p.trim().parse::<u32>().ok() != Some(pid)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_needs_a_positive_period_for_this_process() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            socket: Some((
                UnixDatagram::unbound().unwrap(),
                socket_addr(path.to_str().unwrap()).unwrap(),
            )),
            watchdog: Some(Duration::from_secs(10)),
        };
        assert!(notifier.enabled());
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(5)));
        notifier.ready("serving 172.17.5.0/24");
        notifier.watchdog();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(
            msg.starts_with("READY=1\nSTATUS=serving 172.17.5.0/24\nMAINPID="),
            "{msg}"
        );
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn abstract_names_and_bad_values() {
        assert!(socket_addr("@/org/freedesktop/systemd1/notify").is_ok());
        let err = socket_addr("relative/path").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
