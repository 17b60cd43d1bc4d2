//! Every RPC method, in one place: decodes its params, performs the sandbox action, encodes
//! its result (spec §2.4). The sandbox crate never sees JSON-RPC types; failures are
//! [`Failure`]s, turned into codes only in `error.rs`.
//!
//! # Design
//! [`lane`] says how the loop runs a method (inline or as a task). Exec methods build one
//! `ExecRequest` (`sh -c <command>`, as the SDKs expect a shell string) and differ only in how
//! output and input are wired: captured (`exec`), notifications (`exec_stream`,
//! `exec_pipe`, `exec_tty`), client stdin routed by request id (`exec_pipe`, `exec_tty`).
//! Cancellation drops the guest connection, which kills the command's process group in
//! every mode.
//!
//! # Limitations
//! No `event` notifications are produced (no network proxy or VFS yet); methods that need
//! the network stack answer the reference's "unavailable" error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use matchlock_api::ImageConfig;
use matchlock_guest_proto::{ExecRequest, WinSize};
use matchlock_sandbox::exec::ExecIo;
use matchlock_sandbox::forward::{self, ForwardSpec, Forwarder};
use matchlock_sandbox::{files, Sandbox, SandboxSpec};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::error::Failure;
use crate::io::{b64, Capture, ChanReader, Input, Notify};
use crate::server::{InputRoute, Shared};
use crate::session::Session;
use crate::wire;

/// How long `create` waits to see whether a launched entrypoint fails right away.
const ENTRYPOINT_WINDOW: Duration = Duration::from_millis(500);
/// `log_stream` polling interval.
const LOG_POLL: Duration = Duration::from_millis(100);

/// How the loop runs a method.
pub enum Lane {
    /// Inline, in arrival order, never answered: exec input notifications.
    Input,
    /// Inline: `cancel`.
    Cancel,
    /// Inline: `create`.
    Create,
    /// Inline, after draining in-flight requests: `close`.
    Close,
    /// Its own task, cancellable by id.
    Task,
}

pub fn lane(method: &str) -> Lane {
    match method {
        "exec_pipe.stdin"
        | "exec_pipe.stdin_eof"
        | "exec_tty.stdin"
        | "exec_tty.stdin_eof"
        | "exec_tty.resize" => Lane::Input,
        "cancel" => Lane::Cancel,
        "create" => Lane::Create,
        "close" => Lane::Close,
        _ => Lane::Task,
    }
}

fn params<T: for<'de> Deserialize<'de> + Default>(p: Value) -> Result<T, Failure> {
    if p.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(p).map_err(Failure::Params)
}

/// Methods that run as tasks.
pub async fn call(
    s: &Arc<Shared>,
    method: &str,
    p: Value,
    id: Option<&Value>,
    cancel: CancellationToken,
) -> Result<Value, Failure> {
    match method {
        "exec" => exec(s, params(p)?, Mode::Buffered, id, cancel).await,
        "exec_stream" => exec(s, params(p)?, Mode::Stream, id, cancel).await,
        "exec_pipe" => exec(s, params(p)?, Mode::Pipe, id, cancel).await,
        "exec_tty" => exec(s, params(p)?, Mode::Tty, id, cancel).await,
        "write_file" => write_file(s, params(p)?, cancel).await,
        "read_file" => read_file(s, params(p)?, cancel).await,
        "list_files" => list_files(s, params(p)?, cancel).await,
        "log" => log(s).await,
        "log_stream" => log_stream(s, id, cancel).await,
        "allow_list_add" | "allow_list_delete" => allow_list(s, params(p)?),
        "port_forward" => port_forward(s, params(p)?).await,
        _ => Err(Failure::MethodNotFound),
    }
}

// ---- create / close / cancel -------------------------------------------------------------

pub async fn create(s: &Arc<Shared>, p: Value) -> Result<Value, Failure> {
    let plan = config::plan(p)?;
    if let Ok(cur) = s.current() {
        return Err(Failure::VmExists(cur.id().to_string()));
    }
    let cfg = &plan.config;
    if cfg
        .network
        .as_ref()
        .is_some_and(|n| n.needs_network_stack())
    {
        return Err(Failure::Unavailable {
            what: "network interception (allowed_hosts, secrets, intercept)",
            needs: "the guest network stack",
        });
    }
    if cfg
        .vfs
        .as_ref()
        .and_then(|v| v.get("mounts"))
        .and_then(Value::as_object)
        .is_some_and(|m| !m.is_empty())
    {
        return Err(Failure::Unavailable {
            what: "vfs mounts",
            needs: "host-backed workspaces",
        });
    }
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    cfg.resources
        .validate(host_cpus)
        .map_err(Failure::Resources)?;

    let paths = s.opts.paths.clone();
    let image_tag = cfg.image.clone();
    let record = tokio::task::spawn_blocking(move || {
        let store = matchlock_image::ImageStore::open(&paths.images())
            .map_err(|e| Failure::Image(format!("open image store: {e}")))?;
        store
            .get(&image_tag)
            .map_err(|e| Failure::Image(e.to_string()))?
            .ok_or_else(|| {
                Failure::Image(format!(
                    "image {image_tag:?} not found locally (import it with `matchlock image import {image_tag} < image.tar`)"
                ))
            })
    })
    .await
    .map_err(Failure::CloseJoin)??;

    // OCI config is the base; non-empty request fields override it.
    let mut image_config = ImageConfig {
        user: record.config.user.clone(),
        working_dir: record.config.working_dir.clone(),
        entrypoint: record.config.entrypoint.clone(),
        cmd: record.config.cmd.clone(),
        env: record.config.env.iter().cloned().collect(),
    };
    if let Some(req) = &cfg.image_config {
        if !req.user.is_empty() {
            image_config.user = req.user.clone();
        }
        if !req.working_dir.is_empty() {
            image_config.working_dir = req.working_dir.clone();
        }
        if !req.entrypoint.is_empty() {
            image_config.entrypoint = req.entrypoint.clone();
        }
        if !req.cmd.is_empty() {
            image_config.cmd = req.cmd.clone();
        }
        image_config
            .env
            .extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let mut config = cfg.clone();
    config.image_config = Some(image_config.clone());
    let launch = config.launch_entrypoint;
    let spec = SandboxSpec {
        config,
        rootfs: record.rootfs.clone(),
        image_config: image_config.clone(),
        accel: s.opts.accel,
        owner_pid: s.opts.owner_pid,
    };
    let paths = s.opts.paths.clone();
    let state = s.state.clone();
    let sandbox = tokio::task::spawn_blocking(move || Sandbox::create(&paths, state, spec))
        .await
        .map_err(Failure::CloseJoin)?
        .map_err(Failure::Create)?;
    let sandbox = Arc::new(sandbox);
    let session = Arc::new(Session {
        sandbox: sandbox.clone(),
        relay_stop: CancellationToken::new(),
        entrypoint: CancellationToken::new(),
        lifetime: CancellationToken::new(),
        forwarder: tokio::sync::Mutex::new(None),
    });
    // The exec relay lets `matchlock exec/port-forward` reach this sandbox too.
    match matchlock_sandbox::relay::bind(&sandbox.dir) {
        Ok(l) => {
            tokio::spawn(matchlock_sandbox::relay::serve(
                l,
                sandbox.link(),
                sandbox.defaults(),
                session.relay_stop.clone(),
            ));
        }
        Err(e) => tracing::warn!(error = %e, "exec relay not started"),
    }
    if launch {
        let argv = image_config.compose(&[]);
        if !argv.is_empty() {
            if let Err(f) = launch_entrypoint(&session, argv).await {
                let _ = session.close(Duration::ZERO).await;
                let _ = s.state.remove(session.id());
                return Err(f);
            }
        }
    }
    s.set_session(session.clone());
    if let Some(secs) = plan.lifetime_secs {
        spawn_lifetime(s, &session, secs);
    }
    tracing::info!(id = %session.id(), "sandbox created");
    Ok(json!({"id": session.id()}))
}

/// Starts the image's entrypoint in the background with its output appended to the VM log
/// (spec §2.5); fails if it fails within [`ENTRYPOINT_WINDOW`].
async fn launch_entrypoint(session: &Arc<Session>, argv: Vec<String>) -> Result<(), Failure> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(session.log_path());
    let (out, err): (
        Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
        Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    ) = match log.and_then(|f| Ok((f.try_clone()?, f))) {
        Ok((a, b)) => (
            Box::new(tokio::fs::File::from_std(a)),
            Box::new(tokio::fs::File::from_std(b)),
        ),
        Err(_) => (Box::new(tokio::io::sink()), Box::new(tokio::io::sink())),
    };
    let req = ExecRequest {
        argv,
        ..Default::default()
    };
    let sb = session.sandbox.clone();
    let io = ExecIo::new(out, err, session.entrypoint.clone());
    let mut task = tokio::spawn(async move { sb.exec(req, io).await });
    tokio::select! {
        r = &mut task => match r {
            Ok(Ok(st)) if st.code == 0 => Ok(()),
            Ok(Ok(st)) => Err(Failure::Entrypoint(format!("exit code {}", st.code))),
            Ok(Err(e)) => Err(Failure::Entrypoint(Failure::Exec(e).message())),
            Err(e) => Err(Failure::Entrypoint(e.to_string())),
        },
        () = tokio::time::sleep(ENTRYPOINT_WINDOW) => Ok(()),
    }
}

/// Enforces `resources.timeout_seconds`: when it expires the sandbox is closed and later
/// requests are told why.
fn spawn_lifetime(s: &Arc<Shared>, session: &Arc<Session>, secs: u64) {
    let weak = Arc::downgrade(s);
    let session = session.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = session.lifetime.cancelled() => {}
            () = tokio::time::sleep(Duration::from_secs(secs)) => {
                let Some(s) = weak.upgrade() else { return };
                let why = format!(
                    "sandbox {} was stopped: resources.timeout_seconds ({secs}s) expired",
                    session.id()
                );
                let Some(cur) = s.take_session(Some(why.clone())) else { return };
                tracing::warn!("{why}");
                s.cancel_all();
                if let Err(e) = cur.close(Duration::ZERO).await {
                    tracing::warn!(error = %e.message(), "closing the expired sandbox failed");
                }
            }
        }
    });
}

#[derive(Deserialize, Default)]
struct CloseParams {
    #[serde(default)]
    timeout_seconds: f64,
}

pub async fn close(s: &Arc<Shared>, p: &Value) -> Result<Value, Failure> {
    let p: CloseParams = params(p.clone())?;
    let Some(session) = s.take_session(Some("sandbox closed".into())) else {
        return Ok(json!({}));
    };
    let grace = Duration::try_from_secs_f64(p.timeout_seconds).unwrap_or(Duration::ZERO);
    session.close(grace).await?;
    Ok(json!({}))
}

#[derive(Deserialize, Default)]
struct IdParams {
    #[serde(default)]
    id: Value,
}

pub fn cancel(s: &Shared, p: &Value) -> Result<Value, Failure> {
    let p: IdParams = params(p.clone())?;
    Ok(json!({"cancelled": !p.id.is_null() && s.cancel(&p.id)}))
}

// ---- exec ---------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct ExecParams {
    #[serde(default)]
    command: String,
    #[serde(default)]
    working_dir: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    rows: u16,
    #[serde(default)]
    cols: u16,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Buffered,
    Stream,
    Pipe,
    Tty,
}

async fn exec(
    s: &Arc<Shared>,
    p: ExecParams,
    mode: Mode,
    id: Option<&Value>,
    cancel: CancellationToken,
) -> Result<Value, Failure> {
    let started = Instant::now();
    let route_id = match (mode, id) {
        (Mode::Pipe, None) => return Err(Failure::IdRequired("exec_pipe")),
        (Mode::Tty, None) => return Err(Failure::IdRequired("exec_tty")),
        (_, id) => id.cloned(),
    };
    if p.command.is_empty() {
        return Err(Failure::Missing("command"));
    }
    let session = s.current()?;
    let mut req = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), p.command],
        cwd: p.working_dir,
        user: p.user,
        ..Default::default()
    };
    let idv = route_id.clone().unwrap_or(Value::Null);
    let notify = |method: &'static str| -> Box<dyn tokio::io::AsyncWrite + Send + Unpin> {
        Box::new(Notify {
            out: s.out.clone(),
            method,
            id: idv.clone(),
        })
    };
    let (out_cap, err_cap) = (Capture::default(), Capture::default());
    let mut io = match mode {
        Mode::Buffered => ExecIo::new(
            Box::new(out_cap.clone()),
            Box::new(err_cap.clone()),
            cancel.clone(),
        ),
        Mode::Stream => ExecIo::new(
            notify("exec_stream.stdout"),
            notify("exec_stream.stderr"),
            cancel.clone(),
        ),
        Mode::Pipe => ExecIo::new(
            notify("exec_pipe.stdout"),
            notify("exec_pipe.stderr"),
            cancel.clone(),
        ),
        // A PTY merges stderr into stdout.
        Mode::Tty => ExecIo::new(
            notify("exec_tty.stdout"),
            notify("exec_tty.stdout"),
            cancel.clone(),
        ),
    };
    if let (Mode::Pipe | Mode::Tty, Some(rid)) = (mode, &route_id) {
        let (tx, rx) = mpsc::channel::<Input>(64);
        io.stdin = Some(Box::new(ChanReader::new(rx)));
        let resize = if mode == Mode::Tty {
            let (rtx, rrx) = mpsc::channel::<WinSize>(16);
            io.resize = Some(rrx);
            req.tty = Some(WinSize {
                rows: if p.rows == 0 { 24 } else { p.rows },
                cols: if p.cols == 0 { 80 } else { p.cols },
            });
            Some(rtx)
        } else {
            req.stdin = true;
            None
        };
        s.add_route(rid, InputRoute { stdin: tx, resize });
        let ready = if mode == Mode::Tty {
            "exec_tty.ready"
        } else {
            "exec_pipe.ready"
        };
        s.send(wire::notification(ready, json!({"id": rid})));
    }
    let result = session.sandbox.exec(req, io).await;
    if let Some(rid) = &route_id {
        if matches!(mode, Mode::Pipe | Mode::Tty) {
            s.remove_route(rid);
        }
    }
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let st = match result {
        Ok(st) => st,
        Err(_) if out_cap.overflowed() || err_cap.overflowed() => {
            return Err(Failure::OutputTooLarge(crate::io::MAX_CAPTURE))
        }
        Err(matchlock_sandbox::SandboxError::Exec(e)) => {
            return Err(Failure::Exec(matchlock_sandbox::SandboxError::Exec(e)))
        }
        Err(e) => return Err(Failure::Connect(e)),
    };
    Ok(match mode {
        Mode::Buffered => json!({
            "exit_code": st.code,
            "stdout": b64(&out_cap.take()),
            "stderr": b64(&err_cap.take()),
            "duration_ms": duration_ms,
        }),
        _ => json!({"exit_code": st.code, "duration_ms": duration_ms}),
    })
}

#[derive(Deserialize, Default)]
struct InputParams {
    #[serde(default)]
    id: Value,
    #[serde(default)]
    data: String,
    #[serde(default)]
    rows: u16,
    #[serde(default)]
    cols: u16,
}

/// Exec input notifications: routed by `params.id`, in order; unknown ids and undecodable
/// data are ignored (no response is ever sent).
pub async fn input(s: &Shared, req: &wire::Request) {
    let Ok(p) = params::<InputParams>(req.params.clone()) else {
        return;
    };
    let Some(route) = s.route(&p.id) else {
        return;
    };
    match req.method.as_str() {
        "exec_pipe.stdin" | "exec_tty.stdin" => {
            let Ok(data) = base64::engine::general_purpose::STANDARD.decode(p.data.as_bytes())
            else {
                return;
            };
            tokio::select! {
                _ = route.stdin.send(Input::Data(data)) => {}
                () = s.run.cancelled() => {}
            }
        }
        "exec_pipe.stdin_eof" | "exec_tty.stdin_eof" => {
            tokio::select! {
                _ = route.stdin.send(Input::Eof) => {}
                () = s.run.cancelled() => {}
            }
        }
        "exec_tty.resize" => {
            if let Some(r) = route.resize {
                // A full queue means resizes are pending: the newest ones win eventually.
                let _ = r.try_send(WinSize {
                    rows: p.rows,
                    cols: p.cols,
                });
            }
        }
        _ => {}
    }
}

// ---- files and logs -----------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct FileParams {
    #[serde(default)]
    path: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    mode: u32,
}

async fn file_conn(s: &Shared, path: &str) -> Result<tokio::net::UnixStream, Failure> {
    if path.is_empty() {
        return Err(Failure::Missing("path"));
    }
    let session = s.current()?;
    session
        .sandbox
        .link()
        .connect()
        .await
        .map_err(Failure::FileConnect)
}

async fn cancellable<T>(
    cancel: &CancellationToken,
    f: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::select! {
        r = f => r,
        () = cancel.cancelled() => Err(Failure::Cancelled),
    }
}

async fn write_file(
    s: &Shared,
    p: FileParams,
    cancel: CancellationToken,
) -> Result<Value, Failure> {
    let data = base64::engine::general_purpose::STANDARD
        .decode(p.content.as_bytes())
        .map_err(|_| Failure::Base64)?;
    let conn = file_conn(s, &p.path).await?;
    let mode = if p.mode == 0 { 0o644 } else { p.mode };
    cancellable(&cancel, async {
        files::write_file(conn, &p.path, &data, mode)
            .await
            .map_err(Failure::File)
    })
    .await?;
    Ok(json!({}))
}

async fn read_file(s: &Shared, p: FileParams, cancel: CancellationToken) -> Result<Value, Failure> {
    let conn = file_conn(s, &p.path).await?;
    let data = cancellable(&cancel, async {
        files::read_file(conn, &p.path).await.map_err(Failure::File)
    })
    .await?;
    Ok(json!({"content": b64(&data)}))
}

async fn list_files(
    s: &Shared,
    p: FileParams,
    cancel: CancellationToken,
) -> Result<Value, Failure> {
    let conn = file_conn(s, &p.path).await?;
    let list = cancellable(&cancel, async {
        files::list_files(conn, &p.path)
            .await
            .map_err(Failure::File)
    })
    .await?;
    let files: Vec<Value> = list
        .iter()
        .map(|f| {
            json!({
                "name": f.name,
                "size": f.size,
                "mode": go_file_mode(f.mode),
                "mod_time": "0001-01-01T00:00:00Z",
                "is_dir": f.is_dir,
            })
        })
        .collect();
    Ok(json!({"files": files}))
}

/// Converts a Unix `st_mode` to Go's `os.FileMode` bit layout, which the SDKs expect.
pub fn go_file_mode(st_mode: u32) -> u32 {
    const DIR: u32 = 1 << 31;
    const SYMLINK: u32 = 1 << 27;
    const DEVICE: u32 = 1 << 26;
    const PIPE: u32 = 1 << 25;
    const SOCKET: u32 = 1 << 24;
    const SETUID: u32 = 1 << 23;
    const SETGID: u32 = 1 << 22;
    const CHAR: u32 = 1 << 21;
    const STICKY: u32 = 1 << 20;
    let mut m = st_mode & 0o777;
    m |= match st_mode & 0o170000 {
        0o040000 => DIR,
        0o120000 => SYMLINK,
        0o060000 => DEVICE,
        0o020000 => DEVICE | CHAR,
        0o010000 => PIPE,
        0o140000 => SOCKET,
        _ => 0,
    };
    if st_mode & 0o4000 != 0 {
        m |= SETUID;
    }
    if st_mode & 0o2000 != 0 {
        m |= SETGID;
    }
    if st_mode & 0o1000 != 0 {
        m |= STICKY;
    }
    m
}

fn log_path(s: &Shared) -> Result<std::path::PathBuf, Failure> {
    if let Ok(cur) = s.current() {
        return Ok(cur.log_path());
    }
    s.last_log().ok_or(Failure::NoVm)
}

async fn log(s: &Shared) -> Result<Value, Failure> {
    let path = log_path(s)?;
    let data = match tokio::fs::read(&path).await {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(Failure::Log {
                path: path.display().to_string(),
                source,
            })
        }
    };
    Ok(json!({"content": b64(&data)}))
}

async fn log_stream(
    s: &Shared,
    id: Option<&Value>,
    cancel: CancellationToken,
) -> Result<Value, Failure> {
    let Some(id) = id.cloned() else {
        return Err(Failure::IdRequired("log_stream"));
    };
    let path = log_path(s)?;
    let mut offset: u64 = 0;
    loop {
        if let Ok(data) = tokio::fs::read(&path).await {
            let len = data.len() as u64;
            if len < offset {
                offset = 0;
            }
            if len > offset {
                let start = usize::try_from(offset).unwrap_or(0);
                for chunk in data[start..].chunks(64 * 1024) {
                    s.send(wire::notification(
                        "log_stream.data",
                        json!({"id": id, "data": b64(chunk)}),
                    ));
                }
                offset = len;
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(Failure::Cancelled),
            () = s.closing.cancelled() => return Err(Failure::Cancelled),
            () = tokio::time::sleep(LOG_POLL) => {}
        }
    }
}

// ---- network-dependent and port forwards --------------------------------------------------

#[derive(Deserialize, Default)]
struct HostsParams {
    #[serde(default)]
    hosts: Vec<String>,
}

fn allow_list(s: &Shared, p: HostsParams) -> Result<Value, Failure> {
    if p.hosts.iter().all(|h| h.trim().is_empty()) {
        return Err(Failure::Missing("hosts"));
    }
    s.current()?;
    Err(Failure::NoInterception)
}

#[derive(Deserialize, Default)]
struct PortForwardParams {
    #[serde(default)]
    forwards: Vec<WireForward>,
    #[serde(default)]
    addresses: Vec<String>,
}

#[derive(Deserialize, Default)]
struct WireForward {
    #[serde(default)]
    local_port: u16,
    #[serde(default)]
    remote_port: u16,
}

async fn port_forward(s: &Shared, p: PortForwardParams) -> Result<Value, Failure> {
    if p.forwards.is_empty() {
        return Err(Failure::Missing("forwards"));
    }
    let addresses = if p.addresses.is_empty() {
        vec!["127.0.0.1".to_string()]
    } else {
        p.addresses
    };
    let ips = forward::parse_addresses(&addresses).map_err(Failure::Spec)?;
    let specs: Vec<ForwardSpec> = p
        .forwards
        .iter()
        .map(|f| ForwardSpec {
            local: f.local_port,
            remote: f.remote_port,
        })
        .collect();
    let session = s.current()?;
    let mut slot = session.forwarder.lock().await;
    // Each call replaces every previous forward (spec §2.4).
    if let Some(old) = slot.take() {
        old.close().await;
    }
    let on_error: forward::OnError =
        Arc::new(|m| tracing::warn!("port-forward connection error: {m}"));
    let fw = Forwarder::start(&ips, &specs, session.sandbox.link().dialer(), on_error)
        .await
        .map_err(Failure::Forward)?;
    let bindings: Vec<Value> = fw
        .bindings()
        .iter()
        .map(|b| {
            json!({
                "address": b.address.to_string(),
                "local_port": b.local_port,
                "remote_port": b.remote_port,
            })
        })
        .collect();
    *slot = Some(fw);
    Ok(json!({"bindings": bindings}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_modes() {
        assert_eq!(go_file_mode(0o100644), 0o644);
        assert_eq!(go_file_mode(0o040755), (1 << 31) | 0o755);
        assert_eq!(go_file_mode(0o120777), (1 << 27) | 0o777);
        assert_eq!(go_file_mode(0o104755), (1 << 23) | 0o755);
        assert_eq!(go_file_mode(0o041777), (1 << 31) | (1 << 20) | 0o777);
        assert_eq!(go_file_mode(0o020666), (1 << 26) | (1 << 21) | 0o666);
    }

    #[test]
    fn lanes() {
        assert!(matches!(lane("exec_tty.resize"), Lane::Input));
        assert!(matches!(lane("exec_pipe.stdin"), Lane::Input));
        assert!(matches!(lane("cancel"), Lane::Cancel));
        assert!(matches!(lane("close"), Lane::Close));
        assert!(matches!(lane("exec"), Lane::Task));
    }
}
