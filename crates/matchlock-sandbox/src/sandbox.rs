//! Creating, booting and shutting down one sandbox.

use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use matchlock_api::{Config, ImageConfig};
use matchlock_guest_proto::{
    read_frame_required, write_frame, BootConfig, DiskRole, DiskSpec, Frame, FrameType, Hello,
    HostEntry, ProtoError, PROTOCOL_VERSION, READY_PORT, SERVICE_PORT,
};
use matchlock_state::{Phase, Resource, StateDb};
use matchlock_vm::{Accel, Disk, Machine, VmConfig};

use crate::exec::{run_exec, ExecDefaults, ExecError, ExecIo};
use crate::paths::Paths;

/// How long the guest may take from VM start to `Ready` before we give up.
const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a connect to the guest's service port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of console output quoted when boot fails.
const CONSOLE_TAIL_LINES: usize = 30;

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
    #[error("locate the guest runtime")]
    GuestBinary(#[source] matchlock_vm::assets::AssetError),
    #[error("build the initramfs")]
    Initramfs(#[source] matchlock_vm::assets::AssetError),
    #[error("guest kernel not found at {0} (build it with scripts/build-kernel.sh, or set MATCHLOCK_KERNEL)")]
    KernelMissing(PathBuf),
    #[error("listen for the guest at {path}")]
    ReadyListen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("select the VM backend")]
    Backend(#[source] matchlock_vm::VmError),
    #[error("start the VM")]
    StartVm(#[source] matchlock_vm::VmError),
    #[error(
        "VM failed to become ready: {reason}\n--- last lines of the VM console ---\n{console}"
    )]
    NotReady { reason: String, console: String },
    #[error("connect to the guest agent")]
    Connect(#[source] matchlock_vm::VmError),
    #[error("prepare the guest connection for async use")]
    StreamSetup(#[source] std::io::Error),
    #[error("guest connection task failed")]
    Join(#[source] tokio::task::JoinError),
    #[error("executing command")]
    Exec(#[source] ExecError),
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
            Box::pin(async move { link.connect().await.map_err(|e| e.to_string()) })
        })
    }
}

/// Everything needed to create a sandbox.
pub struct SandboxSpec {
    pub config: Config,
    /// The image's flattened read-only root filesystem (squashfs).
    pub rootfs: PathBuf,
    pub image_config: ImageConfig,
    pub accel: Accel,
    /// The PID recorded as the sandbox owner (this process).
    pub owner_pid: u32,
}

/// A booted sandbox owned by this process.
pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    state: Arc<StateDb>,
    machine: Arc<dyn Machine>,
    link: Arc<GuestLink>,
    defaults: Arc<ExecDefaults>,
    pub boot_time: Duration,
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
        spec: SandboxSpec,
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
        let dir = state.vm_dir(&id);
        recorded(
            &id,
            "lifecycle",
            state.lifecycle_init(&id, "qemu").map(|_| ()),
        )?;

        let mut sb = Sandbox {
            id: id.clone(),
            dir: dir.clone(),
            state: state.clone(),
            machine: Arc::new(NoMachine),
            link: Arc::new(GuestLink {
                machine: Arc::new(NoMachine),
            }),
            defaults: Arc::new(ExecDefaults::default()),
            boot_time: Duration::ZERO,
        };
        match sb.boot(paths, &spec) {
            Ok(()) => {
                let _ = state.lifecycle_transition(&id, Phase::Running, None);
                Ok(sb)
            }
            Err(e) => {
                let msg = e.to_string();
                // Failures before the VM starts are create failures; later ones start failures.
                if state
                    .lifecycle_transition(&id, Phase::StartFailed, Some(&msg))
                    .is_err()
                {
                    let _ = state.lifecycle_transition(&id, Phase::CreateFailed, Some(&msg));
                }
                sb.teardown(Duration::ZERO);
                Err(e)
            }
        }
    }

    fn boot(&mut self, paths: &Paths, spec: &SandboxSpec) -> Result<(), SandboxError> {
        let started = Instant::now();
        let id = self.id.clone();
        let st = &self.state;
        let kernel = matchlock_vm::assets::kernel_path();
        if !kernel.is_file() {
            return Err(SandboxError::KernelMissing(kernel));
        }
        let guest = matchlock_vm::assets::find_guest_binary().map_err(SandboxError::GuestBinary)?;
        let initramfs = matchlock_vm::assets::initramfs_for(&guest, &paths.initramfs_cache())
            .map_err(SandboxError::Initramfs)?;

        let upper = self.dir.join("upper.ext4");
        recorded(
            &id,
            "upper disk",
            st.record_resource(&id, Resource::File(upper.clone())),
        )?;
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "assets resolved");
        crate::disk::create_ext4(&upper, spec.config.resources.disk_size_mb)
            .map_err(SandboxError::UpperDisk)?;
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "upper disk formatted"
        );

        let vsock = self.dir.join("vsock.sock");
        let ready_path = matchlock_vm::hybrid::listener_path(&vsock, READY_PORT);
        for f in [
            vsock.clone(),
            ready_path.clone(),
            self.dir.join("vhost-vsock.sock"),
            self.dir.join(crate::relay::SOCKET_NAME),
        ] {
            recorded(&id, "socket", st.record_resource(&id, Resource::File(f)))?;
        }
        let ready =
            StdUnixListener::bind(&ready_path).map_err(|source| SandboxError::ReadyListen {
                path: ready_path.clone(),
                source,
            })?;
        let _ = ready.set_nonblocking(true);

        let mut disks = vec![Disk {
            path: spec.rootfs.clone(),
            serial: "ml-lower0".into(),
            readonly: true,
        }];
        disks.push(Disk {
            path: upper,
            serial: "ml-upper".into(),
            readonly: false,
        });
        let mut guest_disks = vec![
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
            guest_disks.push(DiskSpec {
                serial,
                role: DiskRole::Extra {
                    mount: d.guest_mount.clone(),
                    readonly: d.readonly,
                },
            });
        }

        let res = &spec.config.resources;
        let vm_cfg = VmConfig {
            id: id.clone(),
            state_dir: self.dir.clone(),
            kernel,
            initramfs,
            vcpus: res.vcpus(),
            memory_mb: u32::try_from(res.memory_mb).unwrap_or(u32::MAX),
            disks,
            console_log: self.dir.join("logs").join("vm.log"),
            accel: spec.accel,
            extra_cmdline: Vec::new(),
            qemu_binary: None,
            vsock_binary: None,
        };
        let _ = st.lifecycle_transition(&id, Phase::Created, None);
        let _ = st.lifecycle_transition(&id, Phase::Starting, None);
        let backend = matchlock_vm::backend("qemu").map_err(SandboxError::Backend)?;
        let machine: Arc<dyn Machine> =
            Arc::from(backend.start(&vm_cfg).map_err(SandboxError::StartVm)?);
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "VM started");
        for pid in machine.pids() {
            recorded(
                &id,
                "process",
                st.record_resource(
                    &id,
                    Resource::Process {
                        pid,
                        start_time: process_start_time(pid),
                        name: "vm".into(),
                    },
                ),
            )?;
        }
        self.machine = machine.clone();
        self.link = Arc::new(GuestLink {
            machine: machine.clone(),
        });

        let net = spec.config.network.clone().unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let boot_cfg = BootConfig {
            hostname: if net.hostname.is_empty() {
                id.clone()
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
        };
        let timeout = std::env::var("MATCHLOCK_BOOT_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_BOOT_TIMEOUT);
        handshake(&ready, machine.as_ref(), &boot_cfg, started + timeout).map_err(|reason| {
            SandboxError::NotReady {
                reason,
                console: machine.console_tail(CONSOLE_TAIL_LINES),
            }
        })?;
        drop(ready);
        let _ = std::fs::remove_file(&ready_path);
        self.defaults = Arc::new(ExecDefaults::new(&spec.image_config, &spec.config.env));
        self.boot_time = started.elapsed();
        tracing::info!(id = %id, boot_ms = self.boot_time.as_millis() as u64, "sandbox ready");
        Ok(())
    }

    pub fn link(&self) -> Arc<GuestLink> {
        self.link.clone()
    }

    pub fn defaults(&self) -> Arc<ExecDefaults> {
        self.defaults.clone()
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join("logs").join("vm.log")
    }

    /// Runs a command with the sandbox's exec defaults applied.
    pub async fn exec(
        &self,
        mut req: matchlock_guest_proto::ExecRequest,
        io: ExecIo,
    ) -> Result<matchlock_guest_proto::ExitStatus, SandboxError> {
        self.defaults.apply(&mut req);
        let stream = self.link.connect().await?;
        run_exec(stream, &req, io).await.map_err(SandboxError::Exec)
    }

    /// True once the VM has gone away on its own.
    pub fn vm_exited(&self) -> Option<String> {
        self.machine.has_exited()
    }

    /// Stops the VM (a clean guest shutdown first: sync and unmount, then power off; killed
    /// if that takes longer than `grace`), removes its disks and sockets, and marks the
    /// sandbox stopped. State and logs stay until `rm`.
    pub fn shutdown(&self, grace: Duration) {
        let _ = self
            .state
            .lifecycle_transition(&self.id, Phase::Stopping, None);
        self.teardown(grace);
    }

    fn teardown(&self, grace: Duration) {
        let id = &self.id;
        let t = Instant::now();
        if self.machine.has_exited().is_none() {
            let clean = guest_shutdown(self.machine.as_ref(), grace.max(Duration::from_secs(3)));
            self.step("guest_shutdown", clean);
            tracing::debug!(ms = t.elapsed().as_millis() as u64, "guest shut down");
        }
        self.step(
            "machine_close",
            self.machine.kill().map_err(|e| e.to_string()),
        );
        let _ = self.state.lifecycle_transition(id, Phase::Stopped, None);
        let _ = self.state.lifecycle_transition(id, Phase::Cleaning, None);
        let mut failed = Vec::new();
        for name in ["upper.ext4", "vsock.sock", "vhost-vsock.sock", "exec.sock"] {
            let p = self.dir.join(name);
            let r = match std::fs::remove_file(&p) {
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

/// Accepts the guest's boot connection and runs the handshake, watching for VM death.
fn handshake(
    ready: &StdUnixListener,
    machine: &dyn Machine,
    cfg: &BootConfig,
    deadline: Instant,
) -> Result<(), String> {
    let mut conn = loop {
        match ready.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(why) = machine.has_exited() {
                    return Err(format!("VM exited during boot ({why})"));
                }
                if Instant::now() >= deadline {
                    return Err("timed out waiting for the guest to connect".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("accept guest connection: {e}")),
        }
    };
    let _ = conn.set_nonblocking(false);
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let _ = conn.set_read_timeout(Some(remaining));
    let io_err = |e: ProtoError| format!("boot handshake: {e}");
    let hello: Hello = read_frame_required(&mut conn)
        .map_err(io_err)?
        .expect(FrameType::Hello, "hello")
        .map_err(io_err)?;
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "guest speaks protocol {} but this host speaks {}; rebuild the guest runtime",
            hello.protocol_version, PROTOCOL_VERSION
        ));
    }
    write_frame(
        &mut conn,
        &Frame::json(FrameType::BootConfig, cfg).map_err(io_err)?,
    )
    .map_err(io_err)?;
    let reply = read_frame_required(&mut conn).map_err(io_err)?;
    match reply.kind {
        FrameType::Ready => Ok(()),
        FrameType::BootFailed => Err(format!(
            "guest boot failed: {}",
            String::from_utf8_lossy(&reply.payload)
        )),
        other => Err(format!("unexpected {other:?} frame during boot")),
    }
}

/// Asks the guest to sync, unmount and power off; waits for the VM to exit.
fn guest_shutdown(machine: &dyn Machine, grace: Duration) -> Result<(), String> {
    let mut conn = machine
        .connect(SERVICE_PORT, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    let _ = conn.set_read_timeout(Some(grace));
    write_frame(&mut conn, &Frame::empty(FrameType::Shutdown)).map_err(|e| e.to_string())?;
    let _ = read_frame_required(&mut conn);
    if machine.wait_exit(grace) {
        Ok(())
    } else {
        Err(format!(
            "VM still running {}s after shutdown request",
            grace.as_secs()
        ))
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
