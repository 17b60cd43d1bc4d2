//! What the guest sends the network stack and its DNS server, and what an upstream DNS
//! server sends back, on arbitrary bytes: frame classification, ICMP echo parsing and
//! reply framing, TLS ClientHello and HTTP
//! request-line detection,
//! DNS query decisions, reply fitting, upstream-reply validation and the recording of
//! answered addresses must return, never panic.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use matchlock_net::dns::{self, wire, Decision, Transport};
use matchlock_net::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let gw = matchlock_net::stack::Gateways {
        v4: Ipv4Addr::new(10, 0, 2, 2),
        v6: Some(Ipv6Addr::new(0xfd00, 0x6d6c, 0, 0, 0, 0, 0, 2)),
    };
    let _ = matchlock_net::stack::classify(data, gw, 1500);
    // An echo request beyond the gateway, and the reply framed for it.
    if let Some(req) = matchlock_net::icmp::EchoRequest::parse(data) {
        let _ = req.reply_frame([2, 0, 0, 0, 0, 1], &req.data);
    }
    // A raw flow's first bytes (TLS ClientHello detection), and the bytes as a DNS reply
    // whose addresses the stack remembers for raw flows.
    let _ = matchlock_net::tlssniff::sniff(data);
    let _ = matchlock_net::tlssniff::sniff_http(data);
    let mut answered = matchlock_net::answered::Answered::default();
    answered.record(data);
    let _ = answered.allowed_name(
        std::net::IpAddr::V4(Ipv4Addr::LOCALHOST),
        &Policy::new(["*"], true),
    );
    for policy in [
        Policy::new(std::iter::empty(), true),
        Policy::new(["*.example.com", "a.b"], true),
    ] {
        if let Some(Decision::Resolve(q)) = dns::decide(data, &policy) {
            let limit = q.reply_limit(Transport::Udp { max_datagram: 1472 });
            let _ = q.reply_limit(Transport::Tcp);
            // The bytes as an upstream reply to this query, fitted to the client.
            let _ = q.fit(data.to_vec(), limit);
            let _ = q.fit(data.to_vec(), 12);
        }
    }
    // Upstream replies: one half as the query sent, the other as the reply.
    let (sent, reply) = data.split_at(data.len() / 2);
    let _ = wire::answers(sent, reply);
    let _ = wire::question(data);
    let _ = wire::truncated(data);
    let _ = wire::rcode(data);
    let _ = wire::id(data);
});
