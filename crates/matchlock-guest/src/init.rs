//! PID 1: boot handshake, root assembly and power-off.
//!
//! # Design
//! The sequence is linear and fails fast: any error becomes `BootFailed(reason)` on the boot
//! connection (if it exists), a `matchlock-guest: FATAL: <reason>` console line and a
//! power-off. Readiness is the handshake, never a sleep: the agent listener is bound before
//! `Ready` is sent.
//!
//! Root switch: the initramfs is `rootfs`, where `pivot_root` is not allowed, so the overlay
//! is moved over `/` (`MS_MOVE`) and we `chroot(".")` into it, as `switch_root` does. The
//! initramfs' early proc/sys/dev are unmounted first and fresh ones mounted in the new root.
//! The upper ext4 stays mounted underneath (invisible); an `O_PATH` descriptor to it is kept
//! so power-off can still remount it read-only through `/proc/self/fd`.
//!
//! CPU quota: PID 1 moves itself into a child cgroup with `cpu.max` set, so every process
//! spawned afterwards inherits it with no race (the agent shares the quota; it is idle while
//! commands run).
//!
//! Extra disks (`--disk`, volumes) are ext4; read-only ones are mounted `ro,noload` so a
//! volume whose read-write owner crashed (journal needing recovery) can still be read.
//!
//! # Limitations
//! No network configuration beyond `lo` (the network device owner configures `eth0`). The
//! initramfs contents stay in memory after the switch (a few MiB at most: only `/init`).
//! A read-only disk of a crashed owner shows its last checkpointed state: what was only in
//! the journal is not replayed (that needs a read-write attach).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use matchlock_guest_proto::mux::Mux;
use matchlock_guest_proto::{
    write_frame, BootConfig, DiskRole, DiskSpec, Frame, FrameType, ProtoError, ReadyTimes,
    READY_PORT, SERVICE_PORT, WORKSPACE_TAG,
};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vsock::{VsockListener, VsockStream, VMADDR_CID_ANY};

use crate::agent::{self, Agent, HOST_CID};
use crate::etc;
use crate::exec::ExecContext;
use crate::hostchan;
use crate::reaper;

const DIAL_RETRY: Duration = Duration::from_millis(20);
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const DISK_WAIT: Duration = Duration::from_secs(3);
const LOWER_DIR: &str = "/run/matchlock/lower";
const UPPER_DIR: &str = "/run/matchlock/upper";
const MERGED_DIR: &str = "/run/matchlock/merged";

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("dialing the host on vsock port {port}")]
    Dial {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("sending hello")]
    Hello(#[source] ProtoError),
    #[error("reading the boot config")]
    ReadConfig(#[source] ProtoError),
    #[error("invalid add_hosts")]
    Hosts(#[source] etc::EtcError),
    #[error("disk with serial {serial:?} not found")]
    DiskMissing { serial: String },
    #[error("no root layers (need at least one lower and an upper disk)")]
    NoRoot,
    #[error("more than one upper disk")]
    TwoUppers,
    #[error("extra disk mount point {mount:?} is not an absolute path below /")]
    BadExtraMount { mount: String },
    #[error("workspace {path:?} is not an absolute path below /")]
    BadWorkspace { path: String },
    #[error("mounting the workspace (virtiofs tag {tag}) on {target}")]
    MountWorkspace {
        tag: &'static str,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("creating directory {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting {fstype} on {target}")]
    Mount {
        fstype: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("opening the upper mount")]
    OpenUpper(#[source] io::Error),
    #[error("entering the new root")]
    ChdirRoot(#[source] nix::Error),
    #[error("moving the new root onto /")]
    MoveRoot(#[source] nix::Error),
    #[error("chroot into the new root")]
    Chroot(#[source] nix::Error),
    #[error("writing /etc files")]
    EtcFiles(#[source] etc::EtcError),
    #[error("configuring eth0 from the boot config")]
    Network(#[source] std::io::Error),
    #[error("listening on vsock port {port}")]
    Listen {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("opening the host channel")]
    HostChannel(#[source] crate::hostchan::HostChanError),
    #[error("starting the agent thread")]
    AgentThread(#[source] io::Error),
    #[error("sending ready")]
    Ready(#[source] ProtoError),
    #[error("{}", matchlock_guest_proto::TIMER_DEAD_REASON)]
    Timer(#[source] crate::timer::TimerError),
    #[error("boot handshake over the host channel")]
    Resume(#[source] crate::resume::ResumeError),
    #[error("reseeding the kernel CRNG with the host's seed")]
    Reseed(#[source] std::io::Error),
}

/// What power-off must clean up.
#[derive(Default)]
struct Teardown {
    extra_mounts: Vec<PathBuf>,
    upper: Option<OwnedFd>,
}

fn console(msg: &str) {
    // PID 1's stderr is /dev/console (the VM log).
    eprintln!("matchlock-guest: {msg}");
}

/// Entry point when running as PID 1. Never returns.
pub fn run() -> ! {
    let init_us = crate::sys::boottime_us();
    let teardown = Arc::new(Mutex::new(Teardown::default()));
    let mut boot_conn: Option<BootConn> = None;
    match boot(&mut boot_conn, &teardown, init_us) {
        Ok(()) => loop {
            std::thread::park();
        },
        Err(e) => {
            let reason = crate::chain(&e);
            if let Some(conn) = &mut boot_conn {
                let frame = Frame::new(FrameType::BootFailed, reason.clone().into_bytes());
                let _ = write_frame(conn, &frame);
            }
            console(&format!("FATAL: {reason}"));
            power_off(&teardown)
        }
    }
}

fn mkdir_p(path: &Path, mode: u32) -> Result<(), BootError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| BootError::Mkdir {
            path: path.to_path_buf(),
            source,
        })
}

fn do_mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    mount(Some(source), target, Some(fstype), flags, data).map_err(|source| BootError::Mount {
        fstype: fstype.to_string(),
        target: target.to_path_buf(),
        source,
    })
}

/// Mounts that may already exist (EBUSY) are fine.
fn mount_tolerant(source: &str, target: &Path, fstype: &str, flags: MsFlags, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::Error::EBUSY) => {}
        Err(e) => tracing::warn!(fstype, target = %target.display(), error = %e, "mount failed"),
    }
}

/// The boot connection: a vsock stream or a stream of the virtio-serial channel.
trait BootStream: io::Read + io::Write + Send {}
impl<T: io::Read + io::Write + Send> BootStream for T {}
type BootConn = Box<dyn BootStream>;

/// How the agent reaches the host: vsock, or the virtio-serial channel's mux.
enum Transport {
    Vsock,
    Serial(Mux),
}

/// The transport the host selected on the kernel command line (opens the serial port now,
/// before any other process exists).
fn transport() -> Result<Transport, BootError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if hostchan::selected(&cmdline) {
        Ok(Transport::Serial(
            hostchan::start().map_err(BootError::HostChannel)?,
        ))
    } else {
        Ok(Transport::Vsock)
    }
}

/// Calls `dial` until it succeeds or [`DIAL_TIMEOUT`] has passed, [`DIAL_RETRY`] apart.
fn retry_dial<T>(mut dial: impl FnMut() -> std::io::Result<T>) -> Result<T, BootError> {
    let start = Instant::now();
    loop {
        match dial() {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() >= DIAL_TIMEOUT => {
                return Err(BootError::Dial {
                    port: READY_PORT,
                    source: e,
                })
            }
            Err(_) => std::thread::sleep(DIAL_RETRY),
        }
    }
}

/// Dials the host's ready port over vsock.
fn dial_host() -> Result<BootConn, BootError> {
    retry_dial(|| {
        VsockStream::connect_with_cid_port(HOST_CID, READY_PORT).map(|s| Box::new(s) as BootConn)
    })
}

/// serial -> `/dev/vdX` for every virtio disk, polling briefly until all `serials` exist.
fn find_disks(serials: &[&str]) -> Result<HashMap<String, PathBuf>, BootError> {
    let start = Instant::now();
    loop {
        let mut found = HashMap::new();
        if let Ok(rd) = std::fs::read_dir("/sys/block") {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with("vd") {
                    continue;
                }
                if let Ok(serial) = std::fs::read_to_string(entry.path().join("serial")) {
                    found.insert(serial.trim().to_string(), PathBuf::from("/dev").join(&name));
                }
            }
        }
        let missing = serials.iter().find(|s| !found.contains_key(**s));
        match missing {
            None => return Ok(found),
            Some(s) if start.elapsed() >= DISK_WAIT => {
                return Err(BootError::DiskMissing {
                    serial: (*s).to_string(),
                })
            }
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Where every disk goes, decided before anything is mounted.
#[derive(Debug, PartialEq)]
struct RootPlan {
    /// (device, fstype, mount dir), bottom-most layer first.
    lowers: Vec<(PathBuf, String, PathBuf)>,
    upper: PathBuf,
    /// `lowerdir` lists the top-most layer first, as overlayfs expects.
    overlay_options: String,
    /// (device, mount point, read-only), in request order.
    extras: Vec<(PathBuf, PathBuf, bool)>,
}

fn plan_root(
    disks: &[DiskSpec],
    devices: &HashMap<String, PathBuf>,
) -> Result<RootPlan, BootError> {
    let mut lowers = Vec::new();
    let mut upper = None;
    let mut extras = Vec::new();
    for disk in disks {
        let dev = devices
            .get(&disk.serial)
            .cloned()
            .ok_or_else(|| BootError::DiskMissing {
                serial: disk.serial.clone(),
            })?;
        match &disk.role {
            DiskRole::Lower { fs } => {
                let dir = PathBuf::from(format!("{LOWER_DIR}/{}", lowers.len()));
                lowers.push((dev, fs.clone(), dir));
            }
            DiskRole::Upper if upper.is_some() => return Err(BootError::TwoUppers),
            DiskRole::Upper => upper = Some(dev),
            DiskRole::Extra { mount, readonly } => {
                if !mount.starts_with('/') || mount == "/" {
                    return Err(BootError::BadExtraMount {
                        mount: mount.clone(),
                    });
                }
                extras.push((dev, PathBuf::from(mount), *readonly));
            }
        }
    }
    let Some(upper) = upper.filter(|_| !lowers.is_empty()) else {
        return Err(BootError::NoRoot);
    };
    let lowerdir: Vec<String> = lowers
        .iter()
        .rev()
        .map(|(_, _, d)| d.to_string_lossy().into_owned())
        .collect();
    let overlay_options = format!(
        "lowerdir={},upperdir={UPPER_DIR}/upper,workdir={UPPER_DIR}/work",
        lowerdir.join(":")
    );
    Ok(RootPlan {
        lowers,
        upper,
        overlay_options,
        extras,
    })
}

fn set_clock(now: (i64, u32)) {
    if now.0 <= 0 {
        return;
    }
    let ts = nix::sys::time::TimeSpec::new(now.0, i64::from(now.1));
    if let Err(e) = nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
        tracing::warn!(error = %e, "setting the clock failed");
    }
}

fn boot(
    boot_conn: &mut Option<BootConn>,
    teardown: &Arc<Mutex<Teardown>>,
    init_us: u64,
) -> Result<(), BootError> {
    early_setup();
    let timer_probe = crate::timer::Probe::start().map_err(BootError::Timer)?;
    let transport = transport()?;
    let (cfg, hello_us) = match &transport {
        Transport::Vsock => {
            let conn = boot_conn.insert(dial_host()?);
            let hello_us = crate::sys::boottime_us();
            (handshake(conn)?, hello_us)
        }
        Transport::Serial(mux) => serial_handshake(mux, boot_conn)?,
    };
    fresh_identity(&cfg)?;
    let serials: Vec<&str> = cfg.disks.iter().map(|d| d.serial.as_str()).collect();
    let devices = find_disks(&serials)?;
    let plan = plan_root(&cfg.disks, &devices)?;
    assemble_overlay(&plan, teardown)?;
    switch_root()?;
    mount_base_filesystems();
    limit_cpus(cfg.cpus);
    if let Some(n) = cfg.net {
        crate::sys::configure_ipv4("eth0", n.address, n.prefix_len, n.gateway, n.mtu)
            .map_err(BootError::Network)?;
        tracing::info!(address = %n.address, gateway = %n.gateway, "eth0 configured");
        if let Some(v6) = n.ipv6 {
            crate::sys::configure_ipv6("eth0", v6.address, v6.prefix_len, v6.gateway)
                .map_err(BootError::Network)?;
            tracing::info!(address = %v6.address, gateway = %v6.gateway, "eth0 IPv6 configured");
        }
    }

    let hostname = etc::effective_hostname(&cfg.hostname).to_string();
    if let Err(e) = nix::unistd::sethostname(&hostname) {
        tracing::warn!(error = %e, "sethostname failed");
    }
    etc::write_identity_files(Path::new("/"), &hostname, &cfg.add_hosts, &cfg.dns_servers)
        .map_err(BootError::EtcFiles)?;
    write_machine_id(&cfg.machine_id)?;
    if let Some(pem) = &cfg.ca_pem {
        etc::install_ca(Path::new("/"), pem).map_err(BootError::EtcFiles)?;
    }
    mount_extras(plan.extras, teardown)?;
    if let Some(ws) = &cfg.workspace {
        mount_workspace(ws, teardown)?;
    }
    start_agent(&transport, cfg.privileged, teardown)?;
    let slept = timer_probe
        .finish(crate::timer::PROBE_DEADLINE)
        .map_err(BootError::Timer)?;
    tracing::info!(slept_us = slept.as_micros(), "timer interrupts tick");
    let times = ReadyTimes {
        init_us,
        hello_us,
        ready_us: crate::sys::boottime_us(),
    };
    let ready = Frame::json(FrameType::Ready, &times).map_err(BootError::Ready)?;
    if let Some(conn) = boot_conn.as_mut() {
        write_frame(conn, &ready).map_err(BootError::Ready)?;
    }
    *boot_conn = None;
    tracing::info!(hostname = %hostname, "ready");
    Ok(())
}

/// Initramfs proc/sys/dev, the benchmark's power-off switch, `lo` and the reaper.
fn early_setup() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_tolerant("proc", Path::new("/proc"), "proc", nosuid, None);
    mount_tolerant("sysfs", Path::new("/sys"), "sysfs", nosuid, None);
    mount_tolerant(
        "devtmpfs",
        Path::new("/dev"),
        "devtmpfs",
        MsFlags::MS_NOSUID,
        None,
    );
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline
        .split_whitespace()
        .any(|w| w == "matchlock.poweroff=1")
    {
        // Benchmark baseline (matchlock-bench): the same kernel and initramfs, powered off as
        // soon as init runs.
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    }
    if let Err(e) = crate::sys::interface_up("lo") {
        tracing::warn!(error = %e, "bringing lo up failed");
    }
    // Start reaping before anything can fork.
    let _ = reaper::global();
}

/// Sends `Hello`, reads the `BootConfig` and applies it ([`apply_config`]).
fn handshake(conn: &mut BootConn) -> Result<BootConfig, BootError> {
    crate::resume::send_hello(conn).map_err(BootError::Hello)?;
    let cfg = crate::resume::read_config(conn).map_err(BootError::ReadConfig)?;
    apply_config(&cfg)?;
    Ok(cfg)
}

/// What every handshake does with its `BootConfig` first: set the clock, validate the
/// hosts entries.
fn apply_config(cfg: &BootConfig) -> Result<(), BootError> {
    set_clock(cfg.now_unix);
    etc::validate_hosts(&cfg.add_hosts).map_err(BootError::Hosts)
}

/// The handshake over the serial channel, which also accepts a restoring host's new ready
/// stream ([`crate::resume`]). Returns the config and the boot time of `Hello`.
fn serial_handshake(
    mux: &Mux,
    boot_conn: &mut Option<BootConn>,
) -> Result<(BootConfig, u64), BootError> {
    // Listen before dialing: a snapshot is taken after `Hello`, with this listener in place.
    let fresh = mux.listen(READY_PORT);
    let dialed = retry_dial(|| mux.open(READY_PORT, DIAL_TIMEOUT))?;
    // Until the handshake returns, the boot stream is the dialed one: a handshake failure
    // is then reported (`BootFailed`) on it. Replaced by the stream the config came on.
    *boot_conn = dialed.try_clone().ok().map(|c| Box::new(c) as BootConn);
    let hello_us = crate::sys::boottime_us();
    let (cfg, conn, restored) =
        crate::resume::handshake(dialed, fresh).map_err(BootError::Resume)?;
    *boot_conn = Some(Box::new(conn));
    if restored {
        console("resumed from a snapshot");
    }
    apply_config(&cfg)?;
    Ok((cfg, hello_us))
}

/// Writes the host's fresh `/etc/machine-id` (none sent: the image's stays). An invalid id
/// fails the boot; a root not writable at that path is skipped with a warning.
fn write_machine_id(id: &str) -> Result<(), BootError> {
    if id.is_empty() {
        return Ok(());
    }
    match etc::write_machine_id(Path::new("/"), id) {
        Err(etc::EtcError::BadMachineId) => Err(BootError::EtcFiles(etc::EtcError::BadMachineId)),
        Err(e) => {
            tracing::warn!(error = %e, "/etc/machine-id not written");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// Mixes the host's seed into the kernel's random pool and forces a reseed of the CRNG
/// before any user code runs: restored VMs share the snapshot's CRNG state, so a failure
/// fails the boot (closed) rather than running with it.
fn fresh_identity(cfg: &BootConfig) -> Result<(), BootError> {
    if cfg.random_seed.is_empty() {
        return Ok(());
    }
    crate::sys::add_entropy_and_reseed(&cfg.random_seed).map_err(BootError::Reseed)
}

/// Mounts the lowers and the upper and assembles the overlay at [`MERGED_DIR`], keeping an
/// `O_PATH` descriptor to the upper for power-off.
fn assemble_overlay(plan: &RootPlan, teardown: &Mutex<Teardown>) -> Result<(), BootError> {
    for (dev, fs, dir) in &plan.lowers {
        mkdir_p(dir, 0o755)?;
        do_mount(&dev.to_string_lossy(), dir, fs, MsFlags::MS_RDONLY, None)?;
    }
    let upper_dir = Path::new(UPPER_DIR);
    mkdir_p(upper_dir, 0o755)?;
    // noinit_itable: the upper is formatted with lazy inode tables; zeroing them in the
    // background would steal guest CPU for nothing (the disk dies with the VM).
    // no_prefetch_block_bitmaps: otherwise ext4lazyinit still starts at mount to read every
    // group's bitmap, work that lands just after `Ready`, on the first command's time.
    do_mount(
        &plan.upper.to_string_lossy(),
        upper_dir,
        "ext4",
        MsFlags::empty(),
        Some("noinit_itable,no_prefetch_block_bitmaps"),
    )?;
    mkdir_p(&upper_dir.join("upper"), 0o755)?;
    mkdir_p(&upper_dir.join("work"), 0o755)?;
    let upper_fd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(upper_dir)
        .map_err(BootError::OpenUpper)?;
    teardown
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .upper = Some(OwnedFd::from(upper_fd));
    let merged = Path::new(MERGED_DIR);
    mkdir_p(merged, 0o755)?;
    do_mount(
        "overlay",
        merged,
        "overlay",
        MsFlags::empty(),
        Some(&plan.overlay_options),
    )
}

/// Unmounts the initramfs' proc/sys/dev, moves the overlay onto `/` and enters it.
fn switch_root() -> Result<(), BootError> {
    for old in ["/dev", "/sys", "/proc"] {
        let _ = umount2(old, MntFlags::MNT_DETACH);
    }
    nix::unistd::chdir(Path::new(MERGED_DIR)).map_err(BootError::ChdirRoot)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(BootError::MoveRoot)?;
    nix::unistd::chroot(".").map_err(BootError::Chroot)?;
    nix::unistd::chdir("/").map_err(BootError::ChdirRoot)
}

/// ext4 options for a read-only extra disk: `noload` skips the journal, so a volume whose
/// read-write owner died mid-write (its journal needs recovery, which would have to write
/// to a device QEMU attached read-only) can still be mounted and read. What the guest then
/// sees is the last checkpointed state: transactions only in the journal are not applied.
const RO_EXT4_OPTIONS: &str = "noload";

/// Mounts the extra disks (ext4) at their mount points, recording them for power-off.
fn mount_extras(
    extras: Vec<(PathBuf, PathBuf, bool)>,
    teardown: &Mutex<Teardown>,
) -> Result<(), BootError> {
    for (dev, target, readonly) in extras {
        mkdir_p(&target, 0o755)?;
        let (flags, data) = if readonly {
            (MsFlags::MS_RDONLY, Some(RO_EXT4_OPTIONS))
        } else {
            (MsFlags::empty(), None)
        };
        do_mount(&dev.to_string_lossy(), &target, "ext4", flags, data)?;
        teardown
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extra_mounts
            .push(target);
    }
    Ok(())
}

/// Mounts the host's virtio-fs share at the workspace (creating the directory), recording it
/// for power-off. The share is mounted `nosuid,nodev` (the host also strips set-id bits and
/// refuses device nodes) but keeps `exec`: tools run binaries from their workspace.
fn mount_workspace(path: &str, teardown: &Mutex<Teardown>) -> Result<(), BootError> {
    let target = PathBuf::from(path);
    let clean = target.is_absolute()
        && target
            .components()
            .skip(1)
            .all(|c| matches!(c, std::path::Component::Normal(_)))
        && target != Path::new("/");
    if !clean {
        return Err(BootError::BadWorkspace {
            path: path.to_string(),
        });
    }
    mkdir_p(&target, 0o755)?;
    let flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    mount(
        Some(WORKSPACE_TAG),
        &target,
        Some("virtiofs"),
        flags,
        None::<&str>,
    )
    .map_err(|source| BootError::MountWorkspace {
        tag: WORKSPACE_TAG,
        target: target.clone(),
        source,
    })?;
    tracing::info!(workspace = %target.display(), "workspace mounted");
    teardown
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extra_mounts
        .push(target);
    Ok(())
}

/// Where host connections to the agent arrive.
enum Listener {
    Vsock(VsockListener),
    Serial(std::sync::mpsc::Receiver<std::os::unix::net::UnixStream>),
}

/// Binds the agent's listener and starts serving it on its own thread.
fn start_agent(
    transport: &Transport,
    privileged: bool,
    teardown: &Arc<Mutex<Teardown>>,
) -> Result<(), BootError> {
    let listener = match transport {
        Transport::Vsock => Listener::Vsock(
            VsockListener::bind_with_cid_port(VMADDR_CID_ANY, SERVICE_PORT).map_err(|source| {
                BootError::Listen {
                    port: SERVICE_PORT,
                    source,
                }
            })?,
        ),
        Transport::Serial(mux) => Listener::Serial(mux.listen(SERVICE_PORT)),
    };
    let shutdown_state = Arc::clone(teardown);
    let agent = Arc::new(Agent {
        exec: ExecContext {
            root: PathBuf::from("/"),
            privileged,
        },
        on_shutdown: Box::new(move || power_off(&shutdown_state)),
    });
    std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || match listener {
            Listener::Vsock(l) => agent::serve(l, agent),
            Listener::Serial(streams) => agent::serve_streams(streams, agent),
        })
        .map_err(BootError::AgentThread)?;
    Ok(())
}

/// proc, sys, dev, devpts, shm, run and cgroup2 in the new root; best effort.
fn mount_base_filesystems() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_tolerant("proc", Path::new("/proc"), "proc", nosuid, None);
    mount_tolerant("sysfs", Path::new("/sys"), "sysfs", nosuid, None);
    mount_tolerant(
        "devtmpfs",
        Path::new("/dev"),
        "devtmpfs",
        MsFlags::MS_NOSUID,
        None,
    );
    mount_tolerant(
        "devpts",
        Path::new("/dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    );
    // /dev/ptmx must open the ptmx of *this* devpts instance.
    let _ = std::fs::remove_file("/dev/ptmx");
    if let Err(e) = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx") {
        tracing::warn!(error = %e, "linking /dev/ptmx failed");
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    mount_tolerant(
        "shm",
        Path::new("/dev/shm"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mount_tolerant(
        "tmpfs",
        Path::new("/run"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    mount_tolerant(
        "cgroup2",
        Path::new("/sys/fs/cgroup"),
        "cgroup2",
        nosuid,
        None,
    );
}

/// Quota in microseconds per 100 ms period for a `cpus` fraction, or None if unlimited.
fn cpu_quota(cpus: f64, vcpus: usize) -> Option<u64> {
    if !cpus.is_finite() || cpus <= 0.0 || cpus >= vcpus as f64 {
        return None;
    }
    // Bounded above by vcpus * 100000, so the cast cannot overflow.
    Some(((cpus * 100_000.0) as u64).max(1000))
}

fn limit_cpus(cpus: f64) {
    let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Some(quota) = cpu_quota(cpus, vcpus) else {
        return;
    };
    let root = Path::new("/sys/fs/cgroup");
    let group = root.join("matchlock");
    let result = std::fs::write(root.join("cgroup.subtree_control"), "+cpu")
        .and_then(|()| std::fs::create_dir_all(&group))
        .and_then(|()| std::fs::write(group.join("cpu.max"), format!("{quota} 100000")))
        .and_then(|()| std::fs::write(group.join("cgroup.procs"), "1"));
    if let Err(e) = result {
        tracing::warn!(cpus, error = %e, "applying the cpu limit failed");
    }
}

fn other_processes_left() -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    rd.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            return false;
        };
        if pid <= 2 {
            return false;
        }
        // Kernel threads are children of kthreadd (pid 2).
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        !matches!(ppid, Some(2) | None)
    })
}

/// Polls until no process but PID 1 and kernel threads is left, or `timeout` passes.
fn wait_for_others(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while other_processes_left() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops every process, flushes and detaches disks, then resets the VM (QEMU exits).
fn power_off(teardown: &Mutex<Teardown>) -> ! {
    console("powering off");
    let all = Pid::from_raw(-1);
    let _ = kill(all, Signal::SIGTERM);
    wait_for_others(Duration::from_secs(1));
    let _ = kill(all, Signal::SIGKILL);
    // Commands hold copies of the mounts in their own namespaces until they have exited;
    // give SIGKILL a moment so the unmounts below release the filesystems for real.
    wait_for_others(Duration::from_millis(500));
    nix::unistd::sync();
    let td = teardown.lock().unwrap_or_else(PoisonError::into_inner);
    for m in td.extra_mounts.iter().rev() {
        if let Err(e) = umount2(m, MntFlags::empty()) {
            tracing::warn!(mount = %m.display(), error = %e, "unmount failed; detaching");
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
    }
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    let _ = mount(None::<&str>, "/", None::<&str>, ro, None::<&str>);
    if let Some(fd) = &td.upper {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        if let Err(e) = mount(None::<&str>, path.as_str(), None::<&str>, ro, None::<&str>) {
            tracing::warn!(error = %e, "remounting the upper read-only failed");
        }
    }
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reached without CAP_SYS_BOOT (not PID 1 of a VM).
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(serial: &str, role: DiskRole) -> DiskSpec {
        DiskSpec {
            serial: serial.into(),
            role,
        }
    }

    fn lower(serial: &str) -> DiskSpec {
        disk(
            serial,
            DiskRole::Lower {
                fs: "squashfs".into(),
            },
        )
    }

    fn devices(n: usize) -> HashMap<String, PathBuf> {
        let names = ["l0", "l1", "up", "x"];
        names
            .iter()
            .take(n)
            .enumerate()
            .map(|(i, s)| {
                let dev = format!("/dev/vd{}", char::from(b'a' + i as u8));
                (s.to_string(), PathBuf::from(dev))
            })
            .collect()
    }

    #[test]
    fn root_plan_orders_lowers_top_first() {
        let disks = vec![
            lower("l0"),
            lower("l1"),
            disk("up", DiskRole::Upper),
            disk(
                "x",
                DiskRole::Extra {
                    mount: "/data".into(),
                    readonly: true,
                },
            ),
        ];
        let plan = plan_root(&disks, &devices(4)).expect("plan");
        assert_eq!(
            plan.overlay_options,
            "lowerdir=/run/matchlock/lower/1:/run/matchlock/lower/0,\
             upperdir=/run/matchlock/upper/upper,workdir=/run/matchlock/upper/work"
        );
        assert_eq!(
            plan.lowers[0],
            (
                PathBuf::from("/dev/vda"),
                "squashfs".to_string(),
                PathBuf::from("/run/matchlock/lower/0")
            )
        );
        assert_eq!(plan.upper, PathBuf::from("/dev/vdc"));
        assert_eq!(
            plan.extras,
            vec![(PathBuf::from("/dev/vdd"), PathBuf::from("/data"), true)]
        );
    }

    #[test]
    fn root_plan_errors() {
        let d = devices(4);
        assert!(matches!(
            plan_root(&[lower("l0")], &d),
            Err(BootError::NoRoot)
        ));
        assert!(matches!(
            plan_root(&[disk("up", DiskRole::Upper)], &d),
            Err(BootError::NoRoot)
        ));
        assert!(matches!(
            plan_root(
                &[
                    lower("l0"),
                    disk("up", DiskRole::Upper),
                    disk("x", DiskRole::Upper)
                ],
                &d
            ),
            Err(BootError::TwoUppers)
        ));
        assert!(matches!(
            plan_root(&[lower("zz"), disk("up", DiskRole::Upper)], &d),
            Err(BootError::DiskMissing { .. })
        ));
        for bad in ["data", "/", ""] {
            let extra = disk(
                "x",
                DiskRole::Extra {
                    mount: bad.into(),
                    readonly: false,
                },
            );
            assert!(matches!(
                plan_root(&[lower("l0"), disk("up", DiskRole::Upper), extra], &d),
                Err(BootError::BadExtraMount { .. })
            ));
        }
    }

    #[test]
    fn quota() {
        assert_eq!(cpu_quota(0.5, 1), Some(50_000));
        assert_eq!(cpu_quota(0.001, 1), Some(1000));
        assert_eq!(cpu_quota(1.5, 2), Some(150_000));
        assert_eq!(cpu_quota(0.0, 1), None);
        assert_eq!(cpu_quota(1.0, 1), None);
        assert_eq!(cpu_quota(f64::NAN, 4), None);
        assert_eq!(cpu_quota(-1.0, 4), None);
    }
}
