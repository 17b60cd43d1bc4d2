//! Hermetic network harness: the sandbox owner in a network namespace that holds only `lo`
//! and a veth to a test host in a second namespace, so no packet can leave this machine.
//!
//! Layout (names carry the pid and a counter `<n>`):
//! - `mlt-s-<n>` (the owner: `matchlock run -d` runs in it through [`NetHost::wrap`]): `lo`,
//!   veth `198.51.100.1/24`, default route via the test host, so a policy bug delivers a
//!   blocked flow to the test host, where its log shows it. `/etc/netns/mlt-s-<n>/hosts` maps
//!   `web.test` (only) to the test host and its `resolv.conf` names the test host, so every
//!   other name the owner resolves goes through the test host's DNS server and is logged.
//! - `mlt-h-<n>` (the test host): veth `198.51.100.2/24` plus the "forbidden" addresses in
//!   [`FORBIDDEN`] (private, metadata, the guest's gateway address), all served by one
//!   `matchlock-testhost` process: HTTP :80, HTTPS :443 (leaf of a throwaway test CA,
//!   [`NetHost::ca_pem`]), HTTPS :8443 (untrusted self-signed), HTTPS :9443 (test-CA leaf,
//!   log `https-alt`), TCP echo :7, a server-speaks-first banner :25 (log `banner`), UDP
//!   logger :9, DNS :53 (UDP and TCP) answering [`NAMES`]. Every server logs JSON lines the test reads
//!   with [`NetHost::log`].
//! - IPv6 on the same veth: owner [`OWNER_IP6`]`/64` with a default route via the test
//!   host's [`HOST_IP6`]`/64`, which also holds [`FORBIDDEN6`] (a unique-local address);
//!   HTTP :80, TCP echo :7 and the UDP logger :9 listen on both. The benchmarking range
//!   2001:2::/48 is used because policy blocks the documentation range 2001:db8::/32.
//!
//! Everything (namespaces, `/etc/netns` directory, the server) is removed on drop, including
//! when a test panics. Needs root (`ip netns add`); fails loudly without it, never skips.

// Each test file uses a different part of the harness.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{stderr, stdout, TestEnv};

/// The test host's main address (also an IP SAN of its certificate).
pub const HOST_IP: &str = "198.51.100.2";
/// The sandbox owner's address.
pub const OWNER_IP: &str = "198.51.100.1";
/// Addresses the test host also answers on, which policy must never let a guest reach.
pub const FORBIDDEN: &[&str] = &["10.11.12.13", "169.254.169.254", "10.0.2.2"];
/// The test host's IPv6 address.
pub const HOST_IP6: &str = "2001:2::2";
/// The sandbox owner's IPv6 address.
pub const OWNER_IP6: &str = "2001:2::1";
/// IPv6 addresses the test host also answers on, which policy must never let a guest reach.
pub const FORBIDDEN6: &[&str] = &["fd11:1213::13"];
/// Names the test host's DNS server answers (and its certificate covers, with `*.` forms).
pub const NAMES: &[(&str, &str)] = &[
    ("web.test", HOST_IP),
    ("api.test", HOST_IP),
    ("evil.test", HOST_IP),
    ("private.test", "10.11.12.13"),
    ("metadata.test", "169.254.169.254"),
    ("loopback.test", "127.0.0.1"),
];
/// The image built by `matchlock_test_support::nettest_image` as imported by [`nettest_image`].
pub const NETTEST_IMAGE: &str = "nettest:test";

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

/// Imports the `nettest` image (built once per machine, cached) into `env` once per process.
pub fn nettest_image(env: &TestEnv) -> &'static str {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = matchlock_test_support::nettest_image()
            .unwrap_or_else(|e| panic!("building the nettest image: {:#}", anyhow_chain(&e)));
        let archive = std::fs::read(&path).expect("read the nettest archive");
        let out = env.run_stdin(&["image", "import", NETTEST_IMAGE], &archive);
        assert!(out.status.success(), "import nettest: {}", stderr(&out));
    });
    NETTEST_IMAGE
}

fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

fn testhost_binary() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_matchlock")).with_file_name("matchlock-testhost");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build -p matchlock-test-support` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The two namespaces, the veth, the owner's `/etc/netns` files and the test-host server.
pub struct NetHost {
    pub sandbox_ns: String,
    pub host_ns: String,
    etc: PathBuf,
    dir: tempfile::TempDir,
    server: Option<Child>,
}

impl NetHost {
    pub fn new() -> NetHost {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut net = NetHost {
            sandbox_ns: format!("mlt-s-{n}"),
            host_ns: format!("mlt-h-{n}"),
            etc: PathBuf::from(format!("/etc/netns/mlt-s-{n}")),
            dir: tempfile::tempdir().expect("tempdir"),
            server: None,
        };
        net.build_namespaces();
        net.write_owner_etc();
        net.start_server();
        net
    }

    fn build_namespaces(&self) {
        let (s, h) = (self.sandbox_ns.as_str(), self.host_ns.as_str());
        // Interface names: at most 15 bytes.
        let tag = &s["mlt-s-".len()..];
        let (va, vb) = (format!("mlv{tag}a"), format!("mlv{tag}b"));
        must(&["ip", "netns", "add", s]);
        must(&["ip", "netns", "add", h]);
        must(&[
            "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
        ]);
        must(&["ip", "link", "set", &va, "netns", s]);
        must(&["ip", "link", "set", &vb, "netns", h]);
        let owner_addr = format!("{OWNER_IP}/24");
        let host_addr = format!("{HOST_IP}/24");
        let mut steps: Vec<(&str, Vec<&str>)> = vec![
            (s, vec!["ip", "link", "set", "lo", "up"]),
            (s, vec!["ip", "addr", "add", &owner_addr, "dev", &va]),
            (s, vec!["ip", "link", "set", &va, "up"]),
            (s, vec!["ip", "route", "add", "default", "via", HOST_IP]),
            (h, vec!["ip", "link", "set", "lo", "up"]),
            (h, vec!["ip", "addr", "add", &host_addr, "dev", &vb]),
        ];
        let extra: Vec<String> = FORBIDDEN.iter().map(|a| format!("{a}/32")).collect();
        for a in &extra {
            steps.push((h, vec!["ip", "addr", "add", a, "dev", &vb]));
        }
        let (owner6, host6) = (format!("{OWNER_IP6}/64"), format!("{HOST_IP6}/64"));
        let extra6: Vec<String> = FORBIDDEN6.iter().map(|a| format!("{a}/128")).collect();
        // `nodad`: usable at once (the test host binds them right away).
        steps.push((
            s,
            vec!["ip", "-6", "addr", "add", &owner6, "dev", &va, "nodad"],
        ));
        steps.push((
            h,
            vec!["ip", "-6", "addr", "add", &host6, "dev", &vb, "nodad"],
        ));
        for a in &extra6 {
            steps.push((h, vec!["ip", "-6", "addr", "add", a, "dev", &vb, "nodad"]));
        }
        steps.push((h, vec!["ip", "link", "set", &vb, "up"]));
        steps.push((h, vec!["ip", "route", "add", "default", "dev", &vb]));
        steps.push((h, vec!["ip", "-6", "route", "add", "default", "dev", &vb]));
        steps.push((
            s,
            vec!["ip", "-6", "route", "add", "default", "via", HOST_IP6],
        ));
        for (ns, cmd) in steps {
            let mut full = vec!["ip", "netns", "exec", ns];
            full.extend(cmd);
            must(&full);
        }
    }

    fn write_owner_etc(&self) {
        std::fs::create_dir_all(&self.etc).expect("create /etc/netns dir");
        std::fs::write(
            self.etc.join("hosts"),
            format!("127.0.0.1 localhost\n{HOST_IP} web.test\n"),
        )
        .expect("hosts");
        std::fs::write(
            self.etc.join("resolv.conf"),
            format!("nameserver {HOST_IP}\noptions timeout:2 attempts:1\n"),
        )
        .expect("resolv.conf");
    }

    fn start_server(&mut self) {
        let out = std::fs::File::create(self.dir.path().join("testhost.out")).expect("log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.host_ns])
            .arg(testhost_binary())
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--ip", HOST_IP]);
        for ip in std::iter::once(&HOST_IP6).chain(FORBIDDEN6) {
            cmd.args(["--ip6", ip]);
        }
        for (name, ip) in NAMES {
            cmd.args(["--name", &format!("{name}={ip}")]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn matchlock-testhost");
        self.server = Some(child);
        let ready = self.dir.path().join("ready");
        let t = Instant::now();
        while !ready.is_file() {
            let exited = self
                .server
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && t.elapsed() < Duration::from_secs(20),
                "matchlock-testhost did not start ({exited:?}): {}",
                read(&self.dir.path().join("testhost.out"))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The test CA's certificate (PEM): give it to the owner as `SSL_CERT_FILE`.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The records logged so far by one server: `http`, `https`, `https-untrusted`,
    /// `https-alt`, `tcp`, `banner`, `udp` or `dns`.
    pub fn log(&self, name: &str) -> Vec<Value> {
        read(&self.dir.path().join(format!("{name}.jsonl")))
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The requests one server logged for `path`.
    pub fn requests(&self, name: &str, path: &str) -> Vec<Value> {
        self.log(name)
            .into_iter()
            .filter(|r| r["path"] == path)
            .collect()
    }

    /// The raw text of one server's log (for `contains` checks and failure messages).
    pub fn log_text(&self, name: &str) -> String {
        read(&self.dir.path().join(format!("{name}.jsonl")))
    }

    /// Waits until a record of `name` satisfies `pred`; panics with the log after `timeout`.
    #[track_caller]
    pub fn wait_log(&self, name: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let mut found = None;
        let waited = matchlock_test_support::wait_until(timeout, name, || {
            found = self.log(name).into_iter().find(&pred);
            found.is_some()
        });
        match (waited, found) {
            (Ok(()), Some(v)) => v,
            (w, _) => panic!("{w:?}: no matching record in {}", self.log_text(name)),
        }
    }

    /// Runs `args` inside the sandbox owner's namespace (with its hosts and resolv.conf).
    pub fn run_in_sandbox_ns(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.sandbox_ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ip netns exec")
    }

    /// Sets the owner's namespace's `net.ipv4.ping_group_range` (it covers IPv6 too):
    /// `"0 2147483647"` lets every group open ping sockets, `"1 0"` (the kernel default)
    /// none.
    pub fn set_ping_group_range(&self, range: &str) {
        let arg = format!("net.ipv4.ping_group_range={range}");
        must(&[
            "ip",
            "netns",
            "exec",
            &self.sandbox_ns,
            "sysctl",
            "-q",
            "-w",
            &arg,
        ]);
    }

    /// ICMP echo requests the test host's kernel has received so far, (IPv4, IPv6): its
    /// namespace's `Icmp: InEchos` and `Icmp6InEchos` counters.
    pub fn echoes_received(&self) -> (u64, u64) {
        let read_ns = |file: &str| {
            let o = sh(&["ip", "netns", "exec", &self.host_ns, "cat", file]);
            assert!(o.status.success(), "read {file}: {}", stderr(&o));
            stdout(&o)
        };
        let snmp = read_ns("/proc/net/snmp");
        let icmp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Icmp:")).collect();
        let (names, values) = (icmp[0].split_whitespace(), icmp[1].split_whitespace());
        let v4 = names
            .zip(values)
            .find(|(n, _)| *n == "InEchos")
            .and_then(|(_, v)| v.parse().ok())
            .expect("InEchos in /proc/net/snmp");
        let v6 = read_ns("/proc/net/snmp6")
            .lines()
            .find_map(|l| l.strip_prefix("Icmp6InEchos"))
            .and_then(|v| v.trim().parse().ok())
            .expect("Icmp6InEchos in /proc/net/snmp6");
        (v4, v6)
    }

    /// `cmd` (a `matchlock` command) to run in the owner's namespace, trusting the test CA.
    pub fn wrap(&self, cmd: Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.sandbox_ns])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .stdin(Stdio::null())
            .env("SSL_CERT_FILE", self.ca_pem());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }
}

impl NetHost {
    /// A detached nettest sandbox in this host's namespace under interception: allow-list
    /// `web.test`, secret `API_TOKEN` (value `secret`) bound to `api.test`, net logs at info.
    /// Returns its ID; the caller takes the stop guard.
    pub fn detached_intercepting(&self, env: &TestEnv, secret: &str) -> String {
        let mut run = env.cmd();
        run.args(["run", "--image", nettest_image(env), "-d"])
            .args(["--allow-host", "web.test", "--secret", "API_TOKEN@api.test"])
            .env("API_TOKEN", secret)
            .env("MATCHLOCK_LOG", "warn,matchlock_net=info");
        let out = self.wrap(run).output().expect("run -d");
        assert!(out.status.success(), "run -d: {}", stderr(&out));
        stdout(&out).trim().to_string()
    }
}

impl Default for NetHost {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        if let Some(c) = &mut self.server {
            // `ip netns exec` execs the server, so this pid is the server itself.
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

/// Runs `script` in the guest and returns its output, asserting success when `want_ok`
/// and failure otherwise.
#[track_caller]
pub fn guest_sh(env: &TestEnv, id: &str, script: &str, want_ok: bool) -> String {
    let (ok, text, _) = guest(env, id, script);
    assert_eq!(ok, want_ok, "{script}: {text}");
    text
}

/// Runs `sh -c script` in the guest; returns (success, stdout+stderr, elapsed).
pub fn guest(env: &TestEnv, id: &str, script: &str) -> (bool, String, Duration) {
    let t = Instant::now();
    let o = env.run(&["exec", id, "sh", "-c", script]);
    (
        o.status.success(),
        format!("{}{}", stdout(&o), stderr(&o)),
        t.elapsed(),
    )
}
