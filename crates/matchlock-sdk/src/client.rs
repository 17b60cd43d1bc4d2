//! [`Client`]: one `matchlock rpc` process and its sandbox.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use matchlock_api::rpc::envelope::{self, Incoming};
use matchlock_api::rpc::port::parse_port_spec;
use matchlock_api::rpc::{
    b64, to_value, AllowListAddResult, AllowListDeleteResult, CancelParams, CloseParams,
    ContentResult, CreateResult, ExecMode, ExecParams, ExecResult as WireExecResult,
    ExecStreamResult as WireStreamResult, FileParams, HostsParams, InputParams, ListFilesResult,
    Method, Notice, PortForwardParams, PortForwardResult, StreamData,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};

use crate::builder::{CreateOptions, PortForward, Sandbox};
use crate::SdkError;

/// Where the `matchlock` binary is and how to run it.
#[derive(Debug, Clone)]
pub struct Config {
    /// Default: `$MATCHLOCK_BIN`, else `matchlock` on `PATH`.
    pub binary_path: PathBuf,
    /// Run `sudo matchlock rpc`.
    pub use_sudo: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            binary_path: std::env::var_os("MATCHLOCK_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("matchlock")),
            use_sudo: false,
        }
    }
}

/// Result of [`Client::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub duration_ms: u64,
}

impl ExecResult {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Result of the streaming exec calls (output went to the caller's writers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecStreamResult {
    pub exit_code: i32,
    pub duration_ms: u64,
}

/// Per-call exec options.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub working_dir: String,
    pub user: String,
}

/// Options of [`Client::exec_interactive`].
#[derive(Debug, Default)]
pub struct InteractiveOptions {
    pub working_dir: String,
    pub user: String,
    /// Initial size (0 = 24x80).
    pub rows: u16,
    pub cols: u16,
    /// Window size changes `(rows, cols)`, forwarded while the command runs.
    pub resize: Option<mpsc::Receiver<(u16, u16)>>,
}

/// One entry of [`Client::list_files`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub name: String,
    pub size: u64,
    /// Go `os.FileMode` bits (permissions in the low 9 bits; directories have bit 31).
    pub mode: u32,
    pub is_dir: bool,
}

/// A listener the server bound for [`Client::port_forward`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForwardBinding {
    pub address: String,
    pub local_port: u16,
    pub remote_port: u16,
}

type Notification = (Notice, Value);

/// Output notifications queued per streaming call before the reader waits for the consumer.
const NOTES_QUEUE: usize = 64;

struct Pending {
    done: oneshot::Sender<Result<Value, SdkError>>,
    notify: Option<mpsc::Sender<Notification>>,
}

struct Inner {
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inner {
    async fn write(&self, mut line: String) -> Result<(), SdkError> {
        line.push('\n');
        let mut g = self.stdin.lock().await;
        let s = g.as_mut().ok_or(SdkError::Closed)?;
        s.write_all(line.as_bytes())
            .await
            .map_err(SdkError::Write)?;
        s.flush().await.map_err(SdkError::Write)
    }

    async fn notify(&self, method: Method, params: &InputParams) -> Result<(), SdkError> {
        self.write(envelope::input_notification(method, to_value(params)))
            .await
    }
}

/// An in-flight request; dropping it before the answer (a timeout, a dropped future) sends
/// `cancel`, so the server kills the command.
struct Call {
    inner: Arc<Inner>,
    id: u64,
    done: Option<oneshot::Receiver<Result<Value, SdkError>>>,
    notes: Option<mpsc::Receiver<Notification>>,
    finished: bool,
}

impl Call {
    async fn result(&mut self) -> Result<Value, SdkError> {
        let rx = self.done.take().ok_or(SdkError::Closed)?;
        let r = rx.await.map_err(|_| SdkError::Closed)?;
        self.finished = true;
        r
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        lock(&self.inner.pending).remove(&self.id);
        let inner = self.inner.clone();
        let id = self.id;
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let cid = inner.next_id.fetch_add(1, Ordering::Relaxed);
                let params = to_value(&CancelParams { id: json!(id) });
                let _ = inner
                    .write(envelope::request(Method::Cancel, params, cid))
                    .await;
            });
        }
    }
}

/// A client: one `matchlock rpc` server process, owning at most one sandbox.
///
/// Cancel any call by dropping its future (e.g. `tokio::time::timeout`): the client sends
/// `cancel` and the server kills the command in the guest.
pub struct Client {
    cfg: Config,
    inner: Arc<Inner>,
    child: tokio::sync::Mutex<Option<Child>>,
    vm_id: Mutex<Option<String>>,
}

fn unb64(text: &str) -> Result<Vec<u8>, SdkError> {
    b64::decode(text).map_err(|_| SdkError::Decode("invalid base64 in response"))
}

/// Decodes a result into its contract type.
fn result<T: DeserializeOwned>(v: Value, what: &'static str) -> Result<T, SdkError> {
    serde_json::from_value(v).map_err(|_| SdkError::Decode(what))
}

impl Client {
    /// Starts `matchlock rpc` (stderr is discarded, as in the other SDKs).
    pub async fn start(cfg: Config) -> Result<Client, SdkError> {
        let mut cmd = if cfg.use_sudo {
            let mut c = Command::new("sudo");
            c.arg(&cfg.binary_path);
            c
        } else {
            Command::new(&cfg.binary_path)
        };
        let mut child = cmd
            .arg("rpc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SdkError::Spawn {
                path: cfg.binary_path.clone(),
                source,
            })?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or(SdkError::Closed)?;
        let inner = Arc::new(Inner {
            stdin: tokio::sync::Mutex::new(stdin),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(read_loop(inner.clone(), stdout));
        Ok(Client {
            cfg,
            inner,
            child: tokio::sync::Mutex::new(Some(child)),
            vm_id: Mutex::new(None),
        })
    }

    /// The sandbox id, once created.
    pub fn vm_id(&self) -> Option<String> {
        lock(&self.vm_id).clone()
    }

    async fn start_call(
        &self,
        method: Method,
        params: Value,
        with_notes: bool,
    ) -> Result<Call, SdkError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let (ntx, nrx) = if with_notes {
            let (a, b) = mpsc::channel(NOTES_QUEUE);
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        lock(&self.inner.pending).insert(
            id,
            Pending {
                done: tx,
                notify: ntx,
            },
        );
        let call = Call {
            inner: self.inner.clone(),
            id,
            done: Some(rx),
            notes: nrx,
            finished: false,
        };
        self.inner
            .write(envelope::request(method, params, id))
            .await?;
        Ok(call)
    }

    async fn call(&self, method: Method, params: Value) -> Result<Value, SdkError> {
        let mut c = self.start_call(method, params, false).await?;
        c.result().await
    }

    /// Creates the sandbox and applies configured port forwards; returns its id.
    pub async fn create(&self, opts: CreateOptions) -> Result<String, SdkError> {
        if opts.image.is_empty() {
            return Err(SdkError::Invalid(
                "image is required (e.g., alpine:latest)".into(),
            ));
        }
        let r = self
            .call(Method::Create, to_value(&opts.to_params()))
            .await?;
        let id = result::<CreateResult>(r, "id")?.id;
        *lock(&self.vm_id) = Some(id.clone());
        if !opts.port_forwards.is_empty() {
            let addrs: Vec<&str> = opts
                .port_forward_addresses
                .iter()
                .map(String::as_str)
                .collect();
            self.port_forward_mappings(&addrs, &opts.port_forwards)
                .await?;
        }
        Ok(id)
    }

    /// Creates the sandbox and starts the image's ENTRYPOINT/CMD in the background.
    pub async fn launch(&self, sandbox: Sandbox) -> Result<String, SdkError> {
        let mut opts = sandbox.options();
        opts.launch_entrypoint = true;
        self.create(opts).await
    }

    /// Runs a shell command, buffering its output.
    pub async fn exec(&self, command: &str) -> Result<ExecResult, SdkError> {
        self.exec_with(command, &ExecOptions::default()).await
    }

    pub async fn exec_with(&self, command: &str, o: &ExecOptions) -> Result<ExecResult, SdkError> {
        let r = self.call(Method::Exec, exec_params(command, o)).await?;
        let r: WireExecResult = result(r, "exec result")?;
        Ok(ExecResult {
            exit_code: r.exit_code,
            stdout: unb64(&r.stdout)?,
            stderr: unb64(&r.stderr)?,
            duration_ms: r.duration_ms,
        })
    }

    /// Runs a shell command, streaming its output to the writers as it arrives.
    pub async fn exec_stream<O, E>(
        &self,
        command: &str,
        stdout: &mut O,
        stderr: &mut E,
    ) -> Result<ExecStreamResult, SdkError>
    where
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        let mut c = self
            .start_call(
                Method::ExecStream,
                exec_params(command, &ExecOptions::default()),
                true,
            )
            .await?;
        let r = pump(
            &mut c,
            None::<&mut tokio::io::Empty>,
            stdout,
            stderr,
            Routes::exec(ExecMode::Stream),
            None,
        )
        .await?;
        stream_result(r)
    }

    /// Runs a shell command with `stdin` forwarded (EOF closes the command's stdin).
    pub async fn exec_pipe<I, O, E>(
        &self,
        command: &str,
        stdin: &mut I,
        stdout: &mut O,
        stderr: &mut E,
    ) -> Result<ExecStreamResult, SdkError>
    where
        I: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        let mut c = self
            .start_call(
                Method::ExecPipe,
                exec_params(command, &ExecOptions::default()),
                true,
            )
            .await?;
        let r = pump(
            &mut c,
            Some(stdin),
            stdout,
            stderr,
            Routes::exec(ExecMode::Pipe),
            None,
        )
        .await?;
        stream_result(r)
    }

    /// Runs a shell command on a PTY: `stdin` is typed into it, output (stdout and stderr
    /// merged, as on a terminal) goes to `stdout`.
    pub async fn exec_interactive<I, O>(
        &self,
        command: &str,
        stdin: &mut I,
        stdout: &mut O,
        mut o: InteractiveOptions,
    ) -> Result<ExecStreamResult, SdkError>
    where
        I: AsyncRead + Unpin,
        O: AsyncWrite + Unpin,
    {
        let p = ExecParams {
            command: command.to_string(),
            working_dir: o.working_dir.clone(),
            user: o.user.clone(),
            rows: if o.rows == 0 { 24 } else { o.rows },
            cols: if o.cols == 0 { 80 } else { o.cols },
        };
        let mut c = self.start_call(Method::ExecTty, to_value(&p), true).await?;
        let mut sink = tokio::io::sink();
        let r = pump(
            &mut c,
            Some(stdin),
            stdout,
            &mut sink,
            Routes::exec(ExecMode::Tty),
            o.resize.take(),
        )
        .await?;
        stream_result(r)
    }

    /// Writes a file (mode 0644).
    pub async fn write_file(&self, path: &str, data: &[u8]) -> Result<(), SdkError> {
        self.write_file_mode(path, data, 0o644).await
    }

    pub async fn write_file_mode(
        &self,
        path: &str,
        data: &[u8],
        mode: u32,
    ) -> Result<(), SdkError> {
        let p = FileParams {
            path: path.to_string(),
            content: b64::encode(data),
            mode,
        };
        self.call(Method::WriteFile, to_value(&p)).await.map(|_| ())
    }

    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, SdkError> {
        let r = self.call(Method::ReadFile, path_params(path)).await?;
        unb64(&result::<ContentResult>(r, "content")?.content)
    }

    pub async fn list_files(&self, path: &str) -> Result<Vec<FileInfo>, SdkError> {
        let r = self.call(Method::ListFiles, path_params(path)).await?;
        let list: ListFilesResult = result(r, "files")?;
        Ok(list
            .files
            .into_iter()
            .map(|f| FileInfo {
                name: f.name,
                size: f.size,
                mode: f.mode,
                is_dir: f.is_dir,
            })
            .collect())
    }

    /// The sandbox's log so far (console and launched entrypoint output).
    pub async fn log(&self) -> Result<String, SdkError> {
        let r = self.call(Method::Log, Value::Null).await?;
        let content = unb64(&result::<ContentResult>(r, "content")?.content)?;
        Ok(String::from_utf8_lossy(&content).into_owned())
    }

    /// Streams the log into `out` until the returned future is dropped (e.g. by a timeout).
    pub async fn log_stream<O: AsyncWrite + Unpin>(&self, out: &mut O) -> Result<(), SdkError> {
        let mut c = self
            .start_call(Method::LogStream, Value::Null, true)
            .await?;
        let mut sink = tokio::io::sink();
        pump(
            &mut c,
            None::<&mut tokio::io::Empty>,
            out,
            &mut sink,
            Routes::log(),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Adds hosts to the sandbox's allow-list (it must have been created with interception:
    /// an allow-list, secrets or `intercept`); returns the hosts added and the list now.
    pub async fn allow_list_add(&self, hosts: &[&str]) -> Result<AllowListAddResult, SdkError> {
        let p = HostsParams {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        };
        let r = self.call(Method::AllowListAdd, to_value(&p)).await?;
        result(r, "allow-list")
    }

    /// Removes hosts from the sandbox's allow-list; an empty list allows every host.
    pub async fn allow_list_delete(
        &self,
        hosts: &[&str],
    ) -> Result<AllowListDeleteResult, SdkError> {
        let p = HostsParams {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        };
        let r = self.call(Method::AllowListDelete, to_value(&p)).await?;
        result(r, "allow-list")
    }

    /// Forwards `[LOCAL:]REMOTE` ports from 127.0.0.1; replaces earlier forwards.
    pub async fn port_forward(&self, specs: &[&str]) -> Result<Vec<PortForwardBinding>, SdkError> {
        self.port_forward_with_addresses(&[], specs).await
    }

    pub async fn port_forward_with_addresses(
        &self,
        addresses: &[&str],
        specs: &[&str],
    ) -> Result<Vec<PortForwardBinding>, SdkError> {
        let forwards = specs
            .iter()
            .map(|s| parse_port_spec(s).map_err(|e| SdkError::Invalid(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        self.port_forward_mappings(addresses, &forwards).await
    }

    async fn port_forward_mappings(
        &self,
        addresses: &[&str],
        forwards: &[PortForward],
    ) -> Result<Vec<PortForwardBinding>, SdkError> {
        let addresses = if addresses.is_empty() {
            vec!["127.0.0.1".to_string()]
        } else {
            addresses.iter().map(|a| a.to_string()).collect()
        };
        let p = PortForwardParams {
            forwards: forwards.to_vec(),
            addresses,
        };
        let r = self.call(Method::PortForward, to_value(&p)).await?;
        let r: PortForwardResult = result(r, "bindings")?;
        Ok(r.bindings
            .into_iter()
            .map(|b| PortForwardBinding {
                address: b.address,
                local_port: b.local_port,
                remote_port: b.remote_port,
            })
            .collect())
    }

    /// Shuts the sandbox down (waiting up to `timeout` for a clean guest shutdown) and stops
    /// the server process. Idempotent. The sandbox's state stays until [`Client::remove`].
    pub async fn close(&self, timeout: Duration) -> Result<(), SdkError> {
        let Some(mut child) = self.child.lock().await.take() else {
            return Ok(());
        };
        let t = if timeout.is_zero() {
            Duration::from_secs(2)
        } else {
            timeout
        };
        let closed = tokio::time::timeout(
            t + Duration::from_secs(5),
            self.call(
                Method::Close,
                to_value(&CloseParams {
                    timeout_seconds: t.as_secs_f64(),
                }),
            ),
        )
        .await;
        drop(self.inner.stdin.lock().await.take());
        if tokio::time::timeout(t + Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
            return Err(SdkError::CloseTimeout(t));
        }
        match closed {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(SdkError::CloseTimeout(t)),
        }
    }

    /// Removes the (closed) sandbox's state: `matchlock rm <id>`.
    pub async fn remove(&self) -> Result<(), SdkError> {
        let Some(id) = self.vm_id() else {
            return Ok(());
        };
        let out = Command::new(&self.cfg.binary_path)
            .args(["rm", &id])
            .output()
            .await
            .map_err(|source| SdkError::Spawn {
                path: self.cfg.binary_path.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(SdkError::Remove {
                id,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

fn exec_params(command: &str, o: &ExecOptions) -> Value {
    to_value(&ExecParams {
        command: command.to_string(),
        working_dir: o.working_dir.clone(),
        user: o.user.clone(),
        ..Default::default()
    })
}

fn path_params(path: &str) -> Value {
    to_value(&FileParams {
        path: path.to_string(),
        ..Default::default()
    })
}

fn stream_result(r: Value) -> Result<ExecStreamResult, SdkError> {
    let r: WireStreamResult = result(r, "exec result")?;
    Ok(ExecStreamResult {
        exit_code: r.exit_code,
        duration_ms: r.duration_ms,
    })
}

/// Parses `[LOCAL:]REMOTE` (the shared syntax of the CLI and the server).
pub fn parse_port_forward(spec: &str) -> Result<PortForward, SdkError> {
    parse_port_spec(spec).map_err(|e| SdkError::Invalid(e.to_string()))
}

/// Which notifications carry a streaming call's output and input.
#[derive(Clone, Copy)]
struct Routes {
    stdout: Notice,
    stderr: Notice,
    /// Input may be sent once this arrives; with it, the stdin and stdin-EOF methods.
    input: Option<(Notice, Method, Method)>,
}

impl Routes {
    fn exec(mode: ExecMode) -> Routes {
        let (stdout, stderr) = mode
            .output()
            .unwrap_or((Notice::ExecStreamStdout, Notice::ExecStreamStderr));
        Routes {
            stdout,
            stderr,
            input: mode.input(),
        }
    }

    fn log() -> Routes {
        Routes {
            stdout: Notice::LogStreamData,
            stderr: Notice::LogStreamData,
            input: None,
        }
    }
}

/// Writes one output notification to the matching writer.
async fn deliver<O, E>(
    routes: Routes,
    notice: Notice,
    params: Value,
    stdout: &mut O,
    stderr: &mut E,
) -> Result<(), SdkError>
where
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let data: StreamData = result(params, "data")?;
    let data = unb64(&data.data)?;
    if notice == routes.stdout {
        stdout.write_all(&data).await.map_err(SdkError::Output)?;
        stdout.flush().await.map_err(SdkError::Output)
    } else if notice == routes.stderr {
        stderr.write_all(&data).await.map_err(SdkError::Output)?;
        stderr.flush().await.map_err(SdkError::Output)
    } else {
        Ok(())
    }
}

/// Drives a streaming call: output notifications to the writers, `stdin` (after `*.ready`)
/// as `*.stdin` notifications then `*.stdin_eof`, resizes, until the response arrives.
async fn pump<I, O, E>(
    c: &mut Call,
    mut stdin: Option<&mut I>,
    stdout: &mut O,
    stderr: &mut E,
    routes: Routes,
    mut resize: Option<mpsc::Receiver<(u16, u16)>>,
) -> Result<Value, SdkError>
where
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let mut notes = c.notes.take().ok_or(SdkError::Closed)?;
    let mut done = c.done.take().ok_or(SdkError::Closed)?;
    let inner = c.inner.clone();
    let id = json!(c.id);
    let mut ready = false;
    let mut notes_open = true;
    let mut buf = vec![0u8; 32 * 1024];
    let result = loop {
        tokio::select! {
            biased;
            n = notes.recv(), if notes_open => {
                // The sender goes away with the response: stop polling, the answer is next.
                let Some((notice, params)) = n else { notes_open = false; continue };
                if routes.input.is_some_and(|(r, _, _)| r == notice) {
                    ready = true;
                    continue;
                }
                deliver(routes, notice, params, stdout, stderr).await?;
            }
            r = &mut done => break r.map_err(|_| SdkError::Closed)?,
            n = async { match stdin.as_mut() { Some(s) => s.read(&mut buf).await, None => std::future::pending().await } }, if ready => {
                let Some((_, data_m, eof_m)) = routes.input else { stdin = None; continue };
                match n {
                    Ok(0) | Err(_) => {
                        stdin = None;
                        inner.notify(eof_m, &InputParams { id: id.clone(), ..Default::default() }).await?;
                    }
                    Ok(n) => {
                        let p = InputParams { id: id.clone(), data: b64::encode(&buf[..n]), ..Default::default() };
                        inner.notify(data_m, &p).await?;
                    }
                }
            }
            r = async { match resize.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } }, if ready => {
                match r {
                    Some((rows, cols)) => {
                        let p = InputParams { id: id.clone(), rows, cols, ..Default::default() };
                        inner.notify(Method::ExecTtyResize, &p).await?;
                    }
                    None => resize = None,
                }
            }
        }
    };
    c.finished = true;
    // Notifications are routed before the response, so whatever is queued belongs here.
    while let Ok((notice, params)) = notes.try_recv() {
        if routes.input.is_some_and(|(r, _, _)| r == notice) {
            continue;
        }
        let _ = deliver(routes, notice, params, stdout, stderr).await;
    }
    stdout.flush().await.map_err(SdkError::Output)?;
    result
}

async fn read_loop(inner: Arc<Inner>, stdout: tokio::process::ChildStdout) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match Incoming::parse(&line) {
            Some(Incoming::Response { id, outcome }) => {
                let Some(p) = lock(&inner.pending).remove(&id) else {
                    continue;
                };
                let r = outcome.map_err(|e| SdkError::Rpc {
                    code: e.code,
                    message: e.message,
                });
                let _ = p.done.send(r);
            }
            Some(Incoming::Notification {
                notice,
                target: Some(target),
                params,
            }) => {
                let tx = lock(&inner.pending)
                    .get(&target)
                    .and_then(|p| p.notify.clone());
                if let Some(tx) = tx {
                    // Waiting here passes a slow consumer's back-pressure on to the server.
                    let _ = tx.send((notice, params)).await;
                }
            }
            _ => {}
        }
    }
    // Server gone: fail everything still waiting.
    for (_, p) in lock(&inner.pending).drain() {
        let _ = p.done.send(Err(SdkError::Closed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_forward_specs() {
        assert_eq!(
            parse_port_forward("8080").expect("one"),
            PortForward {
                local_port: 8080,
                remote_port: 8080
            }
        );
        assert_eq!(
            parse_port_forward("18080:80").expect("two"),
            PortForward {
                local_port: 18080,
                remote_port: 80
            }
        );
        assert!(parse_port_forward("0").is_err());
        assert!(parse_port_forward("1:2:3").is_err());
    }
}
