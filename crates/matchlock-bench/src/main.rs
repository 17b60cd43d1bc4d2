//! `cargo run --release -p matchlock-bench -- [cold|exec|net|https|vfs|all|pull|scale|channels|snapshot] [--runs N]`
//! (`all`, the default, runs every row except pull and channels, so that every issue-11 row
//! and its target come from one run)
//!
//! Prints the performance ratios of DESIGN §11 from one run (these machines are noisy, so
//! both sides of each ratio are measured back to back, interleaved):
//! - cold start: `matchlock run -- true` with a cached image vs. a bare QEMU boot of the same
//!   kernel and initramfs to init and power-off;
//! - warm exec: `exec true` into a running sandbox (in-process, through the exec relay
//!   socket, through `matchlock rpc` (JSON-RPC, what the SDKs use) and via the `matchlock
//!   exec` CLI) vs. a raw vsock round trip on an open connection, and each vs. the emulated
//!   floor (new connection + Ping plus the guest's own spawn of `/bin/true`, `floor.rs`);
//! - net (needs root for `ip netns`): bulk TCP throughput guest -> host and host -> guest
//!   through the sandbox's network stack vs. QEMU's `-netdev user` on the same kernel and
//!   VM size, and the host memory of an idle sandbox with and without its network (see
//!   `net.rs`);
//! - https: HTTPS latency and throughput through the interceptor alone vs. direct vs.
//!   mitmproxy (`https.rs`); with `--vm` (needs root), end to end from curl in a sandbox
//!   through interception vs. the open network (`https_vm.rs`);
//! - vfs (needs root): sequential I/O, 2,000-file create/stat/unlink and `git status` on a
//!   10,000-file tree through our workspace server vs. upstream `virtiofsd` on the same host
//!   directory vs. the guest's root disk (see `vfs.rs`);
//! - snapshot: `run -- true` restored from the cached snapshot (the default boot path) vs.
//!   cold vs. bare boot, and restored `run -d` + first exec (see `snapshot.rs`);
//! - scale (takes minutes): 1, 4, 16 and 64 concurrent `run -- true` and the host memory
//!   per idle sandbox with 1, 16 and 64 running, on both boot paths (see `scale.rs`);
//! - pull (only when asked for: needs `skopeo`, `docker-registry` and squashfs-tools-ng):
//!   `matchlock pull` of a ~100 MB image from a local registry vs. an independent baseline,
//!   `skopeo copy` to an OCI layout plus a `tar` unpack (whiteouts applied) and `tar2sqfs`;
//! - channels (only when asked for): boot phases and initcall times of the vsock and the
//!   virtio-serial host channel, interleaved (see `channels.rs`).
//!
//! Needs the kernel and guest runtime (`MATCHLOCK_KERNEL`, `MATCHLOCK_GUEST_INIT` or the
//! standard locations) and the `matchlock` binary (`MATCHLOCK_BIN`, default: next to this one).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use matchlock_guest_proto::ExecRequest;
use matchlock_sandbox::exec::ExecIo;
use matchlock_sandbox::paths::Paths;

mod breakdown;
mod channels;
mod exec;
mod floor;
mod https;
mod https_vm;
mod net;
mod pull;
mod scale;
mod sink;
mod snapshot;
mod vfs;

const IMAGE: &str = "busybox:bench";

/// The 1, 5 and 15 minute load averages, for the context of a run's figures.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// `true` with its output discarded: the request every exec benchmark runs.
fn exec_true() -> (ExecRequest, ExecIo) {
    let req = ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };
    let io = ExecIo::new(
        Box::new(tokio::io::sink()),
        Box::new(tokio::io::sink()),
        tokio_util::sync::CancellationToken::new(),
    );
    (req, io)
}

/// How a row compares with its target, as the rows print it.
fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

struct Bench {
    home: tempfile::TempDir,
    bin: PathBuf,
    runs: usize,
}

impl Bench {
    fn matchlock(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("HOME", self.home.path())
            .env("XDG_CACHE_HOME", self.home.path().join(".cache"))
            .env("MATCHLOCK_QUIET_ACCEL", "1")
            // Cold boots unless a mode asks for snapshot boot (`snapshot.rs`).
            .env("MATCHLOCK_NO_SNAPSHOT", "1")
            .stdin(Stdio::null());
        c
    }

    /// [`Bench::matchlock`] on a chosen boot path: with `snapshot`, `run` restores from the
    /// cached post-boot snapshot (making it on first use), as it does for users by default;
    /// without, it cold boots (`MATCHLOCK_NO_SNAPSHOT=1`).
    fn matchlock_boot(&self, snapshot: bool) -> Command {
        let mut c = self.matchlock();
        if snapshot {
            c.env_remove("MATCHLOCK_NO_SNAPSHOT");
        }
        c
    }

    fn paths(&self) -> Paths {
        Paths {
            state: self.home.path().join(".matchlock"),
            cache: self.home.path().join(".cache/matchlock"),
        }
    }

    /// Starts `spec` in this process, as `matchlock run` does (`RunningSandbox::start`,
    /// removed again if the start fails).
    async fn start_in_process(
        &self,
        spec: matchlock_sandbox::SandboxSpec,
    ) -> anyhow::Result<std::sync::Arc<matchlock_sandbox::RunningSandbox>> {
        let paths = self.paths();
        let state = std::sync::Arc::new(matchlock_state::StateDb::open(&paths.state)?);
        let opts = matchlock_sandbox::StartOptions {
            spec,
            lifetime: None,
            remove_on_failure: true,
        };
        let never = tokio_util::sync::CancellationToken::new();
        Ok(matchlock_sandbox::RunningSandbox::start(&paths, state, opts, &never).await?)
    }

    fn setup(&self) -> anyhow::Result<()> {
        let mut archive = Vec::new();
        matchlock_test_support::busybox_image(&mut archive)?;
        self.import(IMAGE, &archive)
    }

    /// `matchlock image import TAG` of a `docker save` archive.
    fn import(&self, tag: &str, archive: &[u8]) -> anyhow::Result<()> {
        let mut child = self
            .matchlock()
            .args(["image", "import", tag])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("spawn matchlock image import")?;
        std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, archive)?;
        if !child.wait()?.success() {
            bail!("image import of {tag} failed");
        }
        Ok(())
    }

    /// Boots the same kernel + initramfs with no disks; the guest powers off at init.
    fn bare_boot(&self) -> anyhow::Result<Duration> {
        Ok(self.bare_boot_with(matchlock_vm::Channel::Vsock, &[])?.0)
    }

    /// [`Self::bare_boot`] with `channel`'s device and `extra` kernel options; returns the
    /// time to power-off and the console log.
    fn bare_boot_with(
        &self,
        channel: matchlock_vm::Channel,
        extra: &[&str],
    ) -> anyhow::Result<(Duration, String)> {
        let dir = tempfile::tempdir()?;
        let guest = matchlock_vm::assets::find_guest_binary()?;
        let initramfs =
            matchlock_vm::assets::initramfs_for(&guest, &self.paths().initramfs_cache())?;
        let mut extra_cmdline = vec!["matchlock.poweroff=1".to_owned()];
        extra_cmdline.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut cfg = matchlock_vm::VmConfig::new(
            "bench",
            dir.path(),
            matchlock_vm::assets::kernel_path(),
            initramfs,
        );
        cfg.console_max_bytes = matchlock_vm::console::DEFAULT_CONSOLE_MAX_BYTES;
        cfg.accel = matchlock_vm::detect_accel(matchlock_vm::Accel::Auto).accel;
        cfg.extra_cmdline = extra_cmdline;
        cfg.channel = channel;
        let t = Instant::now();
        let m = matchlock_vm::backend("qemu")?.start(&cfg)?;
        if !m.wait_exit(Duration::from_secs(60)) {
            bail!("bare boot did not power off: {}", m.console_tail(20));
        }
        let took = t.elapsed();
        drop(m);
        let console = std::fs::read_to_string(dir.path().join("console.log"))
            .context("read the bare boot's console log")?;
        Ok((took, console))
    }

    fn cold_run(&self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let st = self
            .matchlock()
            .args(["run", "--image", IMAGE, "--", "true"])
            .status()?;
        let d = t.elapsed();
        if !st.success() {
            bail!("matchlock run failed: {st}");
        }
        Ok(d)
    }

    fn cold(&self) -> anyhow::Result<()> {
        // Warm caches (initramfs, page cache) once on both sides.
        self.bare_boot()?;
        self.cold_run()?;
        let (mut bare, mut run, mut parts) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.runs {
            bare.push(self.bare_boot()?);
            run.push(self.cold_run()?);
            parts.push(self.cold_in_process()?);
        }
        let (b, r) = (median(bare), median(run));
        println!("cold start ({} runs, medians):", self.runs);
        println!("  bare QEMU boot to init + power-off: {}", ms(b));
        println!("  matchlock run -- true:              {}", ms(r));
        println!(
            "  overhead ratio: {:.2} (target <= 1.15)",
            r.as_secs_f64() / b.as_secs_f64()
        );
        breakdown::print(&parts, b, r);
        Ok(())
    }
}

/// What `--help` prints: the rows each benchmark measures and what it needs.
const HELP: &str = "\
usage: matchlock-bench [cold|exec|net|https [--vm]|vfs|all|pull|scale|channels|snapshot] [--runs N]

Prints each DESIGN section 11 ratio from one run, both sides measured back to back.
  cold    `matchlock run -- true` cold booted (no snapshot) vs. a bare QEMU boot, per phase
  exec    warm `exec true` (in-process, relay, rpc, CLI) vs. the emulated floor
  net     bulk TCP through the sandbox stack vs. QEMU -netdev user (needs root)
  https   HTTPS through the interceptor vs. direct; --vm: from curl in a sandbox (root)
  vfs     workspace I/O and git status vs. virtiofsd vs. the root disk (needs root)
  all     every row below but pull and channels, one run (the default; tens of minutes)
  pull    `matchlock pull` vs. skopeo + tar + tar2sqfs (local registry)
  scale   1/4/16/64 concurrent sandboxes and host memory per idle sandbox, restored
          and cold booted (minutes)
  channels  boot phases and initcall times, vsock vs. virtio-serial host channel
  snapshot  `run -- true` restored from the cached snapshot (the default boot path) vs.
          cold vs. bare boot, and restored `run -d` + first exec
  --runs N  rounds per row (default 5); medians are printed

Needs the guest kernel and runtime (MATCHLOCK_KERNEL, MATCHLOCK_GUEST_INIT or the standard
locations) and the matchlock binary (MATCHLOCK_BIN, default: next to this one).";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut what = "all".to_string();
    let mut runs = 5;
    let mut vm = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .context("--runs N")?
            }
            "cold" | "exec" | "all" | "pull" | "net" | "https" | "vfs" | "scale" | "channels"
            | "snapshot" => what = a,
            // `https --vm`: the end-to-end figure through a sandbox (needs root, like `net`).
            "--vm" => vm = true,
            "-h" | "--help" => {
                println!("{HELP}");
                return Ok(());
            }
            // The HTTPS upstream of `https --vm`, started in the receiver's namespace.
            "https-upstream" => return https_vm::upstream_main(),
            // The network benchmark's receiver, started by `net` in its own namespace.
            "net-sink" => {
                let bytes = args.next().and_then(|v| v.parse().ok()).context("BYTES")?;
                return sink::main(bytes);
            }
            other => bail!("unknown argument {other:?}; see matchlock-bench --help"),
        }
    }
    if what == "https" && !vm {
        return https::run(runs);
    }
    let bin = match std::env::var_os("MATCHLOCK_BIN") {
        Some(b) => PathBuf::from(b),
        None => std::env::current_exe()?.with_file_name("matchlock"),
    };
    if !bin.is_file() {
        bail!(
            "matchlock binary not found at {} (build it, or set MATCHLOCK_BIN)",
            bin.display()
        );
    }
    let bench = Bench {
        home: tempfile::Builder::new()
            .prefix("ml-bench-")
            .tempdir_in("/tmp")?,
        bin,
        runs,
    };
    let accel = matchlock_vm::detect_accel(matchlock_vm::Accel::Auto);
    println!("accelerator: {:?} ({})", accel.accel, accel.reason);
    if what == "pull" {
        return bench.pull();
    }
    if what == "https" {
        return bench.https_vm();
    }
    bench.setup()?;
    if what == "channels" {
        return bench.channels();
    }
    if what == "cold" || what == "all" {
        bench.cold()?;
    }
    if what == "exec" || what == "all" {
        bench.exec()?;
    }
    if what == "net" || what == "all" {
        bench.net()?;
    }
    if what == "vfs" || what == "all" {
        bench.vfs()?;
    }
    if what == "all" {
        https::run(runs)?;
    }
    if what == "snapshot" || what == "all" {
        bench.snapshot()?;
    }
    if what == "scale" || what == "all" {
        bench.scale()?;
    }
    Ok(())
}
