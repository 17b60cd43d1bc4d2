//! The running sandbox: the one owner of everything the host does while a VM runs.
//!
//! # Design
//! [`RunningSandbox::start`] boots the VM (with its services, see [`crate::services`]),
//! then starts the exec relay so other processes (`matchlock exec`, `port-forward`) reach
//! it, and starts the lifetime clock. While it runs it serves commands ([`exec`]), port
//! forwards ([`forward`], each call replacing the previous set), background commands whose
//! output goes to the VM log ([`spawn_background`]), and reports why it should stop
//! ([`wait_for_stop`]: a shutdown signal, the lifetime passing, the VM dying).
//! [`close`] is the single teardown path for every caller and every reason: forwards,
//! background commands and the relay stop first, then the VM shuts down cleanly, the
//! services stop, disks and sockets are removed. `run`, `run -d` and `rpc` only configure
//! and drive this type; a new per-sandbox service is added in one place.
//!
//! [`exec`]: RunningSandbox::exec
//! [`forward`]: RunningSandbox::forward
//! [`spawn_background`]: RunningSandbox::spawn_background
//! [`wait_for_stop`]: RunningSandbox::wait_for_stop
//! [`close`]: RunningSandbox::close
//!
//! # Limitations
//! The lifetime only reports expiry: the owner decides how to end in-flight work (the CLI
//! reports a timeout, the RPC server answers requests as cancelled) and then calls `close`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use matchlock_guest_proto::{ExecRequest, ExitStatus};
use matchlock_state::StateDb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use matchlock_vm::console::ConsoleWriter;

use crate::exec::ExecIo;
use crate::forward::{Binding, ForwardError, Forwarder, OnError, PortMapping};
use crate::paths::Paths;
use crate::{GuestLink, Sandbox, SandboxError, SandboxSpec};

/// How often a kept-alive sandbox checks that its VM is still there.
const VM_POLL: Duration = Duration::from_millis(500);

/// How to start a sandbox.
pub struct StartOptions {
    pub spec: SandboxSpec,
    /// Stop after this long (`run --timeout`, RPC `resources.timeout_seconds`), counted
    /// from readiness.
    pub lifetime: Option<Duration>,
    /// Remove the sandbox's state (its record, logs included) if the start fails or is
    /// aborted, as `--rm` does: a failed attempt does not stay in `list`. The error still
    /// carries the console tail.
    pub remove_on_failure: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("starting sandbox")]
    Boot(#[source] SandboxError),
    #[error("sandbox boot task failed")]
    Join(#[source] tokio::task::JoinError),
    #[error("interrupted while starting; the sandbox was stopped")]
    Aborted,
}

/// Why a running sandbox should stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The owner was asked to stop (a shutdown signal).
    Requested,
    /// The lifetime passed.
    Expired(Duration),
    /// The VM went away on its own.
    VmExited(String),
}

/// A booted sandbox and everything attached to it while it runs.
pub struct RunningSandbox {
    sandbox: Arc<Sandbox>,
    relay_stop: CancellationToken,
    background: CancellationToken,
    forwarder: tokio::sync::Mutex<Option<Forwarder>>,
    lifetime: Option<Duration>,
    ready_at: Instant,
    closed: tokio::sync::Mutex<bool>,
}

impl RunningSandbox {
    /// Boots the sandbox and starts its relay and lifetime clock. If `abort` fires during
    /// the boot, the boot is allowed to finish (so nothing is left half-made), then the
    /// sandbox is stopped again and [`StartError::Aborted`] returned.
    pub async fn start(
        paths: &Paths,
        state: Arc<StateDb>,
        opts: StartOptions,
        abort: &CancellationToken,
    ) -> Result<Arc<RunningSandbox>, StartError> {
        let StartOptions {
            mut spec,
            lifetime,
            remove_on_failure,
        } = opts;
        if spec.config.id.is_empty() {
            spec.config.id = StateDb::new_vm_id();
        }
        let id = spec.config.id.clone();
        let paths = paths.clone();
        let db = state.clone();
        let boot = tokio::task::spawn_blocking(move || Sandbox::create(&paths, db, spec));
        tokio::pin!(boot);
        let booted = tokio::select! {
            r = &mut boot => r.map_err(StartError::Join).and_then(|r| r.map_err(StartError::Boot)),
            () = abort.cancelled() => {
                if let Ok(Ok(sb)) = boot.await {
                    let _ = tokio::task::spawn_blocking(move || {
                        sb.shutdown(Duration::ZERO, "interrupted while starting")
                    })
                    .await;
                }
                Err(StartError::Aborted)
            }
        };
        let sandbox = match booted {
            Ok(sb) => sb,
            Err(e) => {
                if remove_on_failure {
                    if let Err(r) = state.remove(&id) {
                        tracing::warn!(id = %id, error = %crate::sandbox::error_chain(&r), "removing the failed sandbox's state");
                    }
                }
                return Err(e);
            }
        };
        let sandbox = Arc::new(sandbox);
        let relay_stop = CancellationToken::new();
        match crate::relay::bind(&sandbox.dir) {
            Ok(l) => {
                tokio::spawn(crate::relay::serve(l, sandbox.clone(), relay_stop.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %crate::sandbox::error_chain(&e), "exec relay not started")
            }
        }
        Ok(Arc::new(RunningSandbox {
            sandbox,
            relay_stop,
            background: CancellationToken::new(),
            forwarder: tokio::sync::Mutex::new(None),
            lifetime,
            ready_at: Instant::now(),
            closed: tokio::sync::Mutex::new(false),
        }))
    }

    pub fn id(&self) -> &str {
        &self.sandbox.id
    }

    /// Run-time control of the network policy (none: the sandbox has no network).
    pub fn network(&self) -> Option<Arc<crate::network::NetworkControl>> {
        self.sandbox.network()
    }

    pub fn dir(&self) -> &Path {
        &self.sandbox.dir
    }

    pub fn console_log(&self) -> PathBuf {
        self.sandbox.console_log()
    }

    /// A writer into the console log that shares its cap and rotation.
    pub fn console_writer(&self) -> Option<ConsoleWriter> {
        self.sandbox.console_writer()
    }

    pub fn boot_time(&self) -> Duration {
        self.sandbox.boot_time
    }

    /// Where the boot time went (the cold-start breakdown).
    pub fn boot_phases(&self) -> crate::phases::BootPhases {
        self.sandbox.boot_phases
    }

    /// The raw guest link (for protocol-level work such as benchmarks and file sessions).
    pub fn link(&self) -> Arc<GuestLink> {
        self.sandbox.link()
    }

    /// A fresh guest connection for a file session.
    pub async fn connect(&self) -> Result<tokio::net::UnixStream, SandboxError> {
        self.sandbox.link().connect().await
    }

    /// Runs a command (exec defaults applied); `io.cancel` kills it.
    pub async fn exec(&self, req: ExecRequest, io: ExecIo) -> Result<ExitStatus, SandboxError> {
        self.sandbox.exec(req, io).await
    }

    /// [`RunningSandbox::exec`] with its timeline (see [`crate::exec::ExecTimeline`]).
    pub async fn exec_timed(
        &self,
        req: ExecRequest,
        io: ExecIo,
    ) -> Result<(ExitStatus, crate::exec::ExecTimeline), SandboxError> {
        self.sandbox.exec_timed(req, io).await
    }

    /// Starts `argv` in the background with stdout and stderr appended to the VM log (the
    /// RPC `launch_entrypoint`); it is killed when the sandbox closes.
    pub fn spawn_background(
        &self,
        argv: Vec<String>,
    ) -> JoinHandle<Result<ExitStatus, SandboxError>> {
        type Sink = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;
        let (out, err): (Sink, Sink) = match self.console_writer() {
            Some(w) => (Box::new(LogSink(w.clone())), Box::new(LogSink(w))),
            None => (Box::new(tokio::io::sink()), Box::new(tokio::io::sink())),
        };
        let req = ExecRequest {
            argv,
            ..Default::default()
        };
        let io = ExecIo::new(out, err, self.background.child_token());
        let sb = self.sandbox.clone();
        tokio::spawn(async move { sb.exec(req, io).await })
    }

    /// Forwards host ports into the guest, replacing any forwards started before. Every
    /// listener is bound before any is served.
    pub async fn forward(
        &self,
        addresses: &[IpAddr],
        specs: &[PortMapping],
        on_error: OnError,
    ) -> Result<Vec<Binding>, ForwardError> {
        let mut slot = self.forwarder.lock().await;
        if let Some(old) = slot.take() {
            old.close().await;
        }
        let fw = Forwarder::start(addresses, specs, self.link().dialer(), on_error).await?;
        let bindings = fw.bindings().to_vec();
        *slot = Some(fw);
        Ok(bindings)
    }

    /// How long the sandbox may run (from readiness), if limited.
    pub fn lifetime(&self) -> Option<Duration> {
        self.lifetime
    }

    /// Resolves when the lifetime has passed (never, without a lifetime).
    pub async fn expired(&self) -> Duration {
        match self.lifetime {
            Some(l) => {
                tokio::time::sleep_until((self.ready_at + l).into()).await;
                l
            }
            None => std::future::pending().await,
        }
    }

    /// Waits until the sandbox should stop: `shutdown` fires, the lifetime passes, or the
    /// VM exits on its own.
    pub async fn wait_for_stop(&self, shutdown: &CancellationToken) -> StopReason {
        let vm_gone = async {
            loop {
                tokio::time::sleep(VM_POLL).await;
                if let Some(why) = self.sandbox.vm_exited() {
                    return why;
                }
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => StopReason::Requested,
            l = self.expired() => StopReason::Expired(l),
            why = vm_gone => StopReason::VmExited(why),
        }
    }

    /// Stops everything attached to the sandbox, then the sandbox itself (a clean guest
    /// shutdown within `grace`, then services, disks and sockets). Idempotent; the state
    /// directory and logs stay until [`RunningSandbox::remove`].
    pub async fn close(&self, grace: Duration, reason: &str) -> Result<(), tokio::task::JoinError> {
        let mut closed = self.closed.lock().await;
        if *closed {
            return Ok(());
        }
        *closed = true;
        if let Some(f) = self.forwarder.lock().await.take() {
            f.close().await;
        }
        self.background.cancel();
        self.relay_stop.cancel();
        let sb = self.sandbox.clone();
        let reason = reason.to_string();
        tokio::task::spawn_blocking(move || sb.shutdown(grace, &reason)).await
    }

    /// Removes the sandbox's state (row and directory) after [`RunningSandbox::close`].
    pub fn remove(&self) -> Result<(), matchlock_state::StateError> {
        self.sandbox.remove()
    }
}

/// Command output into the console log (an in-memory append; never waits, never fails).
struct LogSink(ConsoleWriter);

impl tokio::io::AsyncWrite for LogSink {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(std::io::Write::write(&mut self.0, buf))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
