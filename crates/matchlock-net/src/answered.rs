//! The addresses the owner's DNS answered to the guest, and for which names: under an
//! allow-list, a raw TCP flow (any port but 80/443 under interception) to such an address
//! is allowed while the name it was answered for still is.
//!
//! # Design
//! The stack records every DNS reply it sends the guest, over UDP or TCP
//! ([`Answered::record`]; the DNS-over-TCP tasks share the table with the loop behind a
//! mutex held only for one reply's insertions or one lookup):
//! each `A`/`AAAA` record's address is tied to the question's name (the name the policy
//! judged before answering; a CNAME chain's intermediate names are not), for the record's
//! TTL clamped to [`MIN_TTL`]..[`MAX_TTL`]. [`Answered::allows`] is asked only after the
//! IP literal itself was refused as not allowed, and requires a recorded name the policy
//! still allows ([`Policy::check_host`], so `allow-list delete` takes effect at once); the
//! caller still applies the blocked ranges ([`Policy::check_addr`]). Under interception,
//! TLS on such a flow is then judged again by its own SNI / Host in the interceptor.
//!
//! Bounded: at most [`MAX_ADDRS`] addresses (expired entries are swept when it is full,
//! then new addresses are not recorded: fewer flows allowed, never more) and
//! [`MAX_NAMES_PER_ADDR`] names per address (a few MiB in the worst case of maximal names,
//! tens of KiB in practice).
//!
//! # Limitations
//! The address is not tied to the connection that follows
//! (any guest flow may use an address any allowed name resolved to), and a name that is
//! allowed but resolves to an address shared with other services (a CDN) lets raw TCP reach
//! that address on every port.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use simple_dns::rdata::RData;
use simple_dns::Packet;

use crate::policy::Policy;

/// Most addresses remembered per sandbox.
pub const MAX_ADDRS: usize = 4096;
/// Most names remembered per address.
pub const MAX_NAMES_PER_ADDR: usize = 4;
/// Shortest time an answer is remembered (clients cache answers with a short TTL longer).
pub const MIN_TTL: Duration = Duration::from_secs(300);
/// Longest time an answer is remembered.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// Addresses answered to the guest: address -> (name, expiry).
#[derive(Debug, Default)]
pub struct Answered {
    map: HashMap<IpAddr, Vec<(String, Instant)>>,
}

impl Answered {
    /// Remembers the `A`/`AAAA` addresses of a reply the guest is sent. Unparseable replies
    /// and replies without exactly one question are ignored.
    pub fn record(&mut self, reply: &[u8]) {
        let Ok(p) = Packet::parse(reply) else {
            return;
        };
        let [q] = p.questions.as_slice() else {
            return;
        };
        let name = q.qname.to_string();
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let now = Instant::now();
        for rr in &p.answers {
            let ip = match &rr.rdata {
                RData::A(a) => IpAddr::from(std::net::Ipv4Addr::from(a.address)),
                RData::AAAA(a) => IpAddr::from(std::net::Ipv6Addr::from(a.address)),
                _ => continue,
            };
            let ttl = Duration::from_secs(u64::from(rr.ttl)).clamp(MIN_TTL, MAX_TTL);
            self.insert(ip, &name, now + ttl);
        }
    }

    fn insert(&mut self, ip: IpAddr, name: &str, until: Instant) {
        if !self.map.contains_key(&ip) && self.map.len() >= MAX_ADDRS {
            self.sweep();
            if self.map.len() >= MAX_ADDRS {
                tracing::debug!(%ip, "answered-address table full: not recorded");
                return;
            }
        }
        let names = self.map.entry(ip).or_default();
        if let Some(e) = names.iter_mut().find(|(n, _)| n == name) {
            e.1 = e.1.max(until);
            return;
        }
        names.retain(|(_, t)| *t > Instant::now());
        if names.len() < MAX_NAMES_PER_ADDR {
            names.push((name.to_string(), until));
        }
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        self.map.retain(|_, names| {
            names.retain(|(_, t)| *t > now);
            !names.is_empty()
        });
    }

    /// The allowed name `ip` was answered for (unexpired), if any.
    pub fn allowed_name(&self, ip: IpAddr, policy: &Policy) -> Option<&str> {
        let now = Instant::now();
        self.map
            .get(&ip)?
            .iter()
            .find(|(n, t)| *t > now && policy.check_host(n).is_ok())
            .map(|(n, _)| n.as_str())
    }

    /// Addresses remembered (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::rdata::{A, AAAA};
    use simple_dns::{Name, Question, ResourceRecord, CLASS, QCLASS, QTYPE, TYPE};

    fn reply(name: &str, owner: &str, addrs: &[IpAddr]) -> Vec<u8> {
        let mut p = Packet::new_reply(1);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        for a in addrs {
            let rdata = match a {
                IpAddr::V4(v4) => RData::A(A::from(*v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA::from(*v6)),
            };
            p.answers.push(ResourceRecord::new(
                Name::new_unchecked(owner),
                CLASS::IN,
                5,
                rdata,
            ));
        }
        p.build_bytes_vec().expect("build")
    }

    #[test]
    fn answers_allow_their_addresses_while_the_name_is_allowed() {
        let policy = Policy::new(["api.test"], true);
        let mut a = Answered::default();
        let v4: IpAddr = "203.0.113.9".parse().expect("ip");
        let v6: IpAddr = "2001:2::9".parse().expect("ip");
        let other: IpAddr = "203.0.113.10".parse().expect("ip");
        // The question's name counts, not the record owner (a CNAME target).
        a.record(&reply("API.test.", "cdn.example", &[v4, v6]));
        assert_eq!(a.allowed_name(v4, &policy), Some("api.test"));
        assert_eq!(a.allowed_name(v6, &policy), Some("api.test"));
        assert_eq!(a.allowed_name(other, &policy), None);
        // A name the policy refuses opens nothing, and a deleted name stops counting.
        a.record(&reply("evil.test", "evil.test", &[other]));
        assert_eq!(a.allowed_name(other, &policy), None);
        policy.allow.delete(["api.test"]);
        policy.allow.add(["web.test"]);
        assert_eq!(a.allowed_name(v4, &policy), None);
        // Garbage is ignored.
        a.record(b"\x00\x01garbage");
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn the_table_is_bounded() {
        let policy = Policy::new(["n.test"], true);
        let mut a = Answered::default();
        for i in 0..(MAX_ADDRS as u32 + 10) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0xcb00_0000 + i));
            a.record(&reply("n.test", "n.test", &[ip]));
        }
        assert_eq!(a.len(), MAX_ADDRS);
        let ip = IpAddr::from(std::net::Ipv4Addr::from(0xcb00_0001));
        for i in 0..20 {
            a.record(&reply(&format!("x{i}.n.test"), "x", &[ip]));
        }
        assert!(a
            .map
            .get(&ip)
            .is_some_and(|n| n.len() == MAX_NAMES_PER_ADDR));
        assert_eq!(a.allowed_name(ip, &policy), Some("n.test"));
    }
}
