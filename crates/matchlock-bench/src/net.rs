//! `matchlock-bench net`: bulk TCP throughput through the sandbox's userspace network stack
//! vs. QEMU's own `-netdev user` (slirp) on the same kernel and VM size, and the host memory
//! of an idle sandbox with and without its network.
//!
//! # Design
//! Hermetic by construction: the bench creates two network namespaces joined by a veth, the
//! "sandbox" side (`198.51.100.1/24`, `lo` and the veth only, default route to the other
//! side) and the "receiver" side (`198.51.100.2/24`), and runs there, respectively, both
//! VMs' host processes (`matchlock run -d` and the slirp QEMU) and the test host
//! ([`crate::sink`], this binary's `net-sink`). Every byte either VM sends goes to the same
//! receiver over the same veth, and neither namespace has a route off this machine. The
//! receiver address is a TEST-NET-2 address, which the sandbox's default policy allows, so
//! the sandbox runs with its default network configuration (no `block_private_ips: false`).
//! (A loopback arrangement would need the policy opt-out and would compare slirp's
//! `10.0.2.2` host-loopback shortcut with our stack's real connect, a different path.)
//!
//! Both guests run the same busybox binary and the same commands: `dd | nc` to the sink for
//! guest -> host, `nc | wc -c` from the source for host -> guest. Our sandbox runs them
//! through `matchlock exec`; the slirp VM (a busybox initramfs, no vsock) polls the
//! receiver's control port for its next command. The receiver times every transfer, and the
//! two sides are interleaved run by run (this machine is shared and noisy).
//!
//! Memory: the proportional set size (`Pss` of `/proc/<pid>/smaps_rollup`) of the idle
//! sandbox's owner and of its helpers other than QEMU (whose PSS is mostly guest RAM and is
//! shown apart), for a sandbox with the network and one with `--no-network`.
//!
//! # Limitations
//! Needs root (`ip netns`). The slirp QEMU is not confined (seccomp, Landlock) like the
//! sandbox's QEMU is, and its guest runs from an initramfs rather than the image's root
//! disk; neither is on the data path measured. MTU is the default 1500 on both.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::sink::{CONTROL_PORT, DONE_PORT, SINK_PORT, SOURCE_PORT};
use crate::{Bench, IMAGE};

/// The receiver's address (in its own namespace).
const RECEIVER: &str = "198.51.100.2";
/// Bytes per transfer.
const TRANSFER: u64 = 64 * 1024 * 1024;
/// Longest a transfer may take before the bench gives up.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);
/// The host's static busybox, the binary the bench image is made of too.
const BUSYBOX: &str = "/bin/busybox";
/// The guest command printing its NIC's counters as one line `STATS <rx packets>
/// <tx packets> <interrupts> <idle ticks> <all ticks>` (`eth0` in `/proc/net/dev`, its
/// virtio device's line in `/proc/interrupts`, the `cpu` line of `/proc/stat`); the same in
/// both guests, so the two sides' guest work per MiB can be compared.
const GUEST_STATS: &str = "d=$(basename $(readlink /sys/class/net/eth0/device)); \
    set -- $(tr : ' ' </proc/net/dev | grep ' eth0 '); r=$3; t=${11}; \
    set -- $(grep \" $d\\$\" /proc/interrupts); i=$2; set -- $(head -n1 /proc/stat); \
    echo STATS $r $t $i $5 $(($2+$3+$4+$5+$6+$7+$8))";

/// The guest command sending [`TRANSFER`] bytes to the sink.
fn upload_cmd() -> String {
    format!(
        "dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc {RECEIVER} {SINK_PORT}",
        TRANSFER / 65536
    )
}

/// The guest command receiving [`TRANSFER`] bytes and reporting the count.
fn download_cmd() -> String {
    format!("nc {RECEIVER} {SOURCE_PORT} </dev/null | wc -c | nc {RECEIVER} {DONE_PORT}")
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {args:?}"))?;
    if !o.status.success() {
        bail!(
            "{args:?} failed (the network benchmark needs root for `ip netns`): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// MiB/s from a receiver line `<kind> <bytes> <nanoseconds>` of a complete transfer.
fn rate(kind: &str, line: &str) -> anyhow::Result<f64> {
    let mut w = line.split_whitespace();
    let (k, bytes, nanos) = (w.next(), w.next(), w.next());
    let bytes: u64 = bytes.and_then(|b| b.parse().ok()).unwrap_or(0);
    let nanos: u64 = nanos.and_then(|n| n.parse().ok()).unwrap_or(0);
    if k != Some(kind) || bytes != TRANSFER || nanos == 0 {
        bail!("expected a complete {kind} of {TRANSFER} bytes, receiver said {line:?}");
    }
    Ok(bytes as f64 / (1024.0 * 1024.0) / (nanos as f64 / 1e9))
}

/// The two namespaces, the veth and the receiver (and the HTTPS upstream of `https --vm`);
/// all removed on drop. The sandbox namespace's `/etc/hosts` (`/etc/netns/<ns>/hosts`)
/// names the receiver `bench.test`.
pub(crate) struct Lab {
    sandbox_ns: String,
    receiver_ns: String,
    sink: Option<Child>,
    sink_in: Option<ChildStdin>,
    lines: Option<mpsc::Receiver<String>>,
    upstream: Option<Child>,
    dir: tempfile::TempDir,
}

impl Lab {
    pub(crate) fn new() -> anyhow::Result<Lab> {
        let pid = std::process::id();
        let mut lab = Lab {
            sandbox_ns: format!("mlb-s-{pid}"),
            receiver_ns: format!("mlb-r-{pid}"),
            sink: None,
            sink_in: None,
            lines: None,
            upstream: None,
            dir: tempfile::Builder::new()
                .prefix("ml-lab-")
                .tempdir_in("/tmp")?,
        };
        lab.build(&format!("mlb{pid}a"), &format!("mlb{pid}b"))?;
        lab.hosts_file()?;
        lab.start_sink()?;
        Ok(lab)
    }

    /// A scratch directory removed with the lab.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn etc_netns(&self) -> std::path::PathBuf {
        Path::new("/etc/netns").join(&self.sandbox_ns)
    }

    /// The sandbox namespace's `/etc/hosts`: the receiver as `bench.test`, nothing else.
    fn hosts_file(&self) -> anyhow::Result<()> {
        let dir = self.etc_netns();
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let hosts = format!(
            "127.0.0.1 localhost\n{RECEIVER} {}\n",
            crate::https_vm::NAME
        );
        std::fs::write(dir.join("hosts"), hosts)?;
        Ok(())
    }

    /// Starts `https-upstream` in the receiver namespace; returns its CA (PEM).
    pub(crate) fn start_https_upstream(&mut self) -> anyhow::Result<String> {
        let exe = std::env::current_exe()?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.receiver_ns])
            .arg(exe)
            .arg("https-upstream");
        let mut child = crate::https_vm::spawn_piped(c)?;
        let out = child.stdout.take().context("upstream stdout")?;
        self.upstream = Some(child);
        crate::https_vm::read_ca(out)
    }

    fn build(&self, va: &str, vb: &str) -> anyhow::Result<()> {
        let (s, r) = (self.sandbox_ns.as_str(), self.receiver_ns.as_str());
        run(&["ip", "netns", "add", s])?;
        run(&["ip", "netns", "add", r])?;
        run(&["ip", "link", "add", va, "type", "veth", "peer", "name", vb])?;
        run(&["ip", "link", "set", va, "netns", s])?;
        run(&["ip", "link", "set", vb, "netns", r])?;
        let x = |ns: &str, a: &[&str]| -> anyhow::Result<()> {
            let mut v = vec!["ip", "netns", "exec", ns];
            v.extend_from_slice(a);
            run(&v)
        };
        x(s, &["ip", "link", "set", "lo", "up"])?;
        x(s, &["ip", "addr", "add", "198.51.100.1/24", "dev", va])?;
        x(s, &["ip", "link", "set", va, "up"])?;
        x(s, &["ip", "route", "add", "default", "via", RECEIVER])?;
        x(r, &["ip", "link", "set", "lo", "up"])?;
        x(
            r,
            &["ip", "addr", "add", &format!("{RECEIVER}/24"), "dev", vb],
        )?;
        x(r, &["ip", "link", "set", vb, "up"])?;
        Ok(())
    }

    fn start_sink(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.receiver_ns])
            .arg(exe)
            .args(["net-sink", &TRANSFER.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn the receiver")?;
        let out = child.stdout.take().context("receiver stdout")?;
        self.sink_in = child.stdin.take();
        self.sink = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        self.lines = Some(rx);
        let first = self.next_line(Duration::from_secs(20))?;
        if first != "ready" {
            bail!("receiver said {first:?} instead of ready");
        }
        Ok(())
    }

    fn next_line(&self, timeout: Duration) -> anyhow::Result<String> {
        let rx = self.lines.as_ref().context("receiver not started")?;
        rx.recv_timeout(timeout)
            .map_err(|e| anyhow::anyhow!("no word from the receiver: {e}"))
    }

    /// Waits for the receiver's `kind` line (`recv` or `sent`); returns MiB/s.
    fn transfer_rate(&self, kind: &str) -> anyhow::Result<f64> {
        let line = self.next_line(TRANSFER_TIMEOUT)?;
        rate(kind, &line)
    }

    /// The receiver's next line if one comes within `timeout`.
    fn poll_line(&self, timeout: Duration) -> anyhow::Result<Option<String>> {
        let rx = self.lines.as_ref().context("receiver not started")?;
        match rx.recv_timeout(timeout) {
            Ok(line) => Ok(Some(line)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(e) => bail!("receiver gone: {e}"),
        }
    }

    /// Queues a command for the slirp guest's next control connection.
    fn command(&mut self, cmd: &str) -> anyhow::Result<()> {
        let w = self.sink_in.as_mut().context("receiver not started")?;
        writeln!(w, "{cmd}").context("write to the receiver")?;
        w.flush()?;
        Ok(())
    }

    /// `cmd` run inside the sandbox namespace.
    fn in_sandbox_ns(&self, cmd: &Command) -> Command {
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

impl Drop for Lab {
    fn drop(&mut self) {
        drop(self.sink_in.take());
        // `ip netns exec` execs its command, so these pids are the servers themselves.
        for mut c in [self.sink.take(), self.upstream.take()]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(self.etc_netns());
        let _ = run(&["ip", "netns", "del", &self.sandbox_ns]);
        let _ = run(&["ip", "netns", "del", &self.receiver_ns]);
    }
}

/// The slirp VM: QEMU with `-netdev user` booting a busybox initramfs whose `/init` runs
/// the commands the receiver hands out; killed on drop.
struct SlirpVm {
    qemu: Child,
    /// Its console (the guest's commands print here).
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for SlirpVm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

/// The slirp guest's `/init`: network up with slirp's default addressing (the same as our
/// sandbox's), then a loop running whatever the control port hands out.
fn slirp_init() -> String {
    format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev 2>/dev/null\n\
         ip link set lo up\n\
         ip link set eth0 up\n\
         ip addr add 10.0.2.15/24 dev eth0\n\
         ip route add default via 10.0.2.2\n\
         echo slirp-guest-ready\n\
         while true; do\n\
         \x20 cmd=$(nc {RECEIVER} {CONTROL_PORT} </dev/null)\n\
         \x20 case \"$cmd\" in\n\
         \x20   quit) break ;;\n\
         \x20   '') sleep 0.2 ;;\n\
         \x20   *) sh -c \"$cmd\" ;;\n\
         \x20 esac\n\
         done\n\
         poweroff -f\n"
    )
}

impl Bench {
    /// Boots the slirp VM in the sandbox namespace; same kernel, vCPUs and memory as a
    /// sandbox with default resources.
    fn slirp_vm(&self, lab: &Lab) -> anyhow::Result<SlirpVm> {
        use matchlock_vm::cpio::Entry;
        let dir = tempfile::tempdir()?;
        let busybox = std::fs::read(BUSYBOX).with_context(|| format!("read {BUSYBOX}"))?;
        let mut entries = vec![Entry::dir("dev", 0o755)];
        entries.push(Entry::char_dev("dev/console", 0o600, 5, 1));
        for d in ["bin", "proc", "sys", "tmp"] {
            entries.push(Entry::dir(d, 0o755));
        }
        entries.push(Entry::file("bin/busybox", 0o755, busybox));
        entries.push(Entry::file("init", 0o755, slirp_init().into_bytes()));
        let initramfs = dir.path().join("slirp.cpio");
        matchlock_vm::assets::write_initramfs(&entries, &initramfs)?;
        let log = dir.path().join("console.log");
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(slirp_qemu_args(&initramfs)?);
        let qemu = lab
            .in_sandbox_ns(&qemu)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.path().join("qemu.log"))?)
            .spawn()
            .context("spawn QEMU with -netdev user")?;
        let vm = SlirpVm {
            qemu,
            log: log.clone(),
            _dir: dir,
        };
        let t = Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("slirp-guest-ready")
        {
            if t.elapsed() > Duration::from_secs(120) {
                bail!(
                    "slirp guest did not come up: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(vm)
    }
}

/// QEMU's arguments for the slirp VM: the sandbox's machine (microvm, memfd memory, the
/// accelerator and CPU model the VM crate picks, 1 vCPU, 512 MiB), no disks or vsock, and
/// a virtio-net device on `-netdev user`.
fn slirp_qemu_args(initramfs: &Path) -> anyhow::Result<Vec<String>> {
    let kernel = matchlock_vm::assets::kernel_path();
    let (accel, cpu) = match matchlock_vm::detect_accel(matchlock_vm::Accel::Auto).accel {
        matchlock_vm::Accel::Kvm => ("kvm", "host"),
        _ => ("tcg", "max,-erms,-fsrm"),
    };
    let path = |p: &Path| -> anyhow::Result<String> {
        p.to_str()
            .map(|s| s.replace(',', ",,"))
            .with_context(|| format!("{} is not UTF-8", p.display()))
    };
    let mem = matchlock_api::DEFAULT_MEMORY_MB;
    // As the VM crate does under TCG: without a TSC frequency the guest kernel cannot
    // calibrate its clock there and stalls in boot.
    let mut append = "console=ttyS0 reboot=t panic=-1 quiet".to_string();
    if accel == "tcg" {
        if let Some(khz) = host_tsc_khz() {
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    append.push_str(" init=/init");
    Ok([
        "-M",
        "microvm,memory-backend=mem",
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-global",
        "virtio-mmio.force-legacy=false",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-smp",
        "1",
        "-m",
        &format!("{mem}M"),
        "-serial",
        "stdio",
        "-kernel",
        &path(&kernel)?,
        "-initrd",
        &path(initramfs)?,
        "-append",
        &append,
        "-netdev",
        "user,id=net0",
        "-device",
        "virtio-net-device,netdev=net0",
        "-device",
        "virtio-rng-device",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect())
}

/// Host TSC frequency in kHz, from the first `cpu MHz` line of `/proc/cpuinfo`.
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    // Bounded above, so the conversion cannot truncate.
    (mhz.is_finite() && mhz > 0.0 && mhz < 1.0e6).then(|| (mhz * 1000.0).round() as u64)
}

/// Runs `cmd` to completion (output captured), killing it after `timeout`.
pub(crate) fn output_within(
    mut cmd: Command,
    timeout: Duration,
) -> anyhow::Result<std::process::Output> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {:?}", cmd.get_program()))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // The child is ours and not yet reaped (its waiter still holds it).
            let _ = Command::new("kill").arg(pid.to_string()).status();
            bail!(
                "{:?} did not finish within {timeout:?}",
                cmd.get_args().collect::<Vec<_>>()
            )
        }
    }
}

/// Transfer rates in MiB/s, per run, and the host CPU and guest NIC work the transfers took.
#[derive(Default)]
struct Rates {
    up: Vec<f64>,
    down: Vec<f64>,
    cpu_up: CpuUse,
    cpu_down: CpuUse,
    nic_up: NicUse,
    nic_down: NicUse,
}

/// The guest NIC's counters (see [`GUEST_STATS`]), or their sums over transfers.
#[derive(Default, Clone, Copy)]
struct NicUse {
    rx: u64,
    tx: u64,
    irq: u64,
    /// The guest's idle and all CPU time (`/proc/stat`, ticks).
    idle: u64,
    total: u64,
    mib: f64,
}

impl NicUse {
    /// Parses the `STATS rx tx irq` line among `out`'s lines.
    fn parse(out: &str) -> anyhow::Result<NicUse> {
        let line = out
            .lines()
            .rev()
            .find(|l| l.starts_with("STATS "))
            .with_context(|| format!("no STATS line in {out:?}"))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|w| w.parse::<u64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad STATS line {line:?}"))?;
        let [rx, tx, irq, idle, total] = v[..] else {
            bail!("bad STATS line {line:?}");
        };
        Ok(NicUse {
            rx,
            tx,
            irq,
            idle,
            total,
            mib: 0.0,
        })
    }

    /// Adds the counts between `before` and `after`, for `mib` moved.
    fn add(&mut self, before: NicUse, after: NicUse, mib: f64) {
        self.rx += after.rx.saturating_sub(before.rx);
        self.tx += after.tx.saturating_sub(before.tx);
        self.irq += after.irq.saturating_sub(before.irq);
        self.idle += after.idle.saturating_sub(before.idle);
        self.total += after.total.saturating_sub(before.total);
        self.mib += mib;
    }

    /// `guest frames in / out / NIC interrupts` per MiB.
    fn per_mib(&self) -> String {
        let mib = self.mib.max(f64::MIN_POSITIVE);
        format!(
            "frames in {:6.0}, out {:6.0}, NIC interrupts {:6.0}; guest idle {:4.1}%",
            self.rx as f64 / mib,
            self.tx as f64 / mib,
            self.irq as f64 / mib,
            self.idle as f64 * 100.0 / (self.total.max(1) as f64)
        )
    }
}

type CpuSample<'a> = (&'a BTreeMap<String, f64>, &'a BTreeMap<String, f64>);

impl Rates {
    /// One transfer of `kind` (`recv`: guest -> host; `sent`: host -> guest): its rate, the
    /// host CPU (before, after) and the guest NIC's counters (before, after).
    fn record(&mut self, kind: &str, rate: f64, cpu: CpuSample, nic: (NicUse, NicUse), mib: f64) {
        let (rates, c, n) = if kind == "recv" {
            (&mut self.up, &mut self.cpu_up, &mut self.nic_up)
        } else {
            (&mut self.down, &mut self.cpu_down, &mut self.nic_down)
        };
        rates.push(rate);
        c.add(cpu.0, cpu.1, mib);
        n.add(nic.0, nic.1, mib);
    }
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Host CPU seconds by thread group, summed over the transfers of one side and direction.
#[derive(Default)]
struct CpuUse {
    secs: BTreeMap<String, f64>,
    mib: f64,
}

impl CpuUse {
    /// Adds the CPU time the threads of `procs` spent between `before` and `after`.
    fn add(&mut self, before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, mib: f64) {
        for (k, v) in after {
            let d = v - before.get(k).copied().unwrap_or_default();
            *self.secs.entry(k.clone()).or_default() += d.max(0.0);
        }
        self.mib += mib;
    }

    /// Milliseconds of CPU per MiB moved, per group and in all.
    fn per_mib(&self) -> (Vec<(String, f64)>, f64) {
        let mib = self.mib.max(f64::MIN_POSITIVE);
        let rows = self
            .secs
            .iter()
            .map(|(k, v)| (k.clone(), v * 1000.0 / mib))
            .collect();
        (rows, self.secs.values().sum::<f64>() * 1000.0 / mib)
    }
}

/// Clock ticks per second of `/proc` CPU times.
fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system) of every thread of the processes `procs` (pid, role), by
/// group: QEMU's main thread (the one whose id is the pid) apart from its other threads
/// (the vCPU, RCU and I/O workers: QEMU does not name them), the owner's threads by name
/// (`matchlock-net` is the stack; `matchlock-vnet*` and the `vring_worker` that moves
/// the frames are the vhost-user-net backend).
fn thread_cpu(procs: &[(u32, &str)]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for &(pid, role) in procs {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            let tid: u32 = t.file_name().to_string_lossy().parse().unwrap_or_default();
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = stat.get(open + 1..close).unwrap_or_default();
            let f: Vec<&str> = stat
                .get(close + 1..)
                .unwrap_or_default()
                .split_whitespace()
                .collect();
            // Fields 14 and 15 of stat(5); the slice starts at field 3.
            let ticks: f64 = [11, 12]
                .iter()
                .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
                .sum();
            let group = match role {
                "qemu" if tid == pid => "QEMU main thread".to_string(),
                "qemu" => "QEMU other threads (vCPU, ...)".to_string(),
                _ if comm == "matchlock-net" => "owner stack thread (matchlock-net)".to_string(),
                _ if comm.starts_with("matchlock-vnet") || comm == "vring_worker" => {
                    "owner vhost-user-net threads".to_string()
                }
                _ => "owner other threads".to_string(),
            };
            *out.entry(group).or_default() += ticks / clock_ticks();
        }
    }
    out
}

/// Proportional set size of a process in KiB (`Pss:` of `smaps_rollup`).
pub(crate) fn pss_kib(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("read /proc/{pid}/smaps_rollup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no Pss in /proc/{pid}/smaps_rollup"))
}

pub(crate) fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Host memory of one idle sandbox: owner, helpers other than QEMU, QEMU (KiB of PSS).
struct IdleMemory {
    owner: u64,
    /// The owner again after the throughput runs (networked sandbox only).
    owner_after: Option<u64>,
    helpers: u64,
    qemu: u64,
}

impl Bench {
    /// Starts a detached sandbox (in the sandbox namespace) and returns its id.
    fn start_sandbox(&self, lab: &Lab, extra: &[&str]) -> anyhow::Result<String> {
        self.start_sandbox_with(lab, IMAGE, extra, &[])
    }

    /// [`Bench::start_sandbox`] of `image`, the owner's environment plus `env`.
    pub(crate) fn start_sandbox_with(
        &self,
        lab: &Lab,
        image: &str,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<String> {
        let mut c = self.matchlock();
        c.args(["run", "--image", image, "-d"]).args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        let o = lab.in_sandbox_ns(&c).output().context("matchlock run -d")?;
        if !o.status.success() {
            bail!(
                "matchlock run -d failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    pub(crate) fn stop_sandbox(&self, id: &str) {
        let _ = self.matchlock().args(["kill", id]).output();
        let _ = self.matchlock().args(["rm", id]).output();
    }

    fn idle_memory(&self, id: &str) -> anyhow::Result<IdleMemory> {
        let state = matchlock_state::StateDb::open(&self.paths().state)?;
        let owner = state.get(id)?.pid;
        let record = state.lifecycle_latest(id)?.context("no lifecycle record")?;
        let mut m = IdleMemory {
            owner: pss_kib(owner)?,
            owner_after: None,
            helpers: 0,
            qemu: 0,
        };
        for p in &record.resources.processes {
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", p.pid))?;
            if comm.starts_with("qemu") {
                m.qemu += pss_kib(p.pid)?;
            } else {
                m.helpers += pss_kib(p.pid)?;
            }
        }
        Ok(m)
    }

    /// One transfer through our sandbox: `cmd` via `matchlock exec`, timed by the receiver.
    fn ours(&self, lab: &Lab, id: &str, cmd: &str, kind: &str) -> anyhow::Result<f64> {
        let mut exec = self.matchlock();
        exec.args(["exec", id, "sh", "-c", cmd])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = exec.spawn().context("spawn matchlock exec")?;
        let deadline = Instant::now() + TRANSFER_TIMEOUT;
        // Fails fast when the guest command fails instead of waiting for the timeout.
        let line = loop {
            if let Some(line) = lab.poll_line(Duration::from_millis(500))? {
                break line;
            }
            let failed = child.try_wait()?.is_some_and(|st| !st.success());
            if failed || Instant::now() > deadline {
                let o = child.wait_with_output()?;
                bail!(
                    "matchlock exec {cmd:?}: no {kind} report ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
        };
        let o = child.wait_with_output()?;
        rate(kind, &line).with_context(|| {
            format!(
                "matchlock exec {cmd:?} ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )
        })
    }

    /// Our guest's NIC counters, through `matchlock exec`.
    fn ours_nic(&self, id: &str) -> anyhow::Result<NicUse> {
        let mut exec = self.matchlock();
        exec.args(["exec", id, "sh", "-c", GUEST_STATS]);
        let o = output_within(exec, Duration::from_secs(60))?;
        NicUse::parse(&String::from_utf8_lossy(&o.stdout))
            .with_context(|| String::from_utf8_lossy(&o.stderr).trim().to_string())
    }

    /// The slirp guest's NIC counters: the command's line on its console.
    fn slirp_nic(&self, lab: &mut Lab, vm: &SlirpVm) -> anyhow::Result<NicUse> {
        let count = |log: &str| log.lines().filter(|l| l.starts_with("STATS ")).count();
        let seen = count(&std::fs::read_to_string(&vm.log).unwrap_or_default());
        lab.command(GUEST_STATS)?;
        let t = Instant::now();
        loop {
            let log = std::fs::read_to_string(&vm.log).unwrap_or_default();
            if count(&log) > seen {
                return NicUse::parse(&log);
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("slirp guest printed no STATS line");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One transfer through the slirp VM.
    fn slirp(&self, lab: &mut Lab, cmd: &str, kind: &str) -> anyhow::Result<f64> {
        lab.command(cmd)?;
        lab.transfer_rate(kind)
            .with_context(|| format!("slirp guest: {cmd:?}"))
    }

    /// Interleaved transfers, a warm-up of each first, with the host CPU time of each
    /// side's processes (`ours`: the owner and its QEMU; the slirp VM's QEMU) and the
    /// guest NIC's counters over each transfer; (ours, slirp).
    fn throughput(&self, lab: &mut Lab, id: &str, vm: &SlirpVm) -> anyhow::Result<(Rates, Rates)> {
        let (up, down) = (upload_cmd(), download_cmd());
        let mine = self.sandbox_procs(id)?;
        let theirs = [(vm.qemu.id(), "qemu")];
        let mib = (TRANSFER / (1024 * 1024)) as f64;
        self.ours(lab, id, &up, "recv")?;
        self.slirp(lab, &up, "recv")?;
        let (mut ours, mut slirp) = (Rates::default(), Rates::default());
        for _ in 0..self.runs {
            for (cmd, kind) in [(&up, "recv"), (&down, "sent")] {
                let n = self.ours_nic(id)?;
                let b = thread_cpu(&mine);
                let r = self.ours(lab, id, cmd, kind)?;
                let a = thread_cpu(&mine);
                let n2 = self.ours_nic(id)?;
                ours.record(kind, r, (&b, &a), (n, n2), mib);
                let n = self.slirp_nic(lab, vm)?;
                let b = thread_cpu(&theirs);
                let r = self.slirp(lab, cmd, kind)?;
                let a = thread_cpu(&theirs);
                let n2 = self.slirp_nic(lab, vm)?;
                slirp.record(kind, r, (&b, &a), (n, n2), mib);
            }
        }
        Ok((ours, slirp))
    }

    /// The sandbox's owner and QEMU (pid, role).
    fn sandbox_procs(&self, id: &str) -> anyhow::Result<Vec<(u32, &'static str)>> {
        let state = matchlock_state::StateDb::open(&self.paths().state)?;
        let mut procs = vec![(state.get(id)?.pid, "owner")];
        let record = state.lifecycle_latest(id)?.context("no lifecycle record")?;
        for p in &record.resources.processes {
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", p.pid))?;
            if comm.starts_with("qemu") {
                procs.push((p.pid, "qemu"));
            }
        }
        Ok(procs)
    }

    pub(crate) fn net(&self) -> anyhow::Result<()> {
        let load_before = crate::loadavg();
        let mut lab = Lab::new()?;
        let id = self.start_sandbox(&lab, &[])?;
        let result = self.net_with(&mut lab, &id);
        self.stop_sandbox(&id);
        let (ours, slirp, mem_net) = result?;
        let id = self.start_sandbox(&lab, &["--no-network"])?;
        std::thread::sleep(Duration::from_secs(2));
        let mem_none = self.idle_memory(&id);
        self.stop_sandbox(&id);
        let mem_none = mem_none?;
        drop(lab);
        println!(
            "load average (1, 5, 15 min) before: {load_before}, after: {}",
            crate::loadavg()
        );
        print_net(self.runs, ours, slirp, &mem_net, &mem_none);
        Ok(())
    }

    /// The throughput rows and the networked sandbox's idle memory (measured first, before
    /// any traffic, and again after it).
    fn net_with(&self, lab: &mut Lab, id: &str) -> anyhow::Result<(Rates, Rates, IdleMemory)> {
        std::thread::sleep(Duration::from_secs(2));
        let mut mem = self.idle_memory(id)?;
        let vm = self.slirp_vm(lab)?;
        let (ours, slirp) = self.throughput(lab, id, &vm)?;
        lab.command("quit")?;
        drop(vm);
        std::thread::sleep(Duration::from_secs(2));
        mem.owner_after = Some(self.idle_memory(id)?.owner);
        Ok((ours, slirp, mem))
    }
}

fn print_net(runs: usize, ours: Rates, slirp: Rates, net: &IdleMemory, none: &IdleMemory) {
    let mibs = TRANSFER / (1024 * 1024);
    let (ou, su) = (median_f(ours.up), median_f(slirp.up));
    let (od, sd) = (median_f(ours.down), median_f(slirp.down));
    println!(
        "network throughput ({mibs} MiB per transfer, {runs} runs, medians; busybox nc in a \
         1-vCPU guest to a receiver in another netns over a veth):"
    );
    println!("  guest -> host, matchlock stack:       {ou:.1} MiB/s");
    println!("  guest -> host, QEMU -netdev user:     {su:.1} MiB/s");
    println!("  ratio: {:.2}x (target >= 1x)", ou / su);
    println!("  host -> guest, matchlock stack:       {od:.1} MiB/s");
    println!("  host -> guest, QEMU -netdev user:     {sd:.1} MiB/s");
    println!("  ratio: {:.2}x (no target)", od / sd);
    let transport = std::env::var("MATCHLOCK_DEV_NET_TRANSPORT").unwrap_or_default();
    let transport = if transport.is_empty() {
        "default"
    } else {
        &transport
    };
    println!(
        "host CPU per MiB moved (ms/MiB, user + system, summed over the timed transfers; \
         ours: owner + QEMU, transport {transport}; slirp: QEMU):"
    );
    for (dir, o, sl) in [
        ("guest -> host", &ours.cpu_up, &slirp.cpu_up),
        ("host -> guest", &ours.cpu_down, &slirp.cpu_down),
    ] {
        let ((orows, ototal), (srows, stotal)) = (o.per_mib(), sl.per_mib());
        println!(
            "  {dir}: ours {ototal:.1} ms/MiB, slirp {stotal:.1} ms/MiB = {:.2}x",
            ototal / stotal.max(f64::MIN_POSITIVE)
        );
        for (k, v) in orows {
            println!("    ours  {k:<38} {v:6.1}");
        }
        for (k, v) in srows {
            println!("    slirp {k:<38} {v:6.1}");
        }
    }
    println!("guest NIC work per MiB moved (eth0 frames, its virtio interrupts; summed over the timed transfers):");
    for (dir, o, sl) in [
        ("guest -> host", &ours.nic_up, &slirp.nic_up),
        ("host -> guest", &ours.nic_down, &slirp.nic_down),
    ] {
        println!("  {dir}: ours  {}", o.per_mib());
        println!("  {dir}: slirp {}", sl.per_mib());
    }
    println!("idle sandbox host memory (PSS; QEMU shown apart, mostly guest RAM):");
    println!(
        "  with network:  owner {} (target <= 30 MiB), helpers {}, QEMU {}",
        mib(net.owner),
        mib(net.helpers),
        mib(net.qemu)
    );
    if let Some(after) = net.owner_after {
        println!("  with network, after the transfers: owner {}", mib(after));
    }
    println!(
        "  --no-network:  owner {}, helpers {}, QEMU {}",
        mib(none.owner),
        mib(none.helpers),
        mib(none.qemu)
    );
    println!(
        "  the network's cost: owner {:+.1} MiB",
        (net.owner as f64 - none.owner as f64) / 1024.0
    );
}
