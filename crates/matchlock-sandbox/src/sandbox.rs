//! Creating, booting and shutting down one sandbox's VM.
//!
//! # Design
//! [`Sandbox::create`] registers the VM, then boots it in named steps: resolve the kernel
//! and initramfs, create the writable upper disk, bind the socket the guest dials, build
//! the [`BootPlan`] (QEMU devices and the guest's boot configuration), let the services add
//! to it, start the VM, and run the boot handshake. Every host file and process is recorded
//! in the state DB before (files) or right after (processes) it is created. Any failure
//! tears down what exists so far. By default (unless `--no-snapshot`,
//! `MATCHLOCK_NO_SNAPSHOT=1` or `MATCHLOCK_DEV_SNAPSHOT=0`) an eligible VM is restored from
//! a cached post-boot snapshot (made by the first eligible run, [`crate::snapshot`]) and
//! the host opens the ready stream; any failure there falls back to a cold boot with a
//! warning and a `matchlock:` line in the console log. Commands reach the guest through [`Sandbox::exec`] or
//! [`Sandbox::open_exec`], the one place where the sandbox's exec defaults are applied.

use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use matchlock_api::{Config, ImageConfig};
use matchlock_guest_proto::{
    read_frame_required, write_frame, BootConfig, DiskRole, DiskSpec, ExecRequest, ExitStatus,
    Frame, FrameType, Hello, HostEntry, ProtoError, ReadyTimes, PROTOCOL_VERSION, READY_PORT,
    SERVICE_PORT,
};
use matchlock_state::{Phase, Resource, StateDb};
use matchlock_vm::{Accel, Disk, Machine, VmConfig};

use crate::exec::{run_exec, ExecDefaults, ExecError, ExecIo};
use crate::paths::Paths;
use crate::phases::{BootMarks, BootPhases};
use crate::services::{BootPlan, SandboxEvent, ServiceError, Services};

/// How long a restored guest may take to say `Hello` again before the snapshot counts as
/// broken.
const RESUME_TIMEOUT: Duration = Duration::from_secs(15);
/// The restored VM's private copy of the snapshot's RAM, in its state directory (removed
/// once QEMU has mapped it).
const RESTORE_RAM: &str = "ram";
/// Cold boots of one sandbox when the guest reports a dead timer ([`worth_another_boot`]).
const COLD_BOOT_ATTEMPTS: u32 = 2;
/// How long saving a snapshot may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(30);

/// When the VM process was up and the guest said `Hello`, and the guest's boot times.
struct Launched {
    spawned: Instant,
    hello: Instant,
    times: Option<ReadyTimes>,
}

/// How long the guest may take from VM start to `Ready` before we give up.
const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a connect to the guest's service port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of console output quoted when boot fails.
const CONSOLE_TAIL_LINES: usize = 30;
/// Files in the VM directory that exist only while the VM runs.
const RUNTIME_FILES: [&str; 5] = [
    "upper.ext4",
    "vsock.sock",
    "vhost-vsock.sock",
    matchlock_vm::chan::CHAN_SOCKET,
    "exec.sock",
];

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("open state database")]
    State(#[source] Box<matchlock_state::StateError>),
    #[error("record sandbox {id} in the state database")]
    Register {
        id: String,
        #[source]
        source: Box<matchlock_state::StateError>,
    },
    #[error("record {what} for {id}")]
    Record {
        id: String,
        what: &'static str,
        #[source]
        source: Box<matchlock_state::StateError>,
    },
    #[error("create the writable disk")]
    UpperDisk(#[source] crate::disk::DiskError),
    #[error("attach extra disk")]
    DiskLock(#[source] crate::disklock::DiskLockError),
    #[error("locate the guest runtime")]
    GuestBinary(#[source] matchlock_vm::assets::AssetError),
    #[error("build the initramfs")]
    Initramfs(#[source] matchlock_vm::assets::AssetError),
    #[error("guest kernel not found at {0} (build it with scripts/build-kernel.sh, or set MATCHLOCK_KERNEL)")]
    KernelMissing(PathBuf),
    #[error("choose the host channel")]
    Channel(#[source] matchlock_vm::ParseChannelError),
    #[error("listen for the guest at {path}")]
    ReadyListen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("start sandbox services")]
    Service(#[source] ServiceError),
    #[error("select the VM backend")]
    Backend(#[source] matchlock_vm::VmError),
    #[error("start the VM")]
    StartVm(#[source] matchlock_vm::VmError),
    #[error(
        "VM failed to become ready: {reason}\n--- last lines of the VM console ---\n{console}"
    )]
    NotReady {
        /// The handshake failure, rendered with its causes.
        reason: String,
        console: String,
    },
    #[error("connect to the guest agent")]
    Connect(#[source] matchlock_vm::VmError),
    #[error("prepare the guest connection for async use")]
    StreamSetup(#[source] std::io::Error),
    #[error("guest connection task failed")]
    Join(#[source] tokio::task::JoinError),
    #[error("executing command")]
    Exec(#[source] ExecError),
}

/// Why the boot handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("VM exited during boot ({0})")]
    VmExited(String),
    #[error("timed out waiting for the guest to connect")]
    Timeout,
    #[error("accept guest connection")]
    Accept(#[source] std::io::Error),
    #[error("boot handshake")]
    Proto(#[source] ProtoError),
    #[error(
        "guest speaks protocol {guest} but this host speaks {host}; rebuild the guest runtime"
    )]
    Version { guest: u32, host: u32 },
    #[error("guest boot failed: {0}")]
    GuestFailed(String),
    #[error("unexpected {0:?} frame during boot")]
    Unexpected(FrameType),
    #[error("open the restored guest's ready stream")]
    Resume(#[source] matchlock_vm::VmError),
}

/// Why the snapshot path of a boot failed (the boot then cold boots, see
/// [`Sandbox::launch`]).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotBootError {
    #[error("compute the snapshot key")]
    Key(#[source] crate::snapshot::SnapshotCacheError),
    #[error("start writing the snapshot")]
    Begin(#[source] crate::snapshot::SnapshotCacheError),
    #[error("start the snapshot-making VM")]
    StartMaker(#[source] Box<SandboxError>),
    #[error("wait for the snapshot-making VM's guest")]
    MakerAccept(#[source] HandshakeError),
    #[error("read the snapshot-making VM's hello")]
    MakerHello(#[source] HandshakeError),
    #[error("save the snapshot")]
    Save(#[source] matchlock_vm::VmError),
    #[error("commit the snapshot")]
    Commit(#[source] crate::snapshot::SnapshotCacheError),
    #[error("copy the snapshot's RAM for this VM")]
    PrivateRam(#[source] crate::disk::DiskError),
    #[error("start the restored VM")]
    StartRestored(#[source] Box<SandboxError>),
    #[error("the restored guest did not say hello again")]
    Resume(#[source] HandshakeError),
    #[error("send the boot config to the restored guest")]
    SendConfig(#[source] HandshakeError),
    #[error("wait for the restored guest to be ready")]
    Ready(#[source] HandshakeError),
}

/// Why a clean guest shutdown did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("connect")]
    Connect(#[source] matchlock_vm::VmError),
    #[error("send the shutdown request")]
    Send(#[source] ProtoError),
    #[error("VM still running {0}s after shutdown request")]
    StillRunning(u64),
}

/// `outer: inner: ...` for an error and its causes.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// A connector to the guest's service port; shared by the owner and its exec relay.
pub struct GuestLink {
    machine: Arc<dyn Machine>,
}

impl GuestLink {
    /// A fresh connection to the guest agent (one per request).
    pub async fn connect(&self) -> Result<tokio::net::UnixStream, SandboxError> {
        let m = self.machine.clone();
        let std = tokio::task::spawn_blocking(move || m.connect(SERVICE_PORT, CONNECT_TIMEOUT))
            .await
            .map_err(SandboxError::Join)?
            .map_err(SandboxError::Connect)?;
        std.set_nonblocking(true)
            .map_err(SandboxError::StreamSetup)?;
        tokio::net::UnixStream::from_std(std).map_err(SandboxError::StreamSetup)
    }

    /// A [`crate::forward::Dial`] that opens guest connections through this link.
    pub fn dialer(self: &Arc<Self>) -> crate::forward::Dial {
        let link = self.clone();
        Arc::new(move || {
            let link = link.clone();
            Box::pin(async move { link.connect().await.map_err(|e| error_chain(&e)) })
        })
    }
}

/// Everything needed to create a sandbox.
pub struct SandboxSpec {
    pub config: Config,
    /// The image's flattened read-only root filesystem (squashfs).
    pub rootfs: PathBuf,
    /// The image's config with the caller's overrides applied (exec defaults).
    pub image_config: ImageConfig,
    pub accel: Accel,
    /// The PID recorded as the sandbox owner (this process).
    pub owner_pid: u32,
    /// Host services started with the VM.
    pub services: Services,
    /// Always cold boot (`run --no-snapshot`); see [`crate::snapshot::enabled`].
    pub no_snapshot: bool,
}

/// A booted VM owned by this process. [`crate::RunningSandbox`] wraps it with everything
/// else a running sandbox has; use that unless you need the VM alone.
pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    state: Arc<StateDb>,
    machine: Arc<dyn Machine>,
    link: Arc<GuestLink>,
    defaults: ExecDefaults,
    network: Option<Arc<crate::network::NetworkControl>>,
    services: Mutex<Services>,
    /// Locks on the extra disks, held until the VM is stopped ([`crate::disklock`]).
    disk_locks: Mutex<Vec<crate::disklock::DiskLock>>,
    pub boot_time: Duration,
    /// Where [`Sandbox::boot_time`] went.
    pub boot_phases: BootPhases,
    /// Console lines about the snapshot path, written once the final VM runs.
    boot_notes: Vec<String>,
    /// Host instants of the boot's steps (written to the console log when it is ready).
    trace: crate::phases::BootTrace,
}

fn exec_defaults(spec: &SandboxSpec) -> ExecDefaults {
    let mut d = ExecDefaults::new(&spec.image_config, &spec.config.env);
    // Working directory: the caller's, else the image's WORKDIR, else the workspace.
    if d.cwd.is_empty() {
        if let Some(v) = spec.config.vfs.as_ref().filter(|v| v.enabled()) {
            d.cwd = v.workspace().to_string();
        }
    }
    match &spec.config.network {
        Some(net) => {
            let (forced, defaults) = crate::network::exec_env(net);
            d.with_network(forced, defaults)
        }
        None => d,
    }
}

fn process_start_time(pid: u32) -> u64 {
    matchlock_state::process_start_time(pid).unwrap_or(0)
}

impl Sandbox {
    /// Registers, boots and hands the guest its configuration. Blocking: call it from a
    /// blocking context. On failure everything created so far is torn down again.
    pub fn create(
        paths: &Paths,
        state: Arc<StateDb>,
        mut spec: SandboxSpec,
    ) -> Result<Sandbox, SandboxError> {
        let id = if spec.config.id.is_empty() {
            StateDb::new_vm_id()
        } else {
            spec.config.id.clone()
        };
        let config_json = serde_json::to_value(&spec.config).unwrap_or_default();
        state
            .register(&id, spec.owner_pid, &spec.config.image, &config_json)
            .map_err(|source| SandboxError::Register {
                id: id.clone(),
                source: Box::new(source),
            })?;
        let created = Instant::now();
        recorded(
            &id,
            "lifecycle",
            state.lifecycle_init(&id, "qemu").map(|_| ()),
        )?;
        let mut sb = Sandbox {
            dir: state.vm_dir(&id),
            id,
            state: state.clone(),
            machine: Arc::new(NoMachine),
            link: Arc::new(GuestLink {
                machine: Arc::new(NoMachine),
            }),
            defaults: exec_defaults(&spec),
            network: spec.services.network_control.clone(),
            services: Mutex::new(std::mem::take(&mut spec.services)),
            disk_locks: Mutex::new(Vec::new()),
            boot_time: Duration::ZERO,
            boot_phases: BootPhases::default(),
            boot_notes: Vec::new(),
            trace: crate::phases::BootTrace::new(),
        };
        sb.trace.at("create", created);
        match sb.boot(paths, &spec) {
            Ok(()) => {
                let _ = state.lifecycle_transition(&sb.id, Phase::Running, None);
                lock(&sb.services).emit(&SandboxEvent::Ready {
                    id: sb.id.clone(),
                    boot_ms: u64::try_from(sb.boot_time.as_millis()).unwrap_or(u64::MAX),
                });
                Ok(sb)
            }
            Err(e) => {
                let msg = error_chain(&e);
                // Failures before the VM starts are create failures; later ones start failures.
                if state
                    .lifecycle_transition(&sb.id, Phase::StartFailed, Some(&msg))
                    .is_err()
                {
                    let _ = state.lifecycle_transition(&sb.id, Phase::CreateFailed, Some(&msg));
                }
                sb.teardown(Duration::ZERO, "start failed");
                Err(e)
            }
        }
    }

    fn boot(&mut self, paths: &Paths, spec: &SandboxSpec) -> Result<(), SandboxError> {
        let started = Instant::now();
        self.trace.at("registered", started);
        let (kernel, initramfs) = boot_assets(paths)?;
        self.trace.mark("assets");
        self.lock_disks(paths, spec)?;
        let upper = self.create_upper_disk(paths, spec.config.resources.disk_size_mb)?;
        self.trace.mark("upper_disk");
        let (ready, ready_path) = self.bind_ready_socket()?;
        let channel = matchlock_vm::Channel::from_env().map_err(SandboxError::Channel)?;
        let mut plan = self.boot_plan(spec, kernel, initramfs, upper, channel);
        lock(&self.services)
            .events
            .open_log(&self.dir.join("logs").join(crate::services::EVENT_LOG));
        let files = lock(&self.services).host_files(&self.dir);
        for f in files {
            self.record("service socket", Resource::File(f))?;
        }
        lock(&self.services)
            .prepare(&mut plan, &self.dir)
            .map_err(SandboxError::Service)?;
        let spawn = Instant::now();
        self.trace.at("services", spawn);
        let deadline = started + boot_timeout();
        let snapshot = crate::snapshot::enabled(spec.no_snapshot);
        let launched = self.launch(paths, &mut plan, &ready, deadline, snapshot);
        self.flush_notes();
        let launched = launched?;
        let marks = BootMarks {
            start: started,
            spawn,
            spawned: launched.spawned,
            hello: launched.hello,
            ready: Instant::now(),
        };
        let times = launched.times;
        self.boot_phases = BootPhases::new(&marks, times);
        drop(ready);
        let _ = std::fs::remove_file(&ready_path);
        self.boot_time = started.elapsed();
        self.trace.at("ready", marks.ready);
        let line = self.trace.line();
        self.console_note(&line);
        self.flush_notes();
        tracing::info!(id = %self.id, boot_ms = ms(self.boot_time), "sandbox ready");
        Ok(())
    }

    /// Starts the VM and runs the boot handshake: from a cached snapshot when the developer
    /// switch is on and the VM is eligible (making the snapshot first if there is none),
    /// else, or when that fails, a cold boot.
    fn launch(
        &mut self,
        paths: &Paths,
        plan: &mut BootPlan,
        ready: &StdUnixListener,
        deadline: Instant,
        snapshot: bool,
    ) -> Result<Launched, SandboxError> {
        plan.guest.random_seed = match crate::snapshot::seed() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(id = %self.id, error = %error_chain(&e), "no random seed for the guest");
                Vec::new()
            }
        };
        // A fresh machine id from the same host randomness (the seed's tail is not reused:
        // a second read, so the guest cannot derive one from the other).
        plan.guest.machine_id = crate::snapshot::seed()
            .map(|b| hex::encode(b.get(..16).unwrap_or_default()))
            .unwrap_or_default();
        if snapshot {
            // Without a seed a restored guest would keep the snapshot's CRNG state.
            let ineligible = if plan.guest.random_seed.is_empty() {
                Some("no host random seed")
            } else {
                crate::snapshot::ineligible(&plan.vm)
            };
            match ineligible {
                Some(why) => {
                    tracing::info!(id = %self.id, reason = why, "snapshot boot not possible; cold boot")
                }
                None => match self.launch_from_snapshot(paths, plan, ready, deadline) {
                    Ok(l) => return Ok(l),
                    Err(SnapshotBootError::Begin(crate::snapshot::SnapshotCacheError::Busy)) => {
                        // Nothing was started; the maker's snapshot serves later starts.
                        tracing::info!(id = %self.id, "snapshot being made by another sandbox; cold boot");
                        self.console_note("snapshot being made by another sandbox, cold boot");
                    }
                    Err(e) => {
                        let why = error_chain(&e);
                        tracing::warn!(id = %self.id, error = %why, "snapshot boot failed; cold boot");
                        self.console_note(&format!("snapshot boot failed, cold boot: {why}"));
                        self.stop_machine();
                    }
                },
            }
        }
        let mut attempt = 1;
        loop {
            self.start_vm(&plan.vm)?;
            let spawned = Instant::now();
            match handshake(ready, self.machine.as_ref(), &mut plan.guest, deadline) {
                Ok((hello, times)) => {
                    return Ok(Launched {
                        spawned,
                        hello,
                        times,
                    })
                }
                Err(e) if attempt < COLD_BOOT_ATTEMPTS && worth_another_boot(&e, &plan.vm) => {
                    let why = error_chain(&e);
                    tracing::warn!(id = %self.id, error = %why, "guest timer dead; booting the VM again");
                    self.console_note(&format!("boot failed, booting again: {why}"));
                    self.stop_machine();
                    attempt += 1;
                }
                Err(e) => return Err(self.not_ready(&e)),
            }
        }
    }

    fn not_ready(&self, e: &HandshakeError) -> SandboxError {
        SandboxError::NotReady {
            reason: error_chain(e),
            console: self.machine.console_tail(CONSOLE_TAIL_LINES),
        }
    }

    /// The snapshot path of [`Sandbox::launch`].
    fn launch_from_snapshot(
        &mut self,
        paths: &Paths,
        plan: &mut BootPlan,
        ready: &StdUnixListener,
        deadline: Instant,
    ) -> Result<Launched, SnapshotBootError> {
        let cache = crate::snapshot::SnapshotCache::new(paths.snapshots());
        let key = crate::snapshot::key(&plan.vm).map_err(SnapshotBootError::Key)?;
        self.trace.mark("key");
        let entry = match cache.lookup(&key, plan.vm.memory_mb) {
            Some(e) => e,
            None => self.make_snapshot(&cache, &key, plan, ready, deadline)?,
        };
        self.trace.mark("lookup");
        let t = Instant::now();
        // QEMU 7.2 opens a RAM file read-write even to map it private, so the VM gets its
        // own copy in its state directory: a compromised QEMU can write only that, never
        // the cached RAM later restores map (matchlock_vm::snapshot, Limitations).
        let ram = plan.vm.state_dir.join(RESTORE_RAM);
        if let Err(e) = crate::disk::copy_sparse(&entry.ram(), &ram) {
            // A partial copy (e.g. the disk filled up) must not hold space during the
            // cold boot that follows.
            let _ = std::fs::remove_file(&ram);
            return Err(SnapshotBootError::PrivateRam(e));
        }
        self.trace.mark("ram_copied");
        let mut vm = plan.vm.clone();
        vm.snapshot = Some(matchlock_vm::SnapshotMode::Restore {
            ram: ram.clone(),
            state: entry.state(),
        });
        let started = self.start_vm(&vm);
        // QEMU has the copy mapped (or failed): its name is not needed any more.
        if let Err(e) = std::fs::remove_file(&ram) {
            tracing::warn!(id = %self.id, path = %ram.display(), error = %e, "remove the restored VM's RAM copy");
        }
        if let Err(e) = started {
            cache.discard(&entry);
            return Err(SnapshotBootError::StartRestored(Box::new(e)));
        }
        let spawned = Instant::now();
        if let Some(m) = self.machine.restore_marks() {
            self.trace.at("qemu_spawned", m.spawned);
            self.trace.at("qmp", m.qmp);
            self.trace.at("incoming", m.incoming);
            self.trace.at("running", m.running);
        }
        let full_window = spawned + RESUME_TIMEOUT;
        let (mut conn, opened, hello) = match open_ready(
            self.machine.as_ref(),
            deadline.min(full_window),
        ) {
            Ok(c) => c,
            Err(e) => {
                if full_window <= deadline {
                    // The guest had the whole window and never said Hello again: the
                    // snapshot is unusable.
                    cache.discard(&entry);
                } else {
                    // This sandbox's own deadline cut the wait short (an overloaded host,
                    // or a long snapshot making): nothing says the snapshot is bad.
                    tracing::info!(id = %self.id, "boot deadline reached before the restored guest answered; snapshot kept");
                }
                return Err(SnapshotBootError::Resume(e));
            }
        };
        self.trace.at("stream_opened", opened);
        self.trace.at("hello", hello);
        send_config(&mut conn, &mut plan.guest).map_err(SnapshotBootError::SendConfig)?;
        self.trace.mark("config_sent");
        let times = await_ready(&mut conn).map_err(SnapshotBootError::Ready)?;
        let short = key.get(..12).unwrap_or(&key);
        self.console_note(&format!(
            "restored from snapshot {short} (VM start + state load {} ms)",
            ms(spawned - t)
        ));
        tracing::info!(id = %self.id, snapshot = short, load_ms = ms(spawned - t), "restored from snapshot");
        Ok(Launched {
            spawned,
            hello,
            times,
        })
    }

    /// Cold boots a VM with file-backed RAM to the snapshot point (`Hello`), saves it,
    /// kills it and moves the snapshot into the cache.
    fn make_snapshot(
        &mut self,
        cache: &crate::snapshot::SnapshotCache,
        key: &str,
        plan: &BootPlan,
        ready: &StdUnixListener,
        deadline: Instant,
    ) -> Result<crate::snapshot::Entry, SnapshotBootError> {
        let pending = cache.begin(key).map_err(SnapshotBootError::Begin)?;
        // A maker that held the lock until just now may have committed it.
        if let Some(entry) = cache.lookup(key, plan.vm.memory_mb) {
            return Ok(entry);
        }
        let mut vm = plan.vm.clone();
        vm.snapshot = Some(matchlock_vm::SnapshotMode::Make { ram: pending.ram() });
        let t = Instant::now();
        self.start_vm(&vm)
            .map_err(|e| SnapshotBootError::StartMaker(Box::new(e)))?;
        let mut conn = accept_guest(ready, self.machine.as_ref(), deadline)
            .map_err(SnapshotBootError::MakerAccept)?;
        read_hello(&mut conn, deadline).map_err(SnapshotBootError::MakerHello)?;
        self.machine
            .save_snapshot(&pending.state(), SAVE_TIMEOUT)
            .map_err(SnapshotBootError::Save)?;
        self.stop_machine();
        drop(conn);
        let entry = pending.commit().map_err(SnapshotBootError::Commit)?;
        cache.evict(crate::snapshot::keep(), &entry.dir);
        self.console_note(&format!(
            "made snapshot {} ({} ms)",
            key.get(..12).unwrap_or(key),
            ms(t.elapsed())
        ));
        tracing::info!(id = %self.id, ms = ms(t.elapsed()), "snapshot made");
        Ok(entry)
    }

    /// Kills the current VM (a snapshot maker, or a failed restore) before the next start.
    fn stop_machine(&mut self) {
        let _ = self.machine.kill();
        // Its processes are gone: keep the record to the VM that stays (cleanup, `inspect`
        // and the memory figures read it).
        if let Err(e) = self.state.forget_exited_processes(&self.id) {
            tracing::warn!(id = %self.id, error = %e, "forget the stopped VM's processes");
        }
        let none: Arc<dyn Machine> = Arc::new(NoMachine);
        self.machine = none.clone();
        self.link = Arc::new(GuestLink { machine: none });
    }

    /// Queues a `matchlock:` line for the VM's console log; written by
    /// [`Sandbox::flush_notes`] once the VM that stays has started (each start truncates
    /// the log).
    fn console_note(&mut self, msg: &str) {
        self.boot_notes.push(format!("matchlock: {msg}\n"));
    }

    fn flush_notes(&mut self) {
        let notes = std::mem::take(&mut self.boot_notes);
        if let Some(mut w) = self.console_writer() {
            use std::io::Write;
            for n in notes {
                let _ = w.write_all(n.as_bytes());
            }
        }
    }

    /// Locks every extra disk for its mode before QEMU sees it, so a disk attached
    /// read-write elsewhere is refused with our message naming the holder.
    fn lock_disks(&self, paths: &Paths, spec: &SandboxSpec) -> Result<(), SandboxError> {
        let volumes = paths.volumes();
        let disks = spec.config.extra_disks.iter().map(|d| {
            let path = Path::new(&d.host_path);
            let mode = crate::disklock::Mode::from_readonly(d.readonly);
            (path, mode, crate::disklock::describe(path, &volumes))
        });
        let held = crate::disklock::acquire_all(disks, Some(&self.state), &self.id)
            .map_err(SandboxError::DiskLock)?;
        *lock(&self.disk_locks) = held;
        Ok(())
    }

    /// Records and creates the per-VM writable disk (sparse ext4, from a cached template).
    fn create_upper_disk(&self, paths: &Paths, size_mb: u64) -> Result<PathBuf, SandboxError> {
        let upper = self.dir.join("upper.ext4");
        self.record("upper disk", Resource::File(upper.clone()))?;
        crate::disk::create_upper(&upper, size_mb, &paths.disk_templates())
            .map_err(SandboxError::UpperDisk)?;
        Ok(upper)
    }

    /// Records the VM's sockets and binds the one the guest dials when it has booted.
    fn bind_ready_socket(&self) -> Result<(StdUnixListener, PathBuf), SandboxError> {
        let vsock = self.dir.join("vsock.sock");
        let ready_path = matchlock_vm::hybrid::listener_path(&vsock, READY_PORT);
        for f in [
            vsock,
            ready_path.clone(),
            self.dir.join("vhost-vsock.sock"),
            self.dir.join(matchlock_vm::chan::CHAN_SOCKET),
            self.dir.join(crate::relay::SOCKET_NAME),
        ] {
            self.record("socket", Resource::File(f))?;
        }
        let ready =
            StdUnixListener::bind(&ready_path).map_err(|source| SandboxError::ReadyListen {
                path: ready_path.clone(),
                source,
            })?;
        let _ = ready.set_nonblocking(true);
        Ok((ready, ready_path))
    }

    /// The QEMU configuration and the guest's boot configuration, before services add to
    /// them.
    fn boot_plan(
        &self,
        spec: &SandboxSpec,
        kernel: PathBuf,
        initramfs: PathBuf,
        upper: PathBuf,
        channel: matchlock_vm::Channel,
    ) -> BootPlan {
        let (disks, guest_disks) = disk_layout(spec, upper);
        let res = &spec.config.resources;
        let mut vm = VmConfig::new(self.id.clone(), self.dir.clone(), kernel, initramfs);
        vm.vcpus = res.vcpus();
        vm.memory_mb = u32::try_from(res.memory_mb).unwrap_or(u32::MAX);
        vm.disks = disks;
        vm.console_log = self.console_log();
        vm.accel = spec.accel;
        vm.channel = channel;
        let net = spec.config.network.clone().unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let guest = BootConfig {
            hostname: if net.hostname.is_empty() {
                self.id.clone()
            } else {
                net.hostname.clone()
            },
            add_hosts: net
                .add_hosts
                .iter()
                .map(|h| HostEntry {
                    host: h.host.clone(),
                    ip: h.ip.clone(),
                })
                .collect(),
            dns_servers: net.dns(),
            disks: guest_disks,
            cpus: res.cpus,
            privileged: spec.config.privileged,
            now_unix: (
                i64::try_from(now.as_secs()).unwrap_or(0),
                now.subsec_nanos(),
            ),
            net: None,
            ca_pem: None,
            workspace: None,
            random_seed: Vec::new(),
            machine_id: String::new(),
        };
        BootPlan { vm, guest }
    }

    /// Starts the VM and records its processes.
    fn start_vm(&mut self, cfg: &VmConfig) -> Result<(), SandboxError> {
        let _ = self
            .state
            .lifecycle_transition(&self.id, Phase::Created, None);
        let _ = self
            .state
            .lifecycle_transition(&self.id, Phase::Starting, None);
        let backend = matchlock_vm::backend("qemu").map_err(SandboxError::Backend)?;
        let machine: Arc<dyn Machine> =
            Arc::from(backend.start(cfg).map_err(SandboxError::StartVm)?);
        self.machine = machine.clone();
        self.link = Arc::new(GuestLink { machine });
        for pid in self.machine.pids() {
            self.record(
                "process",
                Resource::Process {
                    pid,
                    start_time: process_start_time(pid),
                    name: "vm".into(),
                },
            )?;
        }
        Ok(())
    }

    fn record(&self, what: &'static str, res: Resource) -> Result<(), SandboxError> {
        recorded(&self.id, what, self.state.record_resource(&self.id, res))
    }

    pub fn link(&self) -> Arc<GuestLink> {
        self.link.clone()
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join("logs").join("vm.log")
    }

    /// A writer into the console log that shares its cap and rotation (`None` before the
    /// VM has started).
    pub fn console_writer(&self) -> Option<matchlock_vm::console::ConsoleWriter> {
        self.machine.console().map(|c| c.writer())
    }

    /// A fresh guest connection for `req`, with the sandbox's exec defaults applied to it
    /// (image ENV < config env < request env; WORKDIR; USER). This is the one place those
    /// defaults are applied: in-process execs, the exec relay and RPC all come through here.
    pub async fn open_exec(
        &self,
        mut req: ExecRequest,
    ) -> Result<(tokio::net::UnixStream, ExecRequest), SandboxError> {
        self.defaults.apply(&mut req);
        let stream = self.link.connect().await?;
        Ok((stream, req))
    }

    /// Runs a command with the sandbox's exec defaults applied.
    pub async fn exec(&self, req: ExecRequest, io: ExecIo) -> Result<ExitStatus, SandboxError> {
        let (stream, req) = self.open_exec(req).await?;
        run_exec(stream, &req, io).await.map_err(SandboxError::Exec)
    }

    /// [`Sandbox::exec`] with the exec's timeline (host and guest marks; benchmarks).
    pub async fn exec_timed(
        &self,
        req: ExecRequest,
        io: ExecIo,
    ) -> Result<(ExitStatus, crate::exec::ExecTimeline), SandboxError> {
        let begin = Instant::now();
        let (stream, req) = self.open_exec(req).await?;
        let mut timeline = crate::exec::ExecTimeline::new(begin, Instant::now());
        let st = crate::exec::run_exec_timed(stream, &req, io, &mut timeline)
            .await
            .map_err(SandboxError::Exec)?;
        Ok((st, timeline))
    }

    /// Run-time control of the sandbox's network policy (none: no network).
    pub fn network(&self) -> Option<Arc<crate::network::NetworkControl>> {
        self.network.clone()
    }

    /// True once the VM has gone away on its own.
    pub fn vm_exited(&self) -> Option<String> {
        self.machine.has_exited()
    }

    /// Stops the VM (a clean guest shutdown first: sync and unmount, then power off; killed
    /// if that takes longer than `grace`), stops the services, removes disks and sockets,
    /// and marks the sandbox stopped. State and logs stay until `rm`. Blocking.
    pub fn shutdown(&self, grace: Duration, reason: &str) {
        let _ = self
            .state
            .lifecycle_transition(&self.id, Phase::Stopping, None);
        self.teardown(grace, reason);
    }

    fn teardown(&self, grace: Duration, reason: &str) {
        let id = &self.id;
        let t = Instant::now();
        if self.machine.has_exited().is_none() {
            let clean = guest_shutdown(self.machine.as_ref(), grace.max(Duration::from_secs(3)));
            self.step("guest_shutdown", clean.map_err(|e| error_chain(&e)));
            tracing::debug!(ms = ms(t.elapsed()), "guest shut down");
        }
        self.step(
            "machine_close",
            self.machine.kill().map_err(|e| error_chain(&e)),
        );
        lock(&self.services).stop();
        // QEMU is gone: the extra disks are free for other sandboxes.
        lock(&self.disk_locks).clear();
        let _ = self.state.lifecycle_transition(id, Phase::Stopped, None);
        let _ = self.state.lifecycle_transition(id, Phase::Cleaning, None);
        let mut failed = Vec::new();
        for name in RUNTIME_FILES {
            let r = match std::fs::remove_file(self.dir.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            };
            if let Err(e) = &r {
                failed.push(format!("{name}: {e}"));
            }
            self.step(&format!("remove_{name}"), r);
        }
        let _ = std::fs::remove_file(matchlock_vm::hybrid::listener_path(
            &self.dir.join("vsock.sock"),
            READY_PORT,
        ));
        let _ = self.state.set_stopped(id);
        if failed.is_empty() {
            let _ = self.state.lifecycle_transition(id, Phase::Cleaned, None);
        } else {
            let _ =
                self.state
                    .lifecycle_transition(id, Phase::CleanupFailed, Some(&failed.join("; ")));
        }
        lock(&self.services).emit(&SandboxEvent::Stopped {
            id: id.clone(),
            reason: reason.to_string(),
        });
    }

    fn step(&self, name: &str, r: Result<(), String>) {
        if let Err(e) = &r {
            tracing::warn!(id = %self.id, step = name, error = %e, "cleanup step failed");
        }
        let _ = self.state.record_cleanup(&self.id, name, r);
    }

    /// Removes the sandbox's state (row and directory) after [`Sandbox::shutdown`].
    pub fn remove(&self) -> Result<(), matchlock_state::StateError> {
        self.state.remove(&self.id)
    }

    pub fn state_dir(&self) -> &Path {
        &self.dir
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The kernel, and the initramfs built around the guest runtime (cached by its hash).
fn boot_assets(paths: &Paths) -> Result<(PathBuf, PathBuf), SandboxError> {
    let kernel = matchlock_vm::assets::kernel_path();
    if !kernel.is_file() {
        return Err(SandboxError::KernelMissing(kernel));
    }
    let guest = matchlock_vm::assets::find_guest_binary().map_err(SandboxError::GuestBinary)?;
    let initramfs = matchlock_vm::assets::initramfs_for(&guest, &paths.initramfs_cache())
        .map_err(SandboxError::Initramfs)?;
    Ok((kernel, initramfs))
}

/// `MATCHLOCK_BOOT_TIMEOUT` (seconds) or the default.
fn boot_timeout() -> Duration {
    std::env::var("MATCHLOCK_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_BOOT_TIMEOUT)
}

/// The VM's block devices and how the guest uses each: image root (read-only lower),
/// writable upper, then the extra disks in order.
fn disk_layout(spec: &SandboxSpec, upper: PathBuf) -> (Vec<Disk>, Vec<DiskSpec>) {
    let mut disks = vec![
        Disk {
            path: spec.rootfs.clone(),
            serial: "ml-lower0".into(),
            readonly: true,
        },
        Disk {
            path: upper,
            serial: "ml-upper".into(),
            readonly: false,
        },
    ];
    let mut guest = vec![
        DiskSpec {
            serial: "ml-lower0".into(),
            role: DiskRole::Lower {
                fs: "squashfs".into(),
            },
        },
        DiskSpec {
            serial: "ml-upper".into(),
            role: DiskRole::Upper,
        },
    ];
    for (i, d) in spec.config.extra_disks.iter().enumerate() {
        let serial = format!("ml-disk{i}");
        disks.push(Disk {
            path: PathBuf::from(&d.host_path),
            serial: serial.clone(),
            readonly: d.readonly,
        });
        guest.push(DiskSpec {
            serial,
            role: DiskRole::Extra {
                mount: d.guest_mount.clone(),
                readonly: d.readonly,
            },
        });
    }
    (disks, guest)
}

/// Maps a failed state write for sandbox `id` to the error naming what was being recorded.
fn recorded(
    id: &str,
    what: &'static str,
    r: Result<(), matchlock_state::StateError>,
) -> Result<(), SandboxError> {
    r.map_err(|source| SandboxError::Record {
        id: id.to_string(),
        what,
        source: Box::new(source),
    })
}

/// Waits for the guest's boot connection, watching for VM death and the deadline.
fn accept_guest(
    ready: &StdUnixListener,
    machine: &dyn Machine,
    deadline: Instant,
) -> Result<std::os::unix::net::UnixStream, HandshakeError> {
    loop {
        match ready.accept() {
            Ok((c, _)) => return Ok(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(why) = machine.has_exited() {
                    return Err(HandshakeError::VmExited(why));
                }
                if Instant::now() >= deadline {
                    return Err(HandshakeError::Timeout);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(HandshakeError::Accept(e)),
        }
    }
}

/// Accepts the guest's boot connection and runs the handshake: `Hello` -> `BootConfig` ->
/// `Ready` (or `BootFailed`). Returns when `Hello` arrived and the guest's boot times.
fn handshake(
    ready: &StdUnixListener,
    machine: &dyn Machine,
    cfg: &mut BootConfig,
    deadline: Instant,
) -> Result<(Instant, Option<ReadyTimes>), HandshakeError> {
    let mut conn = accept_guest(ready, machine, deadline)?;
    let hello_at = read_hello(&mut conn, deadline)?;
    let times = finish_handshake(&mut conn, cfg)?;
    Ok((hello_at, times))
}

/// Reads and checks the guest's `Hello`; returns when it arrived.
fn read_hello(
    conn: &mut std::os::unix::net::UnixStream,
    deadline: Instant,
) -> Result<Instant, HandshakeError> {
    let _ = conn.set_nonblocking(false);
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let _ = conn.set_read_timeout(Some(remaining));
    let hello: Hello = read_frame_required(conn)
        .map_err(HandshakeError::Proto)?
        .expect(FrameType::Hello, "hello")
        .map_err(HandshakeError::Proto)?;
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version {
            guest: hello.protocol_version,
            host: PROTOCOL_VERSION,
        });
    }
    Ok(Instant::now())
}

/// A restored guest's boot stream: the host opens it (the guest's own one belonged to the
/// snapshot's owner) and the guest says `Hello` again on it.
fn open_ready(
    machine: &dyn Machine,
    deadline: Instant,
) -> Result<(std::os::unix::net::UnixStream, Instant, Instant), HandshakeError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut conn = machine
        .connect(READY_PORT, left)
        .map_err(HandshakeError::Resume)?;
    let opened = Instant::now();
    let hello = read_hello(&mut conn, deadline)?;
    Ok((conn, opened, hello))
}

/// Sends `BootConfig` (with the current time) and waits for `Ready` or `BootFailed`.
fn finish_handshake(
    conn: &mut std::os::unix::net::UnixStream,
    cfg: &mut BootConfig,
) -> Result<Option<ReadyTimes>, HandshakeError> {
    send_config(conn, cfg)?;
    await_ready(conn)
}

/// Sends `BootConfig` with the current time.
fn send_config(
    conn: &mut std::os::unix::net::UnixStream,
    cfg: &mut BootConfig,
) -> Result<(), HandshakeError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    cfg.now_unix = (
        i64::try_from(now.as_secs()).unwrap_or(0),
        now.subsec_nanos(),
    );
    let frame = Frame::json(FrameType::BootConfig, &*cfg).map_err(HandshakeError::Proto)?;
    write_frame(conn, &frame).map_err(HandshakeError::Proto)
}

/// Whether a failed cold boot is worth one more: only a guest whose timer check failed
/// (its timer interrupts never fired, seen on overloaded TCG hosts: 4-6 of 48 boots at
/// load ~75, `docs/testing.md`); a boot that fails for its configuration would fail again.
/// Not for a VM with an owner-served vhost-user device (workspace, vhost-user-net): those
/// services take one QEMU connection, which the killed VM used.
fn worth_another_boot(e: &HandshakeError, vm: &VmConfig) -> bool {
    vm.owner_vhost_user().is_none()
        && matches!(e, HandshakeError::GuestFailed(reason)
            if reason.starts_with(matchlock_guest_proto::TIMER_DEAD_REASON))
}

/// Waits for `Ready` (with the guest's boot times) or `BootFailed`.
fn await_ready(
    conn: &mut std::os::unix::net::UnixStream,
) -> Result<Option<ReadyTimes>, HandshakeError> {
    let reply = read_frame_required(conn).map_err(HandshakeError::Proto)?;
    match reply.kind {
        // Times are informational: an empty or malformed payload is no failure.
        FrameType::Ready => Ok(reply.parse::<ReadyTimes>("ready").ok()),
        FrameType::BootFailed => Err(HandshakeError::GuestFailed(
            String::from_utf8_lossy(&reply.payload).into_owned(),
        )),
        other => Err(HandshakeError::Unexpected(other)),
    }
}

/// Asks the guest to sync, unmount and power off; waits for the VM to exit.
fn guest_shutdown(machine: &dyn Machine, grace: Duration) -> Result<(), ShutdownError> {
    let mut conn = machine
        .connect(SERVICE_PORT, Duration::from_secs(2))
        .map_err(ShutdownError::Connect)?;
    let _ = conn.set_read_timeout(Some(grace));
    write_frame(&mut conn, &Frame::empty(FrameType::Shutdown)).map_err(ShutdownError::Send)?;
    let _ = read_frame_required(&mut conn);
    if machine.wait_exit(grace) {
        Ok(())
    } else {
        Err(ShutdownError::StillRunning(grace.as_secs()))
    }
}

/// Placeholder machine before the VM starts, so teardown can run at any stage.
struct NoMachine;

impl Machine for NoMachine {
    fn pids(&self) -> Vec<u32> {
        Vec::new()
    }
    fn vsock_path(&self) -> &Path {
        Path::new("")
    }
    fn connect(
        &self,
        port: u32,
        _t: Duration,
    ) -> Result<std::os::unix::net::UnixStream, matchlock_vm::VmError> {
        Err(matchlock_vm::VmError::NotStarted { port })
    }
    fn has_exited(&self) -> Option<String> {
        Some("not started".into())
    }
    fn wait_exit(&self, _t: Duration) -> bool {
        true
    }
    fn kill(&self) -> Result<(), matchlock_vm::VmError> {
        Ok(())
    }
    fn console_tail(&self, _lines: usize) -> String {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dead_guest_timer_is_worth_another_boot() {
        let plain = VmConfig::new("t", "/nonexistent", "/k", "/i");
        let dead = HandshakeError::GuestFailed(format!(
            "{}: a 1ms sleep did not return within 10s",
            matchlock_guest_proto::TIMER_DEAD_REASON
        ));
        assert!(worth_another_boot(&dead, &plain));
        for other in [
            HandshakeError::GuestFailed("mounting the root: ENOENT".into()),
            HandshakeError::Timeout,
            HandshakeError::VmExited("exit code 1".into()),
        ] {
            assert!(!worth_another_boot(&other, &plain), "{other}");
        }
        let mut workspace = plain.clone();
        workspace.fs = Some(matchlock_vm::FsDevice {
            socket: "/nonexistent/fs.sock".into(),
            tag: "ws".into(),
        });
        assert!(!worth_another_boot(&dead, &workspace));
    }
}
