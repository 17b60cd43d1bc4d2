//! Unit tests of the query decision and reply building (no network).

use std::net::{Ipv4Addr, Ipv6Addr};

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

fn edns_query(name: &str, qtype: TYPE, size: u16) -> Vec<u8> {
    let mut p = Packet::parse(&query(name, qtype))
        .expect("parse")
        .into_owned_for_test();
    *p.opt_mut() = Some(OPT {
        opt_codes: Vec::new(),
        udp_packet_size: size,
        version: 0,
    });
    p.build_bytes_vec().expect("build")
}

trait IntoOwned {
    fn into_owned_for_test(self) -> Packet<'static>;
}

impl IntoOwned for Packet<'_> {
    fn into_owned_for_test(self) -> Packet<'static> {
        let mut p = Packet::new_query(self.id());
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions = self
            .questions
            .into_iter()
            .map(Question::into_owned)
            .collect();
        p
    }
}

fn rcode(reply: &[u8]) -> RCODE {
    Packet::parse(reply).expect("parse reply").rcode()
}

fn resolve(d: Option<Decision>) -> Query {
    match d {
        Some(Decision::Resolve(q)) => q,
        other => panic!("expected a query to resolve: {other:?}"),
    }
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
    let q = resolve(decide(&query("api.example.com", TYPE::TXT), &p));
    assert_eq!(q.name(), "api.example.com");
    assert_eq!(q.qtype(), QTYPE::TYPE(TYPE::TXT));
}

#[test]
fn odd_names_and_garbage() {
    let p = Policy::new(std::iter::empty(), true);
    assert_eq!(decide(b"\x00\x01garbage", &p), None);
    // Bytes outside the hostname alphabet, and a label holding a dot (which would make the
    // checked string differ from the wire name), never reach a resolver.
    let mut dotted = Packet::new_query(0x1234);
    dotted.questions.push(Question::new(
        Name::new("a\\.b.example.com").expect("escaped name"),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    assert_eq!(dotted.questions[0].qname.get_labels().len(), 3);
    let dotted = dotted.build_bytes_vec().expect("build");
    for odd in [query("a b.example.com", TYPE::A), dotted] {
        let Some(Decision::Reply(r)) = decide(&odd, &p) else {
            panic!("{odd:?} must be answered locally");
        };
        assert_eq!(rcode(&r), RCODE::NameError);
    }
    assert!(plausible_name("_sip._tcp.example.com"));
    assert!(!plausible_name("a..b"));
    assert!(!plausible_name(&format!("{}.com", "a".repeat(64))));
    // A response is not a query.
    let mut resp = query("example.com", TYPE::A);
    resp[2] |= 0x80;
    assert_eq!(decide(&resp, &p), None);
}

#[test]
fn address_replies_keep_the_asked_family() {
    let p = Policy::new(std::iter::empty(), true);
    let addrs: Vec<IpAddr> = vec![
        Ipv4Addr::new(198, 51, 100, 7).into(),
        "2001:db8::1".parse::<Ipv6Addr>().expect("v6").into(),
    ];
    let a = resolve(decide(&query("example.com", TYPE::A), &p));
    let r = Packet::parse(&a.reply(RCODE::NoError, &addrs).expect("reply"))
        .expect("parse")
        .into_owned_answers();
    assert_eq!(r, vec![RData::A(A::from(Ipv4Addr::new(198, 51, 100, 7)))]);
    let aaaa = resolve(decide(&query("example.com", TYPE::AAAA), &p));
    let r = Packet::parse(&aaaa.reply(RCODE::NoError, &addrs).expect("reply"))
        .expect("parse")
        .into_owned_answers();
    assert_eq!(
        r,
        vec![RData::AAAA(AAAA::from(
            "2001:db8::1".parse::<Ipv6Addr>().expect("v6")
        ))]
    );
    let txt = resolve(decide(&query("example.com", TYPE::TXT), &p));
    let r = txt.reply(RCODE::NoError, &addrs).expect("reply");
    assert!(Packet::parse(&r).expect("parse").answers.is_empty());
}

trait Answers {
    fn into_owned_answers(self) -> Vec<RData<'static>>;
}

impl Answers for Packet<'_> {
    fn into_owned_answers(self) -> Vec<RData<'static>> {
        self.answers
            .into_iter()
            .map(|a| a.into_owned().rdata)
            .collect()
    }
}

#[test]
fn reply_limits_follow_edns_and_transport() {
    let p = Policy::new(std::iter::empty(), true);
    let udp = Transport::Udp { max_datagram: 1472 };
    let plain = resolve(decide(&query("example.com", TYPE::A), &p));
    assert_eq!(plain.reply_limit(udp), 512);
    assert_eq!(plain.reply_limit(Transport::Tcp), MAX_TCP_MESSAGE);
    for (advertised, limit) in [(100, 512), (1232, 1232), (4096, 1472), (65000, 1472)] {
        let q = resolve(decide(&edns_query("example.com", TYPE::A, advertised), &p));
        assert_eq!(q.reply_limit(udp), limit, "EDNS {advertised}");
        assert_eq!(q.reply_limit(Transport::Tcp), MAX_TCP_MESSAGE);
    }
    let big = resolve(decide(&edns_query("example.com", TYPE::A, 65000), &p));
    assert_eq!(
        big.reply_limit(Transport::Udp {
            max_datagram: 65000
        }),
        MAX_UDP_REPLY
    );
}

#[test]
fn oversized_replies_are_truncated_with_the_rcode_kept() {
    let p = Policy::new(std::iter::empty(), true);
    let q = resolve(decide(&edns_query("example.com", TYPE::TXT, 1232), &p));
    let mut big = vec![0u8; 2000];
    big[3] = 3; // NXDOMAIN
    let t = q.fit(big, 1232).expect("truncated reply");
    let parsed = Packet::parse(&t).expect("parse");
    assert!(parsed.has_flags(PacketFlag::TRUNCATION));
    assert_eq!(parsed.rcode(), RCODE::NameError);
    assert_eq!(parsed.id(), 0x1234);
    assert!(parsed.answers.is_empty());
    assert!(parsed.opt().is_some(), "an EDNS client gets OPT back");
    assert_eq!(parsed.questions.len(), 1);
    let small = vec![1u8; 100];
    assert_eq!(q.fit(small.clone(), 1232), Some(small));
}

#[test]
fn upstream_query_is_rebuilt_from_the_checked_name() {
    let p = Policy::new(std::iter::empty(), true);
    let q = resolve(decide(&edns_query("Api.Example.com", TYPE::TXT, 1232), &p));
    let up = q.upstream(0x9999, 1232).expect("upstream query");
    let parsed = Packet::parse(&up).expect("parse");
    assert_eq!(parsed.id(), 0x9999);
    assert!(parsed.has_flags(PacketFlag::RECURSION_DESIRED));
    assert_eq!(parsed.questions[0].qname.to_string(), "Api.Example.com");
    assert_eq!(parsed.questions[0].qtype, QTYPE::TYPE(TYPE::TXT));
    assert_eq!(parsed.opt().map(|o| o.udp_packet_size), Some(1232));
    let plain = resolve(decide(&query("example.com", TYPE::A), &p));
    let up = plain.upstream(1, 4096).expect("upstream query");
    assert!(Packet::parse(&up).expect("parse").opt().is_none());
}

#[test]
fn notimp_for_other_opcodes_and_question_counts() {
    let p = Policy::new(std::iter::empty(), true);
    let mut two = Packet::new_query(5);
    for n in ["a.example.com", "b.example.com"] {
        two.questions.push(Question::new(
            Name::new_unchecked(n),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
    }
    let Some(Decision::Reply(r)) = decide(&two.build_bytes_vec().expect("build"), &p) else {
        panic!("two questions must be refused locally");
    };
    let parsed = Packet::parse(&r).expect("parse");
    assert_eq!(parsed.rcode(), RCODE::NotImplemented);
    assert!(parsed.questions.is_empty());
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
    assert!(p
        .answers
        .iter()
        .any(|a| a.rdata == RData::A(A::from(Ipv4Addr::LOCALHOST))));
}
