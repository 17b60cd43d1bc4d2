//! The crate's error type: one variant per failure site, messages without the source text.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in [`crate::StateDb`].
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state root (`~/.matchlock`) or its `vms/` directory could not be created.
    #[error("create state directory {path}")]
    CreateRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The `<db>.init.lock` file could not be opened.
    #[error("open init lock {path}")]
    OpenInitLock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `flock` on the init lock failed.
    #[error("lock {path}")]
    LockInit {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// SQLite could not open the database file.
    #[error("open database {path}")]
    OpenDb {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// Restricting the database file to mode 0600 failed.
    #[error("set permissions of {path}")]
    ChmodDb {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A connection pragma (busy_timeout, WAL, ...) could not be applied.
    #[error("configure database: {setting}")]
    ConfigureDb {
        setting: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    /// A schema migration failed (it was rolled back).
    #[error("apply migration {module}/{version} ({name})")]
    Migrate {
        module: &'static str,
        version: u32,
        name: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    /// A VM id that would be unsafe as a directory name.
    #[error("invalid VM id {id:?}")]
    InvalidId { id: String },
    /// `register` of an id that already has a row.
    #[error("VM {id} already exists")]
    AlreadyExists { id: String },
    /// No row for this id.
    #[error("VM {id} not found")]
    NotFound { id: String },
    /// `kill` of a VM whose owner is not alive.
    #[error("VM {id} is not running")]
    NotRunning { id: String },
    /// `remove` of a VM whose owner is alive.
    #[error("cannot remove running VM {id}, kill it first")]
    RemoveRunning { id: String },
    /// `remove` found recorded resources that reconciliation could not reclaim.
    #[error("cannot remove VM {id}: cleanup failed for {items}")]
    CleanupIncomplete { id: String, items: String },
    /// The config JSON could not be serialised.
    #[error("serialise config of VM {id}")]
    SerializeConfig {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    /// The owner's `/proc/<pid>/stat` could not be read.
    #[error("read start time of process {pid}")]
    ReadStartTime {
        pid: u32,
        #[source]
        source: io::Error,
    },
    /// The process does not exist (or is a zombie).
    #[error("process {pid} does not exist")]
    ProcessGone { pid: u32 },
    /// `/proc/<pid>/stat` had an unexpected shape.
    #[error("malformed /proc/{pid}/stat")]
    ParseStat { pid: u32 },
    /// Inserting the `vms` row failed.
    #[error("insert state of VM {id}")]
    InsertVm {
        id: String,
        #[source]
        source: rusqlite::Error,
    },
    /// Creating `vms/<id>` or `vms/<id>/logs` failed.
    #[error("create VM directory {path}")]
    CreateVmDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Updating the status of a `vms` row failed.
    #[error("update status of VM {id}")]
    UpdateStatus {
        id: String,
        #[source]
        source: rusqlite::Error,
    },
    /// Reading one `vms` row failed.
    #[error("read state of VM {id}")]
    ReadVm {
        id: String,
        #[source]
        source: rusqlite::Error,
    },
    /// Reading all `vms` rows failed.
    #[error("list VMs")]
    ListVms {
        #[source]
        source: rusqlite::Error,
    },
    /// A stored status string is not one we know.
    #[error("unknown VM status {value:?}")]
    UnknownStatus { value: String },
    /// Sending a signal to a process failed.
    #[error("send {signal} to process {pid}")]
    Signal {
        signal: &'static str,
        pid: u32,
        #[source]
        source: io::Error,
    },
    /// Removing `vms/<id>` failed.
    #[error("remove VM directory {path}")]
    RemoveVmDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Deleting the rows of a VM failed.
    #[error("delete state of VM {id}")]
    DeleteVm {
        id: String,
        #[source]
        source: rusqlite::Error,
    },
    /// A stored or requested phase string is not one we know.
    #[error("unknown lifecycle phase {value:?}")]
    UnknownPhase { value: String },
    /// The transition table (spec §8.3) forbids this change.
    #[error("invalid lifecycle phase transition \"{from}\" -> \"{to}\"")]
    InvalidTransition {
        from: crate::Phase,
        to: crate::Phase,
    },
    /// `lifecycle_init` for a VM that already has lifecycle records.
    #[error("lifecycle of VM {id} already initialised")]
    LifecycleExists { id: String },
    /// A lifecycle update for a VM without `lifecycle_init`.
    #[error("lifecycle of VM {id} not initialised")]
    LifecycleMissing { id: String },
    /// Appending a lifecycle row failed (after retries on SQLITE_BUSY).
    #[error("write lifecycle of VM {id}")]
    LifecycleWrite {
        id: String,
        #[source]
        source: rusqlite::Error,
    },
    /// Reading lifecycle rows failed.
    #[error("read lifecycle of VM {id}")]
    LifecycleRead {
        id: String,
        #[source]
        source: rusqlite::Error,
    },
    /// A stored lifecycle row has malformed JSON.
    #[error("corrupt lifecycle record {id} version {version}")]
    CorruptLifecycle {
        id: String,
        version: u64,
        #[source]
        source: serde_json::Error,
    },
    /// Serialising a lifecycle row's JSON columns failed.
    #[error("serialise lifecycle record of VM {id}")]
    SerializeLifecycle {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}
