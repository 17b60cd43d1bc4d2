//! What the guest sends the network stack and its DNS server, on arbitrary bytes: frame
//! classification and DNS query decisions must return, never panic.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use matchlock_net::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let _ = matchlock_net::stack::classify(data, Ipv4Addr::new(10, 0, 2, 2), 1500);
    for policy in [
        Policy::new(std::iter::empty(), true),
        Policy::new(["*.example.com", "a.b"], true),
    ] {
        let _ = matchlock_net::dns::decide(data, &policy);
    }
    let addrs = [IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7))];
    let _ = matchlock_net::dns::resolved(data, Some(&addrs));
    let _ = matchlock_net::dns::server_failure(data);
});
