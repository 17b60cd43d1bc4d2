//! End to end: TLS on ports other than 443 is recognised from the ClientHello and
//! intercepted like 443, while every other raw flow (guest speaks first, server speaks
//! first) is still spliced, and a destination the policy refuses still gets an immediate
//! RST. A real VM with Debian's curl and python3 (`nettest`), its owner in a network
//! namespace with only a veth to the test host (`common/nethost.rs`): the test host serves
//! TLS with its test-CA leaf on :9443, an untrusted certificate on :8443, TCP echo on :7 and
//! an SMTP-like banner on :25, and logs what arrives. The guest does not trust the test CA,
//! so a TLS request that succeeds on :9443 went through the interceptor.

mod common;
#[path = "common/nethost.rs"]
mod nethost;

use common::env;
use nethost::NetHost;

const SECRET: &str = "tlsport-s3cr3t-value";

/// Runs `script` in the guest and returns its output (asserting success when `want_ok`).
#[track_caller]
fn sh(id: &str, script: &str, want_ok: bool) -> String {
    nethost::guest_sh(env(), id, script, want_ok)
}

#[test]
fn tls_on_other_ports_is_intercepted_and_raw_tcp_still_works() {
    let e = env();
    let net = NetHost::new();
    let id = net.detached_intercepting(e, SECRET);
    let _guard = e.guard(&id);

    // TLS on 9443 toward the secret's host: the guest verified the sandbox CA (it does not
    // trust the test CA, so a raw splice would fail), the owner verified the test host, and
    // the placeholder was replaced in the header and the query.
    let ph = sh(&id, "printf %s \"$API_TOKEN\"", true);
    assert!(ph.starts_with("SANDBOX_SECRET_"), "{ph}");
    let out = sh(
        &id,
        "curl -sS --max-time 30 -o /dev/null -w '%{http_code} %{http_version}' \
         -H \"Authorization: Bearer $API_TOKEN\" \"https://api.test:9443/alt?key=$API_TOKEN\"",
        true,
    );
    assert_eq!(out.trim(), "200 2", "{out}");
    let r = &net.requests("https-alt", "/alt")[0];
    assert_eq!(r["headers"]["authorization"], format!("Bearer {SECRET}"));
    assert_eq!(r["query"], format!("key={SECRET}"));
    assert_eq!(r["sni"], "api.test");
    assert_eq!(r["host"], "api.test:9443", "{r}");

    // The placeholder toward a host it is not scoped to, on 9443 and on 8443: 403 from the
    // interceptor, nothing sent.
    for url in [
        "https://web.test:9443/leak-alt",
        "https://web.test:8443/leak-8443",
    ] {
        let out = sh(
            &id,
            &format!("curl -sS --max-time 30 -w '%{{http_code}}' -H \"X-Leak: $API_TOKEN\" {url}"),
            true,
        );
        assert!(out.ends_with("403"), "{url}: {out}");
        assert!(out.contains("Blocked by policy"), "{url}: {out}");
    }
    for log in ["https-alt", "https-untrusted"] {
        let text = net.log_text(log);
        assert!(!text.contains("leak-"), "{log}: {text}");
        assert!(!text.contains(&ph), "{log}: placeholder arrived: {text}");
    }
    // An upstream on another port with a certificate the owner does not trust: 502.
    let out = sh(
        &id,
        "curl -sS --max-time 30 -w '%{http_code}' https://web.test:8443/untrusted",
        true,
    );
    assert!(out.ends_with("502"), "{out}");
    assert!(net.requests("https-untrusted", "/untrusted").is_empty());

    // Raw TCP, guest speaks first (echo), and server speaks first (banner), both spliced;
    // the banner does not wait for the sniffing window.
    let py = "import socket,time\n\
              s=socket.create_connection(('web.test',7),10); s.sendall(b'ping-raw')\n\
              print('echo', s.recv(64).decode())\n\
              t=time.monotonic(); b=socket.create_connection(('web.test',25),10)\n\
              f=b.makefile('rwb')\n\
              print('banner', f.readline().decode().strip(), round(time.monotonic()-t,3))\n\
              f.write(b'HELO guest\\r\\n'); f.flush(); print('reply', f.readline().decode().strip())\n\
              f.write(b'QUIT\\r\\n'); f.flush(); print('bye', f.readline().decode().strip())\n";
    let out = sh(&id, &format!("python3 -c \"{py}\""), true);
    assert!(out.contains("echo ping-raw"), "{out}");
    assert!(out.contains("reply 250 HELO guest"), "{out}");
    assert!(out.contains("bye 221 bye"), "{out}");
    let secs: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("banner 220 testhost ready "))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no banner: {out}"));
    assert!(secs < 0.9, "banner waited for the sniffing window: {out}");
    net.wait_log("banner", std::time::Duration::from_secs(5), |r| {
        r["line"] == "HELO guest"
    });

    // A destination the policy refuses on a non-443 TLS port: an immediate RST (curl exit
    // 7, connection refused), not a TLS error after an accept; nothing reaches the test
    // host, which does listen there.
    let out = sh(
        &id,
        "t=$(date +%s%N); curl -sS --max-time 30 --resolve evil.test:9443:10.11.12.13 \
         https://evil.test:9443/off-policy; echo \" rc=$? ms=$(( ($(date +%s%N) - t) / 1000000 ))\"",
        true,
    );
    assert!(out.contains(" rc=7 "), "{out}");
    let ms: u64 = out
        .split("ms=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(ms < 5000, "{out}");
    let text = net.log_text("https-alt");
    assert!(!text.contains("10.11.12.13"), "{text}");
}
