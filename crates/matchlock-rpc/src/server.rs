//! The server loop: reads requests, runs them concurrently, writes responses (spec §2.3).
//!
//! # Design
//! One reader (this loop) and one writer task; every output line goes through one channel so
//! lines never interleave. Ordinary methods run as their own tasks, each with a cancellation
//! token registered under its id. `cancel`, the exec-input notifications (`*.stdin`,
//! `*.stdin_eof`, `exec_tty.resize`) are handled inline, so input order is preserved and a
//! `cancel` is never queued behind work. `create` and `close` also run inline: `close`
//! cancels in-flight requests and waits for their answers, then tears the sandbox down.
//!
//! Unlike the reference, stdin EOF, a stdout failure or SIGINT/SIGTERM (the caller's `stop`
//! token) all end in the same graceful teardown: in-flight requests are cancelled (and
//! answered `-32003` while stdout works), the VM is shut down and its disks and sockets are
//! removed, so nothing is left for `gc`.
//!
//! # Limitations
//! `create` blocks the reader while the VM boots; requests sent meanwhile wait.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use matchlock_guest_proto::WinSize;
use matchlock_sandbox::paths::Paths;
use matchlock_state::StateDb;
use matchlock_vm::Accel;
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::Failure;
use crate::handlers;
use crate::io::Input;
use crate::session::Session;
use crate::wire::{self, BadLine, Line, LineReader, Request};

/// What the server needs from its host process.
pub struct ServerOptions {
    pub paths: Paths,
    /// The accelerator to boot VMs with (already resolved from `auto`).
    pub accel: Accel,
    /// Recorded as the owner of created sandboxes (this process).
    pub owner_pid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("open state database")]
    State(#[source] matchlock_state::StateError),
}

/// Where an exec's client input goes.
#[derive(Clone)]
pub struct InputRoute {
    pub stdin: mpsc::Sender<Input>,
    pub resize: Option<mpsc::Sender<WinSize>>,
}

/// State shared by the loop and the request tasks.
pub struct Shared {
    pub out: mpsc::UnboundedSender<String>,
    pub run: CancellationToken,
    /// Cancelled when `close` starts: ends requests that never finish on their own
    /// (`log_stream`), while other in-flight requests are allowed to complete.
    pub closing: CancellationToken,
    pub opts: ServerOptions,
    pub state: Arc<StateDb>,
    pub inflight: Mutex<HashMap<String, CancellationToken>>,
    pub inputs: Mutex<HashMap<String, InputRoute>>,
    pub session: Mutex<Option<Arc<Session>>>,
    /// Why there is no session any more (closed, expired), for error messages.
    pub gone: Mutex<Option<String>>,
    /// Console log of the current or last sandbox (`log` works after `close`).
    pub last_log: Mutex<Option<PathBuf>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub fn send(&self, line: String) {
        let _ = self.out.send(line);
    }

    pub fn current(&self) -> Result<Arc<Session>, Failure> {
        if let Some(s) = lock(&self.session).clone() {
            return Ok(s);
        }
        match lock(&self.gone).clone() {
            Some(why) => Err(Failure::VmGone(why)),
            None => Err(Failure::NoVm),
        }
    }

    pub fn set_session(&self, s: Arc<Session>) {
        *lock(&self.last_log) = Some(s.log_path());
        *lock(&self.gone) = None;
        *lock(&self.session) = Some(s);
    }

    pub fn take_session(&self, why: Option<String>) -> Option<Arc<Session>> {
        let s = lock(&self.session).take();
        if s.is_some() {
            *lock(&self.gone) = why;
        }
        s
    }

    pub fn last_log(&self) -> Option<PathBuf> {
        lock(&self.last_log).clone()
    }

    pub fn route(&self, id: &Value) -> Option<InputRoute> {
        lock(&self.inputs).get(&wire::id_key(id)).cloned()
    }

    pub fn add_route(&self, id: &Value, r: InputRoute) {
        lock(&self.inputs).insert(wire::id_key(id), r);
    }

    pub fn remove_route(&self, id: &Value) {
        lock(&self.inputs).remove(&wire::id_key(id));
    }

    /// Cancels the in-flight request `id`; true if there was one.
    pub fn cancel(&self, id: &Value) -> bool {
        match lock(&self.inflight).get(&wire::id_key(id)) {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    pub fn cancel_all(&self) {
        for t in lock(&self.inflight).values() {
            t.cancel();
        }
    }
}

/// Serves JSON-RPC on `input`/`output` until EOF, `close` + next line, a stdout failure or
/// `stop`; always tears the sandbox down before returning.
pub async fn serve<R, W>(
    input: R,
    output: W,
    opts: ServerOptions,
    stop: CancellationToken,
) -> Result<(), ServeError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(StateDb::open(&opts.paths.state).map_err(ServeError::State)?);
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let run = stop.child_token();
    let writer = tokio::spawn(write_lines(output, rx, run.clone()));
    let shared = Arc::new(Shared {
        out: tx,
        run: run.clone(),
        closing: CancellationToken::new(),
        opts,
        state,
        inflight: Mutex::new(HashMap::new()),
        inputs: Mutex::new(HashMap::new()),
        session: Mutex::new(None),
        gone: Mutex::new(None),
        last_log: Mutex::new(None),
    });
    let mut reader = LineReader::new(input, wire::MAX_LINE);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut closed = false;
    loop {
        let line = tokio::select! {
            () = run.cancelled() => break,
            l = reader.next() => l,
        };
        while tasks.try_join_next().is_some() {}
        let text = match line {
            Ok(Some(Line::Text(t))) => t,
            Ok(Some(Line::TooLong)) => {
                let f = Failure::LineTooLong {
                    max: wire::MAX_LINE,
                };
                shared.send(wire::error_response(None, f.code(), &f.message()));
                continue;
            }
            Ok(None) | Err(_) => break,
        };
        if closed {
            break;
        }
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let req = match wire::parse_request(&text) {
            Ok(r) => r,
            Err(BadLine::Parse) => {
                let f = Failure::Parse;
                shared.send(wire::error_response(None, f.code(), &f.message()));
                continue;
            }
            Err(BadLine::Invalid { id, why }) => {
                let f = Failure::InvalidRequest(why);
                shared.send(wire::error_response(id.as_ref(), f.code(), &f.message()));
                continue;
            }
        };
        tracing::debug!(method = %req.method, "rpc request");
        match handlers::lane(&req.method) {
            handlers::Lane::Input => handlers::input(&shared, &req).await,
            handlers::Lane::Cancel => {
                let r = handlers::cancel(&shared, &req.params);
                respond(&shared, req.id.as_ref(), r);
            }
            handlers::Lane::Create => {
                let r = handlers::create(&shared, req.params).await;
                respond(&shared, req.id.as_ref(), r);
            }
            handlers::Lane::Close => {
                // The sandbox is going away: in-flight requests cannot complete, so they
                // are cancelled (answered -32003) rather than making `close` wait for them
                // (the reference waits, and SDKs then kill the server after their timeout).
                shared.closing.cancel();
                shared.cancel_all();
                while tasks.join_next().await.is_some() {}
                let r = handlers::close(&shared, &req.params).await;
                respond(&shared, req.id.as_ref(), r);
                closed = true;
            }
            handlers::Lane::Task => spawn_request(&shared, &mut tasks, req),
        }
    }
    // Teardown: the same path for EOF, signals, stdout failure and after `close`.
    shared.cancel_all();
    while tasks.join_next().await.is_some() {}
    if let Some(s) = shared.take_session(Some("sandbox closed".into())) {
        if let Err(e) = s.close(Duration::ZERO).await {
            tracing::warn!(error = %e.message(), "closing the sandbox failed");
        }
    }
    drop(shared);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    Ok(())
}

fn respond(shared: &Shared, id: Option<&Value>, r: Result<Value, Failure>) {
    let line = match r {
        Ok(v) => wire::response(id, v),
        Err(f) => wire::error_response(id, f.code(), &f.message()),
    };
    shared.send(line);
}

fn spawn_request(shared: &Arc<Shared>, tasks: &mut JoinSet<()>, req: Request) {
    let token = shared.run.child_token();
    if let Some(id) = &req.id {
        lock(&shared.inflight).insert(wire::id_key(id), token.clone());
    }
    let shared = shared.clone();
    tasks.spawn(async move {
        let Request { method, params, id } = req;
        let r = handlers::call(&shared, &method, params, id.as_ref(), token.clone()).await;
        // Any failure after cancellation is reported as the cancellation (spec §2.2).
        let r = match r {
            Err(f) if token.is_cancelled() && !f.is_cancelled() => Err(Failure::Cancelled),
            r => r,
        };
        if let Some(id) = &id {
            lock(&shared.inflight).remove(&wire::id_key(id));
        }
        respond(&shared, id.as_ref(), r);
    });
}

async fn write_lines<W: AsyncWrite + Unpin>(
    mut out: W,
    mut rx: mpsc::UnboundedReceiver<String>,
    run: CancellationToken,
) {
    while let Some(mut line) = rx.recv().await {
        line.push('\n');
        let ok = out.write_all(line.as_bytes()).await.is_ok() && out.flush().await.is_ok();
        if !ok {
            // Nobody is listening: shut down (the loop tears the sandbox down).
            run.cancel();
            return;
        }
    }
}
