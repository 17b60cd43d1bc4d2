//! A sandbox: one VM booted from an image, owned by this process, plus the host-side pieces
//! that talk to its guest agent.
//!
//! # Design
//! [`RunningSandbox`] is the one home of a running sandbox: the VM and its helpers, the
//! services beside it ([`services`]: network stack, filesystem server, event sink), the
//! exec relay, port forwards, background commands, the lifetime and the single teardown.
//! The CLI (`run`, `run -d`) and the RPC server only configure and drive it.
//!
//! [`Sandbox::create`] records every host resource in the state DB before creating it, boots
//! the VM, and completes the guest's boot handshake (guest dials the host, receives its
//! [`BootConfig`](matchlock_guest_proto::BootConfig), answers `Ready`): readiness is never a
//! sleep. Commands run through [`exec::run_exec`], one vsock connection per command, so a
//! cancelled command is killed by simply dropping its connection; [`Sandbox::open_exec`] is
//! the one place the sandbox's exec defaults are applied, for in-process commands and for
//! the [`relay`] (a unix socket in the VM's state dir) through which other CLI processes
//! reach the sandbox. [`codec`] is the async frame codec every guest session uses.
//!
//! [`files`] and [`forward`] are the host sides of the guest's file and port-forward
//! sessions; they take any connection, so they work in-process and through a relay.
//!
//! # Limitations
//! No guest NIC yet (networking is a later issue); the VM only has vsock.

#![forbid(unsafe_code)]

pub mod codec;
pub mod disk;
pub mod disklock;
pub mod exec;
pub mod files;
pub mod forward;
pub mod network;
pub mod paths;
pub mod phases;
pub mod relay;
mod running;
mod sandbox;
pub mod services;
pub mod signals;
pub mod snapshot;

pub use running::{RunningSandbox, StartError, StartOptions, StopReason};
pub use sandbox::*;
