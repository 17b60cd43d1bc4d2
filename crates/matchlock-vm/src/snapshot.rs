//! Saving and restoring a VM over QMP (developer switch `MATCHLOCK_DEV_SNAPSHOT=1`; the
//! cache, key and boot flow live in `matchlock-sandbox`'s `snapshot` module).
//!
//! # Design
//! Measured in docs/snapshots.md (QEMU 7.2, TCG):
//! - [`SnapshotMode::Make`]: guest RAM is `memory-backend-file,share=on` on a file the
//!   caller created (in the snapshot cache's temporary directory), plus a QMP socket. At the
//!   snapshot point [`save`] sets the `x-ignore-shared` capability (RAM is not
//!   copied into the stream: it already is the file) and `migrate` to a descriptor passed
//!   with `getfd` (`fd:` URI; QEMU runs with `spawn=deny`, so `exec:` is out), then polls
//!   `query-migrate` until `completed`. The VM stays paused and is killed by the caller.
//! - [`SnapshotMode::Restore`]: the same command line with `-incoming defer` and a RAM file
//!   mapped `share=off` (private, copy-on-write); the caller passes a per-VM copy of the
//!   cached one (see Limitations);
//!   [`load`] sets the capability, passes the state file's descriptor and runs
//!   `migrate-incoming`, then waits for `running` (`cont` if the stream came from a paused
//!   VM, which otherwise stays paused).
//! - Every step is bounded by one deadline; QMP replies are hostile input ([`crate::qmp`]).
//!
//! # Limitations
//! QEMU 7.2 opens a `memory-backend-file` read-write even with `share=off` (its `readonly`
//! option would also map the guest's RAM read-only), so a restored VM's Landlock ruleset
//! must allow writing its RAM file. Restoring from the cached file itself would let a
//! compromised QEMU poison later restores; `matchlock-sandbox` therefore gives each
//! restore a sparse copy in the VM's own state directory (tens of ms; docs/snapshots.md).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::qmp::{Qmp, QmpError};

/// The QMP socket's name inside the VM's state directory (only with a snapshot mode).
pub const QMP_SOCKET: &str = "qmp.sock";
/// Name under which the migration stream's descriptor is handed to QEMU.
const FD_NAME: &str = "snapstate";
/// Poll period of `query-migrate` / `query-status`.
const POLL: Duration = Duration::from_millis(2);

/// How a VM's RAM is backed and whether it starts from saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Boot normally with RAM in `ram` (`share=on`), ready for [`save`].
    Make { ram: PathBuf },
    /// Start from `state` with RAM mapped privately from `ram`.
    Restore { ram: PathBuf, state: PathBuf },
}

impl SnapshotMode {
    /// The RAM file.
    pub fn ram(&self) -> &Path {
        match self {
            SnapshotMode::Make { ram } | SnapshotMode::Restore { ram, .. } => ram,
        }
    }

    /// QEMU's memory backend object for `mem` MiB.
    pub(crate) fn memory_object(&self, mem: u32, escaped_ram: &str) -> String {
        let share = match self {
            SnapshotMode::Make { .. } => "on",
            SnapshotMode::Restore { .. } => "off",
        };
        format!("memory-backend-file,id=mem,size={mem}M,mem-path={escaped_ram},share={share}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("QMP")]
    Qmp(#[source] QmpError),
    #[error("create the state file {path}")]
    CreateState {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("open the state file {path}")]
    OpenState {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("migration {status}: {desc}")]
    Failed { status: String, desc: String },
    #[error("QMP answered without a status")]
    NoStatus,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl From<QmpError> for SnapshotError {
    fn from(e: QmpError) -> Self {
        SnapshotError::Qmp(e)
    }
}

fn ignore_shared(qmp: &mut Qmp) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })),
    )
    .map(|_| ())
}

/// Pauses the VM and writes its device state to a new file `state` (0600).
pub(crate) fn save(qmp_path: &Path, state: &Path, timeout: Duration) -> Result<(), SnapshotError> {
    let deadline = Instant::now() + timeout;
    let mut qmp = Qmp::connect(qmp_path, deadline)?;
    // No `stop` first: migration stops the VM itself before it saves the device state
    // (RAM is not copied, so nothing runs in between), and a stream saved from a paused
    // VM would restore paused.
    ignore_shared(&mut qmp)?;
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(state)
            .map_err(|source| SnapshotError::CreateState {
                path: state.to_owned(),
                source,
            })?
    };
    qmp.send_fd(FD_NAME, file.as_fd())?;
    drop(file);
    qmp.execute("migrate", Some(json!({ "uri": format!("fd:{FD_NAME}") })))?;
    loop {
        let r = qmp.execute("query-migrate", None)?;
        let status = r.get("status").and_then(|s| s.as_str()).unwrap_or("");
        match status {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(SnapshotError::Failed {
                    status: status.to_owned(),
                    desc: describe(&r),
                })
            }
            _ if Instant::now() >= deadline => return Err(SnapshotError::Timeout(timeout)),
            _ => std::thread::sleep(POLL),
        }
    }
}

/// When each step of a restore finished (host monotonic clock), for the boot breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadMarks {
    /// QEMU spawned (the process exists; nothing loaded yet).
    pub spawned: Instant,
    /// QMP answered (greeting and capabilities negotiated): QEMU's start-up is done.
    pub qmp: Instant,
    /// `migrate-incoming` accepted.
    pub incoming: Instant,
    /// `query-status` said `running`: the guest runs again.
    pub running: Instant,
}

/// Loads `state` into a QEMU started with `-incoming defer` and waits until it runs.
pub(crate) fn load(
    qmp_path: &Path,
    state: &Path,
    spawned: Instant,
    deadline: Instant,
) -> Result<LoadMarks, SnapshotError> {
    let mut qmp = Qmp::connect(qmp_path, deadline)?;
    let qmp_at = Instant::now();
    ignore_shared(&mut qmp)?;
    let file = File::open(state).map_err(|source| SnapshotError::OpenState {
        path: state.to_owned(),
        source,
    })?;
    qmp.send_fd(FD_NAME, file.as_fd())?;
    drop(file);
    qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": format!("fd:{FD_NAME}") })),
    )?;
    let incoming = Instant::now();
    loop {
        let r = qmp.execute("query-status", None)?;
        let status = r
            .get("status")
            .and_then(|s| s.as_str())
            .ok_or(SnapshotError::NoStatus)?;
        match status {
            "running" => {
                return Ok(LoadMarks {
                    spawned,
                    qmp: qmp_at,
                    incoming,
                    running: Instant::now(),
                })
            }
            // A stream saved from a paused VM loads paused.
            "paused" => {
                qmp.execute("cont", None)?;
            }
            "inmigrate" | "prelaunch" | "finish-migrate" | "restore-vm" => {}
            other => {
                return Err(SnapshotError::Failed {
                    status: other.chars().take(40).collect(),
                    desc: "the VM did not resume".into(),
                })
            }
        }
        if Instant::now() >= deadline {
            return Err(SnapshotError::Timeout(
                deadline.saturating_duration_since(Instant::now()),
            ));
        }
        std::thread::sleep(POLL);
    }
}

fn describe(r: &serde_json::Value) -> String {
    r.get("error-desc")
        .and_then(|d| d.as_str())
        .unwrap_or("(no description)")
        .chars()
        .take(500)
        .collect()
}
