//! Sandbox state and lifecycle records (`~/.matchlock/state.db`).
//!
//! Three concerns share one SQLite database:
//! - **VM rows** (`vms`, [`VmRecord`]): who owns a sandbox (PID *and* process start time),
//!   its status (`running`/`stopped`/`crashed`), image, creation time and config. Backs
//!   `list`, `get`, `kill`, `rm`.
//! - **Lifecycle** (`vm_lifecycle`, [`LifecycleRecord`]): an append-only history of phases,
//!   recorded host resources and cleanup steps. Backs `inspect`.
//! - **Reconciliation** ([`StateDb::reconcile`]): reclaims every recorded resource of a VM
//!   whose owner is gone. Backs `gc`, `rm`, `prune`.
//!
//! # Design
//! - Many CLI processes open the database at once, so it runs in WAL mode with a 15 s busy
//!   timeout; lifecycle appends take the write lock up front (`BEGIN IMMEDIATE`) and retry on
//!   SQLITE_BUSY. Within one process a `Mutex<Connection>` serialises access.
//! - Schema migrations are per module (`state`, `lifecycle`), recorded in `schema_migrations`,
//!   run under an exclusive `flock` on `<db>.init.lock`, each in its own transaction, so
//!   concurrent first opens never race and reopening is a no-op.
//! - Everything a sandbox creates on the host is recorded *before* it is created: `register`
//!   writes the row before making `vms/<id>/`, and callers record files and processes with
//!   [`StateDb::record_resource`] before creating/right after spawning them. A crash at any
//!   point therefore leaves a record that `reconcile` can act on.
//! - PIDs are never trusted alone: owner and recorded processes carry their start time, and
//!   signals go through a pidfd (see `process`), so a reused PID is never killed.
//! - Secret values never reach the database: [`redact_config`] runs inside `register`.
//! - `remove` deletes the VM's lifecycle history too (the reference leaks it forever), but
//!   only after the recorded resources are reclaimed; otherwise it refuses and keeps every row.
//! - Timestamps are UTC RFC3339 with fixed nanosecond width, so string order is time order.
//!
//! # Limitations
//! - Linux only (procfs start times, pidfd).
//! - No pre-migration backup copy: migrations are transactional DDL, so a failed one rolls
//!   back cleanly; a bad migration that succeeds cannot be undone automatically.
//! - `subnet_allocations` from the reference is not created: our network is userspace.
//! - `get` shows `[redacted]` for secret values, unlike the reference (which leaks them).

#![forbid(unsafe_code)]

mod db;
mod error;
mod lifecycle;
mod process;
mod reconcile;
mod redact;
#[cfg(test)]
mod testutil;
mod vms;

pub use db::StateDb;
pub use error::StateError;
pub use lifecycle::{
    CleanupStatus, CleanupStep, LifecycleRecord, Phase, ProcessRes, Resource, Resources,
};
pub use process::process_start_time;
pub use reconcile::{ReconcileReport, SKIPPED_RUNNING};
pub use redact::{redact_config, REDACTED};
pub use vms::{validate_vm_id, VmRecord, VmStatus};
