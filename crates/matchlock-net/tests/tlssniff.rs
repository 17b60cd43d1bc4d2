//! The ClientHello detector against real ClientHellos (rustls's, as a guest's TLS client
//! sends them) cut and re-framed in every way the network may deliver them, and against
//! other protocols' first bytes; the HTTP request-line detector against request lines and
//! text protocols; [`peek`] against fast, slow, silent and closing senders.

use std::sync::Arc;
use std::time::{Duration, Instant};

use matchlock_net::tlssniff::{
    peek, sniff, sniff_http, Decision, HttpSniff, Sniff, MAX_HELLO, MAX_METHOD, MAX_PEEK,
};
use tokio::sync::mpsc;

/// The first flight of a real TLS client: one handshake record holding its ClientHello.
fn client_hello(sni: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("name");
    let mut c = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
    let mut out = Vec::new();
    c.write_tls(&mut out).expect("hello");
    out
}

/// The same handshake bytes re-framed as records of at most `size` bytes each.
fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
    let body = &hello[5..];
    let mut out = Vec::new();
    for part in body.chunks(size) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

#[test]
fn a_real_client_hello_is_recognised_at_every_cut() {
    let hello = client_hello("api.test");
    assert_eq!(sniff(&hello), Sniff::ClientHello);
    // Any TCP segmentation: undecided until the last byte.
    for cut in 0..hello.len() {
        assert_eq!(sniff(&hello[..cut]), Sniff::NeedMore, "cut at {cut}");
    }
    // Bytes after the hello (e.g. early data) do not change the verdict.
    let mut more = hello.clone();
    more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
    assert_eq!(sniff(&more), Sniff::ClientHello);
}

#[test]
fn a_hello_fragmented_over_records_is_recognised() {
    let hello = client_hello("api.test");
    for size in [1, 2, 3, 7, 64, 200] {
        let frag = refragment(&hello, size);
        if frag.len() <= MAX_PEEK {
            assert_eq!(sniff(&frag), Sniff::ClientHello, "records of {size}");
            assert_eq!(sniff(&frag[..frag.len() - 1]), Sniff::NeedMore);
        }
    }
    // A record of another type in the middle of the hello is not TLS as a client sends it.
    let mut frag = refragment(&hello, 64);
    frag[69] = 23;
    assert_eq!(sniff(&frag), Sniff::NotTls);
}

#[test]
fn other_protocols_are_not_tls_from_their_first_bytes() {
    for first in [
        &b"GET / HTTP/1.1\r\n"[..],
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"EHLO x\r\n",
        b"\x00",
        b"\x16", // handshake type, then a wrong version
        b"\x16\x02",
        b"\x16\x03\x05",
        b"\x16\x03\x01\x00\x00",                 // empty record
        b"\x16\x03\x01\x40\x01",                 // record longer than 2^14
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x30", // ServerHello, not ClientHello
        b"\x16\x03\x01\x00\x04\x01\x00\x00\x02", // hello body too short
        b"\x15\x03\x03\x00\x02\x02\x28",         // alert
    ] {
        let v = sniff(first);
        let expect_tls_prefix = first == b"\x16";
        if expect_tls_prefix {
            assert_eq!(v, Sniff::NeedMore);
        } else {
            assert_eq!(v, Sniff::NotTls, "{first:?}");
        }
    }
    // A hello whose client version is not 3.x.
    let mut hello = client_hello("api.test");
    hello[9] = 2;
    assert_eq!(sniff(&hello), Sniff::NotTls);
    // A session id longer than 32 bytes.
    let mut hello = client_hello("api.test");
    hello[5 + 4 + 34] = 33;
    assert_eq!(sniff(&hello), Sniff::NotTls);
}

#[test]
fn oversized_hellos_are_bounded() {
    // Declared larger than MAX_HELLO: decided from the header, without waiting for it.
    let len = MAX_HELLO; // body length: header + body exceeds the bound by 4
    let mut big = vec![22, 3, 1, 0x40, 0x00, 1];
    big.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, 3, 3]);
    assert_eq!(sniff(&big), Sniff::Oversized);
    // A hello within MAX_HELLO cut into 1-byte records passes MAX_PEEK before it ends.
    let hello = client_hello("api.test");
    let mut huge = hello[5..].to_vec();
    let body = MAX_HELLO / 2 - 4;
    huge[1..4].copy_from_slice(&[(body >> 16) as u8, (body >> 8) as u8, body as u8]);
    huge.resize(body + 4, 0);
    let frag = refragment(&[&[0u8; 5][..], &huge].concat(), 1);
    assert!(frag.len() > MAX_PEEK);
    assert_eq!(sniff(&frag[..MAX_PEEK - 1]), Sniff::NeedMore);
    assert_eq!(sniff(&frag), Sniff::Oversized);
    assert_eq!(sniff(&frag[..MAX_PEEK]), Sniff::Oversized);
}

/// Sends `chunks` with `gap` between them, then closes when `close`.
fn sender(chunks: Vec<Vec<u8>>, gap: Duration, close: bool) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for c in chunks {
            tokio::time::sleep(gap).await;
            if tx.send(c).await.is_err() {
                return;
            }
        }
        if !close {
            std::future::pending::<()>().await;
        }
    });
    rx
}

const WINDOW: Duration = Duration::from_millis(300);

#[tokio::test]
async fn peek_decides_on_a_segmented_hello_and_returns_every_byte() {
    let hello = client_hello("api.test");
    let chunks: Vec<Vec<u8>> = hello.chunks(50).map(<[u8]>::to_vec).collect();
    let n = chunks.len();
    let mut rx = sender(chunks, Duration::from_millis(5), false);
    let mut seen = 0;
    let p = peek(&mut rx, WINDOW, std::future::pending::<()>(), || seen += 1).await;
    assert_eq!(p.decision, Decision::ClientHello);
    assert!(p.decision.intercept());
    assert_eq!(p.bytes, hello);
    assert_eq!(seen, n);
}

#[tokio::test]
async fn peek_decides_not_tls_from_the_first_chunk() {
    let mut rx = sender(
        vec![b"hello\n".to_vec(), b"more".to_vec()],
        Duration::ZERO,
        false,
    );
    let p = peek(&mut rx, WINDOW, std::future::pending::<()>(), || {}).await;
    assert_eq!(p.decision, Decision::NotTls);
    assert!(!p.decision.intercept());
    assert_eq!(p.bytes, b"hello\n");
}

#[tokio::test]
async fn a_slow_tls_sender_is_still_intercepted_after_the_window() {
    // A hello dribbled out slower than the window: undecided at the deadline, but it looks
    // like TLS, so it goes to the interceptor (not spliced past the SNI check).
    let hello = client_hello("api.test");
    let chunks: Vec<Vec<u8>> = hello.chunks(10).map(<[u8]>::to_vec).collect();
    let mut rx = sender(chunks, Duration::from_millis(100), false);
    let t = Instant::now();
    let p = peek(&mut rx, WINDOW, std::future::pending::<()>(), || {}).await;
    assert!(
        t.elapsed() < WINDOW + Duration::from_secs(1),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(p.decision, Decision::Incomplete);
    assert!(p.decision.intercept());
    assert_eq!(p.bytes[..], hello[..p.bytes.len()]);
}

#[tokio::test]
async fn silence_is_waited_for_and_closing_and_server_first_are_not_tls() {
    // A guest silent for longer than the window is still waited for: its late hello is
    // intercepted (no deadline skips the sniffing; the window runs from the first byte).
    let hello = client_hello("api.test");
    let mut rx = sender(vec![hello.clone()], WINDOW * 2, false);
    let t = Instant::now();
    let p = peek(&mut rx, WINDOW, std::future::pending::<()>(), || {}).await;
    assert!(t.elapsed() >= WINDOW * 2, "{:?}", t.elapsed());
    assert_eq!(p.decision, Decision::ClientHello);
    assert!(p.decision.intercept());

    let mut rx = sender(vec![], Duration::ZERO, true);
    let p = peek(&mut rx, WINDOW, std::future::pending::<()>(), || {}).await;
    assert_eq!(p.decision, Decision::Closed);
    assert!(!p.decision.intercept());
    // Half a hello, then the guest's FIN: still TLS-looking, so the interceptor gets it.
    let mut rx = sender(vec![hello[..20].to_vec()], Duration::ZERO, true);
    let p = peek(&mut rx, WINDOW, std::future::pending::<()>(), || {}).await;
    assert_eq!(p.decision, Decision::Incomplete);

    let mut rx = sender(vec![], Duration::ZERO, false);
    let t = Instant::now();
    let spoke = tokio::time::sleep(Duration::from_millis(20));
    let p = peek(&mut rx, WINDOW, spoke, || {}).await;
    assert_eq!(p.decision, Decision::ServerFirst);
    assert!(t.elapsed() < WINDOW);
    // Once the guest has sent something, the server speaking does not end the peek early:
    // here the server "speaks" as soon as the first chunk was taken.
    let mut rx = sender(
        vec![hello[..20].to_vec(), hello[20..].to_vec()],
        Duration::ZERO,
        false,
    );
    let after_first = tokio::sync::Notify::new();
    let p = peek(&mut rx, WINDOW, after_first.notified(), || {
        after_first.notify_one()
    })
    .await;
    assert_eq!(p.decision, Decision::ClientHello);
}

#[test]
fn http_request_lines_are_recognised_at_every_cut() {
    let line = b"POST /v1/x?key=1 HTTP/1.1\r\nHost: api.test\r\n\r\n";
    let at = line.iter().position(|b| *b == b' ').expect("space");
    let version = line
        .windows(5)
        .position(|w| w == b"HTTP/")
        .expect("version");
    for cut in 0..=line.len() {
        let want = if cut >= version + 5 {
            HttpSniff::Request
        } else if cut > at {
            HttpSniff::NeedMoreAfterMethod
        } else {
            HttpSniff::NeedMore
        };
        assert_eq!(sniff_http(&line[..cut]), want, "cut {cut}");
        // Never TLS, so the two never both claim a stream.
        if cut > 0 {
            assert_eq!(sniff(&line[..cut]), Sniff::NotTls, "cut {cut}");
        }
    }
    for req in [
        &b"GET / HTTP/1.0\r\n"[..],
        b"CONNECT api.test:443 HTTP/1.1\r\n",
        b"get http://x/ http/1.1\r\n", // any case: hyper decides what it accepts
        b"PRI * HTTP/2.0\r\n",         // h2c prior knowledge: refused by the interceptor
        b"GET /old\r\n",               // HTTP/0.9
        b"GET /old\n",
        b"M-SEARCH * HTTP/1.1\r\n",
    ] {
        assert_eq!(sniff_http(req), HttpSniff::Request, "{req:?}");
    }
}

#[test]
fn text_protocols_are_not_http_within_their_first_line() {
    for other in [
        &b"SET k v\r\n"[..],
        b"get key\r\n", // memcached
        b"GET key\r\n", // redis inline: no `/`, so not HTTP/0.9
        b"EHLO x\r\n",
        b"hello\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"GET  / HTTP/1.1\r\n", // two spaces
        b"GET /a\tb HTTP/1.1\r\n",
        b" GET / HTTP/1.1\r\n",
        b"\x00GET / HTTP/1.1",
        b"\x16\x03\x01",
        b"GET / HTTX/1.1\r\n",
    ] {
        assert_eq!(sniff_http(other), HttpSniff::NotHttp, "{other:?}");
    }
    // A word longer than any method, and a method followed by a long target past MAX_PEEK
    // (fail closed: still a request).
    assert_eq!(sniff_http(&[b'A'; MAX_METHOD + 1]), HttpSniff::NotHttp);
    assert_eq!(sniff_http(&[b'A'; MAX_METHOD]), HttpSniff::NeedMore);
    let mut long = b"GET /".to_vec();
    long.resize(MAX_PEEK + 10, b'a');
    assert_eq!(
        sniff_http(&long[..MAX_PEEK - 1]),
        HttpSniff::NeedMoreAfterMethod
    );
    assert_eq!(sniff_http(&long), HttpSniff::Request);
}

#[tokio::test]
async fn peek_sends_http_to_the_interceptor_and_fails_closed_on_a_dribble() {
    // A request line in pieces: decided once `HTTP/` is there.
    let mut rx = sender(
        vec![b"GET /x ".to_vec(), b"HT".to_vec(), b"TP/1.1\r\n".to_vec()],
        Duration::from_millis(5),
        false,
    );
    let p = peek(&mut rx, WINDOW, std::future::pending::<()>(), || {}).await;
    assert_eq!(p.decision, Decision::HttpRequest);
    assert!(p.decision.intercept_http() && !p.decision.intercept());
    assert_eq!(p.bytes, b"GET /x HTTP/1.1\r\n");
    // Method and space, then nothing until the deadline (or the FIN): still HTTP.
    for close in [false, true] {
        let mut rx = sender(vec![b"GET /x".to_vec()], Duration::ZERO, close);
        let p = peek(&mut rx, WINDOW, std::future::pending::<()>(), || {}).await;
        assert_eq!(p.decision, Decision::HttpIncomplete, "close {close}");
        assert!(p.decision.intercept_http());
    }
    // A bare word, then silence: spliced (an echo client's `ping` must still work).
    let mut rx = sender(vec![b"ping-raw".to_vec()], Duration::ZERO, false);
    let p = peek(&mut rx, WINDOW, std::future::pending::<()>(), || {}).await;
    assert_eq!(p.decision, Decision::NotTls);
    assert!(!p.decision.intercept_http() && !p.decision.intercept());
    let mut rx = sender(vec![b"ping-raw".to_vec()], Duration::ZERO, true);
    let p = peek(&mut rx, WINDOW, std::future::pending::<()>(), || {}).await;
    assert_eq!(p.decision, Decision::Closed);
    // A text command: spliced from its first line.
    let mut rx = sender(vec![b"SET k v\r\n".to_vec()], Duration::ZERO, false);
    let p = peek(&mut rx, WINDOW, std::future::pending::<()>(), || {}).await;
    assert_eq!(p.decision, Decision::NotTls);
}
