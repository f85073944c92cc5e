//! The `ovl-xfer` test helper: bounded TCP transfers and UDP echoes with checked contents.
//!
//! The data is a pseudo-random stream determined by a seed (byte `i` is a function of `seed`
//! and `i` only), so the receiver verifies every byte and reports the first wrong offset; both
//! sides also print an FNV-1a 64 hash and the byte count. Every wait is bounded.
//!
//! Output: one line per event, `<event> key=value ...`:
//! - `tcp-serve`: `listening port=P`, then `received peer=A:P bytes=N hash=H verified=true|false
//!   [mismatch_at=OFF]`
//! - `tcp-send [--bind IP]`: `sent local=A:P bytes=N hash=H`
//! - `udp-serve`: `listening port=P`, then `done received=N peers=A:P,...`
//! - `udp-send`: `done local=A:P sent=N received=M bad=K`
//! - `tcp-many-serve`: `listening port=P`, then `done accepted=N verified=M peers=IP,...`
//! - `tcp-many-send`: `done connected=N ok=M`
//! - `udp-stream`: `done sent=N` (numbered datagrams at a fixed rate)
//! - `udp-sink`: `listening port=P`, then `done received=N distinct=M`
//!
//! Errors go to stderr with exit status 1.

use std::{
    collections::{BTreeSet, HashMap},
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// 64-bit word `k` of the stream for `seed` (splitmix64 of seed and index).
fn word(seed: u64, k: u64) -> u64 {
    let mut z = seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with the stream for `seed` starting at byte `offset`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let w = word(seed, pos / 8).to_le_bytes();
        let skip = (pos % 8) as usize;
        let n = (8 - skip).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[skip..skip + n]);
        i += n;
        pos += n as u64;
    }
}

/// FNV-1a, 64 bit, streaming.
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// Hash of the first `len` bytes of the stream for `seed`.
pub fn stream_hash(seed: u64, len: u64) -> u64 {
    let mut h = Fnv64::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finish()
}

/// Parses `event k=v k=v` into the event name and a map.
pub fn parse_line(line: &str) -> (String, HashMap<String, String>) {
    let mut parts = line.split_whitespace();
    let event = parts.next().unwrap_or("").to_owned();
    let kv = parts
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (event, kv)
}

struct Args(HashMap<String, String>);

impl Args {
    fn parse(args: &[String]) -> Result<Self> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let key = flag
                .strip_prefix("--")
                .with_context(|| format!("unexpected argument {flag:?}"))?;
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            map.insert(key.to_owned(), value.clone());
        }
        Ok(Self(map))
    }

    fn get<T: std::str::FromStr>(&self, key: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let v = self
            .0
            .get(key)
            .with_context(|| format!("missing --{key}"))?;
        v.parse()
            .map_err(|e| anyhow::anyhow!("bad --{key} {v:?}: {e}"))
    }

    fn get_or<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        if self.0.contains_key(key) {
            self.get(key)
        } else {
            Ok(default)
        }
    }
}

/// Entry point of the `ovl-xfer` binary; returns the exit status.
pub fn main_with_args(args: Vec<String>) -> i32 {
    let res = match args.split_first() {
        Some((sub, rest)) => Args::parse(rest).and_then(|a| match sub.as_str() {
            "tcp-serve" => tcp_serve(&a),
            "tcp-send" => tcp_send(&a),
            "udp-serve" => udp_serve(&a),
            "udp-send" => udp_send(&a),
            "tcp-many-serve" => tcp_many_serve(&a),
            "tcp-many-send" => tcp_many_send(&a),
            "udp-stream" => udp_stream(&a),
            "udp-sink" => udp_sink(&a),
            other => bail!("unknown subcommand {other:?}"),
        }),
        None => Err(anyhow::anyhow!(
            "usage: ovl-xfer tcp-serve|tcp-send|udp-serve|udp-send --key value ..."
        )),
    };
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ovl-xfer: {e:#}");
            1
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn remaining(deadline: Instant) -> Result<Duration> {
    let now = Instant::now();
    if now >= deadline {
        bail!("timed out");
    }
    Ok((deadline - now).max(Duration::from_millis(1)))
}

/// `tcp-serve --port P --timeout-ms MS [--seed S]`: accepts one connection, reads to EOF,
/// verifies the bytes against the stream of `seed` when given, reports, closes.
fn tcp_serve(a: &Args) -> Result<()> {
    let port: u16 = a.get("port")?;
    let deadline = Instant::now() + Duration::from_millis(a.get("timeout-ms")?);
    let seed: Option<u64> =
        a.0.contains_key("seed")
            .then(|| a.get("seed"))
            .transpose()?;
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("bind port {port}"))?;
    listener.set_nonblocking(true)?;
    say(&format!("listening port={port}"));
    let (mut stream, peer) = loop {
        match listener.accept() {
            Ok(x) => break x,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                remaining(deadline).context("no connection")?;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accept"),
        }
    };
    stream.set_nonblocking(false)?;
    let mut hash = Fnv64::default();
    let mut buf = vec![0u8; 128 * 1024];
    let mut expect = vec![0u8; 128 * 1024];
    let mut total: u64 = 0;
    let mut mismatch: Option<u64> = None;
    loop {
        stream.set_read_timeout(Some(
            remaining(deadline).with_context(|| format!("reading after {total} bytes"))?,
        ))?;
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("read after {total} bytes")),
        };
        hash.update(&buf[..n]);
        if let (Some(seed), None) = (seed, mismatch) {
            fill(seed, total, &mut expect[..n]);
            if let Some(i) = buf[..n].iter().zip(&expect[..n]).position(|(x, y)| x != y) {
                mismatch = Some(total + i as u64);
            }
        }
        total += n as u64;
    }
    let mismatch = mismatch
        .map(|m| format!(" mismatch_at={m}"))
        .unwrap_or_default();
    say(&format!(
        "received peer={peer} bytes={total} hash={:016x} verified={}{mismatch}",
        hash.finish(),
        seed.is_some() && mismatch.is_empty()
    ));
    // Tells the sender everything arrived (it waits for our EOF).
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

/// Connects to `to` from a socket bound to `bind` (port chosen by the kernel), waiting at most
/// `timeout` (the socket's send timeout bounds a blocking connect).
fn connect_from(bind: Ipv4Addr, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let SocketAddr::V4(to) = to else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket call; the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    let local = sockaddr(bind, 0);
    let remote = sockaddr(*to.ip(), to.port());
    // SAFETY: valid descriptor, pointers to live structs of the sizes given.
    unsafe {
        if libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        ) != 0
            || libc::bind(raw, (&raw const local).cast(), len) != 0
            || libc::connect(raw, (&raw const remote).cast(), len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(TcpStream::from(fd))
}

/// `tcp-send --to IP:PORT --bytes N --seed S --timeout-ms MS [--bind IP]`: sends the stream,
/// half-closes, waits for the server to close. `--bind` binds the client socket to a source
/// address first.
fn tcp_send(a: &Args) -> Result<()> {
    let to: SocketAddr = a.get("to")?;
    let bytes: u64 = a.get("bytes")?;
    let seed: u64 = a.get("seed")?;
    let deadline = Instant::now() + Duration::from_millis(a.get("timeout-ms")?);
    let bind: Option<Ipv4Addr> =
        a.0.contains_key("bind")
            .then(|| a.get("bind"))
            .transpose()?;
    let wait = remaining(deadline)?.min(Duration::from_secs(10));
    let mut stream = match bind {
        Some(ip) => connect_from(ip, to, wait),
        None => TcpStream::connect_timeout(&to, wait),
    }
    .with_context(|| format!("connect {to}"))?;
    // The send timeout set for the connect is replaced below before each write.
    let local = stream.local_addr()?;
    let mut hash = Fnv64::default();
    let mut buf = vec![0u8; 128 * 1024];
    let mut off = 0;
    while off < bytes {
        let n = (bytes - off).min(buf.len() as u64) as usize;
        fill(seed, off, &mut buf[..n]);
        hash.update(&buf[..n]);
        stream.set_write_timeout(Some(
            remaining(deadline).with_context(|| format!("sending after {off} bytes"))?,
        ))?;
        stream
            .write_all(&buf[..n])
            .with_context(|| format!("write after {off} bytes"))?;
        off += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    // Wait for the server's close so that "sent" means "received by the server".
    let mut sink = [0u8; 64];
    loop {
        stream.set_read_timeout(Some(
            remaining(deadline).context("waiting for the server to close")?,
        ))?;
        match stream.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // A reset after the server read everything is fine.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e).context("waiting for the server to close"),
        }
    }
    say(&format!(
        "sent local={local} bytes={bytes} hash={:016x}",
        hash.finish()
    ));
    Ok(())
}

/// Hands each datagram that arrives on `sock` to `each` until `count` arrived, nothing
/// arrived for `idle` after the first one, or `deadline`; returns how many arrived.
fn receive(
    sock: &UdpSocket,
    deadline: Instant,
    idle: Duration,
    count: u64,
    mut each: impl FnMut(&[u8], SocketAddr) -> Result<()>,
) -> Result<u64> {
    let mut received = 0u64;
    let mut buf = vec![0u8; 65536];
    while received < count {
        let Ok(mut wait) = remaining(deadline) else {
            break;
        };
        if received > 0 {
            wait = wait.min(idle);
        }
        sock.set_read_timeout(Some(wait))?;
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                received += 1;
                each(&buf[..n], peer)?;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if received > 0 {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("recv"),
        }
    }
    Ok(received)
}

/// `udp-serve --port P --timeout-ms MS [--count N] [--idle-ms MS]`: echoes datagrams until
/// `count` were echoed, nothing arrived for `idle-ms` after the first one, or `timeout-ms`.
fn udp_serve(a: &Args) -> Result<()> {
    let port: u16 = a.get("port")?;
    let deadline = Instant::now() + Duration::from_millis(a.get("timeout-ms")?);
    let count: u64 = a.get_or("count", u64::MAX)?;
    let idle = Duration::from_millis(a.get_or("idle-ms", 3000)?);
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("bind udp {port}"))?;
    say(&format!("listening port={port}"));
    let mut peers = BTreeSet::new();
    let received = receive(&sock, deadline, idle, count, |data, peer| {
        peers.insert(peer);
        sock.send_to(data, peer)
            .with_context(|| format!("echo to {peer}"))?;
        Ok(())
    })?;
    let peers: Vec<String> = peers.iter().map(ToString::to_string).collect();
    say(&format!(
        "done received={received} peers={}",
        peers.join(",")
    ));
    Ok(())
}

/// `udp-send --to IP:PORT --count N --size B --seed S [--wait-ms MS] [--sport P]`: sends `count` datagrams
/// one at a time (sequence number + stream bytes), waiting up to `wait-ms` for each echo.
fn udp_send(a: &Args) -> Result<()> {
    let to: SocketAddr = a.get("to")?;
    let count: u64 = a.get("count")?;
    let size: usize = a.get("size")?;
    let seed: u64 = a.get("seed")?;
    let wait = Duration::from_millis(a.get_or("wait-ms", 1000)?);
    if !(8..=65000).contains(&size) {
        bail!("--size must be 8..=65000");
    }
    // `--sport` fixes the source port (e.g. to make two clients collide behind a NAT).
    let sport: u16 = a.get_or("sport", 0)?;
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, sport))
        .with_context(|| format!("bind udp source port {sport}"))?;
    // Connected: only datagrams from `to` are accepted (as a real client would see them).
    sock.connect(to).with_context(|| format!("connect {to}"))?;
    let local = sock.local_addr()?;
    let (mut received, mut bad) = (0u64, 0u64);
    let mut msg = vec![0u8; size];
    let mut buf = vec![0u8; 65536];
    for seq in 0..count {
        msg[..8].copy_from_slice(&seq.to_be_bytes());
        fill(seed, seq * size as u64, &mut msg[8..]);
        if let Err(e) = sock.send(&msg) {
            // e.g. ECONNREFUSED from an earlier ICMP error; counts as lost.
            eprintln!("ovl-xfer: send #{seq}: {e}");
            continue;
        }
        let until = Instant::now() + wait;
        // Read until this datagram's echo comes back or the wait is over (late echoes of
        // earlier datagrams are skipped).
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            sock.set_read_timeout(Some(until - now))?;
            match sock.recv(&mut buf) {
                Ok(n) if n >= 8 && buf[..8] == msg[..8] => {
                    if buf[..n] == msg[..] {
                        received += 1;
                    } else {
                        bad += 1;
                    }
                    break;
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("ovl-xfer: recv #{seq}: {e}");
                    break;
                }
            }
        }
    }
    say(&format!(
        "done local={local} sent={count} received={received} bad={bad}"
    ));
    Ok(())
}

/// `tcp-many-serve --port P --count N --bytes B --seed S --timeout-ms MS`: accepts `count`
/// connections, each verified on its own thread (the stream of `seed`, `bytes` long), and
/// answers each with its verdict byte before closing. Reports the distinct peer addresses.
fn tcp_many_serve(a: &Args) -> Result<()> {
    let port: u16 = a.get("port")?;
    let count: usize = a.get("count")?;
    let bytes: u64 = a.get("bytes")?;
    let seed: u64 = a.get("seed")?;
    let deadline = Instant::now() + Duration::from_millis(a.get("timeout-ms")?);
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("bind port {port}"))?;
    listener.set_nonblocking(true)?;
    say(&format!("listening port={port}"));
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    let mut peers = BTreeSet::new();
    let mut accepted = 0;
    while accepted < count {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                accepted += 1;
                peers.insert(peer.ip());
                let tx = tx.clone();
                let limit = remaining(deadline)?;
                std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        let ok = (|| -> Result<bool> {
                            stream.set_nonblocking(false)?;
                            stream.set_read_timeout(Some(limit))?;
                            let mut buf = vec![0u8; bytes as usize + 1];
                            let mut got = 0;
                            loop {
                                let n = stream.read(&mut buf[got..])?;
                                if n == 0 {
                                    break;
                                }
                                got += n;
                                if got > bytes as usize {
                                    return Ok(false);
                                }
                            }
                            let mut expect = vec![0u8; bytes as usize];
                            fill(seed, 0, &mut expect);
                            let ok = got == bytes as usize && buf[..got] == expect[..];
                            stream.write_all(&[u8::from(ok)])?;
                            Ok(ok)
                        })()
                        .unwrap_or(false);
                        let _ = tx.send(ok);
                    })?;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                remaining(deadline).with_context(|| format!("{accepted} of {count} accepted"))?;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
    drop(tx);
    let mut verified = 0;
    for _ in 0..count {
        match rx.recv_timeout(remaining(deadline).unwrap_or(Duration::from_millis(1))) {
            Ok(true) => verified += 1,
            Ok(false) => {}
            Err(_) => break,
        }
    }
    let peers: Vec<String> = peers.iter().map(ToString::to_string).collect();
    say(&format!(
        "done accepted={accepted} verified={verified} peers={}",
        peers.join(",")
    ));
    Ok(())
}

/// `tcp-many-send --to IP:PORT --count N --bytes B --seed S --timeout-ms MS`: opens `count`
/// connections and keeps them all open at once, then sends the stream of `seed` on each,
/// half-closes, and reads each one's verdict byte.
fn tcp_many_send(a: &Args) -> Result<()> {
    let to: SocketAddr = a.get("to")?;
    let count: usize = a.get("count")?;
    let bytes: u64 = a.get("bytes")?;
    let seed: u64 = a.get("seed")?;
    let deadline = Instant::now() + Duration::from_millis(a.get("timeout-ms")?);
    let mut data = vec![0u8; bytes as usize];
    fill(seed, 0, &mut data);
    let mut streams = Vec::with_capacity(count);
    for i in 0..count {
        let s = TcpStream::connect_timeout(&to, remaining(deadline)?.min(Duration::from_secs(10)))
            .with_context(|| format!("connection #{i} to {to}"))?;
        streams.push(s);
    }
    let connected = streams.len();
    for s in &mut streams {
        s.set_write_timeout(Some(remaining(deadline)?))?;
        s.write_all(&data)?;
        s.shutdown(Shutdown::Write)?;
    }
    let mut ok = 0;
    for s in &mut streams {
        s.set_read_timeout(Some(remaining(deadline)?))?;
        let mut verdict = [0u8; 1];
        if s.read_exact(&mut verdict).is_ok() && verdict[0] == 1 {
            ok += 1;
        }
    }
    say(&format!("done connected={connected} ok={ok}"));
    Ok(())
}

/// `udp-stream --to IP:PORT --pps R --count N`: sends `count` datagrams numbered 0.. (8-byte
/// sequence number, 56 bytes of padding) at `pps` per second, paced against the clock.
fn udp_stream(a: &Args) -> Result<()> {
    let to: SocketAddr = a.get("to")?;
    let pps: u64 = a.get("pps")?;
    let count: u64 = a.get("count")?;
    if !(1..=100_000).contains(&pps) || count > 10_000_000 {
        bail!("--pps must be 1..=100000 and --count at most 10000000");
    }
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("bind udp")?;
    let start = Instant::now();
    let mut msg = [0u8; 64];
    for seq in 0..count {
        let due = start + Duration::from_nanos(seq * 1_000_000_000 / pps);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        msg[..8].copy_from_slice(&seq.to_be_bytes());
        if let Err(e) = sock.send_to(&msg, to) {
            // e.g. a transient ENOBUFS: counts as lost at the sink.
            eprintln!("ovl-xfer: send #{seq}: {e}");
        }
    }
    say(&format!("done sent={count}"));
    Ok(())
}

/// `udp-sink --port P --timeout-ms MS [--idle-ms MS]`: counts the datagrams that arrive, and
/// the distinct sequence numbers among them (first 8 bytes), until nothing arrived for
/// `idle-ms` after the first one (default 2000) or `timeout-ms`.
fn udp_sink(a: &Args) -> Result<()> {
    let port: u16 = a.get("port")?;
    let deadline = Instant::now() + Duration::from_millis(a.get("timeout-ms")?);
    let idle = Duration::from_millis(a.get_or("idle-ms", 2000)?);
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("bind udp {port}"))?;
    say(&format!("listening port={port}"));
    let mut seen = BTreeSet::new();
    let received = receive(&sock, deadline, idle, u64::MAX, |data, _| {
        if let Some(seq) = data.get(..8) {
            seen.insert(u64::from_be_bytes(seq.try_into().unwrap_or_default()));
        }
        Ok(())
    })?;
    say(&format!("done received={received} distinct={}", seen.len()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_position_addressable() {
        let mut whole = vec![0u8; 100];
        fill(7, 0, &mut whole);
        for start in 0..20 {
            let mut part = vec![0u8; 37];
            fill(7, start, &mut part);
            assert_eq!(part[..], whole[start as usize..start as usize + 37]);
        }
        let mut other = vec![0u8; 100];
        fill(8, 0, &mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn hash_is_chunking_independent() {
        let mut data = vec![0u8; 200_003];
        fill(42, 0, &mut data);
        let mut h = Fnv64::default();
        for chunk in data.chunks(4093) {
            h.update(chunk);
        }
        assert_eq!(h.finish(), stream_hash(42, data.len() as u64));
        let mut known = Fnv64::default();
        known.update(b"a");
        assert_eq!(known.finish(), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn parses_report_lines() {
        let (ev, kv) =
            parse_line("received peer=172.16.1.2:40000 bytes=10 hash=00ff verified=true");
        assert_eq!(ev, "received");
        assert_eq!(kv["peer"], "172.16.1.2:40000");
        assert_eq!(kv["verified"], "true");
    }

    #[test]
    fn tcp_and_udp_on_loopback() {
        // Runs the helper's functions on threads in the current namespace (loopback only).
        let port = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap().port()
        };
        let args = |v: &[&str]| {
            Args::parse(&v.iter().map(ToString::to_string).collect::<Vec<_>>()).unwrap()
        };
        let p = port.to_string();
        let server = {
            let a = args(&["--port", &p, "--timeout-ms", "10000", "--seed", "5"]);
            std::thread::spawn(move || tcp_serve(&a))
        };
        std::thread::sleep(Duration::from_millis(100));
        let to = format!("127.0.0.1:{port}");
        tcp_send(&args(&[
            "--to",
            &to,
            "--bytes",
            "300000",
            "--seed",
            "5",
            "--timeout-ms",
            "10000",
        ]))
        .unwrap();
        server.join().unwrap().unwrap();

        let server = {
            let a = args(&["--port", &p, "--timeout-ms", "10000", "--count", "3"]);
            std::thread::spawn(move || udp_serve(&a))
        };
        std::thread::sleep(Duration::from_millis(100));
        udp_send(&args(&[
            "--to", &to, "--count", "3", "--size", "100", "--seed", "1",
        ]))
        .unwrap();
        server.join().unwrap().unwrap();
    }
}
