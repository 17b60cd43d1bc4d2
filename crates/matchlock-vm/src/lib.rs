//! Virtual machines for Matchlock: the backend trait, the QEMU `microvm` backend, the guest
//! kernel/initramfs assets and the Firecracker-style hybrid-vsock connector.
//!
//! The sandbox crate calls [`backend`] with a backend name, then [`Backend::start`] with a
//! [`VmConfig`], and gets a [`Machine`] it can share (`Arc<dyn Machine>`): connect to guest
//! vsock ports, watch for exit, read the console tail, kill.
//!
//! # Design
//! - Backends sit behind a trait with a runtime constructor (Cloud Hypervisor's `hypervisor`
//!   crate), so a Firecracker backend can follow without touching callers.
//! - Acceleration is decided by [`detect_accel`]: a PVM-backed `/dev/kvm` (this project's
//!   development machines) runs standard guests about a thousand times slower and crashes, so
//!   it counts as unusable and `auto` falls back to TCG with a one-line reason.
//! - Every host process a VM needs (QEMU, `vhost-device-vsock`) is a child of the owner that
//!   dies with it (`PR_SET_PDEATHSIG`), lives in its own process group, and is reaped by a
//!   waiter thread; see [`qemu`] and the `spawn` module. Both run confined (QEMU's seccomp
//!   sandbox and a Landlock ruleset limiting them to the VM's own files); see [`confine`].
//! - The guest vsock is reached through the hybrid (Firecracker) protocol on a unix socket in
//!   the VM's state directory ([`hybrid`]), which `vhost-device-vsock` speaks. With
//!   [`Channel::Serial`] (developer knob `MATCHLOCK_DEV_CHANNEL=serial`) the same
//!   [`Machine::connect`] and ready-socket interfaces run over one multiplexed virtio-serial
//!   port instead ([`chan`]), which migrates and needs no helper process.
//!
//! # Limitations
//! - Only the QEMU backend exists; only x86_64 hosts and guests.
//! - There is no readiness logic here beyond [`Machine::connect`] retrying until the guest
//!   listens: the readiness handshake belongs to the sandbox and the guest agent.
#![deny(unsafe_code)]

pub mod accel;
pub mod assets;
pub mod chan;
pub mod confine;
pub mod console;
pub mod cpio;
pub mod hybrid;
pub mod qemu;
pub mod qmp;
pub mod snapshot;
mod spawn;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use accel::{detect_accel, Accel, AccelChoice, ParseAccelError};
pub use assets::AssetError;
pub use chan::{Channel, ParseChannelError, CHANNEL_ENV};
pub use confine::{host_confinement, Confinement};
pub use qemu::{qemu_version, snapshot_key_material, vsock_backend_path};

/// A block device given to the guest as a `virtio-blk` device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Raw image file on the host.
    pub path: PathBuf,
    /// Serial the guest sees (`/sys/block/vdX/serial`), used to find the disk by role.
    pub serial: String,
    /// Whether the guest may only read.
    pub readonly: bool,
}

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Sandbox id, used in logs.
    pub id: String,
    /// Directory for the VM's sockets (`vsock.sock`, `vhost-vsock.sock`); created if missing.
    pub state_dir: PathBuf,
    /// Uncompressed, PVH-bootable `vmlinux`.
    pub kernel: PathBuf,
    /// newc cpio initramfs whose `/init` is the guest binary.
    pub initramfs: PathBuf,
    /// Number of virtual CPUs (at least 1).
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mb: u32,
    /// Block devices, in the order the guest sees them (`vda`, `vdb`, ...).
    pub disks: Vec<Disk>,
    /// Truncated at start; receives the guest serial console and QEMU's stderr.
    pub console_log: PathBuf,
    /// Cap of the console log in bytes; one rotated copy is kept (see [`console`]).
    pub console_max_bytes: u64,
    /// Requested acceleration.
    pub accel: Accel,
    /// Extra kernel command-line words, appended after ours.
    pub extra_cmdline: Vec<String>,
    /// Override for the QEMU binary (default: `qemu-system-x86_64` in `PATH`).
    pub qemu_binary: Option<PathBuf>,
    /// Override for `vhost-device-vsock` (default: `PATH`, then `~/.cargo/bin`).
    pub vsock_binary: Option<PathBuf>,
    /// A virtio-net device, when the sandbox has a network (none: no NIC at all).
    pub net: Option<NetDevice>,
    /// A vhost-user-fs device, when the sandbox has a workspace (none: no share).
    pub fs: Option<FsDevice>,
    /// The host<->guest channel's transport (vsock, or the virtio-serial mux of [`chan`]).
    pub channel: Channel,
    /// Make or restore a snapshot ([`snapshot`]; serial channel only). None: memfd RAM.
    pub snapshot: Option<SnapshotMode>,
}

pub use snapshot::SnapshotMode;

/// A device whose vhost-user backend the sandbox's owner serves (not QEMU): QEMU 7.2 cannot
/// migrate it, and the backend takes one QEMU connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerVhostUser {
    /// The workspace's vhost-user-fs.
    Fs,
    /// The network on [`NetTransport::VhostUser`].
    Net,
}

impl VmConfig {
    /// The first device of this VM whose vhost-user backend the owner serves, if any.
    pub fn owner_vhost_user(&self) -> Option<OwnerVhostUser> {
        if self.fs.is_some() {
            return Some(OwnerVhostUser::Fs);
        }
        self.net
            .as_ref()
            .is_some_and(|n| n.transport == NetTransport::VhostUser)
            .then_some(OwnerVhostUser::Net)
    }

    /// A VM with the defaults: 1 vCPU, 512 MiB, no disks, no network or workspace, the
    /// default channel, automatic acceleration, the console log `<state_dir>/console.log`
    /// with the configured cap, no snapshot. Callers change the fields they need.
    pub fn new(
        id: impl Into<String>,
        state_dir: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
        initramfs: impl Into<PathBuf>,
    ) -> Self {
        let state_dir = state_dir.into();
        VmConfig {
            id: id.into(),
            console_log: state_dir.join("console.log"),
            state_dir,
            kernel: kernel.into(),
            initramfs: initramfs.into(),
            vcpus: 1,
            memory_mb: 512,
            disks: Vec::new(),
            console_max_bytes: console::console_max_bytes(),
            accel: Accel::Auto,
            extra_cmdline: Vec::new(),
            qemu_binary: None,
            vsock_binary: None,
            net: None,
            fs: None,
            channel: Channel::default(),
            snapshot: None,
        }
    }
}

/// A virtio-fs device whose requests a vhost-user backend in the sandbox owner serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsDevice {
    /// The unix socket the backend listens on before QEMU starts.
    pub socket: PathBuf,
    /// The mount tag the guest mounts (`mount -t virtiofs <tag> <dir>`).
    pub tag: String,
}

/// A virtio-net device whose Ethernet frames travel over a unix stream socket (`-netdev
/// stream`, each frame behind a 4-byte big-endian length) between QEMU and the host's
/// userspace network stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDevice {
    /// The socket the network stack listens on before QEMU starts; QEMU connects to it.
    pub socket: PathBuf,
    /// The guest NIC's MAC address.
    pub mac: [u8; 6],
    /// How the NIC's frames reach the stack.
    pub transport: NetTransport,
}

/// The netdev between the guest NIC and the sandbox's network stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetTransport {
    /// `-netdev stream`: QEMU copies every frame to the stack's unix stream socket
    /// (migratable: the transport for snapshot boots).
    Stream,
    /// `-netdev vhost-user`: the stack serves the virtqueues from the shared guest memory
    /// (QEMU 7.2 cannot migrate it).
    VhostUser,
}

/// A way to run VMs (QEMU today).
pub trait Backend: Send + Sync {
    /// Short name, as accepted by [`backend`].
    fn name(&self) -> &'static str;
    /// Starts a VM. Returns once the VMM process runs; the guest boots asynchronously.
    fn start(&self, cfg: &VmConfig) -> Result<Box<dyn Machine>, VmError>;
}

/// A running (or exited) VM. Shareable: all methods take `&self`.
///
/// Dropping a `Machine` kills the VM and its helpers.
pub trait Machine: Send + Sync {
    /// Pids of the VMM and its helper processes, for state records.
    fn pids(&self) -> Vec<u32>;
    /// The hybrid-vsock base socket (`<state_dir>/vsock.sock`); guest-initiated streams to
    /// host port P arrive at `<base>_<P>` over either channel.
    fn vsock_path(&self) -> &Path;
    /// Opens a host-to-guest vsock connection to `port`, retrying until the guest listens or
    /// `timeout` passes; fails early if the VM exits.
    fn connect(&self, port: u32, timeout: Duration) -> Result<UnixStream, VmError>;
    /// `Some(description)` once the VMM has exited.
    fn has_exited(&self) -> Option<String>;
    /// Waits up to `timeout` for the VMM to exit on its own; true if it did.
    fn wait_exit(&self, timeout: Duration) -> bool;
    /// SIGKILLs the VMM and its helpers and reaps them. Idempotent.
    fn kill(&self) -> Result<(), VmError>;
    /// The last `lines` lines of the console log (guest serial and VMM stderr).
    fn console_tail(&self, lines: usize) -> String;
    /// The console log, for other writers that must share its cap (`None` if this machine
    /// has none).
    fn console(&self) -> Option<std::sync::Arc<console::ConsoleLog>> {
        None
    }
    /// When the steps of this VM's snapshot restore finished (`None`: not restored).
    fn restore_marks(&self) -> Option<snapshot::LoadMarks> {
        None
    }
    /// Saves the paused guest's device state to `state` (its RAM stays in the file given
    /// by [`SnapshotMode::Make`]) and leaves the VM paused; see [`snapshot`].
    fn save_snapshot(&self, state: &Path, timeout: Duration) -> Result<(), VmError> {
        let _ = (state, timeout);
        Err(VmError::SnapshotUnsupported)
    }
}

/// Returns the backend called `kind` (`"qemu"`).
pub fn backend(kind: &str) -> Result<Box<dyn Backend>, VmError> {
    match kind {
        "qemu" => Ok(Box::new(qemu::QemuBackend)),
        other => Err(VmError::UnknownBackend {
            kind: other.to_owned(),
        }),
    }
}

/// Errors of VM backends.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("this VM was not started to make a snapshot")]
    SnapshotUnsupported,
    #[error("save the snapshot")]
    SnapshotSave(#[source] snapshot::SnapshotError),
    #[error("restore the snapshot (last console lines: {console:?})")]
    SnapshotRestore {
        console: String,
        #[source]
        source: snapshot::SnapshotError,
    },
    #[error("read {path} for the snapshot key")]
    SnapshotIdentity {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown VM backend {kind:?} (known: qemu)")]
    UnknownBackend { kind: String },
    #[error("qemu-system-x86_64 not found in PATH; install the qemu-system-x86 package")]
    QemuNotFound,
    #[error("run {binary} --version")]
    QemuVersion {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} --version failed: {stderr}")]
    QemuVersionFailed { binary: PathBuf, stderr: String },
    #[error("vhost-device-vsock not found in PATH or ~/.cargo/bin; install it with `cargo install vhost-device-vsock`")]
    VsockBackendNotFound,
    #[error("KVM requested but unusable: {reason}")]
    KvmUnusable { reason: String },
    #[error("invalid VM config: {reason}")]
    InvalidConfig { reason: String },
    #[error("missing {what} at {path}")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("create state directory {path}")]
    CreateStateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("remove stale socket {path}")]
    RemoveStaleSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("create console log {path}")]
    CreateConsoleLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spawn vhost-device-vsock {binary}")]
    SpawnVsockBackend {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vhost-device-vsock exited before creating its socket ({status})")]
    VsockBackendExited { status: String },
    #[error("vhost-device-vsock did not create {socket} within {timeout:?}")]
    VsockBackendTimeout { socket: PathBuf, timeout: Duration },
    #[error("build the Landlock ruleset for {what}")]
    Landlock {
        what: &'static str,
        #[source]
        source: landlock::RulesetError,
    },
    #[error("spawn QEMU {binary}")]
    SpawnQemu {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("start waiter thread for {what}")]
    SpawnWaiter {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to guest vsock port {port}")]
    Connect {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("listen on the host channel socket in {dir}")]
    ChannelListen {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM not started (guest vsock port {port})")]
    NotStarted { port: u32 },
    #[error("VM exited before guest vsock port {port} accepted: {status}")]
    ExitedBeforeConnect { port: u32, status: String },
    #[error("kill {what} (pid {pid})")]
    Kill {
        what: &'static str,
        pid: u32,
        #[source]
        source: nix::Error,
    },
}
