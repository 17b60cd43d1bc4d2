//! State shared by the server loop and the request tasks: the two output paths, in-flight
//! requests (for `cancel`), exec input routes, the capture budget and the session's sandbox.
//!
//! # Design
//! Its own module so that the loop (`server`) and the methods (`handlers`) both depend on
//! it and not on each other. Output takes one of two paths to the single writer:
//! - control ([`Shared::send`]): answers the reader produces itself (`cancel`, `create`,
//!   parse and id errors). Never waits, so the reader never blocks on output; at most one
//!   small line per request line read. The writer prefers it.
//! - data ([`Shared::send_data`], [`Shared::data_sender`]): notifications and the answers
//!   of request tasks, through a channel of [`DATA_LINES`] lines that the producers wait on.
//!   A request's chunks and its answer take this one path, so they stay in order.
//!
//! An id is in flight from the moment its request is accepted until it has finished (its
//! answer is sent next); a second request with that id is refused (`-32600`), so routing
//! (`cancel`, exec input) always reaches the first.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use matchlock_api::rpc::envelope::id_key;
use matchlock_guest_proto::WinSize;
use matchlock_sandbox::paths::Paths;
use matchlock_sandbox::RunningSandbox;
use matchlock_state::StateDb;
use matchlock_vm::Accel;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::Failure;
use crate::io::{Backlog, Budget, Input, OutLine, CAPTURE_BUDGET};

/// Lines of notifications and task answers queued for the writer (each at most one output
/// chunk, ~90 KiB, or one answer).
pub const DATA_LINES: usize = 16;

/// What the server needs from its host process.
pub struct ServerOptions {
    pub paths: Paths,
    /// The accelerator to boot VMs with (already resolved from `auto`).
    pub accel: Accel,
    /// Recorded as the owner of created sandboxes (this process).
    pub owner_pid: u32,
}

/// Where an exec's client input goes.
#[derive(Clone)]
pub struct InputRoute {
    /// Never waited on: the [`Backlog`] bounds what it holds.
    pub stdin: mpsc::UnboundedSender<Input>,
    pub backlog: Arc<Backlog>,
    pub resize: Option<mpsc::Sender<WinSize>>,
}

/// The writer's two inputs (see the module docs).
pub struct Outputs {
    pub control: mpsc::UnboundedReceiver<String>,
    pub data: mpsc::Receiver<OutLine>,
}

/// State shared by the loop and the request tasks.
pub struct Shared {
    control: mpsc::UnboundedSender<String>,
    data: mpsc::Sender<OutLine>,
    /// Captured `exec` output of the sandbox, over all its requests.
    pub capture: Arc<Budget>,
    /// Cancelled on stdin EOF, a stdout failure or a shutdown signal.
    pub run: CancellationToken,
    /// Cancelled when `close` starts: ends requests that never finish on their own
    /// (`log_stream`), while other in-flight requests are allowed to complete.
    pub closing: CancellationToken,
    pub opts: ServerOptions,
    pub state: Arc<StateDb>,
    inflight: Mutex<HashMap<String, CancellationToken>>,
    inputs: Mutex<HashMap<String, InputRoute>>,
    session: Mutex<Option<Arc<RunningSandbox>>>,
    /// Why there is no session any more (closed, expired), for error messages.
    gone: Mutex<Option<String>>,
    /// Console log of the current or last sandbox (`log` works after `close`).
    last_log: Mutex<Option<PathBuf>>,
}

/// An id as quoted in an error message (bounded: ids come from the client).
fn shown(mut key: String) -> String {
    const MAX: usize = 64;
    if key.len() > MAX {
        let mut end = MAX;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        key.truncate(end);
        key.push_str("...");
    }
    key
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// The shared state and the receiving ends of its output paths (for the writer).
    pub fn new(
        run: CancellationToken,
        opts: ServerOptions,
        state: Arc<StateDb>,
    ) -> (Shared, Outputs) {
        let (control, control_rx) = mpsc::unbounded_channel();
        let (data, data_rx) = mpsc::channel(DATA_LINES);
        let outputs = Outputs {
            control: control_rx,
            data: data_rx,
        };
        let shared = Shared {
            control,
            data,
            capture: Budget::new(CAPTURE_BUDGET),
            run,
            closing: CancellationToken::new(),
            opts,
            state,
            inflight: Mutex::new(HashMap::new()),
            inputs: Mutex::new(HashMap::new()),
            session: Mutex::new(None),
            gone: Mutex::new(None),
            last_log: Mutex::new(None),
        };
        (shared, outputs)
    }

    /// Queues a control line (never waits; see the module docs).
    pub fn send(&self, line: String) {
        let _ = self.control.send(line);
    }

    /// Queues a data line, waiting while the client is behind; false if the writer is gone.
    pub async fn send_data(&self, line: OutLine) -> bool {
        self.data.send(line).await.is_ok()
    }

    /// The data path, for sinks that wait for room themselves.
    pub fn data_sender(&self) -> mpsc::Sender<OutLine> {
        self.data.clone()
    }

    /// The session's sandbox, or why there is none.
    pub fn current(&self) -> Result<Arc<RunningSandbox>, Failure> {
        if let Some(s) = lock(&self.session).clone() {
            return Ok(s);
        }
        match lock(&self.gone).clone() {
            Some(why) => Err(Failure::VmGone(why)),
            None => Err(Failure::NoVm),
        }
    }

    pub fn set_session(&self, s: Arc<RunningSandbox>) {
        *lock(&self.last_log) = Some(s.console_log());
        *lock(&self.gone) = None;
        *lock(&self.session) = Some(s);
    }

    pub fn take_session(&self, why: Option<String>) -> Option<Arc<RunningSandbox>> {
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
        lock(&self.inputs).get(&id_key(id)).cloned()
    }

    pub fn add_route(&self, id: &Value, r: InputRoute) {
        lock(&self.inputs).insert(id_key(id), r);
    }

    pub fn remove_route(&self, id: &Value) {
        lock(&self.inputs).remove(&id_key(id));
    }

    /// Registers an in-flight request under its id; refused if the id is in flight already.
    pub fn track(&self, id: &Value, token: CancellationToken) -> Result<(), Failure> {
        let mut m = lock(&self.inflight);
        let key = id_key(id);
        if m.contains_key(&key) {
            return Err(Failure::DuplicateId(shown(key)));
        }
        m.insert(key, token);
        Ok(())
    }

    /// Refuses `id` if a request with that id is in flight.
    pub fn check_free(&self, id: &Value) -> Result<(), Failure> {
        let key = id_key(id);
        if lock(&self.inflight).contains_key(&key) {
            return Err(Failure::DuplicateId(shown(key)));
        }
        Ok(())
    }

    pub fn untrack(&self, id: &Value) {
        lock(&self.inflight).remove(&id_key(id));
    }

    /// Cancels the in-flight request `id`; true if there was one.
    pub fn cancel(&self, id: &Value) -> bool {
        match lock(&self.inflight).get(&id_key(id)) {
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
