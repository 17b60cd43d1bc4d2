//! Workspaces: the host-side virtual filesystem a sandbox's guest mounts over virtio-fs.
//!
//! # Design
//! The sandbox owner serves one `vhost-user-fs` device per VM in-process (DESIGN §9): QEMU's
//! `vhost-user-fs-device` shares the guest's memfd memory with the owner, and the FUSE requests
//! the guest kernel puts on the virtqueues are answered by `fuse-backend-rs`'s server over a
//! router of providers (host directory, read-only, memory, overlay) mounted at guest paths.
//! There is no FUSE daemon in the guest and no extra host process.
//!
//! # Limitations
//! Only `host_fs` mounts are served so far; `memory` and `overlay` are refused with "not
//! supported yet", as are mounts nested inside other mounts and interception rules.

pub mod guard;
pub mod router;
pub mod server;

pub use matchlock_api::{MountConfig, VfsConfig};
pub use router::{build, RouterError};
pub use server::{FsServer, ServerError};
