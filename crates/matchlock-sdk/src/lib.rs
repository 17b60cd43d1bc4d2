//! Typed async Rust client for Matchlock sandboxes.
//!
//! The client spawns `matchlock rpc` and speaks its JSON-RPC protocol (the same one the
//! Python, TypeScript and Go SDKs use). One [`Client`] owns one sandbox.
//!
//! ```no_run
//! use matchlock_sdk::{Client, Config, Sandbox};
//! # async fn demo() -> Result<(), matchlock_sdk::SdkError> {
//! let client = Client::start(Config::default()).await?;
//! client.launch(Sandbox::new("alpine:latest").with_memory(256)).await?;
//! let r = client.exec("echo hello").await?;
//! assert_eq!(r.stdout_str(), "hello\n");
//! client.write_file("/tmp/a.txt", b"data").await?;
//! client.close(std::time::Duration::from_secs(2)).await?;
//! client.remove().await?;
//! # Ok(()) }
//! ```
//!
//! Runnable examples: `examples/basic.rs` (launch, exec, files, close, remove) and
//! `examples/streaming.rs` (exec_stream, exec_pipe, exec_interactive, port_forward, log,
//! cancellation by timeout). Run them with `MATCHLOCK_BIN` and `MATCHLOCK_IMAGE` set, e.g.
//! `cargo run -p matchlock-sdk --example basic`.
//!
//! # Design
//! Method names, params, results, notifications and error codes come from the shared
//! contract (`matchlock_api::rpc`) the server is built on, so the two cannot drift. One
//! reader task routes responses by id and notifications by `params.id` to the waiting call. Dropping a call's future before it finishes sends `cancel`, so `tokio::time::timeout`
//! around any call kills the command in the guest.
//!
//! # Limitations
//! No network/VFS hooks (the server has no interception yet); no volume helpers.

#![forbid(unsafe_code)]

mod builder;
mod client;

use matchlock_api::rpc::codes;

pub use builder::{CreateOptions, PortForward, Sandbox};
pub use client::{
    parse_port_forward, Client, Config, ExecOptions, ExecResult, ExecStreamResult, FileInfo,
    InteractiveOptions, PortForwardBinding,
};
pub use matchlock_api::rpc::codes as error_codes;
pub use matchlock_api::rpc::{AllowListAddResult, AllowListDeleteResult};

/// Errors of the SDK.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    #[error("start {path}")]
    Spawn {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write to the matchlock rpc process")]
    Write(#[source] std::io::Error),
    #[error("matchlock rpc process closed")]
    Closed,
    #[error("matchlock RPC error [{code}]: {message}")]
    Rpc { code: i64, message: String },
    #[error("invalid response: missing or malformed {0}")]
    Decode(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error("write command output")]
    Output(#[source] std::io::Error),
    #[error("close timed out after {0:?}; process killed")]
    CloseTimeout(std::time::Duration),
    #[error("matchlock rm {id}: {stderr}")]
    Remove { id: String, stderr: String },
}

impl SdkError {
    /// Sandbox lifecycle failures (`-32000`).
    pub fn is_vm_error(&self) -> bool {
        matches!(self, SdkError::Rpc { code, .. } if *code == codes::VM_FAILED)
    }
    /// Exec failures (`-32001`).
    pub fn is_exec_error(&self) -> bool {
        matches!(self, SdkError::Rpc { code, .. } if *code == codes::EXEC_FAILED)
    }
    /// File operation failures (`-32002`).
    pub fn is_file_error(&self) -> bool {
        matches!(self, SdkError::Rpc { code, .. } if *code == codes::FILE_FAILED)
    }
}
