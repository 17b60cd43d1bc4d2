//! The guest's DNS server: every query to port 53, whatever address it was sent to and over
//! UDP or TCP, is answered by the sandbox owner.
//!
//! # Design
//! A query is decided before anything leaves the host ([`decide`]): names the policy does
//! not allow get NXDOMAIN locally, whatever the record type (TXT included), so an allow-list
//! also closes DNS as an exfiltration channel (the name never reaches a resolver). Names are
//! limited to letters, digits, `-`, `_` and `.` in non-empty labels of at most 63 bytes, so
//! the string checked against the policy is exactly the name resolved or forwarded.
//!
//! An allowed query is then answered by a [`DnsResolver`] in one of two modes:
//! - **System** (no servers configured): `A` and `AAAA` questions are resolved with the
//!   host's system resolver (`getaddrinfo` through tokio, so `/etc/hosts` and nsswitch are
//!   honoured); other types get an empty NOERROR answer.
//! - **Forwarding** (`--dns-servers`): the query is rebuilt from the checked name (fresh
//!   random ID, the guest's question, RD/CD flags, EDNS only if the guest used it, no EDNS
//!   options) and sent over UDP to the servers in round robin, at most
//!   [`FORWARD_TRIES`] tries of [`FORWARD_TIMEOUT`] each. Only a reply with the same ID and
//!   question is accepted (others are dropped as spoofed, see [`forward`]); a truncated
//!   reply is fetched again over TCP when the guest can take more than 512 bytes. The reply
//!   is relayed byte for byte with the guest's ID restored, so every record type works.
//!
//! Every reply is fitted to what the guest can receive ([`Query::reply_limit`]): over UDP
//! the client's EDNS size (512 without EDNS, at most [`MAX_UDP_REPLY`]) and the path's
//! datagram limit; over TCP 65535 bytes. A larger reply becomes a truncated one (TC set,
//! no records) so the client retries over TCP, which [`serve_tcp`] serves.
//!
//! Answers may contain any address, blocked ranges included (a name may well resolve to
//! 127.0.0.1 or 10.x): DNS is not where the address policy is enforced. Every connection is
//! checked on the address it actually goes to (`Policy::check_connect`), so a rebinding or
//! hostile answer cannot open a blocked destination.
//!
//! # Limitations
//! Answers in system mode carry a fixed TTL ([`ANSWER_TTL`]); `getaddrinfo` does not expose
//! the real one. The EDNS DO bit and options are not forwarded (no DNSSEC to the guest). A
//! query that does not parse is dropped (UDP) or closes the connection (TCP).

mod forward;
mod tcp;
pub mod wire;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use simple_dns::rdata::{RData, A, AAAA, OPT};
use simple_dns::{
    Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, OPCODE, QCLASS, QTYPE, RCODE, TYPE,
};

use crate::policy::Policy;

pub use tcp::{serve_tcp, serve_tcp_with, MAX_TCP_PIPELINE, MAX_TCP_QUERIES, TCP_IDLE_TIMEOUT};

/// TTL of every answer made in system mode, in seconds.
pub const ANSWER_TTL: u32 = 30;
/// Most addresses put in one system-mode answer.
pub const MAX_ANSWERS: usize = 16;
/// How long the host's system resolver may take before the guest gets SERVFAIL.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one forwarding try (UDP, or the TCP retry) may take.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Forwarding tries per query (each to the next server, round robin).
pub const FORWARD_TRIES: usize = 2;
/// Reply limit over UDP without EDNS, and the least an EDNS size counts for (RFC 6891).
pub const MIN_UDP_REPLY: usize = 512;
/// Most a UDP reply may be, whatever EDNS size the client advertises.
pub const MAX_UDP_REPLY: usize = 4096;
/// Longest DNS message over TCP (the 2-byte length prefix).
pub const MAX_TCP_MESSAGE: usize = 65_535;
/// Longest name accepted, without the trailing dot (RFC 1035).
const MAX_NAME: usize = 253;
/// Longest label (RFC 1035).
const MAX_LABEL: usize = 63;

/// How the guest's query arrived, which bounds the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP; `max_datagram` is the largest payload the path back to the guest carries
    /// (the guest's IP MTU − 28 for the stack, which does not fragment).
    Udp { max_datagram: usize },
    /// TCP (length-prefixed, up to [`MAX_TCP_MESSAGE`]); the EDNS size does not apply.
    Tcp,
}

/// What a [`DnsResolver`] is built from.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Upstream servers (`--dns-servers`); empty = the host's system resolver.
    pub servers: Vec<SocketAddr>,
    /// The sandbox's egress policy, shared with whoever changes it at run time.
    pub policy: Arc<Policy>,
}

/// Answers a sandbox's DNS queries (see the module docs); cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct DnsResolver {
    servers: Vec<SocketAddr>,
    policy: Arc<Policy>,
    /// Round-robin cursor over `servers`.
    next: AtomicUsize,
}

/// What to do with a query, decided without I/O.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Reply with this message right away (refused name, unsupported opcode).
    Reply(Vec<u8>),
    /// The name is allowed: resolve or forward it.
    Resolve(Query),
}

/// A well-formed standard query for one allowed name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    id: u16,
    recursion_desired: bool,
    checking_disabled: bool,
    /// The checked name, without the trailing dot.
    name: String,
    qtype: QTYPE,
    qclass: QCLASS,
    unicast_response: bool,
    /// The client's advertised EDNS UDP size, if it sent an OPT record.
    edns: Option<u16>,
}

fn plausible_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= MAX_LABEL)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The OPT record of a reply to a client that used EDNS.
fn reply_opt() -> OPT<'static> {
    OPT {
        opt_codes: Vec::new(),
        udp_packet_size: MAX_UDP_REPLY as u16,
        version: 0,
    }
}

/// A header-only error reply to a query that is not one [`Query`] (NOTIMP): the question is
/// echoed only when there is exactly one, so the reply stays small.
fn error_reply(q: &Packet<'_>, rcode: RCODE) -> Option<Vec<u8>> {
    let mut r = Packet::new_reply(q.id());
    if q.has_flags(PacketFlag::RECURSION_DESIRED) {
        r.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    r.set_flags(PacketFlag::RECURSION_AVAILABLE);
    *r.rcode_mut() = rcode;
    *r.opcode_mut() = q.opcode();
    if q.questions.len() == 1 {
        r.questions = q.questions.clone();
    }
    if q.opt().is_some() {
        *r.opt_mut() = Some(reply_opt());
    }
    r.build_bytes_vec_compressed().ok()
}

/// Decides a query without any I/O. `None`: the message does not parse or is not a query;
/// drop it (no reply to garbage).
pub fn decide(query: &[u8], policy: &Policy) -> Option<Decision> {
    let p = Packet::parse(query).ok()?;
    if p.has_flags(PacketFlag::RESPONSE) {
        return None;
    }
    if p.opcode() != OPCODE::StandardQuery || p.questions.len() != 1 {
        return error_reply(&p, RCODE::NotImplemented).map(Decision::Reply);
    }
    let question = &p.questions[0];
    let name = question.qname.to_string();
    let name = name.strip_suffix('.').unwrap_or(&name).to_string();
    let q = Query {
        id: p.id(),
        recursion_desired: p.has_flags(PacketFlag::RECURSION_DESIRED),
        checking_disabled: p.has_flags(PacketFlag::CHECKING_DISABLED),
        name,
        qtype: question.qtype,
        qclass: question.qclass,
        unicast_response: question.unicast_response,
        edns: p.opt().map(|o| o.udp_packet_size),
    };
    if !plausible_name(&q.name) || policy.check_host(&q.name).is_err() {
        tracing::debug!(name = %q.name.escape_debug(), "DNS name refused locally");
        return error_reply(&p, RCODE::NameError).map(Decision::Reply);
    }
    Some(Decision::Resolve(q))
}

impl Query {
    /// The checked name, without the trailing dot.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The question's type.
    pub fn qtype(&self) -> QTYPE {
        self.qtype
    }

    /// The question, named by the checked name (`None` only if it is not a valid name,
    /// which [`decide`] rules out).
    fn question(&self) -> Option<Question<'_>> {
        let name = Name::new(&self.name).ok()?;
        Some(Question::new(
            name,
            self.qtype,
            self.qclass,
            self.unicast_response,
        ))
    }

    /// The largest reply the client can receive over `transport`.
    pub fn reply_limit(&self, transport: Transport) -> usize {
        match transport {
            Transport::Tcp => MAX_TCP_MESSAGE,
            Transport::Udp { max_datagram } => {
                let client = self.edns.map_or(MIN_UDP_REPLY, |s| {
                    usize::from(s).clamp(MIN_UDP_REPLY, MAX_UDP_REPLY)
                });
                client.min(max_datagram)
            }
        }
    }

    /// A reply header with the question (and OPT if the client used EDNS).
    fn base_reply(&self, rcode: RCODE) -> Option<Packet<'_>> {
        let mut r = Packet::new_reply(self.id);
        if self.recursion_desired {
            r.set_flags(PacketFlag::RECURSION_DESIRED);
        }
        r.set_flags(PacketFlag::RECURSION_AVAILABLE);
        *r.rcode_mut() = rcode;
        r.questions.push(self.question()?);
        if self.edns.is_some() {
            *r.opt_mut() = Some(reply_opt());
        }
        Some(r)
    }

    /// A reply with `rcode` and, for `A`/`AAAA` questions, the addresses of that family.
    pub fn reply(&self, rcode: RCODE, addrs: &[IpAddr]) -> Option<Vec<u8>> {
        let mut r = self.base_reply(rcode)?;
        let want_v6 = match self.qtype {
            QTYPE::TYPE(TYPE::A) => false,
            QTYPE::TYPE(TYPE::AAAA) => true,
            _ => return r.build_bytes_vec_compressed().ok(),
        };
        let rdata = addrs.iter().filter_map(|a| match a {
            IpAddr::V4(v4) if !want_v6 => Some(RData::A(A::from(*v4))),
            IpAddr::V6(v6) if want_v6 => Some(RData::AAAA(AAAA::from(*v6))),
            _ => None,
        });
        for d in rdata.take(MAX_ANSWERS) {
            let name = r.questions[0].qname.clone();
            r.answers
                .push(ResourceRecord::new(name, CLASS::IN, ANSWER_TTL, d));
        }
        r.build_bytes_vec_compressed().ok()
    }

    /// The truncated form of a reply with `rcode`: TC set, the question, no records.
    fn truncated(&self, rcode: u8) -> Option<Vec<u8>> {
        let mut r = self.base_reply(RCODE::NoError)?;
        r.set_flags(PacketFlag::TRUNCATION);
        let mut out = r.build_bytes_vec_compressed().ok()?;
        let byte = out.get_mut(3)?;
        *byte = (*byte & 0xf0) | (rcode & 0x0f);
        Some(out)
    }

    /// `reply` if it is at most `limit` bytes, else its truncated form.
    pub fn fit(&self, reply: Vec<u8>, limit: usize) -> Option<Vec<u8>> {
        if reply.len() <= limit {
            return Some(reply);
        }
        tracing::debug!(
            len = reply.len(),
            limit,
            "DNS reply truncated for the client"
        );
        self.truncated(wire::rcode(&reply).unwrap_or(0))
    }

    /// The query sent upstream: `id`, the checked name, the client's type and class, EDNS
    /// with `udp_size` only if the client used EDNS.
    fn upstream(&self, id: u16, udp_size: u16) -> Option<Vec<u8>> {
        let mut p = Packet::new_query(id);
        if self.recursion_desired {
            p.set_flags(PacketFlag::RECURSION_DESIRED);
        }
        if self.checking_disabled {
            p.set_flags(PacketFlag::CHECKING_DISABLED);
        }
        p.questions.push(self.question()?);
        if self.edns.is_some() {
            *p.opt_mut() = Some(OPT {
                opt_codes: Vec::new(),
                udp_packet_size: udp_size,
                version: 0,
            });
        }
        p.build_bytes_vec().ok()
    }
}

/// `e` and its sources, joined by `: ` (for debug logs).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Resolves `q` with the host's system resolver.
async fn system(q: &Query) -> Option<Vec<u8>> {
    let is_address = matches!(q.qtype, QTYPE::TYPE(TYPE::A) | QTYPE::TYPE(TYPE::AAAA));
    if !is_address || q.qclass != QCLASS::CLASS(CLASS::IN) {
        return q.reply(RCODE::NoError, &[]);
    }
    let lookup = tokio::net::lookup_host((q.name.as_str(), 0));
    match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            q.reply(RCODE::NoError, &addrs)
        }
        Ok(Err(e)) => {
            tracing::debug!(name = %q.name, error = %e, "host resolver failed");
            q.reply(RCODE::NameError, &[])
        }
        Err(_) => q.reply(RCODE::ServerFailure, &[]),
    }
}

/// Answers `query` (received over UDP) with the host's system resolver under `policy`.
/// Equivalent to a [`DnsResolver`] without servers and a 512-byte path; kept for callers
/// that hold a bare policy.
pub async fn answer(query: &[u8], policy: &Policy) -> Option<Vec<u8>> {
    let q = match decide(query, policy)? {
        Decision::Reply(r) => return Some(r),
        Decision::Resolve(q) => q,
    };
    let limit = q.reply_limit(Transport::Udp {
        max_datagram: MIN_UDP_REPLY,
    });
    q.fit(system(&q).await?, limit)
}

impl DnsResolver {
    pub fn new(cfg: DnsConfig) -> DnsResolver {
        DnsResolver {
            servers: cfg.servers,
            policy: cfg.policy,
            next: AtomicUsize::new(0),
        }
    }

    /// The upstream servers (empty: system resolver).
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The reply to `query`, received over `transport`, or `None` to drop it (garbage, or
    /// a response rather than a query). Never fails otherwise: resolver trouble is SERVFAIL.
    pub async fn answer(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let q = match decide(query, &self.policy)? {
            Decision::Reply(r) => return Some(r),
            Decision::Resolve(q) => q,
        };
        let limit = q.reply_limit(transport);
        let reply = if self.servers.is_empty() {
            system(&q).await?
        } else {
            self.forward(&q, limit).await?
        };
        q.fit(reply, limit)
    }

    /// Forwards `q` to the servers; SERVFAIL when none answered.
    async fn forward(&self, q: &Query, limit: usize) -> Option<Vec<u8>> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let udp_size = u16::try_from(limit.clamp(MIN_UDP_REPLY, MAX_UDP_REPLY)).ok()?;
        for attempt in 0..FORWARD_TRIES {
            let server = self.servers[start.wrapping_add(attempt) % self.servers.len()];
            let sent = q.upstream(rand::random(), udp_size)?;
            let mut reply = match forward::udp(server, &sent, FORWARD_TIMEOUT).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(name = %q.name, error = %chain(&e), "DNS forwarding try failed");
                    continue;
                }
            };
            if wire::truncated(&reply) && limit > MIN_UDP_REPLY {
                match forward::tcp(server, &sent, FORWARD_TIMEOUT).await {
                    Ok(full) => reply = full,
                    Err(e) => {
                        tracing::debug!(name = %q.name, error = %chain(&e), "DNS retry over TCP failed; relaying the truncated reply");
                    }
                }
            }
            wire::set_id(&mut reply, q.id);
            return Some(reply);
        }
        q.reply(RCODE::ServerFailure, &[])
    }
}

#[cfg(test)]
mod tests;
