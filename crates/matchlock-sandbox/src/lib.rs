//! A sandbox: one VM booted from an image, owned by this process, plus the host-side pieces
//! that talk to its guest agent.
//!
//! # Design
//! [`Sandbox::create`] records every host resource in the state DB before creating it, boots
//! the VM, and completes the guest's boot handshake (guest dials the host, receives its
//! [`BootConfig`](matchlock_guest_proto::BootConfig), answers `Ready`): readiness is never a
//! sleep. Commands run through [`exec::run_exec`], one vsock connection per command, so a
//! cancelled command is killed by simply dropping its connection. Other CLI processes reach
//! the sandbox through the [`relay`] (a unix socket in the VM's state dir) which applies the
//! sandbox's exec defaults and then splices bytes to the guest.
//!
//! [`files`] and [`forward`] are the host sides of the guest's file and port-forward
//! sessions; they take any connection, so they work in-process and through a relay.
//!
//! # Limitations
//! No guest NIC yet (networking is a later issue); the VM only has vsock.

#![forbid(unsafe_code)]

pub mod disk;
pub mod exec;
pub mod files;
pub mod forward;
pub mod paths;
pub mod relay;
mod sandbox;

pub use sandbox::*;
