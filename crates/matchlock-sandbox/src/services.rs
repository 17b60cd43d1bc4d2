//! Per-sandbox host services: the slots where the network stack, the filesystem server and
//! the event sink plug into a sandbox.
//!
//! # Design
//! A service lives exactly as long as its sandbox and is driven by it, never by a caller
//! (`run`, `run -d` and `rpc` only fill in [`Services`]). Before the VM starts, each service
//! gets the [`BootPlan`] (the QEMU configuration and the guest's boot configuration) to add
//! the devices it serves (a netdev socket, a vhost-user-fs socket) and what the guest must
//! know (addresses, mount tags); it records every host file it creates in the state DB
//! through the sandbox before creating it. After the VM is down, [`Service::stop`] releases
//! what it holds. Events (sandbox ready, stopped; later flows and file operations) go to the
//! [`EventSink`].
//!
//! The filesystem service ([`FilesystemService`]) serves the workspace: it checks the
//! mounts when the sandbox is configured (so a bad mount fails before anything boots),
//! builds the router (overlay copy-ups in `<state dir>/overlay`, removed at stop) wrapped in
//! the interception layer (file events to the event hub) and listens on
//! `<state dir>/vfs.sock` in `prepare` (before QEMU starts), adds the `vhost-user-fs` device
//! and tells the guest where to mount the share.
//!
//! Benchmark knob: with `MATCHLOCK_DEV_VHOST_USER_FS_SOCKET` set in the owner's environment
//! ([`DEV_VHOST_USER_FS_SOCKET_ENV`]), QEMU's `vhost-user-fs` device connects to that socket
//! (an externally started back-end, e.g. upstream `virtiofsd`) instead of the in-process
//! server; the guest mounts the same tag at the same path, so `matchlock-bench vfs` compares
//! the two servers on one VM image and one boot path. Whoever sets the owner's environment
//! already controls the sandbox, so the knob grants nothing new; it is refused when the
//! configuration has interception rules or events (the external server would silently skip
//! them) and when the path is not a socket.
//!
//! # Limitations
//! Mount nesting rules are the router's (see `matchlock_vfs::router`).

use std::path::Path;
use std::sync::Arc;

use matchlock_api::rpc::{EventParams, FileEventInfo, NetworkEventInfo};
use matchlock_guest_proto::BootConfig;
use matchlock_net::events::{now_unix, now_unix_ms};
use matchlock_vm::console::ConsoleLog;
use matchlock_vm::VmConfig;

/// What a VM will boot with; services may add to it before the VM starts.
pub struct BootPlan {
    pub vm: VmConfig,
    pub guest: BootConfig,
}

#[derive(Debug, thiserror::Error)]
#[error("prepare the {service} service")]
pub struct ServiceError {
    pub service: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// A host-side service of one sandbox.
pub trait Service: Send {
    /// Short name for errors and logs (`network`, `filesystem`).
    fn name(&self) -> &'static str;
    /// The host files [`Service::prepare`] will create in `dir`; the sandbox records them in
    /// the state DB first, so reclamation finds them after any crash.
    fn host_files(&self, _dir: &Path) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
    /// Before the VM starts: add devices and guest settings to `plan`; `dir` is the
    /// sandbox's state directory, where its sockets belong.
    fn prepare(&mut self, plan: &mut BootPlan, dir: &Path) -> Result<(), ServiceError>;
    /// After the VM has stopped: release everything. Must not block for long.
    fn stop(&mut self);
}

/// Something worth telling an operator or a client about a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxEvent {
    /// The guest answered the boot handshake.
    Ready { id: String, boot_ms: u64 },
    /// The sandbox stopped (its VM is down and its disks and sockets are removed).
    Stopped { id: String, reason: String },
    /// A request through the interception proxy, or a connection the policy refused.
    Network {
        /// Unix seconds.
        timestamp: i64,
        event: NetworkEventInfo,
    },
    /// A guest filesystem operation in the workspace (when VFS events are on).
    File {
        /// Unix milliseconds (the reference stamps file events in ms, network events in s).
        timestamp_ms: i64,
        event: FileEventInfo,
    },
}

impl SandboxEvent {
    /// The RPC `event` notification's params for this event (network and file events; the
    /// reference has no lifecycle events on the wire).
    pub fn event_params(&self) -> Option<EventParams> {
        match self {
            SandboxEvent::Network { timestamp, event } => Some(EventParams {
                kind: "network".to_string(),
                timestamp: *timestamp,
                network: Some(event.clone()),
                file: None,
            }),
            SandboxEvent::File {
                timestamp_ms,
                event,
            } => Some(EventParams {
                kind: "file".to_string(),
                timestamp: *timestamp_ms,
                network: None,
                file: Some(event.clone()),
            }),
            SandboxEvent::Ready { .. } | SandboxEvent::Stopped { .. } => None,
        }
    }

    /// One line of the sandbox's event log (`logs/events.jsonl`): network events in the
    /// shape of the RPC `event` notification, lifecycle events as `{"type":"sandbox",...}`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            SandboxEvent::Ready { id, boot_ms } => {
                serde_json::json!({"type": "sandbox", "event": "ready", "id": id, "boot_ms": boot_ms, "timestamp": now_unix()})
            }
            SandboxEvent::Stopped { id, reason } => {
                serde_json::json!({"type": "sandbox", "event": "stopped", "id": id, "reason": reason, "timestamp": now_unix()})
            }
            SandboxEvent::Network { .. } | SandboxEvent::File { .. } => {
                serde_json::to_value(self.event_params()).unwrap_or_default()
            }
        }
    }
}

/// Receives a sandbox's events; must not block.
pub type EventSink = Arc<dyn Fn(&SandboxEvent) + Send + Sync>;

/// File name of a sandbox's event log, in its `logs` directory.
pub const EVENT_LOG: &str = "events.jsonl";

/// Where a sandbox's events go: its event log (capped and rotated like the console log)
/// and the caller's sink (the RPC server's `event` notifications). Never blocks for long:
/// a log line is one small append; the sink must not block.
#[derive(Default)]
pub struct EventHub {
    sink: Option<EventSink>,
    log: std::sync::OnceLock<Arc<ConsoleLog>>,
}

impl EventHub {
    pub fn new(sink: Option<EventSink>) -> Arc<EventHub> {
        Arc::new(EventHub {
            sink,
            log: std::sync::OnceLock::new(),
        })
    }

    /// Starts the event log at `path` (once; later calls are ignored).
    pub(crate) fn open_log(&self, path: &Path) {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match ConsoleLog::create(path, matchlock_vm::console::console_max_bytes()) {
            Ok(log) => {
                let _ = self.log.set(log);
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "event log unavailable"),
        }
    }

    pub fn emit(&self, event: &SandboxEvent) {
        tracing::debug!(?event, "sandbox event");
        if let Some(log) = self.log.get() {
            let mut line = event.to_json().to_string();
            line.push('\n');
            log.append(line.as_bytes());
        }
        if let Some(sink) = &self.sink {
            sink(event);
        }
    }
}

/// The services a sandbox runs beside its VM.
#[derive(Default)]
pub struct Services {
    /// Userspace network stack and egress policy (none: no guest NIC).
    pub network: Option<Box<dyn Service>>,
    /// Workspace filesystem server (none: no workspace).
    pub filesystem: Option<Box<dyn Service>>,
    /// Where events go (the event log, and the caller's sink if any).
    pub events: Arc<EventHub>,
    /// Run-time control of the network's policy (none: no network).
    pub network_control: Option<Arc<crate::network::NetworkControl>>,
}

impl Services {
    /// The services `config` asks for: a network unless `network.no_network` (an absent
    /// network section means the default network). Generated secret placeholders are
    /// written into `config`.
    pub fn for_config(
        config: &mut matchlock_api::Config,
        sink: Option<EventSink>,
    ) -> Result<Services, crate::network::NetworkSetupError> {
        let net = config.network.get_or_insert_with(Default::default);
        let mut services = Services {
            events: EventHub::new(sink),
            ..Services::default()
        };
        if let Some((service, control)) = crate::network::for_config(net, services.events.clone())?
        {
            services.network = Some(Box::new(service));
            services.network_control = Some(control);
        }
        Ok(services)
    }

    /// Adds the workspace filesystem `vfs` asks for (nothing without mounts).
    pub fn add_filesystem(
        &mut self,
        vfs: Option<&matchlock_api::VfsConfig>,
    ) -> Result<(), matchlock_vfs::RouterError> {
        if let Some(v) = vfs.filter(|v| v.enabled()) {
            self.filesystem = Some(Box::new(FilesystemService::new(v, self.events.clone())?));
        }
        Ok(())
    }

    fn each(&mut self) -> impl Iterator<Item = &mut Box<dyn Service>> {
        self.network.iter_mut().chain(self.filesystem.iter_mut())
    }

    /// Every host file the services will create in `dir`.
    pub(crate) fn host_files(&mut self, dir: &Path) -> Vec<std::path::PathBuf> {
        self.each().flat_map(|s| s.host_files(dir)).collect()
    }

    /// Lets every service add to the boot plan, in a fixed order (network, filesystem).
    pub(crate) fn prepare(&mut self, plan: &mut BootPlan, dir: &Path) -> Result<(), ServiceError> {
        for s in self.each() {
            s.prepare(plan, dir)?;
            tracing::debug!(service = s.name(), "service prepared");
        }
        Ok(())
    }

    /// Stops every service (after the VM is down).
    pub(crate) fn stop(&mut self) {
        for s in self.each() {
            s.stop();
            tracing::debug!(service = s.name(), "service stopped");
        }
    }

    pub(crate) fn emit(&self, event: &SandboxEvent) {
        self.events.emit(event);
    }
}

/// File name of the virtio-fs socket in a sandbox's state directory.
pub const VFS_SOCKET: &str = "vfs.sock";

/// Benchmark knob: the socket of an external vhost-user-fs back-end to use instead of the
/// in-process server (see the module docs).
pub const DEV_VHOST_USER_FS_SOCKET_ENV: &str = "MATCHLOCK_DEV_VHOST_USER_FS_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum ExternalFsError {
    #[error("{DEV_VHOST_USER_FS_SOCKET_ENV}={path}: not a unix socket")]
    NotSocket { path: std::path::PathBuf },
    #[error("{DEV_VHOST_USER_FS_SOCKET_ENV} cannot be used with vfs.interception: the external server would not enforce it")]
    Interception,
}

/// The external back-end's socket when the benchmark knob is set, checked.
fn external_fs_socket(
    rules: &matchlock_vfs::intercept::Rules,
) -> Result<Option<std::path::PathBuf>, ExternalFsError> {
    use std::os::unix::fs::FileTypeExt;
    let Some(path) = std::env::var_os(DEV_VHOST_USER_FS_SOCKET_ENV).filter(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    let path = std::path::PathBuf::from(path);
    if !rules.blocks.is_empty() || rules.emit_events {
        return Err(ExternalFsError::Interception);
    }
    match std::fs::metadata(&path) {
        Ok(m) if m.file_type().is_socket() => Ok(Some(path)),
        _ => Err(ExternalFsError::NotSocket { path }),
    }
}

/// Directory, in a sandbox's state directory, where overlay mounts keep their copy-ups.
pub const OVERLAY_DIR: &str = "overlay";

/// The workspace's virtio-fs server (see the module docs).
pub struct FilesystemService {
    config: matchlock_api::VfsConfig,
    rules: matchlock_vfs::intercept::Rules,
    events: Arc<EventHub>,
    scratch: Option<std::path::PathBuf>,
    server: Option<matchlock_vfs::FsServer>,
}

impl FilesystemService {
    /// Checks `vfs` (mounts, host paths, interception rules); nothing is opened until the
    /// sandbox prepares its services.
    pub fn new(
        vfs: &matchlock_api::VfsConfig,
        events: Arc<EventHub>,
    ) -> Result<Self, matchlock_vfs::RouterError> {
        let rules = matchlock_vfs::router::preflight(vfs)?;
        Ok(FilesystemService {
            config: vfs.clone(),
            rules,
            events,
            scratch: None,
            server: None,
        })
    }

    /// The router wrapped in the interception layer, file events going to the event hub.
    fn served(
        &self,
        scratch: &Path,
    ) -> Result<
        matchlock_vfs::intercept::Intercept<matchlock_vfs::router::Router>,
        matchlock_vfs::RouterError,
    > {
        use matchlock_vfs::intercept::{FileEvent, Intercept};
        let router = matchlock_vfs::build(&self.config, scratch)?;
        let hub = self.events.clone();
        let sink: matchlock_vfs::intercept::EventSink = Arc::new(move |e: FileEvent| {
            hub.emit(&SandboxEvent::File {
                timestamp_ms: now_unix_ms(),
                event: FileEventInfo {
                    op: e.op.as_str().to_string(),
                    path: e.path,
                    size: e.size,
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                },
            })
        });
        Ok(Intercept::new(
            router,
            self.rules.clone(),
            self.config.workspace(),
            Some(sink),
        ))
    }
}

impl Service for FilesystemService {
    fn name(&self) -> &'static str {
        "filesystem"
    }

    fn host_files(&self, dir: &Path) -> Vec<std::path::PathBuf> {
        vec![dir.join(VFS_SOCKET), dir.join(OVERLAY_DIR)]
    }

    fn prepare(&mut self, plan: &mut BootPlan, dir: &Path) -> Result<(), ServiceError> {
        let fail = |e: Box<dyn std::error::Error + Send + Sync>| ServiceError {
            service: "filesystem",
            source: e,
        };
        if self.server.is_some() {
            return Err(fail("the filesystem service was prepared twice".into()));
        }
        if let Some(socket) = external_fs_socket(&self.rules).map_err(|e| fail(Box::new(e)))? {
            tracing::warn!(socket = %socket.display(), "workspace served by an external vhost-user-fs back-end (benchmark knob)");
            plan.vm.fs = Some(matchlock_vm::FsDevice {
                socket,
                tag: matchlock_guest_proto::WORKSPACE_TAG.to_string(),
            });
            plan.guest.workspace = Some(self.config.workspace().to_string());
            return Ok(());
        }
        let scratch = dir.join(OVERLAY_DIR);
        self.scratch = Some(scratch.clone());
        let served = self.served(&scratch).map_err(|e| fail(Box::new(e)))?;
        let socket = dir.join(VFS_SOCKET);
        let server = matchlock_vfs::FsServer::start(served, &socket, "vfs")
            .map_err(|e| fail(Box::new(e)))?;
        self.server = Some(server);
        plan.vm.fs = Some(matchlock_vm::FsDevice {
            socket,
            tag: matchlock_guest_proto::WORKSPACE_TAG.to_string(),
        });
        plan.guest.workspace = Some(self.config.workspace().to_string());
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
        // Overlay copy-ups are the guest's scratch data: they go with the sandbox.
        if let Some(dir) = self.scratch.take() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dir.display(), error = %e, "overlay copy-ups not removed");
                }
            }
        }
    }
}
