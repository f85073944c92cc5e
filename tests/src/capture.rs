//! Packet captures inside a namespace (`tcpdump -w`) and their decoding with `tshark`, e.g. to
//! check VXLAN headers on the underlay.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    cmd::{self, ChildGuard},
    netns::NetNs,
};

/// A running `tcpdump` writing to a pcap file; killed on drop, flushed by [`Capture::stop`].
#[derive(Debug)]
pub struct Capture {
    guard: ChildGuard,
    path: PathBuf,
}

impl Capture {
    /// Captures on `ifname` in `ns` into `path`, with the BPF capture `filter` (e.g. `"udp port
    /// 8472"`, or `""` for everything); returns once tcpdump listens.
    pub fn start(ns: &NetNs, ifname: &str, filter: &str, path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let mut c = ns.command("tcpdump");
        c.args([
            "-i",
            ifname,
            "-n",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-s",
            "256",
            "-w",
        ])
        .arg(&path);
        c.args(filter.split_whitespace());
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut guard =
            ChildGuard::spawn(c).context("starting tcpdump (Debian package tcpdump)")?;
        let stderr = guard.child_mut().stderr.take().context("no stderr")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.contains("listening on") => break,
                Ok(line) => seen.push(line),
                Err(_) => bail!(
                    "tcpdump on {ifname} in {} did not start: {}",
                    ns.name(),
                    seen.join("; ")
                ),
            }
        }
        Ok(Self { guard, path })
    }

    /// The pcap file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops tcpdump (SIGTERM: it writes out what it has) and returns the pcap path.
    pub fn stop(mut self) -> Result<PathBuf> {
        // Give packets in flight a moment to be captured.
        thread::sleep(Duration::from_millis(100));
        self.guard.terminate(Duration::from_secs(5))?;
        Ok(self.path.clone())
    }
}

/// Decodes `pcap` with tshark (UDP 8472 and 4789 as VXLAN), keeping packets that match
/// `display_filter` (e.g. `"vxlan && icmp"`, or `""`), and returns the values of `fields` (e.g.
/// `["ip.src", "vxlan.vni", "eth.dst"]`) per packet. Multiple occurrences of a field (inner and
/// outer headers) come comma-separated, outer first.
pub fn tshark_fields(
    pcap: &Path,
    display_filter: &str,
    fields: &[&str],
) -> Result<Vec<Vec<String>>> {
    let mut c = cmd::command("tshark", &["-n", "-r"]);
    c.arg(pcap).args([
        "-d",
        "udp.port==8472,vxlan",
        "-d",
        "udp.port==4789,vxlan",
        "-T",
        "fields",
    ]);
    c.args([
        "-E",
        "separator=/t",
        "-E",
        "occurrence=a",
        "-E",
        "aggregator=,",
    ]);
    for f in fields {
        c.args(["-e", f]);
    }
    if !display_filter.is_empty() {
        c.args(["-Y", display_filter]);
    }
    let out = cmd::check(c).context("decoding capture (Debian package tshark)")?;
    Ok(out
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect())
}
