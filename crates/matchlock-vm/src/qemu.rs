//! The QEMU `microvm` backend with a vhost-user vsock device served by `vhost-device-vsock`
//! (default) or a virtio-serial host channel ([`crate::chan`], no helper process).
//!
//! # Design
//! Start order: `vhost-device-vsock --vm guest-cid=3,socket=<dir>/vhost-vsock.sock,
//! uds-path=<dir>/vsock.sock` first (QEMU needs its socket to exist), polled every 10 ms for
//! up to 5 s, failing fast if it exits; then QEMU with the recipe measured in DESIGN §2:
//! - `-M microvm,memory-backend=mem` with a shared memfd backend: vhost-user needs the guest
//!   memory shared, without it vsock connections time out;
//! - `-global virtio-mmio.force-legacy=false` (legacy virtio-mmio breaks vhost-user devices);
//! - TCG: `-cpu max,-erms,-fsrm` (plain `max` makes `rep movsb` copies ~3x slower; `qemu64`
//!   lacks SSE4/POPCNT), `thread=multi` only with more than one vCPU;
//! - kernel command line `tsc_early_khz=<host kHz>` under TCG (without it TSC calibration
//!   sometimes hangs the guest), `reboot=t` (fast power-off), `panic=-1` plus `-no-reboot`
//!   so a guest reboot or panic ends QEMU;
//! - PVH direct boot of the uncompressed `vmlinux` (0.2 s faster than `bzImage`);
//! - TCG: QEMU's default translation cache (`tb-size`, 1 GiB, touched as code is
//!   translated): an idle VM keeps ~45 MiB of it. `tb-size=16` cut that to ~18 MiB but made
//!   the first exec after boot ~4x slower and the power-off 2-3x (retranslation after cache
//!   flushes; `matchlock-bench cold`, docs/testing.md), so it is not set;
//! - TCG: `tsc=reliable`: QEMU's TCG TSC follows the host clock, but the kernel's clocksource
//!   watchdog checks it against jiffies, whose ticks arrive late when the host is loaded;
//!   under load it declared the TSC unstable in every boot seen ("TSC found unstable after
//!   boot") and switched the guest to `refined-jiffies` (10 ms resolution, time that only
//!   advances with timer ticks).
//!
//! ACPI (measured here, QEMU 7.2 TCG, `-smp 1 -m 256`, vsock + rng devices, busybox init
//! that mounts sysfs, lists `/sys/bus/virtio/devices` and reboots; 8 runs each, wall time
//! from QEMU start to exit):
//! - default (microvm builds ACPI tables describing the virtio-mmio devices): 0.81-0.92 s
//!   (median ~0.85 s), both devices found;
//! - `-M microvm,acpi=off` (QEMU then adds `virtio_mmio.device=` to the command line):
//!   0.93-1.11 s (median ~0.95 s), both devices found, plus an "ACPI BIOS Error" line;
//! - `acpi=off` on the kernel command line only: 0.92-1.07 s and **no** virtio device is
//!   found (QEMU passes no `virtio_mmio.device=` while its ACPI is on).
//!
//! So ACPI stays on ([`MICROVM_ACPI_OFF`] is false). `pci=off` made no measurable difference.
//!
//! With [`Channel::Serial`] the vsock device and its helper are replaced by
//! `virtio-serial-device` with one `virtserialport` on a chardev that connects to the
//! owner's `<dir>/chan.sock` (bound before QEMU starts), and the kernel command line gets
//! `matchlock.chan=serial` so the guest agent opens the port instead of dialing vsock.
//!
//! With a [`crate::SnapshotMode`] (developer switch `MATCHLOCK_DEV_SNAPSHOT=1`, serial
//! channel only) guest RAM is a `memory-backend-file` instead of memfd and QEMU gets a QMP
//! socket (`<dir>/qmp.sock`); a restore adds `-incoming defer` and [`QemuMachine::start`]
//! loads the saved state before it returns ([`crate::snapshot`]).
//!
//! The serial console is a `stdio` chardev: QEMU's stdout, its stderr and the stderr of
//! `vhost-device-vsock` share one pipe that the owner copies into the capped, rotating
//! console log (`console.rs`), so a boot failure report shows all three. When QEMU exits (guest power-off, panic, kill), its waiter
//! SIGKILLs the vsock helper, which has nothing left to serve.
//!
//! # Limitations
//! Paths passed to QEMU and `vhost-device-vsock` must be UTF-8; commas are escaped for QEMU
//! but rejected in the state directory (the `--vm` option of `vhost-device-vsock` cannot
//! escape them). Disk serials are limited to 20 bytes (virtio-blk). No network device yet.
//! No balloon: `virtio-balloon-device,
//! free-page-reporting=on` was tried and returned nothing measurable (docs/testing.md, "Many
//! sandboxes").

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use matchlock_guest_proto::GUEST_CID;

use crate::accel::{detect_accel, kvm_usable, Accel};
use crate::assets::private_dir;
use crate::chan::{Channel, HostChannel, CHAN_SOCKET};
use crate::confine::{landlock_for, qemu_supports_sandbox, Rules, QEMU_SANDBOX};
use crate::console::ConsoleLog;
use crate::spawn::{spawn_tied, Supervised};
use crate::{hybrid, Backend, Machine, VmConfig, VmError};

/// Whether to boot with `-M microvm,acpi=off`; measured slower by ~0.1 s (module docs).
pub const MICROVM_ACPI_OFF: bool = false;
/// Hybrid vsock base socket name inside the state directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// vhost-user control socket name inside the state directory.
pub const VHOST_SOCKET: &str = "vhost-vsock.sock";
/// How long `vhost-device-vsock` may take to create its socket.
const VSOCK_STARTUP: Duration = Duration::from_secs(5);
/// Poll period while waiting for that socket.
const VSOCK_POLL: Duration = Duration::from_millis(10);
/// Longest single hybrid-vsock attempt inside [`Machine::connect`], so a VM exit is noticed.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(2);
/// Pause between attempts when the guest did not accept yet.
const CONNECT_RETRY: Duration = Duration::from_millis(20);
/// How long `kill` waits for a SIGKILLed child to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// virtio-blk serials are at most 20 bytes.
const MAX_SERIAL: usize = 20;

/// The QEMU `microvm` backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct QemuBackend;

impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn start(&self, cfg: &VmConfig) -> Result<Box<dyn Machine>, VmError> {
        Ok(Box::new(QemuMachine::start(cfg)?))
    }
}

/// Version line of QEMU (`QEMU emulator version 7.2.22 ...`), for `diagnose`.
pub fn qemu_version(bin: Option<&Path>) -> Result<String, VmError> {
    let binary = qemu_path(bin)?;
    let out = Command::new(&binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| VmError::QemuVersion {
            binary: binary.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmError::QemuVersionFailed {
            binary,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

/// Locates `vhost-device-vsock`: `bin` if given, else `PATH`, else `~/.cargo/bin`.
pub fn vsock_backend_path(bin: Option<&Path>) -> Result<PathBuf, VmError> {
    if let Some(b) = bin {
        return if is_executable(b) {
            Ok(b.to_owned())
        } else {
            Err(VmError::MissingFile {
                what: "vhost-device-vsock",
                path: b.to_owned(),
            })
        };
    }
    if let Some(p) = find_in_path("vhost-device-vsock") {
        return Ok(p);
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = cargo_home {
        let p = home.join("bin").join("vhost-device-vsock");
        if is_executable(&p) {
            return Ok(p);
        }
    }
    Err(VmError::VsockBackendNotFound)
}

pub(crate) fn qemu_path(bin: Option<&Path>) -> Result<PathBuf, VmError> {
    match bin {
        Some(b) if is_executable(b) => Ok(b.to_owned()),
        Some(b) => Err(VmError::MissingFile {
            what: "QEMU binary",
            path: b.to_owned(),
        }),
        None => find_in_path("qemu-system-x86_64").ok_or(VmError::QemuNotFound),
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Host TSC frequency in kHz from the first `cpu MHz` line of `/proc/cpuinfo`.
fn host_tsc_khz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    if !(mhz.is_finite() && mhz > 0.0 && mhz < 1.0e6) {
        return None;
    }
    // Bounded above, so the conversion cannot truncate.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((mhz * 1000.0).round() as u64)
}

fn utf8<'a>(p: &'a Path, what: &str) -> Result<&'a str, VmError> {
    p.to_str().ok_or_else(|| VmError::InvalidConfig {
        reason: format!("{what} path {} is not UTF-8", p.display()),
    })
}

/// Escapes a value for a QEMU `key=value,...` option (commas are doubled).
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// The kernel command line.
fn kernel_cmdline(cfg: &VmConfig, accel: Accel, tsc_khz: Option<u64>) -> String {
    let mut words: Vec<String> = ["console=ttyS0", "reboot=t", "panic=-1", "quiet"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    if accel == Accel::Tcg {
        if let Some(khz) = tsc_khz {
            words.push(format!("tsc_early_khz={khz}"));
        }
        // QEMU's TCG TSC follows the host clock; the kernel's clocksource watchdog compares
        // it with jiffies, whose ticks arrive late on a loaded host, and then switches the
        // guest to the 10 ms `refined-jiffies` clocksource (module docs).
        words.push("tsc=reliable".to_owned());
    }
    if cfg.channel == Channel::Serial {
        words.push("matchlock.chan=serial".to_owned());
    }
    words.push("init=/init".to_owned());
    words.extend(cfg.extra_cmdline.iter().cloned());
    words.join(" ")
}

/// QEMU's argument vector (without the binary). `accel` is `Kvm` or `Tcg`.
///
/// `chan_socket` is the vhost-user socket of `vhost-device-vsock` (vsock) or the owner's
/// channel socket (serial), per `cfg.channel`.
fn qemu_args(
    cfg: &VmConfig,
    accel: Accel,
    tsc_khz: Option<u64>,
    chan_socket: &Path,
) -> Result<Vec<OsString>, VmError> {
    let mem = cfg.memory_mb;
    let mut machine = "microvm,memory-backend=mem".to_owned();
    if MICROVM_ACPI_OFF {
        machine.push_str(",acpi=off");
    }
    let memory = match &cfg.snapshot {
        None => format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        Some(snap) => snap.memory_object(mem, &qemu_escape(utf8(snap.ram(), "snapshot RAM")?)),
    };
    let mut a: Vec<String> = vec![
        "-M".into(),
        machine,
        "-object".into(),
        memory,
        "-global".into(),
        "virtio-mmio.force-legacy=false".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
    ];
    match accel {
        Accel::Kvm => a.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]),
        _ => {
            let tcg = if cfg.vcpus > 1 {
                "tcg,thread=multi".to_owned()
            } else {
                "tcg".to_owned()
            };
            a.extend([
                "-accel".into(),
                tcg,
                "-cpu".into(),
                "max,-erms,-fsrm".into(),
            ]);
        }
    }
    a.extend([
        "-smp".into(),
        cfg.vcpus.to_string(),
        "-m".into(),
        format!("{mem}M"),
        // The serial console is QEMU's stdout, a pipe the owner copies into the capped
        // console log (see `console.rs`).
        "-chardev".into(),
        "stdio,id=con,signal=off".into(),
        "-serial".into(),
        "chardev:con".into(),
        "-kernel".into(),
        utf8(&cfg.kernel, "kernel")?.to_owned(),
        "-initrd".into(),
        utf8(&cfg.initramfs, "initramfs")?.to_owned(),
        "-append".into(),
        kernel_cmdline(cfg, accel, tsc_khz),
    ]);
    let socket = qemu_escape(utf8(chan_socket, "channel socket")?);
    match cfg.channel {
        Channel::Vsock => a.extend([
            "-chardev".into(),
            format!("socket,id=vs,path={socket}"),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vs".into(),
        ]),
        Channel::Serial => a.extend(crate::chan::qemu_args(&socket)),
    }
    for (i, d) in cfg.disks.iter().enumerate() {
        let ro = if d.readonly { "on" } else { "off" };
        a.push("-drive".into());
        a.push(format!(
            "id=d{i},file={},format=raw,if=none,readonly={ro},discard=unmap",
            qemu_escape(utf8(&d.path, "disk")?)
        ));
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=d{i},serial={}", d.serial));
    }
    if let Some(n) = &cfg.net {
        a.extend(netdev_args(n)?);
    }
    if let Some(f) = &cfg.fs {
        a.extend(fs_args(f)?);
    }
    a.extend(["-device".into(), "virtio-rng-device".into()]);
    if let Some(snap) = &cfg.snapshot {
        let qmp = cfg.state_dir.join(crate::snapshot::QMP_SOCKET);
        a.extend([
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                qemu_escape(utf8(&qmp, "QMP socket")?)
            ),
        ]);
        if matches!(snap, crate::SnapshotMode::Restore { .. }) {
            a.extend(["-incoming".into(), "defer".into()]);
        }
    }
    Ok(a.into_iter().map(OsString::from).collect())
}

/// Everything a snapshot of `cfg` depends on, as text for the snapshot key: QEMU's
/// argument vector with the per-VM paths replaced (so it carries the kernel command line,
/// memory, vCPUs, accelerator and device layout), each disk's serial, mode and size (the
/// guest reads capacities at probe), and the identity (path, device, inode, size, mtime)
/// of the QEMU binary, the kernel and the initramfs, so a rebuilt file never restores an
/// old snapshot.
pub fn snapshot_key_material(cfg: &VmConfig) -> Result<String, VmError> {
    let accel = match cfg.accel {
        Accel::Auto => detect_accel(Accel::Auto).accel,
        other => other,
    };
    let tsc_khz = if accel == Accel::Tcg {
        fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| host_tsc_khz(&c))
    } else {
        None
    };
    let mut norm = cfg.clone();
    norm.state_dir = PathBuf::from("/vm");
    norm.kernel = PathBuf::from("/kernel");
    norm.initramfs = PathBuf::from("/initramfs");
    norm.snapshot = None;
    if let Some(n) = &mut norm.net {
        n.socket = PathBuf::from("/vm/net");
    }
    if let Some(f) = &mut norm.fs {
        f.socket = PathBuf::from("/vm/fs");
    }
    for (i, d) in norm.disks.iter_mut().enumerate() {
        d.path = PathBuf::from(format!("/disk{i}"));
    }
    let args = qemu_args(&norm, accel, tsc_khz, Path::new("/vm/chan"))?;
    let mut text: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    for d in &cfg.disks {
        let len = fs::metadata(&d.path)
            .map_err(|source| VmError::SnapshotIdentity {
                path: d.path.clone(),
                source,
            })?
            .len();
        text.push(format!("disk {} ro={} size={len}", d.serial, d.readonly));
    }
    let qemu = qemu_path(cfg.qemu_binary.as_deref())?;
    for (what, p) in [
        ("qemu", &qemu),
        ("kernel", &cfg.kernel),
        ("initramfs", &cfg.initramfs),
    ] {
        text.push(format!("{what} {}", file_identity(p)?));
    }
    Ok(text.join("\n"))
}

fn file_identity(p: &Path) -> Result<String, VmError> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(p).map_err(|source| VmError::SnapshotIdentity {
        path: p.to_owned(),
        source,
    })?;
    Ok(format!(
        "{} dev={} ino={} size={} mtime={}.{}",
        p.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// The vhost-user-fs device on the backend's socket (queue size 1024, the backend's maximum).
fn fs_args(f: &crate::FsDevice) -> Result<[String; 4], VmError> {
    if f.tag.is_empty() || !f.tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(VmError::InvalidConfig {
            reason: format!("virtio-fs tag {:?} must be alphanumeric", f.tag),
        });
    }
    Ok([
        "-chardev".into(),
        format!(
            "socket,id=vfs,path={}",
            qemu_escape(utf8(&f.socket, "virtio-fs socket")?)
        ),
        "-device".into(),
        format!(
            "vhost-user-fs-device,chardev=vfs,tag={},queue-size=1024",
            f.tag
        ),
    ])
}

/// The microvm virtio-net device on the network stack's unix socket (the stack listens
/// before QEMU starts; QEMU is the client): `-netdev stream` (length-prefixed frames), or
/// `-netdev vhost-user` with 1024-entry queues (the backend's maximum; QEMU allows a
/// transmit queue above 256 only for vhost-user).
fn netdev_args(n: &crate::NetDevice) -> Result<Vec<String>, VmError> {
    let m = n.mac;
    let mac = format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    );
    let socket = qemu_escape(utf8(&n.socket, "network stack socket")?);
    Ok(match n.transport {
        crate::NetTransport::Stream => vec![
            "-netdev".into(),
            format!("stream,id=net0,server=off,addr.type=unix,addr.path={socket}"),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={mac}"),
        ],
        crate::NetTransport::VhostUser => vec![
            "-chardev".into(),
            format!("socket,id=netchr,path={socket}"),
            "-netdev".into(),
            "vhost-user,id=net0,chardev=netchr".into(),
            "-device".into(),
            format!(
                "virtio-net-device,netdev=net0,mac={mac},rx_queue_size=1024,tx_queue_size=1024"
            ),
        ],
    })
}

fn validate(cfg: &VmConfig) -> Result<(), VmError> {
    let invalid = |reason: String| Err(VmError::InvalidConfig { reason });
    if cfg.vcpus == 0 {
        return invalid("vcpus must be at least 1".into());
    }
    if cfg.memory_mb < 32 {
        return invalid(format!("memory_mb {} is below 32", cfg.memory_mb));
    }
    let dir = utf8(&cfg.state_dir, "state directory")?;
    if dir.contains(',') {
        return invalid(format!("state directory {dir} contains a comma"));
    }
    if !cfg.kernel.is_file() {
        return Err(VmError::MissingFile {
            what: "guest kernel (build it with scripts/build-kernel.sh)",
            path: cfg.kernel.clone(),
        });
    }
    if !cfg.initramfs.is_file() {
        return Err(VmError::MissingFile {
            what: "initramfs",
            path: cfg.initramfs.clone(),
        });
    }
    for d in &cfg.disks {
        if !d.path.is_file() {
            return Err(VmError::MissingFile {
                what: "disk image",
                path: d.path.clone(),
            });
        }
        let serial_ok = d.serial.len() <= MAX_SERIAL
            && !d.serial.is_empty()
            && d.serial
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !serial_ok {
            return invalid(format!(
                "disk serial {:?} must be 1-{MAX_SERIAL} bytes of [A-Za-z0-9._-]",
                d.serial
            ));
        }
    }
    Ok(())
}

/// The Landlock ruleset for helper `what` (binary `bin`) of `cfg`.
fn confined(
    what: &'static str,
    cfg: &VmConfig,
    bin: &Path,
    accel: Accel,
) -> Result<Option<std::os::fd::OwnedFd>, VmError> {
    landlock_for(&Rules::for_vm(cfg, bin, accel))
        .map_err(|source| VmError::Landlock { what, source })
}

fn warn_once_no_seccomp(why: &str) {
    static WARNED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    WARNED.get_or_init(|| {
        tracing::warn!(reason = why, "QEMU runs without its seccomp sandbox");
    });
}

fn remove_stale(path: &Path) -> Result<(), VmError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmError::RemoveStaleSocket {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A running QEMU VM and its `vhost-device-vsock` helper (none with the serial channel).
pub struct QemuMachine {
    id: String,
    vsock_path: PathBuf,
    console_log: PathBuf,
    console: Arc<ConsoleLog>,
    qemu: Arc<Supervised>,
    vsock: Option<Arc<Supervised>>,
    chan: Option<HostChannel>,
    /// The QMP socket, when the VM was started with a snapshot mode.
    qmp: Option<PathBuf>,
    /// The restore's step times, when the VM was restored.
    restored: Option<crate::snapshot::LoadMarks>,
}

/// How long loading a snapshot may take (QEMU start to `running`).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

impl QemuMachine {
    /// Starts the helper, then QEMU. See the module docs for the order and the recipe.
    pub fn start(cfg: &VmConfig) -> Result<Self, VmError> {
        validate(cfg)?;
        let accel = match cfg.accel {
            Accel::Tcg => Accel::Tcg,
            Accel::Kvm => {
                kvm_usable().map_err(|reason| VmError::KvmUnusable { reason })?;
                Accel::Kvm
            }
            Accel::Auto => {
                let choice = detect_accel(Accel::Auto);
                tracing::debug!(id = %cfg.id, reason = %choice.reason, "accelerator chosen");
                choice.accel
            }
        };
        let qemu_bin = qemu_path(cfg.qemu_binary.as_deref())?;
        let tsc_khz = if accel == Accel::Tcg {
            let khz = fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|c| host_tsc_khz(&c));
            if khz.is_none() {
                tracing::warn!("no `cpu MHz` in /proc/cpuinfo; booting without tsc_early_khz (TCG guests may hang calibrating the TSC)");
            }
            khz
        } else {
            None
        };

        private_dir(&cfg.state_dir).map_err(|source| VmError::CreateStateDir {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let vhost_socket = cfg.state_dir.join(VHOST_SOCKET);
        let vsock_path = cfg.state_dir.join(VSOCK_SOCKET);
        remove_stale(&vhost_socket)?;
        remove_stale(&vsock_path)?;
        remove_stale(&cfg.state_dir.join(crate::snapshot::QMP_SOCKET))?;
        let chan_socket = match cfg.channel {
            Channel::Vsock => vhost_socket.clone(),
            Channel::Serial => cfg.state_dir.join(CHAN_SOCKET),
        };
        let mut args = qemu_args(cfg, accel, tsc_khz, &chan_socket)?;
        match qemu_supports_sandbox(&qemu_bin) {
            Ok(()) => args.extend([OsString::from("-sandbox"), OsString::from(QEMU_SANDBOX)]),
            Err(why) => warn_once_no_seccomp(&why),
        }

        let console_err = |source| VmError::CreateConsoleLog {
            path: cfg.console_log.clone(),
            source,
        };
        if let Some(parent) = cfg.console_log.parent() {
            private_dir(parent).map_err(console_err)?;
        }
        // Guest console output is private (0600) and capped: QEMU's stdout and stderr and
        // the helper's stderr go through one pipe into the rotating log.
        let console =
            ConsoleLog::create(&cfg.console_log, cfg.console_max_bytes).map_err(console_err)?;
        let (pipe_r, pipe_w) = io::pipe().map_err(console_err)?;
        console.pump(pipe_r).map_err(console_err)?;
        let append = || pipe_w.try_clone().map_err(console_err);

        // 1. The channel: vhost-device-vsock, or the owner's listener for QEMU's chardev.
        let (vsock, chan) = match cfg.channel {
            Channel::Vsock => {
                let helper = start_vsock_helper(cfg, accel, &vhost_socket, &vsock_path, append()?)?;
                (Some(helper), None)
            }
            Channel::Serial => {
                let chan =
                    HostChannel::listen(&cfg.state_dir, vsock_path.clone()).map_err(|source| {
                        VmError::ChannelListen {
                            dir: cfg.state_dir.clone(),
                            source,
                        }
                    })?;
                (None, Some(chan))
            }
        };
        let stop_helper = || {
            if let Some(v) = &vsock {
                let _ = v.signal();
            }
        };

        // 2. QEMU; when it exits the helper has nothing left to serve.
        let mut cmd = Command::new(&qemu_bin);
        cmd.args(&args);
        match append().and_then(|out| Ok((out, append()?))) {
            Ok((out, err)) => cmd.stdout(out).stderr(err),
            Err(e) => {
                stop_helper();
                return Err(e);
            }
        };
        // Only the children hold the pipe now: its end is the end of both processes.
        drop(pipe_w);
        tracing::debug!(id = %cfg.id, ?args, "starting QEMU");
        let fd = confined("qemu", cfg, &qemu_bin, accel).inspect_err(|_| stop_helper())?;
        let child = spawn_tied(cmd, fd).map_err(|source| {
            stop_helper();
            VmError::SpawnQemu {
                binary: qemu_bin,
                source,
            }
        })?;
        let spawned = Instant::now();
        let helper = vsock.clone();
        let qemu = Supervised::new(
            "qemu",
            child,
            Some(Box::new(move || {
                if let Some(h) = helper {
                    let _ = h.signal();
                }
            })),
        )
        .map_err(|source| {
            stop_helper();
            VmError::SpawnWaiter {
                what: "qemu",
                source,
            }
        })?;
        tracing::info!(id = %cfg.id, qemu_pid = qemu.pid(), vsock_pid = vsock.as_ref().map(|v| v.pid()), channel = ?cfg.channel, %accel, "VM started");
        let mut machine = QemuMachine {
            id: cfg.id.clone(),
            vsock_path,
            console_log: cfg.console_log.clone(),
            console,
            qemu,
            vsock,
            chan,
            qmp: cfg
                .snapshot
                .as_ref()
                .map(|_| cfg.state_dir.join(crate::snapshot::QMP_SOCKET)),
            restored: None,
        };
        if let (Some(crate::SnapshotMode::Restore { state, .. }), Some(qmp)) =
            (&cfg.snapshot, &machine.qmp)
        {
            let deadline = Instant::now() + RESTORE_TIMEOUT;
            match crate::snapshot::load(qmp, state, spawned, deadline) {
                Ok(marks) => machine.restored = Some(marks),
                Err(source) => {
                    let _ = machine.kill();
                    machine.console.wait_drained(Duration::from_secs(1));
                    return Err(VmError::SnapshotRestore {
                        console: tail_lines(&machine.console_log, 3),
                        source,
                    });
                }
            }
        }
        Ok(machine)
    }

    /// The helpers and the VMM, for signalling and reaping.
    fn children(&self) -> impl Iterator<Item = &Arc<Supervised>> {
        std::iter::once(&self.qemu).chain(self.vsock.as_ref())
    }

    /// One connection attempt over the channel in use.
    fn connect_once(&self, port: u32, attempt: Duration) -> io::Result<UnixStream> {
        match &self.chan {
            Some(chan) => chan.open(port, attempt).map_err(|e| match e.kind() {
                // Nothing listens yet: retried like the hybrid backend's reset.
                io::ErrorKind::ConnectionRefused => io::Error::new(io::ErrorKind::UnexpectedEof, e),
                _ => e,
            }),
            None => hybrid::connect(&self.vsock_path, port, attempt),
        }
    }
}

/// Starts `vhost-device-vsock` and waits for its socket (see the module docs).
fn start_vsock_helper(
    cfg: &VmConfig,
    accel: Accel,
    vhost_socket: &Path,
    vsock_path: &Path,
    stderr: io::PipeWriter,
) -> Result<Arc<Supervised>, VmError> {
    let vsock_bin = vsock_backend_path(cfg.vsock_binary.as_deref())?;
    let mut cmd = Command::new(&vsock_bin);
    cmd.arg("--vm").arg(format!(
        "guest-cid={GUEST_CID},socket={},uds-path={}",
        utf8(vhost_socket, "vhost socket")?,
        utf8(vsock_path, "vsock socket")?
    ));
    cmd.stdout(Stdio::null()).stderr(stderr);
    let fd = confined("vhost-device-vsock", cfg, &vsock_bin, accel)?;
    let child = spawn_tied(cmd, fd).map_err(|source| VmError::SpawnVsockBackend {
        binary: vsock_bin.clone(),
        source,
    })?;
    let vsock = Supervised::new("vhost-device-vsock", child, None).map_err(|source| {
        VmError::SpawnWaiter {
            what: "vhost-device-vsock",
            source,
        }
    })?;
    let deadline = Instant::now() + VSOCK_STARTUP;
    while !vhost_socket.exists() {
        if let Some(status) = vsock.status() {
            return Err(VmError::VsockBackendExited { status });
        }
        if Instant::now() >= deadline {
            let _ = vsock.signal();
            return Err(VmError::VsockBackendTimeout {
                socket: vhost_socket.to_path_buf(),
                timeout: VSOCK_STARTUP,
            });
        }
        thread::sleep(VSOCK_POLL);
    }
    Ok(vsock)
}

impl Machine for QemuMachine {
    fn pids(&self) -> Vec<u32> {
        self.children().map(|c| c.pid()).collect()
    }

    fn vsock_path(&self) -> &Path {
        &self.vsock_path
    }

    fn connect(&self, port: u32, timeout: Duration) -> Result<UnixStream, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.has_exited() {
                return Err(VmError::ExitedBeforeConnect { port, status });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = left.min(CONNECT_ATTEMPT);
            match self.connect_once(port, attempt) {
                Ok(s) => return Ok(s),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::TimedOut
                    ) && Instant::now() + CONNECT_RETRY < deadline =>
                {
                    thread::sleep(CONNECT_RETRY);
                }
                Err(source) => {
                    if let Some(status) = self.has_exited() {
                        return Err(VmError::ExitedBeforeConnect { port, status });
                    }
                    return Err(VmError::Connect { port, source });
                }
            }
        }
    }

    fn has_exited(&self) -> Option<String> {
        self.qemu.status().map(|s| format!("QEMU {s}"))
    }

    fn wait_exit(&self, timeout: Duration) -> bool {
        self.qemu.wait(timeout)
    }

    fn kill(&self) -> Result<(), VmError> {
        if let Some(chan) = &self.chan {
            chan.close();
        }
        for child in self.children() {
            child.signal().map_err(|source| VmError::Kill {
                what: child.what(),
                pid: child.pid(),
                source,
            })?;
        }
        for child in self.children() {
            if !child.wait(REAP_TIMEOUT) {
                tracing::warn!(id = %self.id, what = child.what(), pid = child.pid(), "child not reaped after SIGKILL");
            }
        }
        Ok(())
    }

    fn console_tail(&self, lines: usize) -> String {
        if self.has_exited().is_some() {
            // Let the copier write the VM's last words before reading them.
            self.console.wait_drained(Duration::from_secs(1));
        }
        tail_lines(&self.console_log, lines)
    }

    fn console(&self) -> Option<Arc<ConsoleLog>> {
        Some(self.console.clone())
    }

    fn restore_marks(&self) -> Option<crate::snapshot::LoadMarks> {
        self.restored
    }

    fn save_snapshot(&self, state: &Path, timeout: Duration) -> Result<(), VmError> {
        let qmp = self.qmp.as_ref().ok_or(VmError::SnapshotUnsupported)?;
        crate::snapshot::save(qmp, state, timeout).map_err(VmError::SnapshotSave)
    }
}

impl Drop for QemuMachine {
    fn drop(&mut self) {
        for child in self.children() {
            let _ = child.signal();
        }
    }
}

/// The last `lines` lines of `path` (reads at most the last 64 KiB).
fn tail_lines(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(MAX))).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{backend, Disk};

    fn cfg(dir: &Path) -> VmConfig {
        VmConfig {
            id: "t1".into(),
            state_dir: dir.join("state"),
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initrd"),
            vcpus: 1,
            memory_mb: 256,
            disks: vec![
                Disk {
                    path: dir.join("root,1.img"),
                    serial: "root0".into(),
                    readonly: true,
                },
                Disk {
                    path: dir.join("upper.img"),
                    serial: "upper".into(),
                    readonly: false,
                },
            ],
            console_log: dir.join("console.log"),
            console_max_bytes: crate::console::DEFAULT_CONSOLE_MAX_BYTES,
            accel: Accel::Tcg,
            extra_cmdline: vec!["matchlock.debug=1".into()],
            qemu_binary: None,
            vsock_binary: None,
            net: None,
            fs: None,
            channel: crate::Channel::Vsock,
            snapshot: None,
        }
    }

    #[test]
    fn fs_argv_only_when_configured() {
        let d = Path::new("/s");
        let mut c = cfg(d);
        let none = joined(&qemu_args(&c, Accel::Tcg, None, &d.join("v.sock")).expect("args"));
        assert!(!none.contains("vhost-user-fs"), "{none}");
        c.fs = Some(crate::FsDevice {
            socket: d.join("vfs,x.sock"),
            tag: "matchlock".into(),
        });
        let s = joined(&qemu_args(&c, Accel::Tcg, None, &d.join("v.sock")).expect("args"));
        assert!(
            s.contains(
                "-chardev socket,id=vfs,path=/s/vfs,,x.sock \
                 -device vhost-user-fs-device,chardev=vfs,tag=matchlock,queue-size=1024"
            ),
            "{s}"
        );
        c.fs = Some(crate::FsDevice {
            socket: d.join("vfs.sock"),
            tag: "a,b".into(),
        });
        assert!(qemu_args(&c, Accel::Tcg, None, &d.join("v.sock")).is_err());
    }

    #[test]
    fn netdev_argv_only_when_configured() {
        let d = Path::new("/s");
        let mut c = cfg(d);
        let none = joined(&qemu_args(&c, Accel::Tcg, None, &d.join("v.sock")).expect("args"));
        assert!(
            !none.contains("-netdev") && !none.contains("virtio-net"),
            "{none}"
        );
        c.net = Some(crate::NetDevice {
            socket: d.join("net,stack.sock"),
            mac: [0x02, 0x4d, 0x4c, 0, 0, 0x0f],
            transport: crate::NetTransport::Stream,
        });
        let s = joined(&qemu_args(&c, Accel::Tcg, None, &d.join("v.sock")).expect("args"));
        assert!(
            s.contains(
                "-netdev stream,id=net0,server=off,addr.type=unix,addr.path=/s/net,,stack.sock \
                 -device virtio-net-device,netdev=net0,mac=02:4d:4c:00:00:0f"
            ),
            "{s}"
        );
        if let Some(n) = c.net.as_mut() {
            n.transport = crate::NetTransport::VhostUser;
        }
        let s = joined(&qemu_args(&c, Accel::Tcg, None, &d.join("v.sock")).expect("args"));
        assert!(
            s.contains(
                "-chardev socket,id=netchr,path=/s/net,,stack.sock \
                 -netdev vhost-user,id=net0,chardev=netchr \
                 -device virtio-net-device,netdev=net0,mac=02:4d:4c:00:00:0f,\
                 rx_queue_size=1024,tx_queue_size=1024"
            ),
            "{s}"
        );
    }

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn tcg_argv() {
        let d = Path::new("/s");
        let c = cfg(d);
        let args =
            qemu_args(&c, Accel::Tcg, Some(2_596_148), &d.join("vhost-vsock.sock")).expect("args");
        let s = joined(&args);
        assert!(
            s.contains("-object memory-backend-memfd,id=mem,size=256M,share=on"),
            "{s}"
        );
        assert!(s.contains("-global virtio-mmio.force-legacy=false"));
        assert!(s.contains("-nodefaults -no-user-config -nographic -no-reboot"));
        assert!(
            s.contains("-accel tcg -cpu max,-erms,-fsrm -smp 1 -m 256M"),
            "{s}"
        );
        assert!(s.contains("-chardev stdio,id=con,signal=off -serial chardev:con"));
        assert!(s.contains("-kernel /s/vmlinux -initrd /s/initrd"));
        assert!(s.contains(
            "-chardev socket,id=vs,path=/s/vhost-vsock.sock -device vhost-user-vsock-device,chardev=vs"
        ));
        assert!(s.contains(
            "-drive id=d0,file=/s/root,,1.img,format=raw,if=none,readonly=on,discard=unmap -device virtio-blk-device,drive=d0,serial=root0"
        ), "{s}");
        assert!(s.contains(
            "-drive id=d1,file=/s/upper.img,format=raw,if=none,readonly=off,discard=unmap"
        ));
        assert!(s.ends_with("-device virtio-rng-device"));
        let append = args
            .iter()
            .position(|a| a == "-append")
            .and_then(|i| args.get(i + 1))
            .expect("-append");
        assert_eq!(
            append,
            "console=ttyS0 reboot=t panic=-1 quiet tsc_early_khz=2596148 tsc=reliable init=/init matchlock.debug=1"
        );
        assert!(s.starts_with(if MICROVM_ACPI_OFF {
            "-M microvm,memory-backend=mem,acpi=off "
        } else {
            "-M microvm,memory-backend=mem "
        }));
    }

    #[test]
    fn serial_channel_argv() {
        let d = Path::new("/s");
        let mut c = cfg(d);
        c.channel = Channel::Serial;
        let args = qemu_args(&c, Accel::Tcg, None, &d.join(CHAN_SOCKET)).expect("args");
        let s = joined(&args);
        assert!(s.contains(
            "-device virtio-serial-device,max_ports=2 -chardev socket,id=chan,path=/s/chan.sock -device virtserialport,chardev=chan,name=matchlock.0"
        ), "{s}");
        assert!(!s.contains("vhost-user-vsock"), "{s}");
        assert!(s.contains("matchlock.chan=serial init=/init"), "{s}");
    }

    #[test]
    fn kvm_and_smp_argv() {
        let d = Path::new("/s");
        let mut c = cfg(d);
        c.vcpus = 2;
        let s = joined(&qemu_args(&c, Accel::Tcg, None, Path::new("/v")).expect("args"));
        assert!(s.contains("-accel tcg,thread=multi -cpu max,-erms,-fsrm -smp 2"));
        let args = qemu_args(&c, Accel::Kvm, Some(1000), Path::new("/v")).expect("args");
        let s = joined(&args);
        assert!(s.contains("-accel kvm -cpu host -smp 2"));
        assert!(!s.contains("tsc_early_khz"), "omitted under KVM: {s}");
        assert!(!s.contains("tsc=reliable"), "omitted under KVM: {s}");
    }

    #[test]
    fn tsc_khz_from_cpuinfo() {
        assert_eq!(
            host_tsc_khz("processor\t: 0\ncpu MHz\t\t: 2596.148\n"),
            Some(2_596_148)
        );
        assert_eq!(host_tsc_khz("processor\t: 0\n"), None);
        assert_eq!(host_tsc_khz("cpu MHz : junk\n"), None);
        let here = fs::read_to_string("/proc/cpuinfo").expect("cpuinfo");
        assert!(host_tsc_khz(&here).is_some());
    }

    #[test]
    fn validation_rejects_bad_configs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = cfg(dir.path());
        assert!(matches!(validate(&c), Err(VmError::MissingFile { .. })));
        for f in ["vmlinux", "initrd", "root,1.img", "upper.img"] {
            fs::write(dir.path().join(f), "").expect("write");
        }
        validate(&c).expect("valid");
        c.disks[0].serial = "x".repeat(21);
        assert!(matches!(validate(&c), Err(VmError::InvalidConfig { .. })));
        c.disks[0].serial = "a,b".into();
        assert!(matches!(validate(&c), Err(VmError::InvalidConfig { .. })));
        c.disks.clear();
        c.vcpus = 0;
        assert!(matches!(validate(&c), Err(VmError::InvalidConfig { .. })));
    }

    #[test]
    fn finds_binaries_and_version() {
        let v = qemu_version(None).expect("qemu installed");
        assert!(v.starts_with("QEMU emulator version"), "{v}");
        let p = vsock_backend_path(None).expect("vhost-device-vsock installed");
        assert!(p.ends_with("vhost-device-vsock"));
        assert!(matches!(
            vsock_backend_path(Some(Path::new("/nonexistent/vhost-device-vsock"))),
            Err(VmError::MissingFile { .. })
        ));
        assert!(matches!(
            backend("firecracker"),
            Err(VmError::UnknownBackend { .. })
        ));
        assert_eq!(backend("qemu").expect("qemu").name(), "qemu");
    }

    #[test]
    fn tail_reads_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("log");
        fs::write(&p, "a\nb\nc\nd\n").expect("write");
        assert_eq!(tail_lines(&p, 2), "c\nd");
        assert_eq!(tail_lines(&p, 10), "a\nb\nc\nd");
        assert_eq!(tail_lines(&dir.path().join("none"), 3), "");
    }
}
