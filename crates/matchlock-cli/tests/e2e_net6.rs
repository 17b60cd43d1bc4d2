//! End to end: IPv6 on the guest link and UDP forwarding, with the sandbox owner inside a
//! network namespace that holds only loopback and a veth to a test host, so no packet can
//! leave this machine (harness and layout: `common/nethost.rs`; the test host has
//! `2001:2::2/64` and the unique-local `fd11:1213::13`, the owner `2001:2::1/64`).
//!
//! One booted sandbox (the `nettest` image: Debian's curl and python3) per mode: open
//! egress, where IPv6 and UDP reach the test host and blocked ranges do not, and an
//! allow-list (interception), where UDP other than DNS never leaves and HTTP over IPv6 is
//! proxied. Assertions read the
//! test host's logs to show what did and did not arrive.
//!
//! Needs root (`ip netns add`); fails loudly without it, never skips.

mod common;
#[path = "common/nethost.rs"]
mod nethost;

use std::time::Duration;

use common::{env, ok, stdout, TestEnv};
use nethost::{guest, NetHost, HOST_IP6, OWNER_IP6};
use serde_json::Value;

/// `matchlock run -d` of the nettest image in the owner's namespace, with `args`.
fn start(net: &NetHost, e: &TestEnv, args: &[&str]) -> String {
    let image = nethost::nettest_image(e);
    let mut run = e.cmd();
    run.args(["run", "--image", image, "-d"])
        .args(args)
        .env("MATCHLOCK_LOG", "warn,matchlock_net=debug");
    let out = net.wrap(run).output().expect("run -d");
    ok(&out).trim().to_string()
}

/// Runs a python3 script (given on stdin) in the guest; (success, stdout+stderr).
fn python(e: &TestEnv, id: &str, script: &str) -> (bool, String) {
    let o = e.run_stdin(&["exec", "-i", id, "python3", "-"], script.as_bytes());
    (
        o.status.success(),
        format!("{}{}", stdout(&o), common::stderr(&o)),
    )
}

/// Records of `log` whose `path` is `path`.
fn requests_to(net: &NetHost, log: &str, path: &str) -> Vec<Value> {
    net.log(log)
        .into_iter()
        .filter(|r| r["path"] == path)
        .collect()
}

/// A DNS query for `web.test` (A) sent over UDP to the gateway's IPv6 address, and a
/// datagram to each of `targets` on port 9, then `control` to the test host.
const UDP_SCRIPT: &str = r#"
import socket, sys
q = b'\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x04test\x00\x00\x01\x00\x01'
d = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
d.settimeout(10)
d.sendto(q, ('fd00:6d6c::2', 53))
r = d.recv(512)
print('dns6', r[:2] == b'\x12\x34', bytes([198, 51, 100, 2]) in r)
for family, addr, data in [
    (socket.AF_INET, '198.51.100.2', b'udp4-open'),
    (socket.AF_INET6, '2001:2::2', b'udp6-open'),
    (socket.AF_INET, '10.11.12.13', b'udp4-blocked'),
    (socket.AF_INET6, 'fd11:1213::13', b'udp6-blocked'),
    (socket.AF_INET6, '::ffff:10.11.12.13', b'udp6-mapped-blocked'),
    (socket.AF_INET6, '2001:2::2', b'udp6-control'),
]:
    u = socket.socket(family, socket.SOCK_DGRAM)
    u.sendto(data, (addr, 9))
print('sent')
"#;

#[test]
fn ipv6_and_udp_in_open_egress() {
    let e = env();
    let net = NetHost::new();
    // Controls: from the owner's namespace the test host's IPv6 and unique-local addresses
    // answer, so a flow policy let through would arrive and be logged.
    for url in [
        format!("http://[{HOST_IP6}]/owner-control6"),
        "http://[fd11:1213::13]/owner-control6".to_string(),
    ] {
        let o = net.run_in_sandbox_ns(&["curl", "-sS", "--max-time", "10", &url]);
        assert!(o.status.success(), "{url}: {}", common::stderr(&o));
    }
    assert_eq!(requests_to(&net, "http", "/owner-control6").len(), 2);

    let id = start(&net, e, &[]);
    let _guard = e.guard(&id);
    // The guest has its static IPv6 address (fd00:6d6c::15, no DAD).
    let (okk, text, _) = guest(e, &id, "cat /proc/net/if_inet6");
    assert!(
        okk && text.contains("fd006d6c000000000000000000000015"),
        "{text}"
    );

    // curl -6 to the test host: the request arrives from the owner's IPv6 address.
    let (okk, text, _) = guest(
        e,
        &id,
        &format!("curl -6 -sS --max-time 20 'http://[{HOST_IP6}]/v6-open?q=6'"),
    );
    assert!(okk, "{text}");
    let echoed: Value = serde_json::from_str(text.trim()).expect("echo JSON");
    assert_eq!(echoed["query"], "q=6", "{text}");
    let r = &requests_to(&net, "http", "/v6-open")[0];
    assert_eq!(r["local"], format!("[{HOST_IP6}]:80"), "{r}");
    let peer = r["peer"].as_str().unwrap_or_default();
    assert!(peer.starts_with(&format!("[{OWNER_IP6}]:")), "{r}");

    // Raw TCP over IPv6 (python AF_INET6) to the echo server, both ways.
    let (okk, text) = python(
        e,
        &id,
        "import socket\n\
         s=socket.create_connection(('2001:2::2',7),10); s.sendall(b'echo6')\n\
         print(s.recv(64).decode())\n",
    );
    assert!(okk && text.trim() == "echo6", "{text}");
    net.wait_log("tcp", Duration::from_secs(10), |r| r["data"] == "echo6");

    // Blocked ranges over IPv6: unique-local, the IPv4-mapped form of a private address,
    // the gateway's own address; each an immediate RST (ECONNREFUSED), nothing arrives.
    let py = "import socket, time\n\
              for a in ['fd11:1213::13', '::ffff:10.11.12.13', 'fd00:6d6c::2']:\n\
              \x20   t = time.time()\n\
              \x20   try:\n\
              \x20       socket.create_connection((a, 80), 10).sendall(b'GET /v6-leak HTTP/1.0\\r\\n\\r\\n')\n\
              \x20       print(a, 'connected')\n\
              \x20   except OSError as e:\n\
              \x20       print(a, e.errno, round(time.time() - t, 1))\n";
    let (_, text) = python(e, &id, py);
    for a in ["fd11:1213::13", "::ffff:10.11.12.13", "fd00:6d6c::2"] {
        let line = text.lines().find(|l| l.starts_with(&format!("{a} ")));
        let line = line.unwrap_or_else(|| panic!("{a}: {text}"));
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields[1], "111", "{a} not refused: {text}");
        let took: f64 = fields[2].parse().expect("seconds");
        assert!(took < 5.0, "{a} took {took} s: not an RST");
    }
    let (okk, text, _) = guest(
        e,
        &id,
        "curl -6 -sS --max-time 20 'http://[fd11:1213::13]/v6-ula'",
    );
    assert!(!okk && text.contains("curl: (7)"), "{text}");
    for path in ["/v6-leak", "/v6-ula"] {
        assert!(requests_to(&net, "http", path).is_empty(), "{path} arrived");
    }

    // UDP: DNS to the gateway's IPv6 address is answered; datagrams to the test host arrive
    // over IPv4 and IPv6; the blocked ones do not (the control sent after them arrived).
    let (okk, text) = python(e, &id, UDP_SCRIPT);
    assert!(
        okk && text.contains("dns6 True True") && text.contains("sent"),
        "{text}"
    );
    for data in ["udp4-open", "udp6-open", "udp6-control"] {
        net.wait_log("udp", Duration::from_secs(10), |r| r["data"] == data);
    }
    let v6 = net.wait_log("udp", Duration::from_secs(1), |r| r["data"] == "udp6-open");
    let peer = v6["peer"].as_str().unwrap_or_default();
    assert!(peer.starts_with(&format!("[{OWNER_IP6}]:")), "{v6}");
    let udp = net.log_text("udp");
    assert!(!udp.contains("blocked"), "{udp}");

    // ICMPv6 echo: the gateway answers, nothing else does (ping sockets are not permitted in
    // this owner's namespace; e2e_icmp.rs covers relaying).
    let (okk, text, _) = guest(e, &id, "busybox ping -6 -c 1 -W 5 fd00:6d6c::2");
    assert!(okk, "{text}");
    let (okk, text, _) = guest(e, &id, &format!("busybox ping -6 -c 1 -W 2 {HOST_IP6}"));
    assert!(!okk, "{text}");
    e.kill_and_rm(&id);
}

#[test]
fn udp_is_not_forwarded_under_an_allow_list() {
    let e = env();
    let net = NetHost::new();
    let id = start(&net, e, &["--allow-host", "198.51.100.2,2001:2::2"]);
    let _guard = e.guard(&id);
    // Raw TCP over IPv6 to an allowed IP literal works (the control: the guest's IPv6
    // path is up) ...
    let (okk, text) = python(
        e,
        &id,
        "import socket\n\
         s=socket.create_connection(('2001:2::2',7),10); s.sendall(b'allowed6')\n\
         print(s.recv(64).decode())\n\
         for f, a in [(socket.AF_INET, '198.51.100.2'), (socket.AF_INET6, '2001:2::2')]:\n\
         \x20   socket.socket(f, socket.SOCK_DGRAM).sendto(b'udp-intercepted', (a, 9))\n\
         s=socket.create_connection(('2001:2::2',7),10); s.sendall(b'after-udp')\n\
         print(s.recv(64).decode())\n",
    );
    assert!(
        okk && text.contains("allowed6") && text.contains("after-udp"),
        "{text}"
    );
    // ... while UDP to the same allowed addresses never leaves (the TCP flow sent after the
    // datagrams has arrived, so they would have too).
    net.wait_log("tcp", Duration::from_secs(10), |r| r["data"] == "after-udp");
    std::thread::sleep(Duration::from_millis(500));
    let udp = net.log_text("udp");
    assert!(!udp.contains("udp-intercepted"), "{udp}");
    // HTTP over IPv6 goes through the interceptor: the allowed literal is proxied (the
    // owner dials it over IPv6), a unique-local one gets the proxy's 403 and never arrives.
    let (okk, text, _) = guest(
        e,
        &id,
        &format!("curl -6 -sS --max-time 20 'http://[{HOST_IP6}]/v6-intercepted'"),
    );
    assert!(
        okk && text.contains("\"path\":\"/v6-intercepted\""),
        "{text}"
    );
    let r = &requests_to(&net, "http", "/v6-intercepted")[0];
    assert_eq!(r["local"], format!("[{HOST_IP6}]:80"), "{r}");
    let (_, text, _) = guest(
        e,
        &id,
        "curl -6 -sS -w '%{http_code}' --max-time 20 'http://[fd11:1213::13]/v6-icpt-ula'",
    );
    assert!(text.ends_with("403"), "{text}");
    assert!(requests_to(&net, "http", "/v6-icpt-ula").is_empty());
    e.kill_and_rm(&id);
}
