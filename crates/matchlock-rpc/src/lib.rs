//! `matchlock rpc`: newline-delimited JSON-RPC 2.0 on stdin/stdout, the protocol the
//! Matchlock SDKs (Python, TypeScript, Go, Rust) speak (spec §2).
//!
//! # Design
//! - [`wire`]: the envelope (framing, ids, bounded lines) and nothing else.
//! - [`handlers`]: every method, the one place where wire params become sandbox actions.
//! - [`error`]: every failure, the one place where failures become RPC error codes.
//! - [`server`]: the loop and its concurrency rules (§2.3); [`session`]: the owned sandbox
//!   and everything attached to it, with a single teardown path.
//!
//! The sandbox crate never sees JSON-RPC types. The server owns at most one sandbox; it
//! serves an exec relay for it, so `matchlock exec` and `matchlock port-forward` reach
//! sandboxes created through RPC as well.
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
pub mod session;
pub mod wire;

pub use server::{serve, ServeError, ServerOptions};
