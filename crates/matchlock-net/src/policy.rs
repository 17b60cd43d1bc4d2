//! Allow-list globs (spec §7.5.2), runtime allow-list changes (§7.5.3), and the address
//! ranges a guest may never reach unless the user opts out (`block_private_ips: false`).
//!
//! # Design
//! Unlike the reference, private ranges are blocked in every mode, not only under
//! interception, and the check runs on the address a connection is about to use (never on a
//! name), including IPv4-mapped and IPv4-compatible IPv6 forms, so `::ffff:127.0.0.1` is
//! loopback. Globs keep the reference's semantics exactly (case-sensitive, `*.a.b` does not
//! match `a.b`); ports are stripped correctly for bracketed IPv6 literals.
//!
//! # Limitations
//! The allow-list matches names as the guest wrote them (Host header, SNI, DNS question);
//! a name the list does not match is denied (fail closed), whatever its case.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::RwLock;

/// The reference's glob (§7.5.2): `*` alone matches anything; `*.suffix` a host ending
/// with `.suffix`; `prefix.*` a host starting with `prefix.`; other `*`s match any run (dots
/// included), parts in order; no `*` is exact equality.
pub fn glob_match(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let stars = pattern.matches('*').count();
    if stars == 0 {
        return pattern == host;
    }
    if stars == 1 {
        if let Some(suffix) = pattern.strip_prefix("*.") {
            return host.ends_with(&format!(".{suffix}"));
        }
        if let Some(prefix) = pattern.strip_suffix(".*") {
            return host.starts_with(&format!("{prefix}."));
        }
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, rest) = match parts.split_first() {
        Some(p) => p,
        None => return false,
    };
    let Some(mut remainder) = host.strip_prefix(first) else {
        return false;
    };
    let (last, middle) = match rest.split_last() {
        Some(p) => p,
        None => return false,
    };
    for part in middle {
        match remainder.find(part) {
            Some(i) => remainder = &remainder[i + part.len()..],
            None => return false,
        }
    }
    remainder.len() >= last.len() && remainder.ends_with(last)
}

/// `host` without a `:port` suffix; `[v6]:port` and bare IPv6 literals are kept whole.
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    if host.matches(':').count() > 1 {
        return host; // a bare IPv6 literal
    }
    host.split(':').next().unwrap_or(host)
}

/// Why an address is not reachable from a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockedRange {
    Unspecified,
    ThisNetwork,
    Loopback,
    Private,
    SharedAddressSpace,
    LinkLocal,
    Multicast,
    Broadcast,
    Reserved,
    UniqueLocal,
    Documentation,
}

impl BlockedRange {
    pub fn describe(self) -> &'static str {
        match self {
            BlockedRange::Unspecified => "unspecified address",
            BlockedRange::ThisNetwork => "\"this network\" (0.0.0.0/8)",
            BlockedRange::Loopback => "loopback",
            BlockedRange::Private => "private network (RFC 1918)",
            BlockedRange::SharedAddressSpace => "carrier-grade NAT (100.64.0.0/10)",
            BlockedRange::LinkLocal => "link-local (incl. cloud metadata 169.254.169.254)",
            BlockedRange::Multicast => "multicast",
            BlockedRange::Broadcast => "broadcast",
            BlockedRange::Reserved => "reserved (240.0.0.0/4)",
            BlockedRange::UniqueLocal => "IPv6 unique local (fc00::/7)",
            BlockedRange::Documentation => "documentation range",
        }
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<BlockedRange> {
    let o = ip.octets();
    Some(match o {
        [0, 0, 0, 0] => BlockedRange::Unspecified,
        [0, ..] => BlockedRange::ThisNetwork,
        [127, ..] => BlockedRange::Loopback,
        [10, ..] | [192, 168, ..] => BlockedRange::Private,
        [172, b, ..] if (16..=31).contains(&b) => BlockedRange::Private,
        [100, b, ..] if (64..=127).contains(&b) => BlockedRange::SharedAddressSpace,
        [169, 254, ..] => BlockedRange::LinkLocal,
        [255, 255, 255, 255] => BlockedRange::Broadcast,
        [a, ..] if (224..=239).contains(&a) => BlockedRange::Multicast,
        [a, ..] if a >= 240 => BlockedRange::Reserved,
        _ => return None,
    })
}

/// The IPv4 address in the low 32 bits of `ip`.
fn embedded_v4(ip: Ipv6Addr) -> Ipv4Addr {
    let o = ip.octets();
    Ipv4Addr::new(o[12], o[13], o[14], o[15])
}

fn classify_v6(ip: Ipv6Addr) -> Option<BlockedRange> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let s = ip.segments();
    // IPv4-compatible (::a.b.c.d, deprecated) is treated as the IPv4 address it embeds.
    if s[..6].iter().all(|x| *x == 0) && !ip.is_loopback() && !ip.is_unspecified() {
        return classify_v4(embedded_v4(ip));
    }
    Some(match s[0] {
        _ if ip.is_unspecified() => BlockedRange::Unspecified,
        _ if ip.is_loopback() => BlockedRange::Loopback,
        x if x & 0xfe00 == 0xfc00 => BlockedRange::UniqueLocal,
        x if x & 0xffc0 == 0xfe80 => BlockedRange::LinkLocal,
        x if x & 0xff00 == 0xff00 => BlockedRange::Multicast,
        0x2001 if s[1] == 0x0db8 => BlockedRange::Documentation,
        // 64:ff9b::/96 (NAT64) embeds an IPv4 address: judge that address.
        0x0064 if s[1] == 0xff9b && s[2..6].iter().all(|x| *x == 0) => {
            return classify_v4(embedded_v4(ip))
        }
        _ => return None,
    })
}

/// The blocked range `ip` falls in, if any.
pub fn blocked_range(ip: IpAddr) -> Option<BlockedRange> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// The sandbox's allow-list; empty means every host is allowed (spec §7.5.3).
#[derive(Debug, Default)]
pub struct AllowList {
    hosts: RwLock<Vec<String>>,
}

fn cleaned<'a>(hosts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    hosts
        .into_iter()
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect()
}

impl AllowList {
    pub fn new<'a>(hosts: impl IntoIterator<Item = &'a str>) -> AllowList {
        let list = AllowList::default();
        list.add(hosts);
        list
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<String>> {
        self.hosts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<String>> {
        self.hosts
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds hosts (trimmed; empties and hosts already present skipped); returns the ones
    /// newly added, in order.
    pub fn add<'a>(&self, hosts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut list = self.write();
        let mut added = Vec::new();
        for h in cleaned(hosts) {
            if !list.contains(&h) {
                list.push(h.clone());
                added.push(h);
            }
        }
        added
    }

    /// Removes every occurrence of the given hosts; returns the removed ones in allow-list
    /// order, without duplicates.
    pub fn delete<'a>(&self, hosts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let gone = cleaned(hosts);
        let mut list = self.write();
        let mut removed: Vec<String> = Vec::new();
        list.retain(|h| {
            if gone.contains(h) {
                if !removed.contains(h) {
                    removed.push(h.clone());
                }
                false
            } else {
                true
            }
        });
        removed
    }

    pub fn hosts(&self) -> Vec<String> {
        self.read().clone()
    }

    /// Whether `host` (a name or an IP literal, port stripped) matches; empty list = all.
    pub fn allows(&self, host: &str) -> bool {
        let list = self.read();
        list.is_empty() || list.iter().any(|p| glob_match(p, host))
    }
}

/// Why the policy refused a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    NotAllowed { host: String },
    BlockedAddress { addr: IpAddr, range: BlockedRange },
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::NotAllowed { host } => write!(f, "host {host:?} is not in the allow-list"),
            Denied::BlockedAddress { addr, range } => {
                write!(
                    f,
                    "address {addr} is in a blocked range: {}",
                    range.describe()
                )
            }
        }
    }
}

/// A sandbox's egress policy.
#[derive(Debug)]
pub struct Policy {
    pub allow: AllowList,
    /// Refuse blocked ranges (default true; `block_private_ips: false` opts out).
    pub block_private: bool,
}

impl Policy {
    pub fn new<'a>(hosts: impl IntoIterator<Item = &'a str>, block_private: bool) -> Policy {
        Policy {
            allow: AllowList::new(hosts),
            block_private,
        }
    }

    /// Whether the guest may talk to `host` by name (before any address is known).
    pub fn check_host(&self, host: &str) -> Result<(), Denied> {
        let host = strip_port(host);
        if self.allow.allows(host) {
            Ok(())
        } else {
            Err(Denied::NotAllowed {
                host: host.to_string(),
            })
        }
    }

    /// Whether a connection for `host` may go to `addr`, the address the host resolved and
    /// is about to connect to. Both the name and the address must pass.
    pub fn check_connect(&self, host: &str, addr: IpAddr) -> Result<(), Denied> {
        self.check_host(host)?;
        self.check_addr(addr)
    }

    /// The address check alone (for flows without a name, e.g. raw TCP to an IP).
    pub fn check_addr(&self, addr: IpAddr) -> Result<(), Denied> {
        match blocked_range(addr) {
            Some(range) if self.block_private => Err(Denied::BlockedAddress { addr, range }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_table() {
        let cases = [
            ("*", "anything.example.com", true),
            ("*", "", true),
            ("example.com", "example.com", true),
            ("example.com", "api.example.com", false),
            ("*.example.com", "api.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "badexample.com", false),
            ("api.*", "api.example.com", true),
            ("api.*", "api", false),
            ("api-*.example.com", "api-v1.example.com", true),
            ("api-*.example.com", "api-.example.com", true),
            ("api-*.example.com", "web-v1.example.com", false),
            ("*.*.example.com", "a.b.example.com", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "acb", false),
            ("ab*ba", "aba", false),
            ("Example.com", "example.com", false),
            ("", "", true),
            ("", "a", false),
        ];
        for (p, h, want) in cases {
            assert_eq!(glob_match(p, h), want, "{p:?} vs {h:?}");
        }
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("example.com:443"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:443"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("10.0.0.1:80"), "10.0.0.1");
    }

    #[test]
    fn blocked_ranges() {
        let blocked = [
            "192.168.1.1",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "127.0.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ];
        for a in blocked {
            let ip: IpAddr = a.parse().expect("ip");
            assert!(blocked_range(ip).is_some(), "{a} must be blocked");
        }
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = a.parse().expect("ip");
            assert_eq!(blocked_range(ip), None, "{a} must be allowed");
        }
    }

    #[test]
    fn allow_list_changes() {
        let l = AllowList::new([" a.com ", "", "b.com", "a.com"]);
        assert_eq!(l.hosts(), ["a.com", "b.com"]);
        assert_eq!(l.add(["c.com", "a.com", " "]), ["c.com"]);
        assert_eq!(l.delete(["b.com", "b.com", "zzz"]), ["b.com"]);
        assert_eq!(l.hosts(), ["a.com", "c.com"]);
        assert!(l.allows("a.com") && !l.allows("b.com"));
        assert_eq!(l.delete(["a.com", "c.com"]).len(), 2);
        assert!(l.allows("anything"), "an emptied list allows every host");
    }

    #[test]
    fn policy_checks_name_and_address() {
        let p = Policy::new(["*.example.com"], true);
        assert!(p.check_host("api.example.com:443").is_ok());
        assert!(matches!(
            p.check_host("evil.com"),
            Err(Denied::NotAllowed { .. })
        ));
        let private: IpAddr = "10.0.0.5".parse().expect("ip");
        let public: IpAddr = "93.184.216.34".parse().expect("ip");
        assert!(p.check_connect("api.example.com", public).is_ok());
        let e = p
            .check_connect("api.example.com", private)
            .expect_err("rebinding");
        assert!(e.to_string().contains("private network"), "{e}");
        let open = Policy::new([], false);
        assert!(open.check_connect("x", private).is_ok());
    }
}
