//! `matchlock rpc`: newline-delimited JSON-RPC 2.0 on stdin/stdout, the protocol the
//! Matchlock SDKs (Python, TypeScript, Go, Rust) speak (spec §2).
//!
//! # Design
//! - The contract (method names, typed params and results, notifications, error codes, the
//!   envelope) is `matchlock_api::rpc`, shared with the Rust SDK.
//! - [`wire`]: bounded line framing.
//! - [`handlers`]: every method, the one place where wire params become sandbox actions.
//! - [`error`]: every failure, the one place where failures become RPC error codes.
//! - [`server`]: the loop and its concurrency rules (§2.3); [`shared`]: the state the loop
//!   and the request tasks share, including the session's `RunningSandbox` (which owns the
//!   VM, its relay, port forwards, background entrypoint and the single teardown path).
//!
//! The sandbox crate never sees JSON-RPC types. The server owns at most one sandbox; its
//! exec relay lets `matchlock exec` and `matchlock port-forward` reach sandboxes created
//! through RPC as well.
//!
//! # Limitations
//! One sandbox per server process (as in the reference). Network interception, allow-lists,
//! VFS mounts and `event` notifications wait for the network and VFS subsystems.

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod handlers;
pub mod io;
pub mod server;
pub mod shared;
pub mod wire;

pub use server::{serve, ServeError};
pub use shared::ServerOptions;
