//! The guest DNS resolver against a real DNS server on 127.0.0.1 (UDP and TCP on one
//! ephemeral port), written here with simple-dns: it answers fixed records, can be told to
//! truncate or to send spoofed replies, and logs every question it receives, so the tests
//! assert what did and did not leave the resolver. Nothing leaves loopback.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use matchlock_net::dns::{serve_tcp, DnsConfig, DnsResolver, Transport, MAX_TCP_QUERIES};
use matchlock_net::policy::Policy;
use simple_dns::rdata::{RData, A, AAAA, OPT, TXT};
use simple_dns::{
    Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, QCLASS, QTYPE, RCODE, TYPE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// Size of the TXT payload of `big.test` (needs TCP without a large EDNS size).
const BIG_TXT: usize = 3000;
const A_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const SPOOF_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Udp,
    Tcp,
}

/// How the test server misbehaves over UDP.
#[derive(Debug, Clone, Copy, Default)]
struct Behaviour {
    /// Ignore EDNS: truncate every UDP reply above 512 bytes.
    udp_512: bool,
    /// Before the real reply, send one with a wrong ID and a different address.
    spoof_first: bool,
    /// Send only a wrong-ID reply (never the real one).
    spoof_only: bool,
    /// Never answer at all.
    silent: bool,
}

struct TestServer {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<(Proto, String, TYPE)>>>,
}

impl TestServer {
    fn log(&self) -> Vec<(Proto, String, TYPE)> {
        self.log.lock().expect("log").clone()
    }

    fn names(&self) -> Vec<String> {
        self.log().into_iter().map(|(_, n, _)| n).collect()
    }
}

/// The full reply to `query` (records by name), with `wrong_id` the spoofed form.
fn reply_for(query: &Packet<'_>, spoofed: bool) -> Vec<u8> {
    let id = if spoofed {
        query.id().wrapping_add(1)
    } else {
        query.id()
    };
    let mut r = Packet::new_reply(id);
    r.set_flags(PacketFlag::RECURSION_AVAILABLE);
    let q = &query.questions[0];
    r.questions.push(q.clone());
    if query.opt().is_some() {
        *r.opt_mut() = Some(OPT {
            opt_codes: Vec::new(),
            udp_packet_size: 4096,
            version: 0,
        });
    }
    let name = q.qname.to_string();
    let name = name.trim_end_matches('.');
    let big = "x".repeat(200);
    let rdata: Vec<RData<'_>> = match (name, q.qtype) {
        (_, QTYPE::TYPE(TYPE::A)) if spoofed => vec![RData::A(A::from(SPOOF_ADDR))],
        (_, QTYPE::TYPE(TYPE::A)) => vec![RData::A(A::from(A_ADDR))],
        (_, QTYPE::TYPE(TYPE::AAAA)) => {
            vec![RData::AAAA(AAAA::from(
                "2001:db8::7".parse::<Ipv6Addr>().expect("v6"),
            ))]
        }
        ("big.test", QTYPE::TYPE(TYPE::TXT)) => (0..BIG_TXT / 200)
            .map(|_| RData::TXT(TXT::new().with_string(&big).expect("txt")))
            .collect(),
        (_, QTYPE::TYPE(TYPE::TXT)) => {
            vec![RData::TXT(TXT::new().with_string("hello").expect("txt"))]
        }
        _ => Vec::new(),
    };
    for d in rdata {
        r.answers
            .push(ResourceRecord::new(q.qname.clone(), CLASS::IN, 60, d));
    }
    r.build_bytes_vec().expect("build reply")
}

/// The reply cut to `limit`: header and question with TC.
fn truncate(query: &Packet<'_>) -> Vec<u8> {
    let mut r = Packet::new_reply(query.id());
    r.set_flags(PacketFlag::TRUNCATION);
    r.questions.push(query.questions[0].clone());
    r.build_bytes_vec().expect("build")
}

fn record(log: &Mutex<Vec<(Proto, String, TYPE)>>, proto: Proto, q: &Packet<'_>) {
    let question = &q.questions[0];
    let t = match question.qtype {
        QTYPE::TYPE(t) => t,
        _ => TYPE::NULL,
    };
    let name = question.qname.to_string();
    log.lock()
        .expect("log")
        .push((proto, name.trim_end_matches('.').to_string(), t));
}

async fn serve_udp(sock: UdpSocket, b: Behaviour, log: Arc<Mutex<Vec<(Proto, String, TYPE)>>>) {
    let mut buf = vec![0; 65_535];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
            return;
        };
        let Ok(q) = Packet::parse(&buf[..n]) else {
            continue;
        };
        record(&log, Proto::Udp, &q);
        if b.silent {
            continue;
        }
        if b.spoof_first || b.spoof_only {
            let _ = sock.send_to(&reply_for(&q, true), peer).await;
        }
        if b.spoof_only {
            continue;
        }
        let full = reply_for(&q, false);
        let limit = match q.opt() {
            Some(o) if !b.udp_512 => usize::from(o.udp_packet_size).max(512),
            _ => 512,
        };
        let reply = if full.len() > limit {
            truncate(&q)
        } else {
            full
        };
        let _ = sock.send_to(&reply, peer).await;
    }
}

async fn serve_tcp_upstream(listener: TcpListener, log: Arc<Mutex<Vec<(Proto, String, TYPE)>>>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            return;
        };
        let log = log.clone();
        tokio::spawn(async move {
            let Ok(len) = conn.read_u16().await else {
                return;
            };
            let mut msg = vec![0; usize::from(len)];
            if conn.read_exact(&mut msg).await.is_err() {
                return;
            }
            let Ok(q) = Packet::parse(&msg) else {
                return;
            };
            record(&log, Proto::Tcp, &q);
            let reply = reply_for(&q, false);
            let len = u16::try_from(reply.len()).expect("reply fits TCP");
            let _ = conn.write_all(&len.to_be_bytes()).await;
            let _ = conn.write_all(&reply).await;
        });
    }
}

/// Starts a test DNS server on 127.0.0.1, UDP and TCP on the same ephemeral port.
async fn server(b: Behaviour) -> TestServer {
    let log = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..20 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind UDP");
        let addr = udp.local_addr().expect("addr");
        let Ok(tcp) = TcpListener::bind(addr).await else {
            continue; // the TCP port is taken: try another
        };
        tokio::spawn(serve_udp(udp, b, log.clone()));
        tokio::spawn(serve_tcp_upstream(tcp, log.clone()));
        return TestServer { addr, log };
    }
    panic!("no free port for UDP and TCP together");
}

fn resolver(servers: Vec<SocketAddr>, allow: &[&str]) -> Arc<DnsResolver> {
    Arc::new(DnsResolver::new(DnsConfig {
        servers,
        policy: Arc::new(Policy::new(allow.iter().copied(), true)),
    }))
}

fn query(id: u16, name: &str, qtype: TYPE, edns: Option<u16>) -> Vec<u8> {
    let mut p = Packet::new_query(id);
    p.set_flags(PacketFlag::RECURSION_DESIRED);
    p.questions.push(Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(qtype),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    if let Some(size) = edns {
        *p.opt_mut() = Some(OPT {
            opt_codes: Vec::new(),
            udp_packet_size: size,
            version: 0,
        });
    }
    p.build_bytes_vec().expect("build query")
}

const UDP_PATH: Transport = Transport::Udp { max_datagram: 4096 };

async fn ask(r: &DnsResolver, q: &[u8], t: Transport) -> Vec<u8> {
    r.answer(q, t).await.expect("a reply")
}

fn txt_len(p: &Packet<'_>) -> usize {
    p.answers
        .iter()
        .map(|a| match &a.rdata {
            RData::TXT(t) => t
                .iter_raw()
                .map(|(k, v)| k.len() + v.map_or(0, |v| v.len() + 1))
                .sum(),
            _ => 0,
        })
        .sum()
}

#[tokio::test]
async fn forwards_a_aaaa_and_txt_to_the_configured_server() {
    let s = server(Behaviour::default()).await;
    let r = resolver(vec![s.addr], &[]);
    let reply = ask(&r, &query(0x0a0a, "a.test", TYPE::A, None), UDP_PATH).await;
    let p = Packet::parse(&reply).expect("parse");
    assert_eq!(p.id(), 0x0a0a, "the guest's ID is restored");
    assert_eq!(p.rcode(), RCODE::NoError);
    assert_eq!(p.answers.len(), 1);
    assert_eq!(p.answers[0].rdata, RData::A(A::from(A_ADDR)));

    let reply = ask(&r, &query(2, "a.test", TYPE::AAAA, None), UDP_PATH).await;
    let p = Packet::parse(&reply).expect("parse");
    assert_eq!(
        p.answers[0].rdata,
        RData::AAAA(AAAA::from("2001:db8::7".parse::<Ipv6Addr>().expect("v6")))
    );

    let reply = ask(&r, &query(3, "t.test", TYPE::TXT, None), UDP_PATH).await;
    let p = Packet::parse(&reply).expect("parse");
    assert_eq!(txt_len(&p), "hello".len());
    assert_eq!(
        s.log(),
        vec![
            (Proto::Udp, "a.test".to_string(), TYPE::A),
            (Proto::Udp, "a.test".to_string(), TYPE::AAAA),
            (Proto::Udp, "t.test".to_string(), TYPE::TXT),
        ]
    );
}

#[tokio::test]
async fn names_outside_the_allow_list_never_leave_the_host() {
    let s = server(Behaviour::default()).await;
    let r = resolver(vec![s.addr], &["*.allowed.test"]);
    for t in [TYPE::TXT, TYPE::A, TYPE::AAAA, TYPE::MX] {
        let reply = ask(
            &r,
            &query(7, "secret-data.attacker.test", t, None),
            UDP_PATH,
        )
        .await;
        let p = Packet::parse(&reply).expect("parse");
        assert_eq!(p.rcode(), RCODE::NameError, "{t:?}");
        assert_eq!(p.id(), 7);
        // Over TCP too.
        let reply = ask(
            &r,
            &query(8, "secret-data.attacker.test", t, None),
            Transport::Tcp,
        )
        .await;
        assert_eq!(
            Packet::parse(&reply).expect("parse").rcode(),
            RCODE::NameError
        );
    }
    let reply = ask(&r, &query(9, "ok.allowed.test", TYPE::TXT, None), UDP_PATH).await;
    assert_eq!(
        Packet::parse(&reply).expect("parse").rcode(),
        RCODE::NoError
    );
    assert_eq!(s.names(), vec!["ok.allowed.test".to_string()]);
}

#[tokio::test]
async fn truncated_udp_reply_is_fetched_again_over_tcp() {
    let s = server(Behaviour {
        udp_512: true,
        ..Behaviour::default()
    })
    .await;
    let r = resolver(vec![s.addr], &[]);
    // A guest asking over TCP gets the whole answer.
    let reply = ask(&r, &query(11, "big.test", TYPE::TXT, None), Transport::Tcp).await;
    let p = Packet::parse(&reply).expect("parse");
    assert!(!p.has_flags(PacketFlag::TRUNCATION));
    assert_eq!(p.id(), 11);
    assert_eq!(txt_len(&p), BIG_TXT);
    assert_eq!(
        s.log(),
        vec![
            (Proto::Udp, "big.test".to_string(), TYPE::TXT),
            (Proto::Tcp, "big.test".to_string(), TYPE::TXT),
        ]
    );
    // So does a UDP guest with a 4096-byte EDNS size.
    let reply = ask(&r, &query(12, "big.test", TYPE::TXT, Some(4096)), UDP_PATH).await;
    let p = Packet::parse(&reply).expect("parse");
    assert!(!p.has_flags(PacketFlag::TRUNCATION));
    assert_eq!(txt_len(&p), BIG_TXT);
    assert_eq!(s.log().len(), 4);
    // A plain UDP guest (512 bytes) gets TC and no host-side TCP retry: it retries itself.
    let reply = ask(&r, &query(13, "big.test", TYPE::TXT, None), UDP_PATH).await;
    let p = Packet::parse(&reply).expect("parse");
    assert!(p.has_flags(PacketFlag::TRUNCATION));
    assert!(p.answers.is_empty());
    assert_eq!(s.log().len(), 5);
}

#[tokio::test]
async fn the_clients_edns_size_bounds_udp_replies() {
    let s = server(Behaviour::default()).await;
    let r = resolver(vec![s.addr], &[]);
    // 1232 bytes advertised: the 3000-byte answer is truncated, within the size.
    let reply = ask(&r, &query(21, "big.test", TYPE::TXT, Some(1232)), UDP_PATH).await;
    assert!(reply.len() <= 1232);
    let p = Packet::parse(&reply).expect("parse");
    assert!(p.has_flags(PacketFlag::TRUNCATION));
    assert!(p.answers.is_empty());
    assert_eq!(p.id(), 21);
    assert!(p.opt().is_some());
    // 4096 advertised but a 1472-byte path: truncated too.
    let small_path = Transport::Udp { max_datagram: 1472 };
    let reply = ask(
        &r,
        &query(22, "big.test", TYPE::TXT, Some(4096)),
        small_path,
    )
    .await;
    assert!(reply.len() <= 1472);
    assert!(Packet::parse(&reply)
        .expect("parse")
        .has_flags(PacketFlag::TRUNCATION));
    // 4096 on a path that carries it: the whole answer.
    let reply = ask(&r, &query(23, "big.test", TYPE::TXT, Some(4096)), UDP_PATH).await;
    assert!(reply.len() > 3000);
    let p = Packet::parse(&reply).expect("parse");
    assert!(!p.has_flags(PacketFlag::TRUNCATION));
    assert_eq!(txt_len(&p), BIG_TXT);
}

#[tokio::test]
async fn a_reply_with_another_id_is_dropped() {
    // The spoofed reply comes first and points elsewhere; the real one must win.
    let s = server(Behaviour {
        spoof_first: true,
        ..Behaviour::default()
    })
    .await;
    let r = resolver(vec![s.addr], &[]);
    let reply = ask(&r, &query(31, "a.test", TYPE::A, None), UDP_PATH).await;
    let p = Packet::parse(&reply).expect("parse");
    assert_eq!(p.answers[0].rdata, RData::A(A::from(A_ADDR)));

    // Only spoofed replies: both tries time out and the guest gets SERVFAIL.
    let s = server(Behaviour {
        spoof_only: true,
        ..Behaviour::default()
    })
    .await;
    let r = resolver(vec![s.addr], &[]);
    let t = Instant::now();
    let reply = ask(&r, &query(32, "a.test", TYPE::A, None), UDP_PATH).await;
    let p = Packet::parse(&reply).expect("parse");
    assert_eq!(p.rcode(), RCODE::ServerFailure);
    assert!(p.answers.is_empty());
    assert!(t.elapsed() >= Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(s.log().len(), 2, "two tries");
}

#[tokio::test]
async fn a_silent_server_is_skipped_for_the_next() {
    let dead = server(Behaviour {
        silent: true,
        ..Behaviour::default()
    })
    .await;
    let live = server(Behaviour::default()).await;
    let r = resolver(vec![dead.addr, live.addr], &[]);
    let reply = ask(&r, &query(41, "a.test", TYPE::A, None), UDP_PATH).await;
    assert_eq!(
        Packet::parse(&reply).expect("parse").answers[0].rdata,
        RData::A(A::from(A_ADDR))
    );
    assert_eq!(dead.names(), vec!["a.test".to_string()]);
    assert_eq!(live.names(), vec!["a.test".to_string()]);
    // Round robin: the next query starts with the live server.
    let _ = ask(&r, &query(42, "b.test", TYPE::A, None), UDP_PATH).await;
    assert_eq!(live.names().len(), 2);
    assert_eq!(dead.names().len(), 1);
}

/// Writes `msgs` length-prefixed on one go.
fn framed(msgs: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        out.extend_from_slice(&u16::try_from(m.len()).expect("len").to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

async fn read_reply(c: &mut tokio::io::DuplexStream) -> Option<Vec<u8>> {
    let len = c.read_u16().await.ok()?;
    let mut m = vec![0; usize::from(len)];
    c.read_exact(&mut m).await.ok()?;
    Some(m)
}

#[tokio::test]
async fn serve_tcp_answers_pipelined_queries_in_order() {
    let s = server(Behaviour::default()).await;
    let r = resolver(vec![s.addr], &["*.test"]);
    let (mut client, srv) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(serve_tcp(srv, r));
    // The first is forwarded (slow), the second refused locally (instant): order is kept.
    let msgs = [
        query(51, "big.test", TYPE::TXT, None),
        query(52, "leak.example.com", TYPE::TXT, None),
    ];
    client.write_all(&framed(&msgs)).await.expect("write");
    let first = Packet::parse(&read_reply(&mut client).await.expect("reply 1"))
        .expect("parse")
        .id();
    let second = read_reply(&mut client).await.expect("reply 2");
    assert_eq!(first, 51);
    let p = Packet::parse(&second).expect("parse");
    assert_eq!(p.id(), 52);
    assert_eq!(p.rcode(), RCODE::NameError);
    client.shutdown().await.expect("shutdown");
    assert_eq!(read_reply(&mut client).await, None, "closed after EOF");
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve_tcp returns")
        .expect("no panic");
}

/// Runs serve_tcp on `input` (then EOF if `eof`) and returns every reply it sent before
/// closing, which it must do within a second (well before the idle timeout).
async fn tcp_session(input: Vec<u8>, eof: bool) -> Vec<Vec<u8>> {
    let r = resolver(Vec::new(), &["allowed.test"]);
    let (mut client, srv) = tokio::io::duplex(1024 * 1024);
    let task = tokio::spawn(serve_tcp(srv, r));
    client.write_all(&input).await.expect("write");
    if eof {
        client.shutdown().await.expect("shutdown");
    }
    let read_all = async {
        let mut replies = Vec::new();
        while let Some(m) = read_reply(&mut client).await {
            replies.push(m);
        }
        replies
    };
    let replies = tokio::time::timeout(Duration::from_secs(1), read_all)
        .await
        .expect("the connection is closed promptly");
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("serve_tcp returns")
        .expect("no panic");
    replies
}

#[tokio::test]
async fn garbage_and_oversized_input_close_the_connection() {
    let ok = query(61, "x.example", TYPE::TXT, None);
    // Garbage after a good query: the good one is answered, then the connection closes
    // (the query after the garbage is not answered).
    let garbage = framed(&[ok.clone(), b"\x01\x02garbage".to_vec(), ok.clone()]);
    assert_eq!(tcp_session(garbage, false).await.len(), 1);
    // A zero length closes it.
    let mut zero = framed(std::slice::from_ref(&ok));
    zero.extend_from_slice(&[0, 0]);
    zero.extend_from_slice(&framed(std::slice::from_ref(&ok)));
    assert_eq!(tcp_session(zero, false).await.len(), 1);
    // A 65535-byte prefix with a short body, then EOF.
    let mut cut = vec![0xff, 0xff];
    cut.extend_from_slice(&[0x41; 1000]);
    assert!(tcp_session(cut, true).await.is_empty());
    // A full 65535-byte message of junk.
    assert!(tcp_session(framed(&[vec![0x5a; 65_535]]), false)
        .await
        .is_empty());
    // Garbage over UDP: no reply, no panic.
    let r = resolver(Vec::new(), &[]);
    assert_eq!(r.answer(b"\xff", UDP_PATH).await, None);
    assert_eq!(r.answer(&[0xffu8; 4096], UDP_PATH).await, None);
    // Zero questions parse as a query: NOTIMP, header only.
    let reply = ask(&r, &[0u8; 4096], UDP_PATH).await;
    assert_eq!(reply.len(), 12);
    assert_eq!(
        Packet::parse(&reply).expect("parse").rcode(),
        RCODE::NotImplemented
    );
}

#[tokio::test]
async fn a_connection_answers_a_bounded_number_of_queries() {
    // Refused names are answered locally, so this needs no server.
    let msgs: Vec<Vec<u8>> = (0..MAX_TCP_QUERIES + 5)
        .map(|i| query(u16::try_from(i).expect("id"), "leak.example", TYPE::A, None))
        .collect();
    let replies = tcp_session(framed(&msgs), true).await;
    assert_eq!(replies.len(), MAX_TCP_QUERIES);
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(
            usize::from(Packet::parse(r).expect("parse").id()),
            i,
            "in order"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed() {
    let r = resolver(Vec::new(), &[]);
    let (mut client, srv) = tokio::io::duplex(1024);
    let task = tokio::spawn(serve_tcp(srv, r));
    let t = tokio::time::Instant::now();
    // Half a length prefix, then nothing: the idle timeout closes the connection.
    client.write_all(&[0]).await.expect("write");
    assert_eq!(read_reply(&mut client).await, None);
    assert!(t.elapsed() >= matchlock_net::dns::TCP_IDLE_TIMEOUT);
    task.await.expect("no panic");
}

#[tokio::test]
async fn system_mode_answers_a_from_the_hosts_file() {
    // No servers: the host's resolver, which answers `localhost` from /etc/hosts.
    let r = resolver(Vec::new(), &[]);
    let reply = ask(&r, &query(71, "localhost", TYPE::A, Some(1232)), UDP_PATH).await;
    let p = Packet::parse(&reply).expect("parse");
    assert_eq!(p.rcode(), RCODE::NoError);
    assert!(p
        .answers
        .iter()
        .any(|a| a.rdata == RData::A(A::from(Ipv4Addr::LOCALHOST))));
    assert!(p.opt().is_some(), "EDNS clients get OPT back");
    // TXT stays an empty answer, over TCP as well.
    let reply = ask(&r, &query(72, "localhost", TYPE::TXT, None), Transport::Tcp).await;
    let p = Packet::parse(&reply).expect("parse");
    assert_eq!(p.rcode(), RCODE::NoError);
    assert!(p.answers.is_empty());
}
