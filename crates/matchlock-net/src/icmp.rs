//! ICMP and ICMPv6 echo ("ping") from the guest to addresses beyond the gateway, sent by the
//! sandbox owner after the policy (issue 9 item 1).
//!
//! # Design
//! The stack ([`crate::stack`]) hands over each guest echo request whose destination is not
//! the gateway; it has already asked the policy with the same decision a raw TCP flow gets
//! (the address actually pinged: its IP literal, or an allowed name the owner's DNS
//! answered it for; blocked ranges in every mode). An allowed request is sent by
//! [`Echoer::send`] from an unprivileged ICMP datagram socket (`socket(AF_INET, SOCK_DGRAM,
//! IPPROTO_ICMP)`, IPv6 likewise), one per request, connected to the destination: no raw
//! socket, no privilege, and the kernel sets the identifier and filters replies to this
//! socket. The reply (type and sequence checked) is relayed to the guest as an echo reply
//! from the pinged address with the guest's own identifier, sequence and the reply's data.
//!
//! A refused request gets **no reply** (as behind a dropping firewall), with a blocked
//! event and an info log from the stack: an administratively-prohibited error would tell a
//! guest which addresses the policy refuses as opposed to which do not answer, and `ping`
//! reports the loss either way.
//!
//! Bounds: at most [`MAX_OUTSTANDING`] echoes in flight per sandbox (more are dropped),
//! each waits at most [`ECHO_TIMEOUT`] for its reply, data of at most
//! [`MAX_ECHO_DATA`] bytes (larger requests are dropped), fragmented requests are dropped,
//! and every guest frame is length- and checksum-checked before anything is sent.
//!
//! # Limitations
//! The host must allow ping sockets for the owner's group (`net.ipv4.ping_group_range`,
//! which covers IPv6 too; many distributions allow all groups, the kernel default allows
//! none): otherwise every echo beyond the gateway is dropped, with one warning logged per
//! sandbox (each echo still tries, so permitting them later works at once). Only echo is relayed: ICMP errors the host receives (unreachable, time
//! exceeded) are not passed on, so `traceroute` sees nothing beyond the gateway. The reply's
//! TTL / hop limit is the stack's (64), not the path's.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet, Icmpv4Repr,
    Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use crate::ErrorChain;

/// Echo requests in flight per sandbox; more are dropped until one is answered or times out.
pub const MAX_OUTSTANDING: usize = 16;
/// How long an echo waits for its reply.
pub const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest echo data relayed (a 1500-byte IPv4 packet's worth).
pub const MAX_ECHO_DATA: usize = 1472;
/// ICMP echo header: type, code, checksum, identifier, sequence.
const ECHO_HEADER: usize = 8;

/// A guest's echo request beyond the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoRequest {
    /// The guest's Ethernet address (the reply goes there).
    pub guest_mac: [u8; 6],
    /// The guest's address.
    pub src: IpAddr,
    /// The address pinged.
    pub dst: IpAddr,
    pub ident: u16,
    pub seq: u16,
    pub data: Vec<u8>,
}

/// Whether an IPv4 ICMP message (the IP payload) is an echo request: type 8, code 0.
pub fn is_echo_request_v4(icmp: &[u8]) -> bool {
    icmp.get(..2) == Some(&[8, 0])
}

/// Whether an ICMPv6 message is an echo request: type 128, code 0.
pub fn is_echo_request_v6(icmp: &[u8]) -> bool {
    icmp.get(..2) == Some(&[128, 0])
}

impl EchoRequest {
    /// Parses a guest frame holding an unfragmented, checksum-valid echo request with at most
    /// [`MAX_ECHO_DATA`] bytes of data; `None` otherwise.
    pub fn parse(frame: &[u8]) -> Option<EchoRequest> {
        let eth = EthernetFrame::new_checked(frame).ok()?;
        let guest_mac = eth.src_addr().0;
        let caps = ChecksumCapabilities::default();
        let (src, dst, ident, seq, data) = match eth.ethertype() {
            EthernetProtocol::Ipv4 => {
                let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
                if ip.more_frags() || ip.frag_offset() != 0 || !ip.verify_checksum() {
                    return None;
                }
                if ip.next_header() != IpProtocol::Icmp {
                    return None;
                }
                let pkt = Icmpv4Packet::new_checked(ip.payload()).ok()?;
                let Icmpv4Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                } = Icmpv4Repr::parse(&pkt, &caps).ok()?
                else {
                    return None;
                };
                let (s, d) = (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()));
                (s, d, ident, seq_no, data.to_vec())
            }
            EthernetProtocol::Ipv6 => {
                let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
                if ip.next_header() != IpProtocol::Icmpv6 {
                    return None;
                }
                let (s, d) = (ip.src_addr(), ip.dst_addr());
                let pkt = Icmpv6Packet::new_checked(ip.payload()).ok()?;
                let Icmpv6Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                } = Icmpv6Repr::parse(&s, &d, &pkt, &caps).ok()?
                else {
                    return None;
                };
                (IpAddr::V6(s), IpAddr::V6(d), ident, seq_no, data.to_vec())
            }
            _ => return None,
        };
        (data.len() <= MAX_ECHO_DATA).then_some(EchoRequest {
            guest_mac,
            src,
            dst,
            ident,
            seq,
            data,
        })
    }

    /// The echo reply to the guest, from the pinged address, carrying `data`.
    pub fn reply_frame(&self, gateway_mac: [u8; 6], data: &[u8]) -> Option<Vec<u8>> {
        let caps = ChecksumCapabilities::default();
        let (ident, seq_no) = (self.ident, self.seq);
        let (ethertype, ip_len, icmp_len) = match self.dst {
            IpAddr::V4(_) => {
                let r = Icmpv4Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                };
                (EthernetProtocol::Ipv4, 20, r.buffer_len())
            }
            IpAddr::V6(_) => {
                let r = Icmpv6Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                };
                (EthernetProtocol::Ipv6, 40, r.buffer_len())
            }
        };
        let mut frame = vec![0u8; 14 + ip_len + icmp_len];
        EthernetRepr {
            src_addr: EthernetAddress(gateway_mac),
            dst_addr: EthernetAddress(self.guest_mac),
            ethertype,
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
        let ip = frame.get_mut(14..)?;
        match (self.dst, self.src) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let repr = Ipv4Repr {
                    src_addr: s,
                    dst_addr: d,
                    next_header: IpProtocol::Icmp,
                    payload_len: icmp_len,
                    hop_limit: 64,
                };
                let mut pkt = Ipv4Packet::new_unchecked(&mut *ip);
                repr.emit(&mut pkt, &caps);
                let r = Icmpv4Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                };
                r.emit(&mut Icmpv4Packet::new_unchecked(pkt.payload_mut()), &caps);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let repr = Ipv6Repr {
                    src_addr: s,
                    dst_addr: d,
                    next_header: IpProtocol::Icmpv6,
                    payload_len: icmp_len,
                    hop_limit: 64,
                };
                let mut pkt = Ipv6Packet::new_unchecked(&mut *ip);
                repr.emit(&mut pkt);
                let r = Icmpv6Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                };
                let mut icmp = Icmpv6Packet::new_unchecked(pkt.payload_mut());
                r.emit(&s, &d, &mut icmp, &caps);
            }
            _ => return None,
        }
        Some(frame)
    }
}

/// Where echo replies go: a frame for the guest (the stack queues it toward QEMU).
pub type Deliver = Arc<dyn Fn(Vec<u8>) + Send + Sync>;

/// One sandbox's echo relay.
pub struct Echoer {
    gateway_mac: [u8; 6],
    deliver: Deliver,
    slots: Arc<Semaphore>,
    /// Set once ping sockets were found not permitted (warned once; later echoes still try,
    /// so a host that permits them later works without a restart).
    warned: Arc<AtomicBool>,
}

impl std::fmt::Debug for Echoer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Echoer")
            .field(
                "in_flight",
                &(MAX_OUTSTANDING - self.slots.available_permits()),
            )
            .finish_non_exhaustive()
    }
}

/// Failures relaying one echo (logged at debug: the guest just sees no reply).
#[derive(Debug, thiserror::Error)]
enum EchoError {
    #[error("open an ICMP datagram socket")]
    Socket(#[source] std::io::Error),
    #[error("connect the ICMP socket to {0}")]
    Connect(IpAddr, #[source] std::io::Error),
    #[error("send the echo request to {0}")]
    Send(IpAddr, #[source] std::io::Error),
    #[error("receive the echo reply from {0}")]
    Recv(IpAddr, #[source] std::io::Error),
    #[error("no echo reply from {0} in time")]
    Timeout(IpAddr),
}

impl Echoer {
    /// Replies are framed from `gateway_mac` and handed to `deliver` (from a tokio task).
    pub fn new(gateway_mac: [u8; 6], deliver: Deliver) -> Echoer {
        Echoer {
            gateway_mac,
            deliver,
            slots: Arc::new(Semaphore::new(MAX_OUTSTANDING)),
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sends `req` from the host (the policy allowed it) and relays the reply; drops it when
    /// [`MAX_OUTSTANDING`] echoes are in flight or ping sockets are not permitted. Must be
    /// called inside a tokio runtime.
    pub fn send(&self, req: EchoRequest) {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::debug!(dst = %req.dst, "too many echo requests in flight: dropped");
            return;
        };
        let (deliver, mac) = (self.deliver.clone(), self.gateway_mac);
        let warned = self.warned.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(ECHO_TIMEOUT, echo(&req)).await {
                Ok(Ok(data)) => match req.reply_frame(mac, &data) {
                    Some(frame) => deliver(frame),
                    None => tracing::debug!(dst = %req.dst, "echo reply not framed"),
                },
                Ok(Err(EchoError::Socket(e))) if is_not_permitted(&e) => {
                    if !warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            error = %e,
                            "ping sockets are not permitted for this user \
                             (net.ipv4.ping_group_range): guest ICMP echo beyond the gateway is dropped"
                        );
                    }
                }
                Ok(Err(e)) => tracing::debug!(error = %ErrorChain(&e), "echo not relayed"),
                Err(_) => tracing::debug!(error = %EchoError::Timeout(req.dst), "echo not relayed"),
            }
        });
    }
}

fn is_not_permitted(e: &std::io::Error) -> bool {
    // EPERM, EACCES (Linux): the group is outside `ping_group_range`.
    matches!(e.raw_os_error(), Some(1 | 13)) || e.kind() == std::io::ErrorKind::PermissionDenied
}

/// One echo over a fresh ping socket: the reply's data once its sequence matches.
async fn echo(req: &EchoRequest) -> Result<Vec<u8>, EchoError> {
    let (domain, proto, reply_type) = match req.dst {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 0u8),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 129u8),
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(proto)).map_err(EchoError::Socket)?;
    sock.set_nonblocking(true).map_err(EchoError::Socket)?;
    let dst = SocketAddr::new(req.dst, 0);
    sock.connect(&dst.into())
        .map_err(|e| EchoError::Connect(req.dst, e))?;
    let sock = UdpSocket::from_std(std::net::UdpSocket::from(sock)).map_err(EchoError::Socket)?;
    let request_type = if req.dst.is_ipv4() { 8u8 } else { 128u8 };
    // Identifier and checksum are the kernel's to fill in.
    let mut msg = Vec::with_capacity(ECHO_HEADER + req.data.len());
    msg.extend_from_slice(&[request_type, 0, 0, 0, 0, 0]);
    msg.extend_from_slice(&req.seq.to_be_bytes());
    msg.extend_from_slice(&req.data);
    sock.send(&msg)
        .await
        .map_err(|e| EchoError::Send(req.dst, e))?;
    let mut buf = vec![0u8; ECHO_HEADER + MAX_ECHO_DATA];
    loop {
        let n = sock
            .recv(&mut buf)
            .await
            .map_err(|e| EchoError::Recv(req.dst, e))?;
        let Some(reply) = buf.get(..n) else { continue };
        if reply.len() >= ECHO_HEADER
            && reply[0] == reply_type
            && reply[6..8] == req.seq.to_be_bytes()
        {
            return Ok(reply[ECHO_HEADER..].to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
    const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

    /// A guest echo request frame, built like [`EchoRequest::reply_frame`] but reversed.
    fn request(src: IpAddr, dst: IpAddr, data: &[u8]) -> Vec<u8> {
        let req = EchoRequest {
            guest_mac: GW_MAC,
            src: dst,
            dst: src,
            ident: 0x1234,
            seq: 7,
            data: Vec::new(),
        };
        let mut f = req.reply_frame(GUEST_MAC, data).expect("frame");
        // Turn the reply into a request: type 0 -> 8 / 129 -> 128, checksum adjusted.
        let off = if src.is_ipv4() { 14 + 20 } else { 14 + 40 };
        let (from, to) = if src.is_ipv4() {
            (0u8, 8u8)
        } else {
            (129, 128)
        };
        assert_eq!(f[off], from);
        f[off] = to;
        let sum = u16::from_be_bytes([f[off + 2], f[off + 3]]);
        // One's complement adjustment for the type byte (high byte of the first word).
        let diff = (u32::from(from) << 8) + 0xffff - (u32::from(to) << 8);
        let mut s = u32::from(sum) + diff;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        f[off + 2..off + 4].copy_from_slice(&(s as u16).to_be_bytes());
        f
    }

    #[test]
    fn parses_v4_and_v6_requests_and_answers_with_the_guests_ident_and_seq() {
        for (src, dst) in [
            (
                "10.0.2.15".parse().expect("test value"),
                "198.51.100.2".parse().expect("test value"),
            ),
            (
                "fd00::15".parse().expect("test value"),
                "2001:2::2".parse().expect("test value"),
            ),
        ] {
            let frame = request(src, dst, b"abcdef");
            let req = EchoRequest::parse(&frame).expect("an echo request");
            assert_eq!((req.src, req.dst), (src, dst));
            assert_eq!((req.ident, req.seq), (0x1234, 7));
            assert_eq!(req.data, b"abcdef");
            assert_eq!(req.guest_mac, GUEST_MAC);
            let reply = req.reply_frame(GW_MAC, b"abcdef").expect("reply");
            // The reply parses as a checksum-valid echo reply to the guest.
            let eth = EthernetFrame::new_checked(&reply[..]).expect("test value");
            assert_eq!(eth.dst_addr().0, GUEST_MAC);
            let caps = ChecksumCapabilities::default();
            match src {
                IpAddr::V4(_) => {
                    let ip = Ipv4Packet::new_checked(eth.payload()).expect("test value");
                    assert!(ip.verify_checksum());
                    let p = Icmpv4Packet::new_checked(ip.payload()).expect("test value");
                    assert_eq!(
                        Icmpv4Repr::parse(&p, &caps).expect("test value"),
                        Icmpv4Repr::EchoReply {
                            ident: 0x1234,
                            seq_no: 7,
                            data: b"abcdef"
                        }
                    );
                }
                IpAddr::V6(_) => {
                    let ip = Ipv6Packet::new_checked(eth.payload()).expect("test value");
                    let p = Icmpv6Packet::new_checked(ip.payload()).expect("test value");
                    let r = Icmpv6Repr::parse(&ip.src_addr(), &ip.dst_addr(), &p, &caps);
                    assert_eq!(
                        r.expect("test value"),
                        Icmpv6Repr::EchoReply {
                            ident: 0x1234,
                            seq_no: 7,
                            data: b"abcdef"
                        }
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_bad_checksums_oversized_data_and_truncation() {
        let (src, dst) = (
            "10.0.2.15".parse().expect("test value"),
            "198.51.100.2".parse().expect("test value"),
        );
        let mut frame = request(src, dst, b"abcdef");
        assert!(EchoRequest::parse(&frame).is_some());
        let last = frame.len() - 1;
        frame[last] ^= 0xff;
        assert!(EchoRequest::parse(&frame).is_none(), "bad ICMP checksum");
        let frame = request(src, dst, b"abcdef");
        assert!(EchoRequest::parse(&frame[..frame.len() - 3]).is_none());
        let big = vec![0u8; MAX_ECHO_DATA + 1];
        assert!(EchoRequest::parse(&request(src, dst, &big)).is_none());
        let ok = vec![0u8; MAX_ECHO_DATA];
        assert!(EchoRequest::parse(&request(src, dst, &ok)).is_some());
    }

    #[test]
    fn only_echo_requests_are_recognised() {
        assert!(is_echo_request_v4(&[8, 0, 0, 0]));
        assert!(!is_echo_request_v4(&[0, 0, 0, 0]));
        assert!(!is_echo_request_v4(&[8, 1]));
        assert!(!is_echo_request_v4(&[8]));
        assert!(is_echo_request_v6(&[128, 0]));
        assert!(!is_echo_request_v6(&[129, 0]));
        assert!(!is_echo_request_v6(&[1, 0]));
    }
}
