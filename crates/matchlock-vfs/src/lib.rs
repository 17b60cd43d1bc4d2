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
//! See the modules: each says what it does not do.

pub mod guard;
pub mod hostdir;
pub mod intercept;
pub mod memory;
pub mod nested;
pub mod overlay;
pub mod router;
pub mod server;

pub use matchlock_api::{MountConfig, VfsConfig};
pub use router::{build, RouterError};
pub use server::{FsServer, ServerError};
