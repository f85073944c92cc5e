//! Real traffic between namespaces: ping, a TCP transfer with every byte verified, UDP echo.
//! All bounded in count and time. TCP and UDP use the `ovl-xfer` helper ([`crate::xfer`]).

use std::{
    io::{BufRead, BufReader, Read},
    net::{Ipv4Addr, SocketAddr},
    process::Stdio,
    sync::{
        atomic::{AtomicU16, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};

use crate::{
    cluster::Endpoint,
    cmd::{self, ChildGuard},
    netns::NetNs,
    xfer,
};

/// Outcome of `ping -c N`.
#[derive(Debug, Clone)]
pub struct PingReport {
    pub transmitted: u32,
    pub received: u32,
    /// ping's full output (stdout and stderr).
    pub output: String,
}

impl PingReport {
    /// Every echo was answered.
    pub fn all_received(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }

    /// At least one echo was answered.
    pub fn any_received(&self) -> bool {
        self.received > 0
    }
}

/// Outcome of a verified TCP transfer.
#[derive(Debug, Clone)]
pub struct TransferReport {
    pub bytes: u64,
    /// FNV-1a 64 of the bytes, equal on both sides.
    pub hash: u64,
    /// The client's socket address as the client sees it.
    pub client_local: SocketAddr,
    /// The client's address as the server sees it (differs from `client_local` under NAT).
    pub server_peer: SocketAddr,
    pub elapsed: Duration,
}

/// Outcome of a UDP echo run.
#[derive(Debug, Clone)]
pub struct UdpReport {
    pub sent: u64,
    /// Echoes that came back intact.
    pub received: u64,
    /// Echoes that came back with wrong contents.
    pub bad: u64,
    pub client_local: SocketAddr,
    /// Source addresses the server saw (the client's address after any NAT).
    pub server_peers: Vec<SocketAddr>,
}

/// `ping -c count -W 1 -i 0.2 dst` inside `ns`. Fails only when ping cannot run or its output
/// is not understood; lost echoes are reported, not errors.
pub fn ping(ns: &NetNs, dst: Ipv4Addr, count: u32) -> Result<PingReport> {
    if count == 0 || count > 1000 {
        bail!("ping count must be 1..=1000");
    }
    let mut c = ns.command("ping");
    c.args([
        "-n",
        "-q",
        "-c",
        &count.to_string(),
        "-W",
        "1",
        "-i",
        "0.2",
        &dst.to_string(),
    ]);
    let line = cmd::describe(&c);
    let timeout = Duration::from_millis(200) * count + Duration::from_secs(5);
    let out = cmd::output_with(c, None, timeout)?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (transmitted, received) = match parse_ping(&output) {
        Some(counts) => counts,
        // ping exits 2 without statistics when it cannot send at all ("Network is
        // unreachable"): nothing got through.
        None if out.status.code() == Some(2) => (0, 0),
        None => bail!("unexpected output of `{line}` ({}): {output}", out.status),
    };
    Ok(PingReport {
        transmitted,
        received,
        output,
    })
}

/// Pings `dst` from `ns` once per ~0.3 s until an echo comes back or `timeout` passes.
pub fn ping_until(ns: &NetNs, dst: Ipv4Addr, timeout: Duration) -> Result<PingReport> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = ping(ns, dst, 1)?;
        if r.any_received() {
            return Ok(r);
        }
        if Instant::now() >= deadline {
            bail!(
                "no ping reply from {dst} in {} within {timeout:?}; last output:\n{}",
                ns.name(),
                r.output
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn parse_ping(out: &str) -> Option<(u32, u32)> {
    // "3 packets transmitted, 3 received, 0% packet loss, time 402ms"
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(',')
        .map(|part| part.split_whitespace().next().and_then(|n| n.parse().ok()));
    Some((nums.next()??, nums.next()??))
}

fn next_port() -> u16 {
    // One port per transfer so that no run waits for an earlier one's TIME_WAIT.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    20000 + NEXT.fetch_add(1, Ordering::Relaxed) % 20000
}

fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
}

/// A server of the helper running in a namespace, with its stdout lines on a channel.
struct Server {
    guard: ChildGuard,
    lines: mpsc::Receiver<String>,
    stderr: thread::JoinHandle<String>,
}

impl Server {
    fn start(ns: &NetNs, args: &[String]) -> Result<Self> {
        let mut c = ns.command(crate::xfer_bin()?);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut guard = ChildGuard::spawn(c)?;
        let stdout = guard.child_mut().stdout.take().context("no stdout")?;
        let mut stderr_pipe = guard.child_mut().stderr.take().context("no stderr")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr_pipe.read_to_string(&mut s);
            s
        });
        let mut server = Self {
            guard,
            lines,
            stderr,
        };
        server.expect("listening", Duration::from_secs(10))?;
        Ok(server)
    }

    /// Waits for the next stdout line, which must be `event ...`.
    fn expect(
        &mut self,
        event: &str,
        timeout: Duration,
    ) -> Result<std::collections::HashMap<String, String>> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                let (ev, kv) = xfer::parse_line(&line);
                if ev != event {
                    bail!("server said {line:?}, expected {event}");
                }
                Ok(kv)
            }
            Err(_) => {
                let status = self.guard.wait_timeout(Duration::ZERO)?;
                let _ = self.guard.terminate(Duration::from_millis(100));
                let stderr = std::mem::replace(&mut self.stderr, thread::spawn(String::new));
                let stderr = stderr.join().unwrap_or_default();
                bail!(
                    "server `{}` did not report {event} within {timeout:?} (exit: {status:?}); stderr: {}",
                    self.guard.command_line(),
                    stderr.trim()
                )
            }
        }
    }
}

fn field<T: std::str::FromStr>(
    kv: &std::collections::HashMap<String, String>,
    key: &str,
) -> Result<T> {
    let v = kv
        .get(key)
        .with_context(|| format!("no {key} in helper output {kv:?}"))?;
    v.parse()
        .map_err(|_| anyhow::anyhow!("bad {key}={v:?} in helper output"))
}

/// Time limit of a TCP transfer with the default options.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `bytes` bytes over TCP from `from` to `to` (server listening on all addresses in `to`'s
/// namespace, client connecting to `to.ip()`), verifying every byte. Fails with details unless
/// all bytes arrived intact within [`TCP_TIMEOUT`].
pub fn tcp_transfer(from: &dyn Endpoint, to: &dyn Endpoint, bytes: u64) -> Result<TransferReport> {
    tcp_transfer_to(from, to, to.ip(), bytes, TCP_TIMEOUT)
}

/// Like [`tcp_transfer`] but the client connects to `dst` (e.g. an address that is translated
/// on the way) while the server runs in `server`'s namespace, and the whole transfer is limited
/// to `timeout` (keep it short where failure is the expected outcome; connecting alone waits
/// at most 10 s).
pub fn tcp_transfer_to(
    from: &dyn Endpoint,
    server: &dyn Endpoint,
    dst: Ipv4Addr,
    bytes: u64,
    timeout: Duration,
) -> Result<TransferReport> {
    tcp_transfer_bound(from, None, server, dst, bytes, timeout)
}

/// Like [`tcp_transfer_to`], with the client's socket bound to the source address `bind` (one
/// of `from`'s addresses) when given, e.g. a node's underlay address for traffic the kernel
/// sends into the cluster through the host device.
pub fn tcp_transfer_bound(
    from: &dyn Endpoint,
    bind: Option<Ipv4Addr>,
    server: &dyn Endpoint,
    dst: Ipv4Addr,
    bytes: u64,
    timeout: Duration,
) -> Result<TransferReport> {
    let timeout_ms = timeout.as_millis().max(1).to_string();
    let port = next_port();
    let seed = seed();
    let what = format!(
        "TCP {} -> {} ({dst}:{port}, {bytes} bytes)",
        from.label(),
        server.label()
    );
    let start = Instant::now();
    let mut srv = Server::start(
        server.ns(),
        &[
            "tcp-serve",
            "--port",
            &port.to_string(),
            "--timeout-ms",
            &timeout_ms,
            "--seed",
            &seed.to_string(),
        ]
        .map(String::from),
    )
    .with_context(|| what.clone())?;

    let mut c = from.ns().command(crate::xfer_bin()?);
    c.args([
        "tcp-send",
        "--to",
        &format!("{dst}:{port}"),
        "--bytes",
        &bytes.to_string(),
    ])
    .args(["--seed", &seed.to_string(), "--timeout-ms", &timeout_ms]);
    if let Some(ip) = bind {
        c.args(["--bind", &ip.to_string()]);
    }
    let line = cmd::describe(&c);
    let out = cmd::output_with(c, None, timeout + Duration::from_secs(5))
        .with_context(|| what.clone())?;
    let client_err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if !out.status.success() {
        let server_side = srv
            .expect("received", Duration::from_millis(300))
            .map_or_else(|e| format!("{e:#}"), |kv| format!("{kv:?}"));
        bail!(
            "{what}: `{line}` failed ({}): {client_err}; server: {server_side}",
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (_, sent) = xfer::parse_line(
        stdout
            .lines()
            .find(|l| l.starts_with("sent "))
            .with_context(|| format!("{what}: client printed {stdout:?}"))?,
    );
    let got = srv
        .expect("received", Duration::from_secs(10))
        .with_context(|| what.clone())?;
    let elapsed = start.elapsed();

    let sent_hash = u64::from_str_radix(&field::<String>(&sent, "hash")?, 16)?;
    let got_hash = u64::from_str_radix(&field::<String>(&got, "hash")?, 16)?;
    let got_bytes: u64 = field(&got, "bytes")?;
    let verified: bool = field(&got, "verified")?;
    if got_bytes != bytes || got_hash != sent_hash || !verified {
        bail!(
            "{what}: corrupted: server got {got_bytes} bytes hash {got_hash:016x} (sent hash {sent_hash:016x}), \
             first wrong byte at {}",
            got.get("mismatch_at").map_or("-", String::as_str)
        );
    }
    Ok(TransferReport {
        bytes,
        hash: got_hash,
        client_local: field(&sent, "local")?,
        server_peer: field(&got, "peer")?,
        elapsed,
    })
}

/// Sends `count` UDP datagrams of 512 bytes from `from` to `to`, each echoed back by a server in
/// `to`'s namespace (waiting ≤ 1 s per echo). Lost datagrams are reported, not errors.
pub fn udp_echo(from: &dyn Endpoint, to: &dyn Endpoint, count: u64) -> Result<UdpReport> {
    udp_echo_to(from, to, to.ip(), count, 512)
}

/// Like [`udp_echo`] with the destination address and datagram size (8..=65000) given.
pub fn udp_echo_to(
    from: &dyn Endpoint,
    server: &dyn Endpoint,
    dst: Ipv4Addr,
    count: u64,
    size: usize,
) -> Result<UdpReport> {
    if count == 0 || count > 10_000 {
        bail!("udp count must be 1..=10000");
    }
    let port = next_port();
    let what = format!(
        "UDP {} -> {} ({dst}:{port}, {count} x {size} bytes)",
        from.label(),
        server.label()
    );
    let timeout = Duration::from_secs(count + 10);
    let timeout_ms = timeout.as_millis().to_string();
    let mut srv = Server::start(
        server.ns(),
        &[
            "udp-serve",
            "--port",
            &port.to_string(),
            "--timeout-ms",
            &timeout_ms,
            "--count",
            &count.to_string(),
        ]
        .map(String::from)
        .into_iter()
        .chain(["--idle-ms".to_owned(), "2000".to_owned()])
        .collect::<Vec<_>>(),
    )
    .with_context(|| what.clone())?;

    let mut c = from.ns().command(crate::xfer_bin()?);
    c.args([
        "udp-send",
        "--to",
        &format!("{dst}:{port}"),
        "--count",
        &count.to_string(),
    ])
    .args([
        "--size",
        &size.to_string(),
        "--seed",
        &seed().to_string(),
        "--wait-ms",
        "1000",
    ]);
    let out =
        cmd::check_with(c, None, timeout + Duration::from_secs(5)).with_context(|| what.clone())?;
    let (_, sent) = xfer::parse_line(
        out.lines()
            .find(|l| l.starts_with("done "))
            .with_context(|| format!("{what}: client printed {out:?}"))?,
    );
    // The server ends after `count` datagrams or 2 s without any; if none arrived it waits for
    // its overall timeout, so stop it.
    let received: u64 = field(&sent, "received")?;
    let server_wait = if received == 0 {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(4)
    };
    let server_peers = match srv.expect("done", server_wait) {
        Ok(kv) => kv
            .get("peers")
            .map(|p| {
                p.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::parse)
                    .collect::<Result<Vec<SocketAddr>, _>>()
            })
            .transpose()?
            .unwrap_or_default(),
        Err(_) if received == 0 => Vec::new(),
        Err(e) => return Err(e.context(what)),
    };
    Ok(UdpReport {
        sent: field(&sent, "sent")?,
        received,
        bad: field(&sent, "bad")?,
        client_local: field(&sent, "local")?,
        server_peers,
    })
}

/// Sends `count` copies of `payload` from `src` (an address of `ns`) to `dst` over a plain UDP
/// socket inside `ns`, 10 ms apart: the kernel builds correct headers around crafted contents
/// (e.g. VXLAN from a pod or a node).
pub fn send_udp(
    ns: &NetNs,
    src: Ipv4Addr,
    dst: SocketAddr,
    payload: &[u8],
    count: usize,
) -> Result<()> {
    let payload = payload.to_vec();
    ns.in_netns(move || {
        let sock = std::net::UdpSocket::bind((src, 0))?;
        for _ in 0..count {
            sock.send_to(&payload, dst)?;
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    })
    .with_context(|| format!("sending UDP from {src} in {} to {dst}", ns.name()))
}

/// Everything that arrives on `sock` until it has been quiet for 1 s (at most 100 datagrams).
pub fn drain(sock: &std::net::UdpSocket) -> Result<Vec<Vec<u8>>> {
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while got.len() < 100 {
        match sock.recv(&mut buf) {
            Ok(n) => got.push(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e).context("receiving UDP"),
        }
    }
    Ok(got)
}

/// Sends `count` numbered datagrams from `ns` to `to` at `pps` per second (blocks until sent).
pub fn udp_stream(ns: &NetNs, to: SocketAddr, pps: u32, count: u32) -> Result<()> {
    let mut c = ns.command(crate::xfer_bin()?);
    c.args(["udp-stream", "--to", &to.to_string()]).args([
        "--pps",
        &pps.to_string(),
        "--count",
        &count.to_string(),
    ]);
    let secs = u64::from(count / pps.max(1)) + 30;
    cmd::check_with(c, None, Duration::from_secs(secs))
        .with_context(|| format!("udp-stream from {} to {to}", ns.name()))?;
    Ok(())
}

/// A UDP listener in a namespace that counts what arrives ([`udp_sink`]).
pub struct UdpSink {
    server: Server,
    port: u16,
}

/// What a [`UdpSink`] counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkReport {
    /// Datagrams received.
    pub received: u64,
    /// Distinct sequence numbers among them (the first 8 bytes).
    pub distinct: u64,
}

/// Starts counting UDP datagrams to a free port in `ns`, for at most `timeout`; stops 2 s after
/// the last one that arrived.
pub fn udp_sink(ns: &NetNs, timeout: Duration) -> Result<UdpSink> {
    let port = next_port();
    let args: Vec<String> = [
        "udp-sink",
        "--port",
        &port.to_string(),
        "--timeout-ms",
        &timeout.as_millis().to_string(),
    ]
    .map(String::from)
    .to_vec();
    Ok(UdpSink {
        server: Server::start(ns, &args)?,
        port,
    })
}

impl UdpSink {
    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits (at most `wait`) for its report; nothing arriving at all ends at its timeout.
    pub fn finish(mut self, wait: Duration) -> Result<SinkReport> {
        let kv = self.server.expect("done", wait)?;
        Ok(SinkReport {
            received: field(&kv, "received")?,
            distinct: field(&kv, "distinct")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summary() {
        let out = "PING 198.18.0.2 (198.18.0.2) 56(84) bytes of data.\n\n--- 198.18.0.2 ping statistics ---\n\
                   3 packets transmitted, 2 received, 33.3333% packet loss, time 402ms\n";
        assert_eq!(parse_ping(out), Some((3, 2)));
        let err = "1 packets transmitted, 0 received, +1 errors, 100% packet loss, time 0ms";
        assert_eq!(parse_ping(err), Some((1, 0)));
        assert_eq!(parse_ping("ping: connect: Network is unreachable"), None);
    }
}
