//! Which BPF programs the kernel has attached to an interface inside a namespace.
//!
//! XDP and netlink TC (clsact) attachments come from `bpftool -j net show dev <if>` run in the
//! namespace. Debian 12's bpftool (7.1) predates tcx and does not list tcx attachments, so those
//! are asked from the kernel directly (`BPF_PROG_QUERY` with `BPF_TCX_INGRESS`/`EGRESS`, from a
//! thread inside the namespace); a newer bpftool's tcx entries are merged, not duplicated.
//! Program names come from `bpftool -j prog show id <id>`.
//!
//! [`DummyProg`] attaches a do-nothing program (tcx or XDP) so the harness can test itself.

use std::{
    fmt,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{cmd, netns::NetNs};

/// Where a program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttachKind {
    /// tcx ingress (bpf_link, kernel ≥ 6.6).
    TcxIngress,
    /// tcx egress.
    TcxEgress,
    /// XDP (any mode, see [`AttachedProg::xdp_mode`]).
    Xdp,
    /// Classic TC filter on the clsact qdisc, ingress.
    TcIngress,
    /// Classic TC filter on the clsact qdisc, egress.
    TcEgress,
}

impl fmt::Display for AttachKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TcxIngress => "tcx_ingress",
            Self::TcxEgress => "tcx_egress",
            Self::Xdp => "xdp",
            Self::TcIngress => "tc_ingress",
            Self::TcEgress => "tc_egress",
        })
    }
}

/// One program attached to an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedProg {
    /// The program's name (as loaded, at most 15 characters); empty if unnamed or unknown.
    pub name: String,
    pub kind: AttachKind,
    /// The program id; None for classic-BPF TC filters, which have none.
    pub prog_id: Option<u32>,
    /// For XDP: `driver`, `generic`, `offload` or `hw` as bpftool says.
    pub xdp_mode: Option<String>,
}

/// Programs attached to `ifname` in `ns`: XDP, then TC, then tcx (each in kernel order).
pub fn attached_programs(ns: &NetNs, ifname: &str) -> Result<Vec<AttachedProg>> {
    let out = ns
        .run("bpftool", &["-j", "net", "show", "dev", ifname])
        .with_context(|| format!("listing programs on {ifname} in {}", ns.name()))?;
    let mut progs = parse_bpftool_net(&out)?;
    let tcx = ns.in_netns(|| query_tcx(ifname))?;
    for (kind, id) in tcx {
        if !progs
            .iter()
            .any(|p| p.kind == kind && p.prog_id == Some(id))
        {
            progs.push(AttachedProg {
                name: String::new(),
                kind,
                prog_id: Some(id),
                xdp_mode: None,
            });
        }
    }
    for p in &mut progs {
        if p.name.is_empty()
            && let Some(id) = p.prog_id
        {
            p.name = prog_name(id);
        }
    }
    Ok(progs)
}

/// Parses `bpftool -j net show [dev X]` output (bpftool 7.1 and later shapes).
pub fn parse_bpftool_net(json: &str) -> Result<Vec<AttachedProg>> {
    let v: Value =
        serde_json::from_str(json).with_context(|| format!("parsing bpftool output: {json}"))?;
    let tops = v
        .as_array()
        .with_context(|| format!("bpftool output is not an array: {json}"))?;
    let id = |o: &Value| {
        o.get("id")
            .or_else(|| o.get("prog_id"))
            .and_then(Value::as_u64)
            .and_then(|i| u32::try_from(i).ok())
    };
    let s = |o: &Value, k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut progs = Vec::new();
    for top in tops {
        for x in top
            .get("xdp")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let entries: Vec<&Value> = match x.get("multi_attachments").and_then(Value::as_array) {
                Some(multi) => multi.iter().collect(),
                None => vec![x],
            };
            for e in entries {
                progs.push(AttachedProg {
                    name: s(e, "name").unwrap_or_default(),
                    kind: AttachKind::Xdp,
                    prog_id: id(e),
                    xdp_mode: s(e, "mode"),
                });
            }
        }
        for t in top
            .get("tc")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let kind_str = s(t, "kind").unwrap_or_default();
            let tcx = kind_str.starts_with("tcx");
            let kind = match (tcx, kind_str.ends_with("egress")) {
                (true, false) => AttachKind::TcxIngress,
                (true, true) => AttachKind::TcxEgress,
                (false, false) => AttachKind::TcIngress,
                (false, true) => AttachKind::TcEgress,
            };
            progs.push(AttachedProg {
                name: s(t, "name").unwrap_or_default(),
                kind,
                prog_id: id(t),
                xdp_mode: None,
            });
        }
    }
    Ok(progs)
}

fn prog_name(id: u32) -> String {
    // The program may go away between listing and this call; then its name stays unknown.
    cmd::check(cmd::command(
        "bpftool",
        &["-j", "prog", "show", "id", &id.to_string()],
    ))
    .ok()
    .and_then(|out| serde_json::from_str::<Value>(&out).ok())
    .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_owned))
    .unwrap_or_default()
}

// --- raw bpf(2), just what the queries and the dummy program need -------------------------

const BPF_PROG_LOAD: i64 = 5;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_PROG_QUERY: i64 = 16;
const BPF_LINK_CREATE: i64 = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// tcx verdict "go on with the next program" (acts as pass when last).
const TCX_NEXT: i32 = -1;
const XDP_PASS: i32 = 2;

/// `union bpf_attr`, zero-filled, written field by field at the kernel's offsets.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }

    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().unwrap_or_default())
    }

    fn call(&mut self, cmd: i64) -> std::io::Result<i64> {
        // SAFETY: the attr buffer is 128 valid bytes; pointers stored in it (set by the caller)
        // point to live buffers for the duration of the call.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, self.0.as_mut_ptr(), self.0.len()) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
}

fn ifindex(ifname: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(ifname)
        .map_err(std::io::Error::from)
        .with_context(|| format!("no interface {ifname}"))
}

/// tcx programs on `ifname` in the calling thread's namespace, ingress then egress.
fn query_tcx(ifname: &str) -> Result<Vec<(AttachKind, u32)>> {
    let idx = ifindex(ifname)?;
    let mut found = Vec::new();
    for (kind, attach_type) in [
        (AttachKind::TcxIngress, BPF_TCX_INGRESS),
        (AttachKind::TcxEgress, BPF_TCX_EGRESS),
    ] {
        let mut ids = [0u32; 64];
        let mut a = Attr::new();
        a.u32(0, idx)
            .u32(4, attach_type)
            .u64(16, ids.as_mut_ptr() as u64)
            .u32(24, ids.len() as u32);
        match a.call(BPF_PROG_QUERY) {
            Ok(_) => {}
            // A kernel without tcx.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(e).with_context(|| format!("BPF_PROG_QUERY {kind} on {ifname}")),
        }
        let n = (a.get_u32(24) as usize).min(ids.len());
        found.extend(ids[..n].iter().map(|&id| (kind, id)));
    }
    Ok(found)
}

/// A do-nothing program attached through a bpf_link (tcx: returns `TCX_NEXT`; XDP: `XDP_PASS`),
/// named `ovl_dummy`. Detached when dropped.
#[derive(Debug)]
pub struct DummyProg {
    _prog: OwnedFd,
    _link: OwnedFd,
    prog_id: u32,
}

impl DummyProg {
    /// Name of the dummy program.
    pub const NAME: &'static str = "ovl_dummy";

    /// Loads and attaches it to `ifname` in `ns` at `kind` (tcx ingress/egress or XDP).
    pub fn attach(ns: &NetNs, ifname: &str, kind: AttachKind) -> Result<Self> {
        let (prog_type, expected, attach_type, ret) = match kind {
            AttachKind::TcxIngress => (BPF_PROG_TYPE_SCHED_CLS, 0, BPF_TCX_INGRESS, TCX_NEXT),
            AttachKind::TcxEgress => (BPF_PROG_TYPE_SCHED_CLS, 0, BPF_TCX_EGRESS, TCX_NEXT),
            AttachKind::Xdp => (BPF_PROG_TYPE_XDP, BPF_XDP, BPF_XDP, XDP_PASS),
            AttachKind::TcIngress | AttachKind::TcEgress => {
                bail!("DummyProg attaches through links only (tcx, xdp)")
            }
        };
        // r0 = ret; exit
        let mut insns = [0u8; 16];
        insns[0] = 0xb7;
        insns[4..8].copy_from_slice(&ret.to_ne_bytes());
        insns[8] = 0x95;
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..Self::NAME.len()].copy_from_slice(Self::NAME.as_bytes());

        let mut a = Attr::new();
        a.u32(0, prog_type)
            .u32(4, 2)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64);
        a.0[48..64].copy_from_slice(&name);
        a.u32(68, expected);
        let fd = a
            .call(BPF_PROG_LOAD)
            .context("BPF_PROG_LOAD of the dummy program")?;
        // SAFETY: the kernel returned a new fd that nothing else owns.
        let prog = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) };

        let mut info = [0u8; 16];
        let mut a = Attr::new();
        a.u32(0, prog.as_raw_fd() as u32)
            .u32(4, info.len() as u32)
            .u64(8, info.as_mut_ptr() as u64);
        a.call(BPF_OBJ_GET_INFO_BY_FD)
            .context("BPF_OBJ_GET_INFO_BY_FD")?;
        let prog_id = u32::from_ne_bytes(info[4..8].try_into()?);

        let prog_fd = prog.as_raw_fd() as u32;
        let link = ns.in_netns(|| {
            let idx = ifindex(ifname)?;
            let mut a = Attr::new();
            a.u32(0, prog_fd).u32(4, idx).u32(8, attach_type);
            let fd = a
                .call(BPF_LINK_CREATE)
                .with_context(|| format!("BPF_LINK_CREATE {kind} on {ifname}"))?;
            // SAFETY: a new fd owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) })
        })?;
        Ok(Self {
            _prog: prog,
            _link: link,
            prog_id,
        })
    }

    /// The loaded program's id.
    pub fn prog_id(&self) -> u32 {
        self.prog_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bpftool_71_and_newer_shapes() {
        let old = r#"[{"xdp":[{"devname":"eth0","ifindex":2,"mode":"driver","id":12}],
            "tc":[{"devname":"eth0","ifindex":2,"kind":"clsact/ingress"},
                  {"devname":"eth0","ifindex":2,"kind":"clsact/egress","name":"tc_eg","id":14}],
            "flow_dissector":[]}]"#;
        let p = parse_bpftool_net(old).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].kind, p[0].prog_id, p[0].xdp_mode.as_deref()),
            (AttachKind::Xdp, Some(12), Some("driver"))
        );
        assert_eq!((p[1].kind, p[1].prog_id), (AttachKind::TcIngress, None));
        assert_eq!(
            (p[2].kind, p[2].prog_id, p[2].name.as_str()),
            (AttachKind::TcEgress, Some(14), "tc_eg")
        );

        let new = r#"[{"xdp":[{"devname":"eth0","ifindex":2,"multi_attachments":[{"mode":"generic","id":3},{"mode":"driver","id":4}]}],
            "tc":[{"devname":"eth0","ifindex":2,"kind":"tcx/ingress","name":"ing","prog_id":20,"link_id":5}],
            "flow_dissector":[],"netfilter":[]}]"#;
        let p = parse_bpftool_net(new).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[1].prog_id, p[1].xdp_mode.as_deref()),
            (Some(4), Some("driver"))
        );
        assert_eq!(
            (p[2].kind, p[2].prog_id, p[2].name.as_str()),
            (AttachKind::TcxIngress, Some(20), "ing")
        );
        assert_eq!(AttachKind::TcxEgress.to_string(), "tcx_egress");
    }
}
