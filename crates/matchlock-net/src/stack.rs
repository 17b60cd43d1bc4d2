//! The guest's network: a userspace TCP/IP stack (smoltcp) on the VM's virtio-net device,
//! which terminates every guest flow and re-originates it from the host after the policy.
//!
//! # Design
//! QEMU's `-netdev stream` connects to the unix stream socket [`Stack::start`] binds (before
//! QEMU starts) and sends each Ethernet frame of the guest NIC behind a 4-byte length; ours
//! go back the same way ([`crate::link`]: many frames per read and per write, a length
//! above the link's largest frame closes the link). One thread per sandbox runs a
//! single-threaded tokio runtime whose loop owns the smoltcp interface. The interface is the guest's gateway and accepts packets for every
//! destination address (smoltcp "any IP"), so a guest TCP connection to `a.b.c.d:p` ends in
//! a smoltcp socket listening on exactly `a.b.c.d:p`. With [`StackConfig::ipv6`] the same
//! holds for IPv6: the interface also has the IPv6 gateway address (smoltcp answers the
//! guest's neighbor solicitations) and every IPv6 flow takes exactly the IPv4 path below
//! (policy on the address, interceptor on 80/443, DNS on 53); [`FlowKey`] holds `IpAddr`s.
//!
//! A guest SYN for a new flow is held back, not given to smoltcp: the policy is asked first
//! ([`Policy::check_connect`] on the address about to be connected to), then the host
//! connects with tokio. Only when that connection is up is a listening socket created and the
//! held SYN fed to it, so the guest's handshake completes iff the upstream one did; a refused
//! or failed flow gets the SYN fed with no listener, and smoltcp answers it with an RST
//! (never a fake accept). Retransmitted SYNs of a pending flow replace the held one.
//!
//! Each flow has bounded buffers end to end: smoltcp socket buffers (the guest sees real
//! windows) and two bounded channels to the tasks that write to and read from the host
//! socket. The loop never blocks: it moves guest data only into channel capacity it has
//! reserved and host data only into socket buffer space, so one slow flow fills its own
//! buffers and closes its own window, and no other. Work per guest frame is kept small (the
//! guest vCPU and this thread share the host's cores): chunks toward the host are sized to
//! what is queued, one timer is re-armed per turn, and a flow's writer wakes the loop only
//! when it frees a slot of a full channel (the only time the loop left guest data behind),
//! not once per chunk. A guest FIN becomes a host-side
//! `shutdown(Write)` after the data before it is written, a host EOF becomes a FIN to the
//! guest after the data before it is sent (half-close both ways); host errors become an RST
//! to the guest.
//!
//! With an [`Interceptor`] configured, a guest SYN to TCP port 80 or 443 (any address) is
//! not connected from the host: the flow is accepted at once and its host side is one end
//! of an in-memory pipe (`tokio::io::duplex`, 32 KiB each way) whose
//! other end the interceptor serves as HTTP or TLS in its own task; the same bounded
//! reader/writer tasks and channels move the bytes, so every bound above still holds. The
//! interceptor judges each request by its own Host / `:authority`, so the destination
//! address is not checked here. Every other port keeps the raw path (policy on the IP
//! literal, then connect). A flow refused by policy is reported to
//! [`StackConfig::events`] (`host` = `ip:port`).
//!
//! Under interception a raw flow is not spliced blindly: once its upstream connection is
//! up and the guest accepted (so a refused or unreachable destination still gets an RST,
//! never a fake accept), one task per flow peeks at the guest's first bytes
//! ([`crate::tlssniff`]: at most [`tlssniff::SNIFF_WINDOW`], about 16 KiB). A TLS
//! ClientHello drops the raw upstream connection and hands the flow, bytes included, to
//! [`Interceptor::serve_tls`] for the same destination port, exactly as port 443 (SNI
//! picks the leaf, each request's Host decides, secrets and hooks apply, upstream TLS
//! verified). An HTTP/1.x request line does the same with [`Interceptor::serve_http`],
//! exactly as port 80 (the Host decides, a placeholder toward another host gets 403 and
//! never leaves), so plain HTTP on port 8080 is not spliced past the secrets. Anything
//! else, or the upstream speaking first (SMTP, SSH banners) splices the flow raw, the
//! peeked bytes first; a guest that sends nothing is waited for as long as it takes. The same bounded channels carry the data
//! in every case.
//!
//! UDP to port 53 at any address is answered by [`crate::dns`]. Other UDP, in open egress
//! ([`StackConfig::udp_egress`]), is taken before smoltcp: per guest flow (source,
//! destination) the policy is asked once, then a host UDP socket connected to the
//! destination sends the guest's datagrams and a reader task queues its replies, which go
//! back to the guest as frames built here (from the destination's address and port).
//! Refused destinations are dropped with a blocked event. Under interception
//! (`udp_egress` off) such UDP gets smoltcp's ICMP port-unreachable and nothing leaves the
//! host. ICMP and ICMPv6 echo to the gateway addresses are answered by smoltcp; an echo
//! request to any other address is judged like a raw TCP flow to it ([`Engine::check_raw`])
//! and, if allowed, sent from the host by [`crate::icmp`] (refused: no reply, a blocked
//! event); other ICMP to other addresses is dropped (no fake reachability); ICMPv6 neighbor
//! discovery, router solicitation and MLD always reach smoltcp.
//!
//! Memory is bounded per sandbox: at most [`MAX_FLOWS`] flows of two [`SOCKET_BUFFER`]s
//! plus 2 × 4 × 16 KiB of channel each (about 64 MiB in the worst case), 1024 queued frames
//! each way plus the link's 64 KiB read and 256 KiB write buffers, and 64 DNS queries in
//! flight; at most [`MAX_UDP_FLOWS`] UDP flows (closed
//! after [`UDP_IDLE_TIMEOUT`] without traffic), 256 host replies queued for all of them,
//! and no datagram larger than one IP packet on the guest link. A flow whose handshake the
//! guest never completes is reset after [`HANDSHAKE_TIMEOUT`], so a half-open SYN flood
//! cannot hold the flow slots (and the host connections behind them) for good.
//!
//! # Limitations
//! IPv6 extension headers (other than smoltcp's own handling) are not parsed: a TCP SYN or
//! UDP datagram behind one goes to smoltcp, which refuses it (RST / port-unreachable), so
//! it fails closed. Raw TCP flows carry no name, so under an allow-list they are judged by
//! their IP literal (reference §7.7 "Passthrough") or by an allowed name the owner's DNS
//! answered their address for ([`crate::answered`], over UDP or TCP); without an
//! interceptor, ports 80 and 443 are raw flows too (and nothing is sniffed). A raw flow
//! under interception whose guest sends one word with no line end (`ping`) and waits gets
//! it spliced only after [`tlssniff::SNIFF_WINDOW`]. A guest RST closes the host socket
//! gracefully (FIN), not with an RST. Forwarded UDP is not fragmented either way: a larger
//! datagram is dropped. A host
//! socket's ICMP errors are not relayed to the guest (its datagrams just go unanswered).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress, IpAddress,
    IpCidr, IpEndpoint, IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
    TcpPacket, UdpPacket, UdpRepr,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::AbortHandle;

use crate::events::{self, EventSink};
use crate::intercept::Interceptor;
use crate::link::{Link, LinkReady, NetLink};
use crate::policy::Policy;
use crate::tlssniff;

/// Guest TCP ports served by the interceptor when there is one: HTTP and HTTPS.
pub const INTERCEPTED_PORTS: [u16; 2] = [80, 443];
/// Bytes buffered each way in the in-memory pipe between a flow and the interceptor.
pub const INTERCEPT_PIPE: usize = 2 * CHUNK;

/// Most TCP flows (open and pending) per sandbox; more SYNs are refused with an RST.
pub const MAX_FLOWS: usize = 256;
/// Receive and send buffer of each guest-side TCP socket (the guest's window).
pub const SOCKET_BUFFER: usize = 64 * 1024;
/// Largest chunk moved between a flow and its host socket.
const CHUNK: usize = 16 * 1024;
/// Chunks buffered per direction between the loop and a flow's host tasks.
const CHANNEL_CHUNKS: usize = 4;
/// How long the host may take to connect upstream before the guest gets an RST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A guest connection accepted (SYN-ACK sent) but never completed by the guest's ACK is
/// reset after this long. Without it a half-open SYN flood would hold every one of the
/// [`MAX_FLOWS`] slots, and the host connections behind them, for good: smoltcp retries
/// the SYN-ACK forever. (Shorter in unit tests, which wait it out.)
#[cfg(not(test))]
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
#[cfg(test)]
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// DNS queries being resolved at once; more are dropped (the guest retries).
const MAX_DNS_IN_FLIGHT: usize = 64;
/// Frames waiting for smoltcp or for QEMU; more are dropped (TCP retransmits).
const MAX_QUEUED_FRAMES: usize = 1024;
/// Largest datagram read from a host UDP socket.
const MAX_DATAGRAM: usize = 65_536;
/// Frames taken from QEMU per loop turn before smoltcp runs.
const INGRESS_BATCH: usize = 64;
/// Most forwarded UDP flows (guest address and port, destination) per sandbox; datagrams of
/// new flows beyond it are dropped until one goes idle.
pub const MAX_UDP_FLOWS: usize = 256;
/// A UDP flow with no datagram either way for this long is closed (its host socket dropped).
pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Host replies waiting for the loop, all UDP flows together; more are dropped.
const UDP_REPLY_QUEUE: usize = 256;

/// How QEMU's virtio-net device reaches the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `-netdev stream`: QEMU copies each frame to the stack's unix stream socket
    /// ([`crate::link`]). Works for snapshot boots (QEMU can migrate it).
    Stream,
    /// `-netdev vhost-user`: the stack serves the virtqueues from the guest's shared memory
    /// ([`crate::vhost`]); needs an MTU of at most [`VHOST_USER_MAX_MTU`].
    VhostUser,
}

/// Largest MTU the vhost-user transport carries (no mergeable receive buffers).
pub const VHOST_USER_MAX_MTU: u16 = 1500;

/// Settings of one sandbox's stack.
#[derive(Clone)]
pub struct StackConfig {
    /// The unix socket the stack listens on; QEMU connects to it.
    pub socket: PathBuf,
    /// How QEMU's NIC reaches the stack.
    pub transport: Transport,
    /// The gateway's address (the stack's own address on the guest link).
    pub gateway: Ipv4Addr,
    /// The guest's address.
    pub guest: Ipv4Addr,
    /// Prefix length of the guest link.
    pub prefix_len: u8,
    /// IPv6 on the same link (absent: IPv4 only).
    pub ipv6: Option<Ipv6Link>,
    /// Open egress: guest UDP other than DNS is forwarded from host sockets after the
    /// policy. Off (under interception) it gets ICMP port-unreachable.
    pub udp_egress: bool,
    /// IP MTU of the guest link.
    pub mtu: u16,
    /// The gateway's MAC address.
    pub gateway_mac: [u8; 6],
    /// Egress policy, shared with whoever changes it at run time.
    pub policy: Arc<Policy>,
    /// HTTP/TLS interception: with it, guest TCP to ports 80 and 443 (any address) is
    /// served by the interceptor instead of being connected from the host.
    pub intercept: Option<Arc<Interceptor>>,
    /// Where flows refused by policy are reported.
    pub events: Option<EventSink>,
    /// Answers the guest's DNS queries (UDP to port 53 at any address, and TCP port 53).
    pub dns: Arc<crate::dns::DnsResolver>,
}

impl std::fmt::Debug for StackConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackConfig")
            .field("socket", &self.socket)
            .field("transport", &self.transport)
            .field("gateway", &self.gateway)
            .field("guest", &self.guest)
            .field("prefix_len", &self.prefix_len)
            .field("ipv6", &self.ipv6)
            .field("udp_egress", &self.udp_egress)
            .field("mtu", &self.mtu)
            .field("policy", &self.policy)
            .field("intercept", &self.intercept.is_some())
            .field("events", &self.events.is_some())
            .finish_non_exhaustive()
    }
}

/// The IPv6 side of the guest link: the gateway's (the stack's) address, the guest's, and the
/// prefix length they share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Link {
    pub gateway: Ipv6Addr,
    pub guest: Ipv6Addr,
    pub prefix_len: u8,
}

/// Failures starting the stack.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("invalid network settings: {reason}")]
    Invalid { reason: String },
    #[error("bind the network stack socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serve vhost-user-net")]
    Vhost(#[source] crate::vhost::VhostError),
    #[error("make the network stack socket non-blocking")]
    NonBlocking(#[source] std::io::Error),
    #[error("build the network stack runtime")]
    Runtime(#[source] std::io::Error),
    #[error("start the network stack thread")]
    Thread(#[source] std::io::Error),
}

impl StackConfig {
    fn validate(&self) -> Result<(), StackError> {
        let invalid = |reason: &str| {
            Err(StackError::Invalid {
                reason: reason.to_string(),
            })
        };
        if !(1..=30).contains(&self.prefix_len) {
            return invalid("prefix length must be 1..=30");
        }
        if !(576..=9000).contains(&self.mtu) {
            return invalid("MTU must be 576..=9000");
        }
        if self.transport == Transport::VhostUser && self.mtu > VHOST_USER_MAX_MTU {
            return invalid("the vhost-user transport carries an MTU of at most 1500");
        }
        let mask = u32::MAX << (32 - u32::from(self.prefix_len));
        if u32::from(self.gateway) & mask != u32::from(self.guest) & mask {
            return invalid("guest and gateway must share the subnet");
        }
        if self.gateway == self.guest {
            return invalid("guest and gateway must differ");
        }
        if self.gateway_mac[0] & 1 != 0 {
            return invalid("gateway MAC must be unicast");
        }
        if let Some(v6) = self.ipv6 {
            if !(1..=126).contains(&v6.prefix_len) {
                return invalid("IPv6 prefix length must be 1..=126");
            }
            let mask = u128::MAX << (128 - u32::from(v6.prefix_len));
            if u128::from(v6.gateway) & mask != u128::from(v6.guest) & mask {
                return invalid("IPv6 guest and gateway must share the subnet");
            }
            if v6.gateway == v6.guest || v6.gateway.is_multicast() || v6.gateway.is_unspecified() {
                return invalid("IPv6 gateway must be a unicast address other than the guest's");
            }
        }
        Ok(())
    }
}

/// The listening end QEMU connects to, made before the stack's thread starts.
enum Endpoint {
    Stream(StdUnixListener),
    Vhost(crate::vhost::VhostLink),
}

/// A running stack; stopped on [`Stack::stop`] or drop.
pub struct Stack {
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stack {
    /// Binds `cfg.socket` (so QEMU can start right after) and starts the stack's thread.
    pub fn start(cfg: StackConfig) -> Result<Stack, StackError> {
        cfg.validate()?;
        let endpoint = match cfg.transport {
            Transport::Stream => {
                let sock =
                    StdUnixListener::bind(&cfg.socket).map_err(|source| StackError::Bind {
                        path: cfg.socket.clone(),
                        source,
                    })?;
                sock.set_nonblocking(true)
                    .map_err(StackError::NonBlocking)?;
                Endpoint::Stream(sock)
            }
            Transport::VhostUser => Endpoint::Vhost(
                crate::vhost::VhostLink::start(&cfg.socket, cfg.mtu).map_err(StackError::Vhost)?,
            ),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StackError::Runtime)?;
        let (tx, rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("matchlock-net".into())
            .spawn(move || {
                rt.block_on(async move {
                    let link = match endpoint {
                        Endpoint::Stream(sock) => Link::new(sock, cfg.mtu).map(NetLink::Stream),
                        Endpoint::Vhost(v) => Ok(NetLink::Vhost(v)),
                    };
                    match link {
                        Ok(link) => Engine::new(cfg, link).run(rx).await,
                        Err(e) => tracing::error!(error = %e, "network stack socket unusable"),
                    }
                });
                // Pending resolver lookups run on blocking threads; do not wait for them.
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .map_err(StackError::Thread)?;
        Ok(Stack {
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stops the loop and closes every flow (host sockets are dropped).
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Frame queues between the loop and smoltcp.
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        (self.tx.len() < MAX_QUEUED_FRAMES).then_some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = self.mtu + 14;
        c
    }
}

/// A guest flow (TCP or UDP): guest address and port, destination address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
}

/// The gateway's own addresses: ICMP echo is answered for these only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gateways {
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

/// What an incoming frame is to the loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Ingress {
    /// A TCP SYN (without ACK) from the guest.
    Syn(FlowKey),
    /// A UDP datagram to a port other than 53 (DNS stays with smoltcp): `payload` is its
    /// byte range in the frame, `mac` the guest's Ethernet address (replies go there).
    Udp {
        key: FlowKey,
        payload: std::ops::Range<usize>,
        mac: [u8; 6],
    },
    /// An ICMP / ICMPv6 echo request to an address other than the gateway's: relayed by
    /// [`crate::icmp`] when the policy allows the address, else dropped.
    Echo,
    /// Dropped before smoltcp: ICMP / ICMPv6 echo replies and errors to any address but the
    /// gateway's (smoltcp's any-IP mode would otherwise answer echo requests for every
    /// address, faking reachability), and frames larger than the link allows. ICMPv6
    /// neighbour discovery, router solicitation and MLD always reach smoltcp.
    Drop,
    /// Anything else: smoltcp handles it.
    Other,
}

/// Classifies a guest frame without trusting any of it (every layer is length-checked).
pub fn classify(frame: &[u8], gw: Gateways, mtu: u16) -> Ingress {
    if frame.len() > usize::from(mtu) + 14 {
        return Ingress::Drop;
    }
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Ingress::Other;
    };
    let mac = eth.src_addr().0;
    let (src, dst, proto, l4, l4_off) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                return Ingress::Other;
            };
            if ip.next_header() == IpProtocol::Icmp && ip.dst_addr() != gw.v4 {
                return match crate::icmp::is_echo_request_v4(ip.payload()) {
                    true => Ingress::Echo,
                    false => Ingress::Drop,
                };
            }
            if ip.more_frags() || ip.frag_offset() != 0 {
                return Ingress::Other;
            }
            let off = 14 + usize::from(ip.header_len());
            let (s, d, p) = (ip.src_addr(), ip.dst_addr(), ip.next_header());
            (IpAddr::V4(s), IpAddr::V4(d), p, ip.payload(), off)
        }
        EthernetProtocol::Ipv6 => {
            let Ok(ip) = Ipv6Packet::new_checked(eth.payload()) else {
                return Ingress::Other;
            };
            let (s, d, p) = (ip.src_addr(), ip.dst_addr(), ip.next_header());
            if p == IpProtocol::Icmpv6 && Some(d) != gw.v6 {
                // Types 1-4 are errors, 128/129 echo; NDP, RS/RA and MLD are 130 and up.
                if crate::icmp::is_echo_request_v6(ip.payload()) {
                    return Ingress::Echo;
                }
                if ip.payload().first().is_none_or(|t| *t <= 129) {
                    return Ingress::Drop;
                }
            }
            (IpAddr::V6(s), IpAddr::V6(d), p, ip.payload(), 14 + 40)
        }
        _ => return Ingress::Other,
    };
    match proto {
        IpProtocol::Tcp => classify_tcp(src, dst, l4),
        IpProtocol::Udp => classify_udp(src, dst, l4, l4_off, mac),
        _ => Ingress::Other,
    }
}

fn classify_tcp(src: IpAddr, dst: IpAddr, l4: &[u8]) -> Ingress {
    let Ok(tcp) = TcpPacket::new_checked(l4) else {
        return Ingress::Other;
    };
    if tcp.syn() && !tcp.ack() && !tcp.rst() {
        Ingress::Syn(FlowKey {
            src: (src, tcp.src_port()),
            dst: (dst, tcp.dst_port()),
        })
    } else {
        Ingress::Other
    }
}

fn classify_udp(src: IpAddr, dst: IpAddr, l4: &[u8], off: usize, mac: [u8; 6]) -> Ingress {
    let Ok(udp) = UdpPacket::new_checked(l4) else {
        return Ingress::Other;
    };
    if udp.dst_port() == 53 {
        return Ingress::Other;
    }
    // `new_checked` bounds the UDP length by the IP payload; the payload follows the header.
    let start = off + 8;
    let end = off + usize::from(udp.len());
    Ingress::Udp {
        key: FlowKey {
            src: (src, udp.src_port()),
            dst: (dst, udp.dst_port()),
        },
        payload: start..end,
        mac,
    }
}

/// Host data for the guest, from a flow's reader task.
enum HostData {
    Data(Vec<u8>),
    Eof,
    Failed,
}

/// Results of tasks, back to the loop.
enum Event {
    Connected {
        key: FlowKey,
        result: Result<TcpStream, String>,
    },
    Dns {
        client: IpEndpoint,
        seq: u64,
        reply: Option<Vec<u8>>,
    },
    /// An echo reply frame for the guest ([`crate::icmp`]).
    EchoReply(Vec<u8>),
}

/// A guest DNS query being answered.
struct DnsSlot {
    seq: u64,
    meta: udp::UdpMetadata,
    /// `Some` once answered (`Some(None)`: dropped, nothing to send).
    reply: Option<Option<Vec<u8>>>,
}

/// An open flow's host side.
struct Flow {
    key: FlowKey,
    /// Guest data toward the host writer; `None` once the guest's FIN was passed on.
    to_host: Option<mpsc::Sender<Vec<u8>>>,
    from_host: mpsc::Receiver<HostData>,
    /// Host data not yet accepted by the smoltcp socket.
    out: Vec<u8>,
    out_off: usize,
    host_done: bool,
    fin_sent: bool,
    write_failed: Arc<AtomicBool>,
    tasks: Vec<AbortHandle>,
    /// When the guest's SYN was accepted (for [`HANDSHAKE_TIMEOUT`]).
    accepted: std::time::Instant,
}

impl Drop for Flow {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A forwarded UDP flow: the host socket (connected to the destination) and its reader.
struct UdpFlow {
    /// Sends without waiting (tokio's readiness of a fresh socket is unknown until polled;
    /// the reader task holds the tokio half).
    sock: std::net::UdpSocket,
    /// The guest's Ethernet address, as its last datagram gave it.
    mac: [u8; 6],
    last: std::time::Instant,
    reader: AbortHandle,
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct Engine {
    cfg: StackConfig,
    /// QEMU's connection or the vhost-user queues: the guest's frames.
    link: NetLink,
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
    flows: HashMap<SocketHandle, Flow>,
    by_key: HashMap<FlowKey, SocketHandle>,
    /// Held SYN frames of flows waiting for the host's connect.
    pending: HashMap<FlowKey, Vec<u8>>,
    dns: SocketHandle,
    dns_in_flight: usize,
    /// Queries per guest socket, answered in arrival order: clients such as busybox's
    /// `nslookup` send A and AAAA with the same ID and take the first reply for the first
    /// question.
    dns_queue: HashMap<IpEndpoint, VecDeque<DnsSlot>>,
    dns_seq: u64,
    /// Addresses the guest was sent in DNS answers (UDP here, TCP from the DNS-over-TCP
    /// tasks), for raw flows under an allow-list.
    answered: Arc<Mutex<crate::answered::Answered>>,
    udp_flows: HashMap<FlowKey, UdpFlow>,
    udp_tx: mpsc::Sender<(FlowKey, Vec<u8>)>,
    udp_rx: mpsc::Receiver<(FlowKey, Vec<u8>)>,
    /// When idle UDP flows were last looked for.
    udp_swept: std::time::Instant,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    wake: Arc<Notify>,
    epoch: std::time::Instant,
    /// Relays echo requests beyond the gateway.
    echoer: crate::icmp::Echoer,
}

enum Turn {
    Stop,
    Link(LinkReady),
    Event(Option<Event>),
    UdpReply(Option<(FlowKey, Vec<u8>)>),
    Wake,
}

impl Engine {
    fn new(cfg: StackConfig, link: NetLink) -> Engine {
        let mut dev = Queues {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu: usize::from(cfg.mtu),
        };
        let hw = HardwareAddress::Ethernet(EthernetAddress(cfg.gateway_mac));
        let mut config = Config::new(hw);
        config.random_seed = rand::random();
        let epoch = std::time::Instant::now();
        let mut iface = Interface::new(config, &mut dev, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(cfg.gateway), cfg.prefix_len));
            if let Some(v6) = cfg.ipv6 {
                let _ = a.push(IpCidr::new(IpAddress::Ipv6(v6.gateway), v6.prefix_len));
            }
        });
        iface.set_any_ip(true);
        let mut sockets = SocketSet::new(Vec::new());
        let mut dns = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 64 * 1024]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 64 * 1024]),
        );
        // Port 53 on any address: the any-IP interface hands every destination to it.
        let _ = dns.bind(IpListenEndpoint {
            addr: None,
            port: 53,
        });
        let dns = sockets.add(dns);
        let (events_tx, events_rx) = mpsc::channel(MAX_FLOWS + MAX_DNS_IN_FLIGHT);
        let (udp_tx, udp_rx) = mpsc::channel(UDP_REPLY_QUEUE);
        let echo_tx = events_tx.clone();
        let echoer = crate::icmp::Echoer::new(
            cfg.gateway_mac,
            Arc::new(move |frame| {
                // A full queue drops the reply, as a congested link would.
                let _ = echo_tx.try_send(Event::EchoReply(frame));
            }),
        );
        Engine {
            cfg,
            link,
            iface,
            dev,
            sockets,
            flows: HashMap::new(),
            by_key: HashMap::new(),
            pending: HashMap::new(),
            dns,
            dns_in_flight: 0,
            dns_queue: HashMap::new(),
            dns_seq: 0,
            answered: Arc::default(),
            udp_flows: HashMap::new(),
            udp_tx,
            udp_rx,
            udp_swept: epoch,
            events_tx,
            events_rx,
            wake: Arc::new(Notify::new()),
            epoch,
            echoer,
        }
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(
            i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX),
        )
    }

    async fn run(mut self, mut shutdown: oneshot::Receiver<()>) {
        tracing::debug!(gateway = %self.cfg.gateway, guest = %self.cfg.guest, "network stack running");
        let wake = self.wake.clone();
        // One timer, re-armed each turn (not a new timer entry per turn).
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        loop {
            self.ingest();
            self.turn();
            let delay = self
                .iface
                .poll_delay(self.now(), &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()))
                .unwrap_or(Duration::from_secs(1));
            // With the frame queue to QEMU full, smoltcp has work it cannot do yet and
            // reports it as due now: wait for QEMU (writable) instead of spinning. Frames
            // already read but not yet taken (a full batch) are work due now.
            let delay = if self.link.has_frame() {
                Duration::ZERO
            } else if self.dev.tx.len() >= MAX_QUEUED_FRAMES {
                delay.max(Duration::from_millis(5))
            } else {
                delay
            };
            timer.as_mut().reset(tokio::time::Instant::now() + delay);
            let want_write = !self.dev.tx.is_empty() || self.link.pending_out();
            let turn = tokio::select! {
                _ = &mut shutdown => Turn::Stop,
                r = self.link.ready(want_write) => Turn::Link(r),
                ev = self.events_rx.recv() => Turn::Event(ev),
                r = self.udp_rx.recv() => Turn::UdpReply(r),
                _ = wake.notified() => Turn::Wake,
                _ = &mut timer => Turn::Wake,
            };
            match turn {
                Turn::Stop => break,
                Turn::Link(LinkReady::Accepted(s)) => self.link.attach(s),
                Turn::Link(LinkReady::Failed(e)) => {
                    tracing::warn!(error = %e, "network stack socket failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Turn::Event(Some(ev)) => self.event(ev),
                Turn::UdpReply(Some((key, data))) => self.udp_reply(key, &data),
                Turn::Link(LinkReady::Io) | Turn::Event(None) | Turn::UdpReply(None) => {}
                Turn::Wake => {}
            }
        }
        tracing::debug!(flows = self.flows.len(), "network stack stopped");
    }

    /// Takes the frames QEMU has sent (up to a batch) without waiting: those already read,
    /// then what the socket has (tokio knows without a system call when it has nothing).
    fn ingest(&mut self) {
        for _ in 0..INGRESS_BATCH {
            match self.link.next_frame() {
                Some(frame) => self.ingress(frame),
                None => break,
            }
        }
    }

    /// One pass: smoltcp, the flows and DNS, smoltcp again, then frames out to QEMU.
    fn turn(&mut self) {
        while let Ok(ev) = self.events_rx.try_recv() {
            self.event(ev);
        }
        while let Ok((key, data)) = self.udp_rx.try_recv() {
            self.udp_reply(key, &data);
        }
        self.sweep_udp();
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.service_flows();
        self.service_dns();
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        self.flush();
    }

    /// Sends queued frames to QEMU, as many as its socket takes now.
    fn flush(&mut self) {
        self.link.send(&mut self.dev.tx);
    }

    fn ingress(&mut self, frame: Vec<u8>) {
        let gw = Gateways {
            v4: self.cfg.gateway,
            v6: self.cfg.ipv6.map(|v6| v6.gateway),
        };
        match classify(&frame, gw, self.cfg.mtu) {
            Ingress::Syn(key) if !self.by_key.contains_key(&key) => self.syn(key, &frame),
            Ingress::Udp { key, payload, mac } if self.cfg.udp_egress => {
                if let Some(data) = frame.get(payload) {
                    self.udp_datagram(key, data, mac);
                }
            }
            Ingress::Echo => self.echo(&frame),
            Ingress::Drop => {}
            _ => self.feed(frame, false),
        }
    }

    /// A guest echo request beyond the gateway: relayed from the host if the policy allows
    /// the address pinged (as for a raw TCP flow), else dropped with a blocked event.
    fn echo(&mut self, frame: &[u8]) {
        let Some(req) = crate::icmp::EchoRequest::parse(frame) else {
            return;
        };
        if let Err(denied) = self.check_raw(req.dst) {
            tracing::info!(dst = %req.dst, reason = %denied, "guest echo request refused by policy");
            let ev = events::blocked(&req.dst.to_string(), &denied.to_string());
            return events::emit(self.cfg.events.as_ref(), ev);
        }
        self.echoer.send(req);
    }

    fn feed(&mut self, frame: Vec<u8>, front: bool) {
        if self.dev.rx.len() >= MAX_QUEUED_FRAMES {
            return;
        }
        if front {
            self.dev.rx.push_front(frame);
        } else {
            self.dev.rx.push_back(frame);
        }
    }

    /// A SYN for a flow with no socket: hold it, ask the policy, connect from the host.
    fn syn(&mut self, key: FlowKey, frame: &[u8]) {
        if let Some(held) = self.pending.get_mut(&key) {
            *held = frame.to_vec();
            return;
        }
        if self.pending.len() + self.flows.len() >= MAX_FLOWS {
            tracing::warn!(?key, "too many flows: refused");
            return self.feed(frame.to_vec(), true);
        }
        if key.dst.1 == 53 {
            return self.dns_tcp(key, frame.to_vec());
        }
        if let Some(icpt) = self.cfg.intercept.clone() {
            if INTERCEPTED_PORTS.contains(&key.dst.1) {
                return self.intercept(key, frame.to_vec(), icpt);
            }
        }
        let ip = key.dst.0;
        if let Err(denied) = self.check_raw(ip) {
            let dst = SocketAddr::new(ip, key.dst.1);
            tracing::info!(%dst, reason = %denied, "guest connection refused by policy");
            let ev = events::blocked(&dst.to_string(), &denied.to_string());
            events::emit(self.cfg.events.as_ref(), ev);
            // No listener: smoltcp answers the SYN with an RST.
            return self.feed(frame.to_vec(), true);
        }
        self.pending.insert(key, frame.to_vec());
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let addr = SocketAddr::new(ip, key.dst.1);
            let result = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await
            {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("connect timed out".to_string()),
            };
            let _ = tx.send(Event::Connected { key, result }).await;
        });
    }

    /// The policy for a raw flow to `ip`: its IP literal, or else an allowed name the
    /// owner's DNS answered `ip` for ([`crate::answered`]); blocked ranges always apply.
    fn check_raw(&self, ip: IpAddr) -> Result<(), crate::policy::Denied> {
        match self.cfg.policy.check_connect(&ip.to_string(), ip) {
            Err(crate::policy::Denied::NotAllowed { host }) => {
                let answered = lock(&self.answered);
                match answered.allowed_name(ip, &self.cfg.policy) {
                    Some(name) => {
                        tracing::debug!(%ip, name, "raw flow allowed by a DNS answer");
                        self.cfg.policy.check_addr(ip)
                    }
                    None => Err(crate::policy::Denied::NotAllowed { host }),
                }
            }
            other => other,
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Connected { key, result } => {
                let Some(syn) = self.pending.remove(&key) else {
                    return;
                };
                match result {
                    Ok(stream) => self.open(key, stream, syn),
                    Err(reason) => {
                        tracing::info!(dst = %SocketAddr::from(key.dst), %reason, "upstream connect failed: RST to guest");
                        self.feed(syn, true);
                    }
                }
            }
            Event::Dns { client, seq, reply } => self.dns_answered(client, seq, reply),
            Event::EchoReply(frame) => {
                if self.dev.tx.len() < MAX_QUEUED_FRAMES {
                    self.dev.tx.push_back(frame);
                }
            }
        }
    }

    /// An intercepted flow: accepted at once, its host side an in-memory pipe whose other
    /// end the interceptor serves (HTTP for port 80, TLS for 443).
    fn intercept(&mut self, key: FlowKey, syn: Vec<u8>, icpt: Arc<Interceptor>) {
        let Some(h) = self.accept_syn(key, syn) else {
            return;
        };
        let (ours, theirs) = tokio::io::duplex(INTERCEPT_PIPE);
        let dst = SocketAddr::from(key.dst);
        let served = if key.dst.1 == 443 {
            tokio::spawn(icpt.serve_tls(dst, theirs))
        } else {
            tokio::spawn(icpt.serve_http(dst, theirs))
        };
        let (rd, wr) = tokio::io::split(ours);
        self.attach(h, key, rd, wr, Some(served.abort_handle()));
    }

    /// DNS over TCP to port 53 at any address: answered by the resolver, like UDP queries,
    /// through an in-memory pipe (never connected from the host).
    fn dns_tcp(&mut self, key: FlowKey, syn: Vec<u8>) {
        let Some(h) = self.accept_syn(key, syn) else {
            return;
        };
        let (ours, theirs) = tokio::io::duplex(INTERCEPT_PIPE);
        let answered = self.answered.clone();
        let served = tokio::spawn(crate::dns::serve_tcp_with(
            theirs,
            self.cfg.dns.clone(),
            move |reply| lock(&answered).record(reply),
        ));
        let (rd, wr) = tokio::io::split(ours);
        self.attach(h, key, rd, wr, Some(served.abort_handle()));
    }

    /// The upstream connection is up: the flow is accepted and joined to it. Under
    /// interception its first bytes decide first whether it is TLS for the interceptor.
    fn open(&mut self, key: FlowKey, stream: TcpStream, syn: Vec<u8>) {
        let Some(h) = self.accept_syn(key, syn) else {
            return;
        };
        let _ = stream.set_nodelay(true);
        if let Some(icpt) = self.cfg.intercept.clone() {
            let wake = self.wake.clone();
            return self.attach_tasks(h, key, move |rx, tx, failed| {
                let sniffed = tokio::spawn(sniffed_flow(key, stream, icpt, rx, tx, failed, wake));
                vec![sniffed.abort_handle()]
            });
        }
        let (rd, wr) = stream.into_split();
        self.attach(h, key, rd, wr, None);
    }

    /// A socket listening on the flow's destination gets the held SYN (smoltcp runs at
    /// once, so no other flow's SYN can reach this listener); its handle once the
    /// handshake is under way.
    fn accept_syn(&mut self, key: FlowKey, syn: Vec<u8>) -> Option<SocketHandle> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        );
        s.set_nagle_enabled(false);
        let endpoint = IpListenEndpoint {
            addr: Some(IpAddress::from(key.dst.0)),
            port: key.dst.1,
        };
        if s.listen(endpoint).is_err() {
            self.feed(syn, true);
            return None;
        }
        let h = self.sockets.add(s);
        self.feed(syn, true);
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        let s = self.sockets.get::<tcp::Socket>(h);
        let remote_ok = s
            .remote_endpoint()
            .is_some_and(|r| r.addr == IpAddress::from(key.src.0) && r.port == key.src.1);
        if s.state() != tcp::State::SynReceived || !remote_ok {
            tracing::debug!(?key, state = %s.state(), "held SYN not accepted");
            self.sockets.remove(h);
            return None;
        }
        Some(h)
    }

    /// Joins an accepted flow to its host side (a socket or the interceptor's pipe).
    fn attach<R, W>(
        &mut self,
        h: SocketHandle,
        key: FlowKey,
        rd: R,
        wr: W,
        extra: Option<AbortHandle>,
    ) where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let wake = self.wake.clone();
        self.attach_tasks(h, key, move |to_host_rx, from_host_tx, failed| {
            let reader = tokio::spawn(host_reader(rd, from_host_tx, wake.clone()));
            let writer = tokio::spawn(host_writer(wr, to_host_rx, failed, wake));
            let mut tasks = vec![reader.abort_handle(), writer.abort_handle()];
            tasks.extend(extra);
            tasks
        });
    }

    /// Joins an accepted flow to the tasks `spawn` starts on the flow's channels (guest data
    /// to the host, host data to the guest, and the write-failure flag); their abort
    /// handles go with the flow.
    fn attach_tasks(
        &mut self,
        h: SocketHandle,
        key: FlowKey,
        spawn: impl FnOnce(ToHost, FromHost, Arc<AtomicBool>) -> Vec<AbortHandle>,
    ) {
        let (to_host, to_host_rx) = mpsc::channel(CHANNEL_CHUNKS);
        let (from_host_tx, from_host) = mpsc::channel(CHANNEL_CHUNKS);
        let write_failed = Arc::new(AtomicBool::new(false));
        let tasks = spawn(to_host_rx, from_host_tx, write_failed.clone());
        tracing::debug!(dst = %SocketAddr::from(key.dst), "flow open");
        self.flows.insert(
            h,
            Flow {
                key,
                to_host: Some(to_host),
                from_host,
                out: Vec::new(),
                out_off: 0,
                host_done: false,
                fin_sent: false,
                write_failed,
                tasks,
                accepted: std::time::Instant::now(),
            },
        );
        self.by_key.insert(key, h);
    }

    fn service_flows(&mut self) {
        let mut closed = Vec::new();
        for (h, flow) in self.flows.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if service_flow(s, flow) {
                closed.push(*h);
            }
        }
        for h in closed {
            if let Some(flow) = self.flows.remove(&h) {
                self.by_key.remove(&flow.key);
                tracing::debug!(dst = %SocketAddr::from(flow.key.dst), "flow closed");
            }
            self.sockets.remove(h);
        }
    }

    fn service_dns(&mut self) {
        let s = self.sockets.get_mut::<udp::Socket>(self.dns);
        while let Ok((data, meta)) = s.recv() {
            if self.dns_in_flight >= MAX_DNS_IN_FLIGHT {
                continue;
            }
            self.dns_in_flight += 1;
            self.dns_seq += 1;
            let (client, seq) = (meta.endpoint, self.dns_seq);
            self.dns_queue
                .entry(client)
                .or_default()
                .push_back(DnsSlot {
                    seq,
                    meta,
                    reply: None,
                });
            let query = data.to_vec();
            let resolver = self.cfg.dns.clone();
            // smoltcp does not fragment: a reply fits one IP packet (IP + UDP headers).
            let headers = match client.addr {
                IpAddress::Ipv4(_) => 28,
                IpAddress::Ipv6(_) => 48,
            };
            let transport = crate::dns::Transport::Udp {
                max_datagram: usize::from(self.cfg.mtu).saturating_sub(headers),
            };
            let tx = self.events_tx.clone();
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                let reply = resolver.answer(&query, transport).await;
                tracing::debug!(
                    ms = t.elapsed().as_millis(),
                    answered = reply.is_some(),
                    "DNS query"
                );
                let _ = tx.send(Event::Dns { client, seq, reply }).await;
            });
        }
    }

    /// Records a finished query and sends the client's replies that are due, in order.
    fn dns_answered(&mut self, client: IpEndpoint, seq: u64, reply: Option<Vec<u8>>) {
        self.dns_in_flight = self.dns_in_flight.saturating_sub(1);
        let Some(queue) = self.dns_queue.get_mut(&client) else {
            return;
        };
        if let Some(slot) = queue.iter_mut().find(|q| q.seq == seq) {
            slot.reply = Some(reply);
        }
        let s = self.sockets.get_mut::<udp::Socket>(self.dns);
        while queue.front().is_some_and(|q| q.reply.is_some()) {
            let Some(DnsSlot {
                meta,
                reply: Some(reply),
                ..
            }) = queue.pop_front()
            else {
                break;
            };
            if let Some(reply) = reply {
                lock(&self.answered).record(&reply);
                if let Err(e) = s.send_slice(&reply, meta) {
                    tracing::debug!(error = %e, "DNS reply dropped");
                }
            }
        }
        if queue.is_empty() {
            self.dns_queue.remove(&client);
        }
    }
}

/// UDP in open egress: one connected host socket per guest flow, after the policy.
impl Engine {
    /// A guest datagram to a port other than 53: sent from the flow's host socket (opened,
    /// after the policy, for a new flow). Never blocks: a datagram the host socket cannot
    /// take at once is dropped, as UDP may be.
    fn udp_datagram(&mut self, key: FlowKey, data: &[u8], mac: [u8; 6]) {
        if !self.udp_flows.contains_key(&key) && !self.udp_open(key) {
            return;
        }
        let Some(flow) = self.udp_flows.get_mut(&key) else {
            return;
        };
        flow.mac = mac;
        flow.last = std::time::Instant::now();
        if let Err(e) = flow.sock.send(data) {
            tracing::debug!(dst = %SocketAddr::from(key.dst), error = %e, "guest UDP datagram dropped");
        }
    }

    /// Opens a flow's host socket; false when the policy refuses the destination (a blocked
    /// event), the flow table is full or the socket cannot be made.
    fn udp_open(&mut self, key: FlowKey) -> bool {
        let dst = SocketAddr::from(key.dst);
        if let Err(denied) = self
            .cfg
            .policy
            .check_connect(&dst.ip().to_string(), dst.ip())
        {
            tracing::info!(%dst, reason = %denied, "guest UDP refused by policy");
            let ev = events::blocked(&dst.to_string(), &denied.to_string());
            events::emit(self.cfg.events.as_ref(), ev);
            return false;
        }
        if self.udp_flows.len() >= MAX_UDP_FLOWS {
            self.sweep_udp_now();
            if self.udp_flows.len() >= MAX_UDP_FLOWS {
                tracing::warn!(%dst, "too many UDP flows: datagram dropped");
                return false;
            }
        }
        let (sock, rx) = match udp_connect(dst) {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%dst, error = %e, "guest UDP flow not opened");
                return false;
            }
        };
        let reader = tokio::spawn(udp_reader(
            key,
            rx,
            self.udp_tx.clone(),
            udp_payload_max(self.cfg.mtu, dst.ip()),
        ));
        tracing::debug!(%dst, "UDP flow open");
        let flow = UdpFlow {
            sock,
            mac: [0; 6],
            last: std::time::Instant::now(),
            reader: reader.abort_handle(),
        };
        self.udp_flows.insert(key, flow);
        true
    }

    /// A host reply on a flow: one frame to the guest, from the flow's destination.
    fn udp_reply(&mut self, key: FlowKey, data: &[u8]) {
        let Some(flow) = self.udp_flows.get_mut(&key) else {
            return;
        };
        flow.last = std::time::Instant::now();
        if self.dev.tx.len() >= MAX_QUEUED_FRAMES {
            return;
        }
        let (guest, gw) = (
            EthernetAddress(flow.mac),
            EthernetAddress(self.cfg.gateway_mac),
        );
        match udp_frame(key, data, gw, guest) {
            Some(frame) => {
                self.dev.tx.push_back(frame);
                self.flush();
            }
            None => tracing::debug!(len = data.len(), "UDP reply not framed"),
        }
    }

    /// Closes idle UDP flows, at most once a second.
    fn sweep_udp(&mut self) {
        if self.udp_swept.elapsed() >= Duration::from_secs(1) {
            self.sweep_udp_now();
        }
    }

    fn sweep_udp_now(&mut self) {
        self.udp_swept = std::time::Instant::now();
        self.udp_flows
            .retain(|_, f| f.last.elapsed() < UDP_IDLE_TIMEOUT);
    }
}

/// A non-blocking UDP socket on an ephemeral port of `dst`'s family, connected to `dst`
/// (so only `dst`'s replies are received): a std handle to send, a tokio one to receive.
fn udp_connect(dst: SocketAddr) -> std::io::Result<(std::net::UdpSocket, UdpSocket)> {
    let local: SocketAddr = match dst {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = std::net::UdpSocket::bind(local)?;
    sock.connect(dst)?;
    sock.set_nonblocking(true)?;
    let rx = UdpSocket::from_std(sock.try_clone()?)?;
    Ok((sock, rx))
}

/// The largest UDP payload that fits one IP packet on the guest link (no fragmentation).
fn udp_payload_max(mtu: u16, dst: IpAddr) -> usize {
    let headers = if dst.is_ipv4() { 28 } else { 48 };
    usize::from(mtu).saturating_sub(headers)
}

/// Reads a flow's replies into the loop's bounded queue; drops what does not fit the
/// guest link or the queue.
async fn udp_reader(
    key: FlowKey,
    sock: UdpSocket,
    tx: mpsc::Sender<(FlowKey, Vec<u8>)>,
    max: usize,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = match sock.recv(&mut buf).await {
            Ok(n) => n,
            // ICMP errors (e.g. port unreachable) surface here on a connected socket.
            Err(e) => {
                tracing::trace!(error = %e, "UDP flow receive error");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if n > max {
            tracing::debug!(
                len = n,
                max,
                "UDP reply larger than the guest link: dropped"
            );
            continue;
        }
        match tx.try_send((key, buf[..n].to_vec())) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => tracing::debug!("UDP reply dropped"),
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// The Ethernet frame carrying `data` from the flow's destination back to the guest;
/// `None` when the families do not match or the datagram is too large for a UDP length.
fn udp_frame(
    key: FlowKey,
    data: &[u8],
    gw: EthernetAddress,
    guest: EthernetAddress,
) -> Option<Vec<u8>> {
    let udp = UdpRepr {
        src_port: key.dst.1,
        dst_port: key.src.1,
    };
    let udp_len = udp.header_len() + data.len();
    let (src, dst) = (IpAddress::from(key.dst.0), IpAddress::from(key.src.0));
    let (ethertype, ip_len) = match (key.dst.0, key.src.0) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (EthernetProtocol::Ipv4, 20),
        (IpAddr::V6(_), IpAddr::V6(_)) => (EthernetProtocol::Ipv6, 40),
        _ => return None,
    };
    if udp_len > usize::from(u16::MAX) - ip_len {
        return None;
    }
    let mut frame = vec![0u8; 14 + ip_len + udp_len];
    let eth = EthernetRepr {
        src_addr: gw,
        dst_addr: guest,
        ethertype,
    };
    eth.emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
    let ip = frame.get_mut(14..)?;
    match (key.dst.0, key.src.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ipv4Repr {
            src_addr: s,
            dst_addr: d,
            next_header: IpProtocol::Udp,
            payload_len: udp_len,
            hop_limit: 64,
        }
        .emit(
            &mut Ipv4Packet::new_unchecked(&mut *ip),
            &ChecksumCapabilities::default(),
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => Ipv6Repr {
            src_addr: s,
            dst_addr: d,
            next_header: IpProtocol::Udp,
            payload_len: udp_len,
            hop_limit: 64,
        }
        .emit(&mut Ipv6Packet::new_unchecked(&mut *ip)),
        _ => return None,
    }
    let l4 = ip.get_mut(ip_len..)?;
    udp.emit(
        &mut UdpPacket::new_unchecked(l4),
        &src,
        &dst,
        data.len(),
        |p| p.copy_from_slice(data),
        &ChecksumCapabilities::default(),
    );
    Some(frame)
}

/// The answered-address table, even if a task panicked while holding it (its state is a
/// plain map, valid after any partial update).
fn lock(
    answered: &Mutex<crate::answered::Answered>,
) -> std::sync::MutexGuard<'_, crate::answered::Answered> {
    answered
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Moves data both ways for one flow without blocking; true when the flow is finished.
fn service_flow(s: &mut tcp::Socket<'_>, f: &mut Flow) -> bool {
    use tcp::State;
    if s.state() == State::SynReceived && f.accepted.elapsed() >= HANDSHAKE_TIMEOUT {
        tracing::debug!(dst = %SocketAddr::from(f.key.dst), "guest never completed the handshake: reset");
        s.abort();
        return true;
    }
    // Guest -> host, only into reserved channel capacity.
    if let Some(tx) = &f.to_host {
        while s.can_recv() {
            let Ok(permit) = tx.try_reserve() else { break };
            // Exactly what is queued (up to a chunk): no zeroing of a full chunk per frame.
            let mut chunk = vec![0; s.recv_queue().min(CHUNK)];
            match s.recv_slice(&mut chunk) {
                Ok(n) if n > 0 => {
                    chunk.truncate(n);
                    permit.send(chunk);
                }
                _ => break,
            }
        }
        let guest_fin = matches!(
            s.state(),
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait | State::Closed
        );
        if guest_fin && s.recv_queue() == 0 {
            f.to_host = None; // the writer shuts the host socket's write side down
        }
    }
    if f.write_failed.load(Ordering::Relaxed) {
        s.abort();
    }
    // Host -> guest, only into socket buffer space.
    loop {
        if f.out_off < f.out.len() {
            match s.send_slice(&f.out[f.out_off..]) {
                Ok(n) => f.out_off += n,
                Err(_) => break,
            }
            if f.out_off < f.out.len() {
                break;
            }
        }
        if f.host_done {
            break;
        }
        match f.from_host.try_recv() {
            Ok(HostData::Data(v)) => {
                f.out = v;
                f.out_off = 0;
            }
            Ok(HostData::Eof) | Err(mpsc::error::TryRecvError::Disconnected) => f.host_done = true,
            Ok(HostData::Failed) => {
                f.host_done = true;
                s.abort();
            }
            Err(mpsc::error::TryRecvError::Empty) => break,
        }
    }
    if f.host_done && f.out_off >= f.out.len() && !f.fin_sent {
        s.close();
        f.fin_sent = true;
    }
    s.state() == State::Closed
}

/// Guest data toward a flow's host side, and host data back (the flow's channel ends).
type ToHost = mpsc::Receiver<Vec<u8>>;
type FromHost = mpsc::Sender<HostData>;

/// A raw flow under interception, its upstream connected: its first bytes decide
/// ([`tlssniff::peek`]) whether the upstream connection is dropped and the flow served by
/// the interceptor as TLS or plain HTTP to the same port, or spliced raw to that
/// connection (the bytes read to decide go first either way).
async fn sniffed_flow(
    key: FlowKey,
    stream: TcpStream,
    icpt: Arc<Interceptor>,
    mut rx: ToHost,
    tx: FromHost,
    failed: Arc<AtomicBool>,
    wake: Arc<Notify>,
) {
    let dst = SocketAddr::from(key.dst);
    let peeked = {
        let spoke = stream.readable();
        tlssniff::peek(&mut rx, tlssniff::SNIFF_WINDOW, spoke, || wake.notify_one()).await
    };
    let (decision, first) = (peeked.decision, peeked.bytes);
    tracing::debug!(%dst, ?decision, bytes = first.len(), "first bytes of a raw flow");
    if decision.intercept() || decision.intercept_http() {
        drop(stream);
        let (ours, theirs) = tokio::io::duplex(INTERCEPT_PIPE);
        let (rd, wr) = tokio::io::split(ours);
        let served = async move {
            if decision.intercept() {
                icpt.serve_tls(dst, theirs).await;
            } else {
                icpt.serve_http(dst, theirs).await;
            }
        };
        tokio::join!(
            served,
            host_reader(rd, tx, wake.clone()),
            write_first(wr, first, rx, failed, wake.clone()),
        );
    } else {
        let (rd, wr) = stream.into_split();
        tokio::join!(
            host_reader(rd, tx, wake.clone()),
            write_first(wr, first, rx, failed, wake.clone()),
        );
    }
}

/// Writes `first`, then what the guest sends, as [`host_writer`].
async fn write_first<W: AsyncWrite + Unpin>(
    mut wr: W,
    first: Vec<u8>,
    rx: ToHost,
    failed: Arc<AtomicBool>,
    wake: Arc<Notify>,
) {
    if !first.is_empty() && wr.write_all(&first).await.is_err() {
        failed.store(true, Ordering::Relaxed);
        wake.notify_one();
        return;
    }
    host_writer(wr, rx, failed, wake).await;
}

async fn host_reader<R: AsyncRead + Unpin>(
    mut rd: R,
    tx: mpsc::Sender<HostData>,
    wake: Arc<Notify>,
) {
    loop {
        let Ok(permit) = tx.reserve().await else {
            return;
        };
        let mut buf = vec![0; CHUNK];
        let (msg, done) = match rd.read(&mut buf).await {
            Ok(0) => (HostData::Eof, true),
            Ok(n) => {
                buf.truncate(n);
                (HostData::Data(buf), false)
            }
            Err(_) => (HostData::Failed, true),
        };
        permit.send(msg);
        wake.notify_one();
        if done {
            return;
        }
    }
}

async fn host_writer<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
    failed: Arc<AtomicBool>,
    wake: Arc<Notify>,
) {
    while let Some(chunk) = rx.recv().await {
        // The loop leaves guest data in the socket only when this channel is full: wake it
        // when this receive freed the first slot, not once per chunk (which cost a whole
        // loop turn per guest frame). The loop and this task share one thread, so the
        // channel cannot change between the loop's failed reserve and this check.
        if rx.len() + 1 == CHANNEL_CHUNKS {
            wake.notify_one();
        }
        if wr.write_all(&chunk).await.is_err() {
            failed.store(true, Ordering::Relaxed);
            wake.notify_one();
            return;
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
#[path = "stack_tests.rs"]
mod tests;
