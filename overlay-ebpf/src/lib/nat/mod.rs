//! Masquerade (`--ip-masq`): flannel's six nat POSTROUTING rules as a source NAT in eBPF.
//!
//! Which packets are masqueraded: `NAT_CONFIG` on, not marked 0x4000/0x4000 (kube-proxy
//! masquerades those itself), not to a destination in `NAT_EXCLUDE_V4`, and either
//! - ([`masquerades`], rule 5) source inside the cluster network, destination outside it, not
//!   multicast (224.0.0.0/4) nor broadcast; or
//! - ([`masquerades_to_cluster`], rule 6, `! -s <cluster> -d <cluster>`) source outside the
//!   cluster network, destination a remote pod (a peer's subnet, so leaving this node).
//!
//! Everything else (pod ↔ cluster, outside → local pod) is never touched, so pods see real pod
//! addresses.
//!
//! Where (layouts in `overlay_common::nat`):
//! - `pod_egress` (tcx ingress of the pod bridge) calls [`snat_from_pod`] for what no peer
//!   route covers. A packet that the kernel would route out of the external interface
//!   (`bpf_fib_lookup`) gets its source rewritten to that interface's address, its TTL
//!   decremented (we replace the forwarding hop) and is sent with `bpf_redirect_neigh`: the
//!   kernel's FORWARD chain (which Docker sets to DROP) is bypassed, as flannel's FORWARD
//!   ACCEPT rules would let it through. What the FIB routes elsewhere (or not at all, a local
//!   address, "fragmentation needed", TTL expiring) goes on to the kernel untouched.
//! - `underlay_egress` (tcx egress of the external interface) calls [`snat_egress`] for what
//!   the kernel routed there itself (e.g. Service traffic after kube-proxy's DNAT): translated
//!   in place, flagged `NAT_E_KERNEL` so the replies go back through the kernel. A reply of a
//!   `NAT_E_TO_CLUSTER` flow (a remote pod answering an outside host, see below) is not a new
//!   flow and is left alone, as conntrack would.
//! - `host_egress` (tcx egress of the host device ovl0) calls [`snat_to_cluster`] for rule 6:
//!   what the kernel sends into the cluster from a non-cluster source, i.e. a host socket bound
//!   to another address (`ping -I <node IP>`) or traffic the node forwards for an outside host
//!   that routes the cluster network through it (the kernel's FORWARD chain has seen that one:
//!   under policy DROP without flannel's `-d <cluster> -j ACCEPT` rule it never gets here). The
//!   source becomes the address flannel's MASQUERADE would pick on the egress device: the host
//!   device's `<subnet>.0` (flannel.1's address) for a VXLAN peer, the external interface's
//!   address for a direct (host-gw, DirectRouting) peer. Flagged `NAT_E_TO_CLUSTER`; the kernel
//!   has routed it already, so the TTL is left alone.
//! - `underlay_ingress` calls [`reverse`] for what decapsulation left alone: a reply to the
//!   node's address matching a flow's reply tuple (any protocol, an ICMP echo reply, or an ICMP
//!   error whose inner header is a translated flow) gets the pod's address and port back
//!   (inner header and every checksum too, for errors) and goes to the pod bridge with
//!   `bpf_redirect_neigh`
//!   (or to the kernel for `NAT_E_KERNEL` flows). Decapsulation calls
//!   [`reverse_decapsulated`] for VXLAN packets to `<subnet>.0` before it hands them to the host
//!   device. A `NAT_E_TO_CLUSTER` reply gets its original destination back and is routed
//!   (`bpf_fib_lookup`): to a local address (a host socket) it goes on to the host stack; to
//!   anything else (the outside host) it is sent out with `bpf_redirect_neigh`, TTL
//!   decremented, bypassing the kernel's FORWARD chain as `pod_egress` does; an expiring TTL, a
//!   packet too big or no route go to the kernel instead.
//!
//! Flows: a new one gets a port (ICMP: identifier) in `[port_min, port_max]`, at random, or its
//! own first with `NAT_F_KEEP_PORT`; the reply tuple is claimed with `BPF_NOEXIST`, so two flows
//! never share one, retrying up to `NAT_PORT_TRIES` times (then dropped, `drop_nat_exhausted`).
//! A new flow lives in `SNAT_V4_CT_NEW` / `SNAT_V4_REV_NEW` until it is assured (its
//! originator sends again after a reply that was neither a reset nor a FIN) and moves to
//! `SNAT_V4_CT` / `SNAT_V4_REV`, so floods of new flows evict only each other. Both entries of
//! a flow are refreshed together (`flow`); an entry idle longer than its timeout (by protocol,
//! TCP state and tier) is dead for the data path at once and swept by the agent.
//!
//! Checksums: the L4 checksum through `bpf_l4_csum_replace` (`BPF_F_PSEUDO_HDR` for addresses,
//! so CHECKSUM_PARTIAL packets from pods — GSO included — stay right; `BPF_F_MARK_MANGLED_0`
//! for UDP, so a zero checksum stays zero), the IPv4 header's by hand (RFC 1624) where the
//! program writes the packet in place (the pod hooks, `underlay_ingress`), else with
//! `bpf_l3_csum_replace` (`rewrite`); writes do not touch `skb->csum`, each change being
//! compensated by its checksum field. Inside ICMP
//! errors the inner headers' checksums are patched by hand (RFC 1624) and the ICMP checksum
//! follows every changed word (the inner IPv4 header's sum is unchanged by construction).
//!
//! ICMP errors the originator of a flow sends about it (a pod's "port unreachable" for a reply
//! whose socket is gone) are related to the flow, as conntrack says: they leave translated
//! ([`icmp_error_out`]), the packet they quote included, so no pod address leaks out.
//! A pod's UDP to a member node's VXLAN port is dropped instead of translated
//! (`drop_pod_vxlan`): with the node's address it would pass for the node's tunnel traffic.
//!
//! Protocols ([`NatPorts`]), as conntrack's trackers and MASQUERADE treat them: TCP, UDP and
//! ICMP echo get a port (`flow_out`); DCCP and UDP-Lite (their checksums cover a pseudo-header,
//! patched as UDP's is) and SCTP (its CRC32c covers the ports, not the addresses) keep theirs;
//! every other protocol (GRE, ESP, IP-in-IP, ...) is translated on its address alone. Those
//! flows' reply tuples are fixed by their packets (`fixed_tuple_out`, unassured tier, UDP's
//! timeouts): a second pod's flow with the same one is refused while the first lives
//! (`drop_nat_exhausted`), as conntrack drops its clash. Without ports there is no
//! telling a pod's flow from the node's own tunnel to the same host: to a member node (whose
//! tunnels to us would then go into the pod) such traffic leaves untranslated, with the pod's
//! address, which the member routes back through the overlay.
//!
//! Fragments: later fragments of a pod's datagram get the address only (they carry no ports);
//! the first fragment of a reply, translated back, leaves its datagram's identity in
//! `SNAT_V4_FRAG`, and the later fragments follow it to the same destination (within
//! `NAT_FRAG_TIMEOUT`; fragments that arrive before the first go to the kernel untouched).
//!
//! Limits: IPv4 only; ICMP other than echo and errors is not translated (it goes on to the
//! kernel untouched); while a pod's portless flow to a host outside the cluster lives, the
//! node's own traffic of that protocol from that host goes to the pod (conntrack mixes the two
//! up as well). Traffic from outside into the cluster is masqueraded only where the kernel
//! hands it to ovl0: under a FORWARD policy DROP, forwarded traffic from an outside host gets
//! there only through flanneld's forward rules, which the agent writes (`forward_rules`).
//! Only what leaves through the external interface is translated; flannel's MASQUERADE, with
//! no output interface, would also translate what the node routes out of another one.
//!
//! Layout of this module, by job: `policy` (which packets are masqueraded: `NAT_CONFIG`,
//! `NAT_EXCLUDE_V4`, flannel's rules), `flow` (the flow tables, assured and new, and
//! `SNAT_V4_FRAG`: finding, creating, refreshing, promoting, expiring flows), `snat` (outbound
//! translation at the three hooks), `reverse` (replies translated back and delivered),
//! `icmp` (ICMP errors about flows, both ways), `rewrite` (address rewrites with their
//! checksums). Headers are read once per packet through [`load_l4`]; the hand-off to the
//! kernel's forwarding is `lib::fib`'s.

mod flow;
mod icmp;
mod policy;
mod reverse;
mod rewrite;
mod snat;

use core::mem::offset_of;

use aya_ebpf::programs::TcContext;
use overlay_common::{
    nat::{
        IPPROTO_DCCP, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE,
        NatPorts,
    },
    wire::ETH_HLEN,
};

pub use self::{
    reverse::{reverse, reverse_decapsulated},
    snat::{snat_egress, snat_from_pod, snat_to_cluster},
};
use crate::lib::hdr::{IcmpHdr, Ipv4Hdr, TcpHdr, UdpHdr};

/// Whether an outbound translation rewrote the packet. A `u32`-sized value rather than a
/// `bool`: in `Result<Translated, Reason>` it fills the same word as the reason, where a `bool`
/// leaves the reason's half undefined on the `Ok` path; LLVM may still read that half where it
/// merges the two paths, and the verifier refuses the read of a register never written.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Translated {
    No = 0,
    Yes = 1,
}

/// Offsets in the packet of the IPv4 header (behind Ethernet) and of the fields rewritten.
const IP_OFF: usize = ETH_HLEN;
const IP_CHECK_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, check);
const IP_TTL_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, ttl);
const IP_SADDR_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, saddr);
const IP_DADDR_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, daddr);

/// The part of an L4 header a translation reads: ports (ICMP: the identifier), where the
/// checksum is, the TCP flags and the ICMP type. One parse for the three places that look at a
/// tuple: outbound packets, replies, and the packets quoted by ICMP errors.
#[derive(Clone, Copy)]
struct L4Ports {
    /// Source port; ICMP: the identifier.
    sport: [u8; 2],
    /// Destination port; ICMP: 0.
    dport: [u8; 2],
    /// Offset in the packet of the L4 checksum; 0: none covers what a translation rewrites.
    csum_off: usize,
    /// How the protocol's ports are treated, set as a constant in each arm of [`load_l4`]:
    /// deciding by it (not by the protocol number again) keeps the verifier from walking the
    /// port-choosing path for protocols it cannot tell apart.
    ports: NatPorts,
    /// TCP flags (0 for a quoted header and other protocols).
    tcp_flags: u8,
    /// TCP sequence and acknowledgment numbers, host order (0 for a quoted header and other
    /// protocols).
    tcp_seq: u32,
    tcp_ack: u32,
    /// ICMP type (meaningless for other protocols).
    icmp_type: u8,
}

impl L4Ports {
    /// Offset in the packet (header at `l4`) of the field a translation puts its port in:
    /// the source port (`source` true) or destination port; ICMP: the identifier either way.
    #[inline(always)]
    const fn port_off(proto: u8, l4: usize, source: bool) -> usize {
        if proto == IPPROTO_ICMP {
            l4 + offset_of!(IcmpHdr, id)
        } else if source {
            l4 + offset_of!(UdpHdr, source)
        } else {
            l4 + offset_of!(UdpHdr, dest)
        }
    }
}

/// Reads the L4 header of `proto` at `l4`: TCP through its checksum when `whole` (a packet to
/// rewrite), else (a packet quoted by an ICMP error, which carries 8 bytes of it) only the
/// first 8 bytes, which hold the ports. Ports only where the protocol has them in the tuple
/// ([`NatPorts`]); the checksum offset is 0 where no checksum covers what a translation
/// rewrites (SCTP's CRC32c leaves out the IP header; other protocols without ports have none
/// over the addresses). `None` for a header cut short.
#[inline(always)]
fn load_l4(ctx: &TcContext, proto: u8, l4: usize, whole: bool) -> Option<L4Ports> {
    match proto {
        IPPROTO_TCP if whole => {
            let h: [u8; TcpHdr::THROUGH_CHECK] = ctx.load(l4).ok()?;
            Some(L4Ports {
                sport: [h[0], h[1]],
                dport: [h[2], h[3]],
                csum_off: l4 + offset_of!(TcpHdr, check),
                ports: NatPorts::Chosen,
                tcp_flags: h[offset_of!(TcpHdr, flags)],
                tcp_seq: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
                tcp_ack: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
                icmp_type: 0,
            })
        }
        IPPROTO_TCP | IPPROTO_UDP => {
            let h: [u8; 8] = ctx.load(l4).ok()?;
            Some(L4Ports {
                sport: [h[0], h[1]],
                dport: [h[2], h[3]],
                csum_off: l4
                    + if proto == IPPROTO_TCP {
                        offset_of!(TcpHdr, check)
                    } else {
                        offset_of!(UdpHdr, check)
                    },
                ports: NatPorts::Chosen,
                tcp_flags: 0,
                tcp_seq: 0,
                tcp_ack: 0,
                icmp_type: 0,
            })
        }
        IPPROTO_DCCP | IPPROTO_UDPLITE => {
            // Through the checksum, which the translation patches.
            let h: [u8; 8] = ctx.load(l4).ok()?;
            Some(L4Ports {
                sport: [h[0], h[1]],
                dport: [h[2], h[3]],
                // Their checksums sit where UDP's does.
                csum_off: l4 + offset_of!(UdpHdr, check),
                ports: NatPorts::Kept,
                tcp_flags: 0,
                tcp_seq: 0,
                tcp_ack: 0,
                icmp_type: 0,
            })
        }
        IPPROTO_SCTP => {
            let h: [u8; 4] = ctx.load(l4).ok()?;
            Some(L4Ports {
                sport: [h[0], h[1]],
                dport: [h[2], h[3]],
                csum_off: 0,
                ports: NatPorts::Kept,
                tcp_flags: 0,
                tcp_seq: 0,
                tcp_ack: 0,
                icmp_type: 0,
            })
        }
        IPPROTO_ICMP => {
            let h: IcmpHdr = ctx.load(l4).ok()?;
            Some(L4Ports {
                sport: h.id,
                dport: [0, 0],
                csum_off: l4 + offset_of!(IcmpHdr, check),
                ports: NatPorts::Chosen,
                tcp_flags: 0,
                tcp_seq: 0,
                tcp_ack: 0,
                icmp_type: h.kind,
            })
        }
        // No ports ([`NatPorts::None`]): nothing to read. (Kept in separate literal arms: a
        // struct filled field by field per protocol tripled the verifier's work.)
        _ => Some(L4Ports {
            sport: [0, 0],
            dport: [0, 0],
            csum_off: 0,
            ports: NatPorts::None,
            tcp_flags: 0,
            tcp_seq: 0,
            tcp_ack: 0,
            icmp_type: 0,
        }),
    }
}

/// Whether `icmp_type` is an ICMP error that quotes the packet it is about.
#[inline(always)]
const fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        IcmpHdr::DEST_UNREACH | IcmpHdr::TIME_EXCEEDED | IcmpHdr::PARAMETERPROB
    )
}
