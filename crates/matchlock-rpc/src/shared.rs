//! State shared by the server loop and the request tasks: the output channel, in-flight
//! requests (for `cancel`), exec input routes, and the session's sandbox.
//!
//! # Design
//! Its own module so that the loop (`server`) and the methods (`handlers`) both depend on
//! it and not on each other.

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
use crate::io::Input;

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
    pub stdin: mpsc::Sender<Input>,
    pub resize: Option<mpsc::Sender<WinSize>>,
}

/// State shared by the loop and the request tasks.
pub struct Shared {
    pub out: mpsc::UnboundedSender<String>,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub fn new(
        out: mpsc::UnboundedSender<String>,
        run: CancellationToken,
        opts: ServerOptions,
        state: Arc<StateDb>,
    ) -> Shared {
        Shared {
            out,
            run,
            closing: CancellationToken::new(),
            opts,
            state,
            inflight: Mutex::new(HashMap::new()),
            inputs: Mutex::new(HashMap::new()),
            session: Mutex::new(None),
            gone: Mutex::new(None),
            last_log: Mutex::new(None),
        }
    }

    pub fn send(&self, line: String) {
        let _ = self.out.send(line);
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

    /// Registers an in-flight request under its id.
    pub fn track(&self, id: &Value, token: CancellationToken) {
        lock(&self.inflight).insert(id_key(id), token);
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
