//! Wire types of the public surfaces: the sandbox configuration (`api.Config` of the
//! reference, spec §3) with its defaults and validation, the parsers for the CLI's
//! `KEY=VALUE` environment and `host:ip` mapping syntaxes (spec §3.9, §3.4), and the
//! JSON-RPC contract ([`rpc`]: methods, params, results, notifications, error codes).
//!
//! # Design
//! A leaf crate (serde only) so that the CLI, the RPC server and the SDK agree on one schema.
//! Field names are the reference's JSON names exactly, because existing SDKs send them.
//!
//! # Limitations
//! Network and VFS sections are carried for schema compatibility; the sandbox rejects the
//! parts it cannot honour yet instead of ignoring them.

#![forbid(unsafe_code)]

pub mod config;
pub mod env;
pub mod pathglob;
pub mod rpc;

pub use config::*;
