//! The guest's DNS server: every UDP query to port 53, whatever address it was sent to, is
//! answered by the sandbox owner.
//!
//! # Design
//! A query is decided before anything leaves the host: names the policy does not allow get
//! NXDOMAIN locally, so an allow-list also closes DNS as an exfiltration channel (the name
//! never reaches a resolver). Allowed `A` questions are resolved with the host's system
//! resolver (`getaddrinfo` through tokio, so `/etc/hosts` and nsswitch are honoured); other
//! question types get an empty NOERROR answer, other opcodes NOTIMP. Messages are parsed and
//! built with `simple-dns`; a query that does not parse is dropped (no reply to garbage).
//! Names are limited to letters, digits, `-`, `_` and `.`, so the string checked against the
//! policy is exactly the string resolved.
//!
//! # Limitations
//! `AAAA` questions get an empty answer: the guest has no IPv6 route in this slice, and an
//! unusable IPv6 answer would only slow clients down. DNS over TCP is not served (a TCP
//! connection to port 53 is an ordinary flow, subject to the address policy). Answers carry
//! a fixed TTL; the host resolver's TTL is not visible through `getaddrinfo`.

use std::net::IpAddr;
use std::time::Duration;

use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, PacketFlag, ResourceRecord, CLASS, OPCODE, QTYPE, RCODE, TYPE};

use crate::policy::Policy;

/// TTL of every answer, in seconds.
pub const ANSWER_TTL: u32 = 30;
/// Most addresses put in one answer.
pub const MAX_ANSWERS: usize = 16;
/// How long the host resolver may take before the guest gets SERVFAIL.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest name accepted (RFC 1035 limit).
const MAX_NAME: usize = 253;

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Reply with this message right away.
    Reply(Vec<u8>),
    /// Resolve `name` (allowed by the policy) on the host, then call [`resolved`].
    ResolveA { name: String },
}

fn plausible_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A reply to `query` with `rcode` and the given IPv4 answers.
fn reply(query: &Packet<'_>, rcode: RCODE, addrs: &[IpAddr]) -> Option<Vec<u8>> {
    let mut r = Packet::new_reply(query.id());
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        r.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    r.set_flags(PacketFlag::RECURSION_AVAILABLE);
    *r.rcode_mut() = rcode;
    *r.opcode_mut() = query.opcode();
    r.questions = query.questions.clone();
    if let Some(q) = query.questions.first() {
        let v4 = addrs.iter().filter_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
        for a in v4.take(MAX_ANSWERS) {
            let rdata = RData::A(A {
                address: u32::from(a),
            });
            r.answers.push(ResourceRecord::new(
                q.qname.clone(),
                CLASS::IN,
                ANSWER_TTL,
                rdata,
            ));
        }
    }
    r.build_bytes_vec_compressed().ok()
}

/// Decides a query without any I/O. `None`: the message does not parse; drop it.
pub fn decide(query: &[u8], policy: &Policy) -> Option<Decision> {
    let q = Packet::parse(query).ok()?;
    if q.has_flags(PacketFlag::RESPONSE) {
        return None;
    }
    if q.opcode() != OPCODE::StandardQuery || q.questions.len() != 1 {
        return reply(&q, RCODE::NotImplemented, &[]).map(Decision::Reply);
    }
    let question = &q.questions[0];
    let name = question.qname.to_string();
    let name = name.strip_suffix('.').unwrap_or(&name).to_string();
    if !plausible_name(&name) || policy.check_host(&name).is_err() {
        tracing::debug!(name = %name.escape_debug(), "DNS name refused locally");
        return reply(&q, RCODE::NameError, &[]).map(Decision::Reply);
    }
    match question.qtype {
        QTYPE::TYPE(TYPE::A) => Some(Decision::ResolveA { name }),
        _ => reply(&q, RCODE::NoError, &[]).map(Decision::Reply),
    }
}

/// The reply to `query` once its name resolved to `addrs` (`None`: resolution failed,
/// answered NXDOMAIN; `Some([])`: the name exists without IPv4 addresses).
pub fn resolved(query: &[u8], addrs: Option<&[IpAddr]>) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    match addrs {
        Some(a) => reply(&q, RCODE::NoError, a),
        None => reply(&q, RCODE::NameError, &[]),
    }
}

/// A reply saying the server failed (resolver timeout).
pub fn server_failure(query: &[u8]) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    reply(&q, RCODE::ServerFailure, &[])
}

/// Answers `query` completely: decides, resolves with the system resolver if needed.
pub async fn answer(query: &[u8], policy: &Policy) -> Option<Vec<u8>> {
    match decide(query, policy)? {
        Decision::Reply(r) => Some(r),
        Decision::ResolveA { name } => {
            let lookup = tokio::net::lookup_host((name.as_str(), 0));
            match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Ok(Ok(addrs)) => {
                    let addrs: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                    resolved(query, Some(&addrs))
                }
                Ok(Err(e)) => {
                    tracing::debug!(name = %name, error = %e, "host resolver failed");
                    resolved(query, None)
                }
                Err(_) => server_failure(query),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::{Name, Question, QCLASS};

    fn query(name: &str, qtype: TYPE) -> Vec<u8> {
        let mut p = Packet::new_query(0x1234);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(qtype),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.build_bytes_vec().expect("build")
    }

    fn rcode(reply: &[u8]) -> RCODE {
        Packet::parse(reply).expect("parse reply").rcode()
    }

    #[test]
    fn non_allowed_names_are_nxdomain_without_lookup() {
        let p = Policy::new(["*.example.com"], true);
        for t in [TYPE::A, TYPE::TXT, TYPE::AAAA, TYPE::MX] {
            match decide(&query("leak.attacker.test", t), &p) {
                Some(Decision::Reply(r)) => {
                    assert_eq!(rcode(&r), RCODE::NameError);
                    assert_eq!(Packet::parse(&r).expect("parse").id(), 0x1234);
                }
                other => panic!("{t:?}: {other:?}"),
            }
        }
        assert_eq!(
            decide(&query("api.example.com", TYPE::A), &p),
            Some(Decision::ResolveA {
                name: "api.example.com".into()
            })
        );
    }

    #[test]
    fn other_types_empty_and_garbage_dropped() {
        let p = Policy::new(std::iter::empty(), true);
        let Some(Decision::Reply(r)) = decide(&query("example.com", TYPE::TXT), &p) else {
            panic!("TXT must be answered locally");
        };
        let parsed = Packet::parse(&r).expect("parse");
        assert_eq!(parsed.rcode(), RCODE::NoError);
        assert!(parsed.answers.is_empty());
        assert_eq!(decide(b"\x00\x01garbage", &p), None);
        // A name with bytes outside the hostname alphabet never reaches the resolver.
        let Some(Decision::Reply(r)) = decide(&query("a b.example.com", TYPE::A), &p) else {
            panic!("odd name must be answered locally");
        };
        assert_eq!(rcode(&r), RCODE::NameError);
    }

    #[test]
    fn answers_carry_ipv4_only() {
        let q = query("example.com", TYPE::A);
        let addrs: Vec<IpAddr> = vec![
            "198.51.100.7".parse().expect("v4"),
            "2001:db8::1".parse().expect("v6"),
        ];
        let r = resolved(&q, Some(&addrs)).expect("reply");
        let p = Packet::parse(&r).expect("parse");
        assert_eq!(p.rcode(), RCODE::NoError);
        assert_eq!(p.answers.len(), 1);
        assert_eq!(
            p.answers[0].rdata,
            RData::A(A {
                address: u32::from(std::net::Ipv4Addr::new(198, 51, 100, 7))
            })
        );
        assert_eq!(rcode(&resolved(&q, None).expect("nx")), RCODE::NameError);
    }

    #[tokio::test]
    async fn localhost_resolves_through_the_system_resolver() {
        // `localhost` comes from /etc/hosts (or nss-myhostname): never from the network.
        let p = Policy::new(std::iter::empty(), true);
        let r = answer(&query("localhost", TYPE::A), &p)
            .await
            .expect("reply");
        let p = Packet::parse(&r).expect("parse");
        assert_eq!(p.rcode(), RCODE::NoError);
        assert!(p.answers.iter().any(|a| a.rdata
            == RData::A(A {
                address: u32::from(std::net::Ipv4Addr::LOCALHOST)
            })));
    }
}
