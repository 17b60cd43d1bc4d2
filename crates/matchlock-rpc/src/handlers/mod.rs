//! Every RPC method, in one place: decodes its params, performs the sandbox action, encodes
//! its result (spec §2.4). The sandbox crate never sees JSON-RPC types; failures are
//! [`Failure`]s, turned into codes only in `error.rs`.
//!
//! # Design
//! Methods arrive parsed ([`Method`]); [`lane`] says how the loop runs each (inline or as a
//! task) and [`call`] is the one dispatch for task methods. Params and results are the typed
//! contract in `matchlock_api::rpc`, which the Rust SDK uses too. The submodules group the
//! methods: [`session`] (create, close, cancel, the lifetime), [`exec`] (the four exec modes
//! and their input), [`files`] (files and logs), [`forward`] (port forwards, allow-lists).
//!
//! # Limitations
//! No `event` notifications are produced (no network proxy or VFS yet); methods that need
//! the network stack answer the reference's "unavailable" error.

mod exec;
mod files;
mod forward;
mod session;

use std::sync::Arc;

use matchlock_api::rpc::{decode_params, ExecMode, Method};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::Failure;
use crate::io::Hold;
use crate::shared::Shared;

pub use exec::input;
pub use session::{cancel, close, create};

/// How the loop runs a method.
#[derive(Debug, PartialEq, Eq)]
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

pub fn lane(method: Method) -> Lane {
    use Method::*;
    match method {
        ExecPipeStdin | ExecPipeStdinEof | ExecTtyStdin | ExecTtyStdinEof | ExecTtyResize => {
            Lane::Input
        }
        Cancel => Lane::Cancel,
        Create => Lane::Create,
        Close => Lane::Close,
        Exec | ExecStream | ExecPipe | ExecTty | WriteFile | ReadFile | ListFiles | Log
        | LogStream | AllowListAdd | AllowListDelete | PortForward => Lane::Task,
    }
}

fn params<T: DeserializeOwned + Default>(p: Value) -> Result<T, Failure> {
    decode_params(p).map_err(Failure::Params)
}

/// A method's result, with what must stay reserved until it has been written.
pub struct Reply {
    pub value: Value,
    pub hold: Option<Hold>,
}

impl From<Value> for Reply {
    fn from(value: Value) -> Self {
        Reply { value, hold: None }
    }
}

/// Runs a [`Lane::Task`] method.
pub async fn call(
    s: &Arc<Shared>,
    method: Method,
    p: Value,
    id: Option<&Value>,
    cancel: CancellationToken,
) -> Result<Reply, Failure> {
    if let Some(mode) = ExecMode::from_method(method) {
        return exec::exec(s, params(p)?, mode, id, cancel).await;
    }
    call_other(s, method, p, id, cancel).await.map(Reply::from)
}

async fn call_other(
    s: &Arc<Shared>,
    method: Method,
    p: Value,
    id: Option<&Value>,
    cancel: CancellationToken,
) -> Result<Value, Failure> {
    match method {
        Method::WriteFile => files::write_file(s, params(p)?, cancel).await,
        Method::ReadFile => files::read_file(s, params(p)?, cancel).await,
        Method::ListFiles => files::list_files(s, params(p)?, cancel).await,
        Method::Log => files::log(s).await,
        Method::LogStream => files::log_stream(s, id, cancel).await,
        Method::AllowListAdd => forward::allow_list(s, params(p)?, true),
        Method::AllowListDelete => forward::allow_list(s, params(p)?, false),
        Method::PortForward => forward::port_forward(s, params(p)?).await,
        // Inline methods never reach a task.
        _ => Err(Failure::MethodNotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes() {
        assert_eq!(lane(Method::ExecTtyResize), Lane::Input);
        assert_eq!(lane(Method::ExecPipeStdin), Lane::Input);
        assert_eq!(lane(Method::Cancel), Lane::Cancel);
        assert_eq!(lane(Method::Close), Lane::Close);
        assert_eq!(lane(Method::Exec), Lane::Task);
    }
}
