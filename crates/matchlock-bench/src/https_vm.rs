//! `matchlock-bench https --vm`: HTTPS requests made by a client inside a sandbox, end to end
//! through the VM, virtio-net, the userspace network stack and (when on) the interceptor,
//! to an upstream in the network benchmark's namespaces.
//!
//! # Design
//! The namespaces, veth and routes of `net` ([`crate::net::Lab`]): the sandboxes' owners run
//! in the "sandbox" namespace, and an HTTPS upstream ([`upstream_main`], this binary's
//! `https-upstream`: hyper + rustls, HTTP/1.1, a throwaway rcgen CA whose leaf names
//! `bench.test`) on `198.51.100.2:443` in the "receiver" namespace. `bench.test` resolves
//! to it through the sandbox namespace's own `/etc/hosts` (`/etc/netns/<ns>/hosts`), which
//! the owner's resolver answers the guest's DNS from. Nothing has a route off the machine.
//!
//! Two sandboxes of the `nettest` image (curl 7.88), both running while measured, in
//! interleaved rounds:
//! - **interception**: `--allow-host bench.test` (the allow-list turns interception on):
//!   the guest's TLS ends in the interceptor (the guest trusts the sandbox CA through the
//!   environment every command gets), which verifies the upstream against the test CA
//!   (`SSL_CERT_FILE` in the owner's environment) and re-sends each request;
//! - **open**: the default network (open egress, no interception): the guest's TLS goes
//!   through the stack to the upstream, the guest trusting the test CA (`--cacert`).
//!
//! Each round is one `curl --http1.1` per sandbox on one keep-alive connection: [`SMALL_N`]
//! GETs of a 100-byte body (the first [`WARMUP`] dropped: the TLS handshake and first
//! upstream dial), then [`LARGE_N`] GETs of [`LARGE`] bytes. Latency per request is curl's
//! `time_total` (request sent to last byte, connection reused), throughput the large bodies'
//! bytes over their `time_total`s.
//!
//! # Limitations
//! curl runs in the emulated guest (TCG): its own per-request work is part of every figure.
//! One connection at a time; HTTP/1.1 only (the upstream offers nothing else).

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::net::Lab;
use crate::Bench;

/// The bench's image with curl.
const IMAGE: &str = "nettest:bench";
/// The upstream's name (in the sandbox namespace's hosts file) and address.
pub(crate) const NAME: &str = "bench.test";
/// Small GETs per round and sandbox, of which the first [`WARMUP`] are not counted.
const SMALL_N: usize = 210;
const WARMUP: usize = 10;
/// Small body.
const SMALL: usize = 100;
/// Large GETs per round and sandbox, and their body.
const LARGE_N: usize = 2;
pub(crate) const LARGE: usize = 8 << 20;
/// Longest one round of one sandbox may take.
const ROUND_TIMEOUT: Duration = Duration::from_secs(300);

/// What one sandbox measured over all rounds.
#[derive(Default)]
struct Samples {
    small: Vec<f64>,
    large_bytes: f64,
    large_secs: f64,
}

impl Samples {
    fn pct(&self, q: f64) -> f64 {
        let mut v = self.small.clone();
        v.sort_by(f64::total_cmp);
        let i = ((v.len().saturating_sub(1)) as f64 * q).round() as usize;
        v.get(i).copied().unwrap_or_default()
    }

    fn mib_per_s(&self) -> f64 {
        self.large_bytes / (1024.0 * 1024.0) / self.large_secs.max(1e-9)
    }
}

/// The guest's curl command for one round; `cacert` when the guest trusts the test CA.
fn curl_cmd(cacert: Option<&str>) -> String {
    let ca = cacert.map(|c| format!("--cacert {c} ")).unwrap_or_default();
    let w = "%{stderr}%{http_code} %{size_download} %{time_total}\\n";
    format!(
        "curl -sS --http1.1 {ca}-o /dev/null -w '{w}' 'https://{NAME}/small?[1-{SMALL_N}]' \
         'https://{NAME}/large?[1-{LARGE_N}]' 2>&1 >/dev/null"
    )
}

/// Parses one round's `code bytes seconds` lines into `s`.
fn parse_round(out: &str, s: &mut Samples) -> anyhow::Result<()> {
    let lines: Vec<&str> = out.lines().collect();
    if lines.len() != SMALL_N + LARGE_N {
        bail!(
            "curl printed {} lines, expected {}: {out}",
            lines.len(),
            SMALL_N + LARGE_N
        );
    }
    for (i, line) in lines.iter().enumerate() {
        let mut w = line.split_whitespace();
        let (code, bytes, secs) = (w.next(), w.next(), w.next());
        let bytes: usize = bytes.and_then(|b| b.parse().ok()).unwrap_or(0);
        let secs: f64 = secs.and_then(|t| t.parse().ok()).unwrap_or(0.0);
        let want = if i < SMALL_N { SMALL } else { LARGE };
        // curl prints microseconds; a warm small GET may round to 0 (a real reading).
        let timed = secs > 0.0 || (i < SMALL_N && secs == 0.0);
        if code != Some("200") || bytes != want || !timed {
            bail!("request {i}: {line:?} (expected 200 and {want} bytes)");
        }
        if i >= SMALL_N {
            s.large_bytes += bytes as f64;
            s.large_secs += secs;
        } else if i >= WARMUP {
            s.small.push(secs);
        }
    }
    Ok(())
}

impl Bench {
    /// Runs one round in sandbox `id`.
    fn https_round(&self, id: &str, cmd: &str, s: &mut Samples) -> anyhow::Result<()> {
        let mut c = self.matchlock();
        c.args(["exec", id, "sh", "-c", cmd]);
        let o = crate::net::output_within(c, ROUND_TIMEOUT)?;
        let out = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            bail!(
                "guest curl failed ({}): {} {}",
                o.status,
                out.trim(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        parse_round(&out, s)
    }

    pub(crate) fn https_vm(&self) -> anyhow::Result<()> {
        let path = matchlock_test_support::nettest_image().context("build the nettest image")?;
        let archive = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        self.import(IMAGE, &archive)?;
        let mut lab = Lab::new()?;
        let ca = lab.start_https_upstream()?;
        let ca_file = lab.dir().join("upstream-ca.pem");
        std::fs::write(&ca_file, &ca)?;
        let env = [("SSL_CERT_FILE", ca_file.as_os_str())];
        let icpt = self.start_sandbox_with(&lab, IMAGE, &["--allow-host", NAME], &env)?;
        let open = self.start_sandbox_with(&lab, IMAGE, &[], &env);
        let result = open.and_then(|open| {
            let r = self.https_vm_rounds(&icpt, &open, &ca);
            self.stop_sandbox(&open);
            r
        });
        self.stop_sandbox(&icpt);
        let (through, direct) = result?;
        drop(lab);
        report(self.runs, &through, &direct);
        Ok(())
    }

    /// The rounds, interleaved: (interception, open).
    fn https_vm_rounds(
        &self,
        icpt: &str,
        open: &str,
        ca: &str,
    ) -> anyhow::Result<(Samples, Samples)> {
        // The test CA into the open sandbox's guest (PEM is plain ASCII without quotes).
        let mut c = self.matchlock();
        c.args(["exec", open, "sh", "-c"])
            .arg(format!("printf '%s' '{ca}' > /tmp/upstream-ca.pem"));
        let o = crate::net::output_within(c, ROUND_TIMEOUT)?;
        if !o.status.success() {
            bail!(
                "copy the CA into the guest: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let (mut through, mut direct) = (Samples::default(), Samples::default());
        let (cmd_icpt, cmd_open) = (curl_cmd(None), curl_cmd(Some("/tmp/upstream-ca.pem")));
        for _ in 0..self.runs.max(1) {
            self.https_round(icpt, &cmd_icpt, &mut through)
                .context("interception sandbox")?;
            self.https_round(open, &cmd_open, &mut direct)
                .context("open sandbox")?;
        }
        Ok((through, direct))
    }
}

fn report(runs: usize, through: &Samples, direct: &Samples) {
    println!(
        "https through a VM (curl --http1.1 in a 1-vCPU guest, one keep-alive connection, \
         {} x {SMALL} B and {} x {} MiB GETs per sandbox over {runs} interleaved rounds, \
         upstream in another netns over a veth):",
        (SMALL_N - WARMUP) * runs.max(1),
        LARGE_N * runs.max(1),
        LARGE >> 20
    );
    for (name, s) in [
        ("interception (allow-list)", through),
        ("open, not intercepted", direct),
    ] {
        println!(
            "  {name:<27} p50 {:.2} ms  p99 {:.2} ms  throughput {:.1} MiB/s",
            s.pct(0.5) * 1000.0,
            s.pct(0.99) * 1000.0,
            s.mib_per_s()
        );
    }
    println!(
        "  interception adds {:.2} ms at p50; throughput {:.2}x the open path's",
        (through.pct(0.5) - direct.pct(0.5)) * 1000.0,
        through.mib_per_s() / direct.mib_per_s().max(1e-9)
    );
}

/// `https-upstream CA_FILE` in the receiver namespace: generates the test CA, writes its PEM
/// to stdout's first lines (ended by `ready`), then serves HTTPS on port 443 until killed.
pub(crate) fn upstream_main() -> anyhow::Result<()> {
    let ca = crate::https::TestCa::for_names(&[NAME])?;
    let listener = std::net::TcpListener::bind(("0.0.0.0", 443)).context("listen on :443")?;
    listener.set_nonblocking(true)?;
    let tls = ca.server_config()?;
    print!("{}", ca.pem());
    println!("ready");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(crate::https::upstream(listener, tls, LARGE));
    Ok(())
}

/// Reads the upstream's CA PEM from its stdout, up to its `ready` line.
pub(crate) fn read_ca(out: impl std::io::Read) -> anyhow::Result<String> {
    let mut pem = String::new();
    for line in std::io::BufReader::new(out).lines() {
        let line = line.context("read the upstream's output")?;
        if line == "ready" {
            return Ok(pem);
        }
        if pem.len() > 64 * 1024 {
            break;
        }
        pem.push_str(&line);
        pem.push('\n');
    }
    bail!("the HTTPS upstream exited before it was ready")
}

/// Spawns `cmd` with piped stdout (for [`read_ca`]).
pub(crate) fn spawn_piped(mut cmd: Command) -> anyhow::Result<std::process::Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn the HTTPS upstream")
}
