//! Append-only lifecycle records: phases, recorded host resources, cleanup steps.
//!
//! # Design
//! Every change inserts a new `vm_lifecycle` row with `version = last + 1`; nothing is
//! updated in place, so `inspect` can show the whole history and a crash mid-write loses at
//! most the change being written. The version is allocated inside `BEGIN IMMEDIATE` by an
//! upsert on `vm_lifecycle_head` (`RETURNING last_version`), and the previous record is read
//! in the same transaction, so concurrent writers (threads or processes) serialise and never
//! lose an update. SQLITE_BUSY/LOCKED are retried with a growing backoff.
//!
//! Resources are recorded *before* they are created (files) or right after spawn
//! (processes, with their start time), which is what lets `reconcile` reclaim them after a
//! crash without ever touching a stranger's process.
//!
//! # Limitations
//! Resources are a flat list of files and processes; network artefacts of the reference
//! (TAP devices, nftables tables) do not exist in our userspace network design.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior};
use serde::{Deserialize, Serialize};

use crate::db::{is_busy, now_rfc3339, MAX_ATTEMPTS};
use crate::{StateDb, StateError};

/// Lifecycle phase of a VM (spec §8.3). Serialised in snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Creating,
    Created,
    Starting,
    Running,
    Stopping,
    Stopped,
    Cleaning,
    Cleaned,
    CreateFailed,
    StartFailed,
    StopFailed,
    CleanupFailed,
}

impl Phase {
    /// Every phase, in declaration order.
    pub const ALL: [Phase; 12] = [
        Phase::Creating,
        Phase::Created,
        Phase::Starting,
        Phase::Running,
        Phase::Stopping,
        Phase::Stopped,
        Phase::Cleaning,
        Phase::Cleaned,
        Phase::CreateFailed,
        Phase::StartFailed,
        Phase::StopFailed,
        Phase::CleanupFailed,
    ];

    /// The stored string.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Creating => "creating",
            Phase::Created => "created",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Cleaning => "cleaning",
            Phase::Cleaned => "cleaned",
            Phase::CreateFailed => "create_failed",
            Phase::StartFailed => "start_failed",
            Phase::StopFailed => "stop_failed",
            Phase::CleanupFailed => "cleanup_failed",
        }
    }

    /// Whether `self -> to` is allowed (spec §8.3 table; every phase may go to itself).
    pub fn can_transition_to(self, to: Phase) -> bool {
        use Phase::*;
        if self == to {
            return true;
        }
        let allowed: &[Phase] = match self {
            Creating => &[Created, CreateFailed, Cleaning],
            Created => &[Starting, Stopping, Cleaning],
            Starting => &[Running, StartFailed, Stopping, Cleaning],
            Running => &[Stopping, Cleaning],
            Stopping => &[Stopped, StopFailed, Cleaning],
            Stopped => &[Cleaning, Cleaned],
            Cleaning => &[Cleaned, CleanupFailed],
            CreateFailed => &[Cleaning, CleanupFailed],
            StartFailed => &[Stopping, Cleaning, CleanupFailed],
            StopFailed => &[Cleaning, CleanupFailed],
            CleanupFailed => &[Cleaning, Cleaned],
            Cleaned => &[],
        };
        allowed.contains(&to)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = StateError;

    fn from_str(s: &str) -> Result<Self, StateError> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| StateError::UnknownPhase {
                value: s.to_owned(),
            })
    }
}

/// A host resource to record, *before* creating it (files) or right after spawning it
/// (processes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// A disk, socket, temp file or directory, inside or outside the VM directory.
    File(PathBuf),
    /// A helper process (QEMU, vhost-device-vsock). `start_time` comes from
    /// [`crate::process_start_time`].
    Process {
        pid: u32,
        start_time: u64,
        name: String,
    },
}

/// A recorded process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRes {
    pub pid: u32,
    pub start_time: u64,
    pub name: String,
}

/// Everything recorded for a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    #[serde(default)]
    pub files: Vec<PathBuf>,
    #[serde(default)]
    pub processes: Vec<ProcessRes>,
}

/// Outcome of one cleanup step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CleanupStatus {
    Ok,
    Error,
}

/// One entry of [`LifecycleRecord::cleanup`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupStep {
    pub status: CleanupStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub updated_at: String,
}

/// One version of a VM's lifecycle; serialises as the `inspect` JSON (and parses it back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleRecord {
    pub version: u64,
    pub vm_id: String,
    pub backend: String,
    pub phase: Phase,
    /// UTC RFC3339.
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub cleanup: BTreeMap<String, CleanupStep>,
}

const LC_COLUMNS: &str =
    "vm_id, version, backend, phase, updated_at, last_error, resources_json, cleanup_json";

struct RawLifecycle {
    vm_id: String,
    version: u64,
    backend: String,
    phase: String,
    updated_at: String,
    last_error: String,
    resources_json: String,
    cleanup_json: String,
}

impl RawLifecycle {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<RawLifecycle> {
        Ok(RawLifecycle {
            vm_id: row.get(0)?,
            version: row.get(1)?,
            backend: row.get(2)?,
            phase: row.get(3)?,
            updated_at: row.get(4)?,
            last_error: row.get(5)?,
            resources_json: row.get(6)?,
            cleanup_json: row.get(7)?,
        })
    }

    fn into_record(self) -> Result<LifecycleRecord, StateError> {
        let corrupt = |source| StateError::CorruptLifecycle {
            id: self.vm_id.clone(),
            version: self.version,
            source,
        };
        let resources = serde_json::from_str(&self.resources_json).map_err(corrupt)?;
        let cleanup = serde_json::from_str(&self.cleanup_json).map_err(corrupt)?;
        Ok(LifecycleRecord {
            phase: self.phase.parse()?,
            version: self.version,
            vm_id: self.vm_id,
            backend: self.backend,
            updated_at: self.updated_at,
            last_error: self.last_error,
            resources,
            cleanup,
        })
    }
}

/// A change to apply to the latest record (`None` if there is none yet).
type Change<'a> = dyn FnMut(Option<LifecycleRecord>) -> Result<LifecycleRecord, StateError> + 'a;

impl StateDb {
    /// Starts the lifecycle of `id`: version 1, phase `creating`. Errors if records exist.
    pub fn lifecycle_init(&self, id: &str, backend: &str) -> Result<LifecycleRecord, StateError> {
        self.append(id, &mut |prev| match prev {
            Some(_) => Err(StateError::LifecycleExists { id: id.to_owned() }),
            None => Ok(LifecycleRecord {
                version: 0,
                vm_id: id.to_owned(),
                backend: backend.to_owned(),
                phase: Phase::Creating,
                updated_at: String::new(),
                last_error: String::new(),
                resources: Resources::default(),
                cleanup: BTreeMap::new(),
            }),
        })
    }

    /// Moves `id` to `phase`, setting `last_error` to `error` (cleared when `None`). Rejects
    /// transitions the table forbids with [`StateError::InvalidTransition`].
    pub fn lifecycle_transition(
        &self,
        id: &str,
        phase: Phase,
        error: Option<&str>,
    ) -> Result<LifecycleRecord, StateError> {
        self.append(id, &mut |prev| {
            let mut rec = prev.ok_or_else(|| StateError::LifecycleMissing { id: id.to_owned() })?;
            if !rec.phase.can_transition_to(phase) {
                return Err(StateError::InvalidTransition {
                    from: rec.phase,
                    to: phase,
                });
            }
            rec.phase = phase;
            rec.last_error = error.unwrap_or_default().to_owned();
            Ok(rec)
        })
    }

    /// Records a resource of `id` (idempotent: recording the same one twice keeps one entry).
    pub fn record_resource(&self, id: &str, res: Resource) -> Result<(), StateError> {
        self.append(id, &mut |prev| {
            let mut rec = prev.ok_or_else(|| StateError::LifecycleMissing { id: id.to_owned() })?;
            match &res {
                Resource::File(path) => {
                    if !rec.resources.files.contains(path) {
                        rec.resources.files.push(path.clone());
                    }
                }
                Resource::Process {
                    pid,
                    start_time,
                    name,
                } => {
                    let p = ProcessRes {
                        pid: *pid,
                        start_time: *start_time,
                        name: name.clone(),
                    };
                    if !rec.resources.processes.contains(&p) {
                        rec.resources.processes.push(p);
                    }
                }
            }
            Ok(rec)
        })
        .map(|_| ())
    }

    /// Drops every recorded process of `id` that has exited (or whose pid now names a
    /// process started at another time), e.g. a snapshot-making VM that was killed before
    /// the sandbox's own VM started. Returns how many were dropped; processes that may
    /// still run stay recorded, so cleanup can still reach them.
    pub fn forget_exited_processes(&self, id: &str) -> Result<usize, StateError> {
        let mut dropped = 0;
        self.append(id, &mut |prev| {
            let mut rec = prev.ok_or_else(|| StateError::LifecycleMissing { id: id.to_owned() })?;
            let before = rec.resources.processes.len();
            rec.resources
                .processes
                .retain(|p| crate::process::is_alive(p.pid, p.start_time));
            dropped = before - rec.resources.processes.len();
            Ok(rec)
        })?;
        Ok(dropped)
    }

    /// Records the outcome of cleanup step `step` of `id`.
    pub fn record_cleanup(
        &self,
        id: &str,
        step: &str,
        result: Result<(), String>,
    ) -> Result<(), StateError> {
        let (status, error) = match result {
            Ok(()) => (CleanupStatus::Ok, String::new()),
            Err(e) => (CleanupStatus::Error, e),
        };
        self.append(id, &mut |prev| {
            let mut rec = prev.ok_or_else(|| StateError::LifecycleMissing { id: id.to_owned() })?;
            rec.cleanup.insert(
                step.to_owned(),
                CleanupStep {
                    status,
                    error: error.clone(),
                    updated_at: String::new(),
                },
            );
            Ok(rec)
        })
        .map(|_| ())
    }

    /// The newest record of `id`, if any.
    pub fn lifecycle_latest(&self, id: &str) -> Result<Option<LifecycleRecord>, StateError> {
        latest(&self.conn(), id)
            .map_err(|source| StateError::LifecycleRead {
                id: id.to_owned(),
                source,
            })?
            .map(RawLifecycle::into_record)
            .transpose()
    }

    /// Every record of `id`, oldest first.
    pub fn lifecycle_history(&self, id: &str) -> Result<Vec<LifecycleRecord>, StateError> {
        let read_err = |source| StateError::LifecycleRead {
            id: id.to_owned(),
            source,
        };
        let raws = {
            let conn = self.conn();
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {LC_COLUMNS} FROM vm_lifecycle WHERE vm_id = ?1 ORDER BY version ASC"
                ))
                .map_err(read_err)?;
            let rows = stmt
                .query_map([id], RawLifecycle::from_row)
                .map_err(read_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(read_err)?
        };
        raws.into_iter().map(RawLifecycle::into_record).collect()
    }

    /// Applies `change` to the latest record and appends the result as a new version.
    fn append(&self, id: &str, change: &mut Change<'_>) -> Result<LifecycleRecord, StateError> {
        let mut conn = self.conn();
        let mut attempt = 1;
        loop {
            match try_append(&mut conn, id, change) {
                Ok(result) => return result,
                Err(e) if is_busy(&e) && attempt < MAX_ATTEMPTS => {
                    tracing::debug!(id, attempt, "lifecycle write busy, retrying");
                    thread::sleep(Duration::from_millis(25 * u64::from(attempt)));
                    attempt += 1;
                }
                Err(source) => {
                    return Err(StateError::LifecycleWrite {
                        id: id.to_owned(),
                        source,
                    })
                }
            }
        }
    }
}

fn latest(conn: &Connection, id: &str) -> rusqlite::Result<Option<RawLifecycle>> {
    conn.query_row(
        &format!(
            "SELECT {LC_COLUMNS} FROM vm_lifecycle WHERE vm_id = ?1 ORDER BY version DESC LIMIT 1"
        ),
        [id],
        RawLifecycle::from_row,
    )
    .optional()
}

/// One attempt. The outer error is SQLite's (retryable if busy); the inner one is a domain
/// error from `change` (the transaction is rolled back on drop).
fn try_append(
    conn: &mut Connection,
    id: &str,
    change: &mut Change<'_>,
) -> rusqlite::Result<Result<LifecycleRecord, StateError>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let prev = match latest(&tx, id)?.map(RawLifecycle::into_record).transpose() {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let mut rec = match change(prev) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let version: u64 = tx.query_row(
        "INSERT INTO vm_lifecycle_head (vm_id, last_version)
         VALUES (?1, COALESCE((SELECT MAX(version) FROM vm_lifecycle WHERE vm_id = ?1), 0) + 1)
         ON CONFLICT(vm_id) DO UPDATE SET last_version = vm_lifecycle_head.last_version + 1
         RETURNING last_version",
        [id],
        |r| r.get(0),
    )?;
    let now = now_rfc3339();
    rec.version = version;
    rec.vm_id = id.to_owned();
    rec.updated_at = now.clone();
    for step in rec.cleanup.values_mut() {
        if step.updated_at.is_empty() {
            step.updated_at = now.clone();
        }
    }
    let ser = |source| StateError::SerializeLifecycle {
        id: id.to_owned(),
        source,
    };
    let resources_json = match serde_json::to_string(&rec.resources).map_err(ser) {
        Ok(j) => j,
        Err(e) => return Ok(Err(e)),
    };
    let cleanup_json = match serde_json::to_string(&rec.cleanup).map_err(ser) {
        Ok(j) => j,
        Err(e) => return Ok(Err(e)),
    };
    tx.execute(
        &format!("INSERT INTO vm_lifecycle ({LC_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
        (
            id,
            version,
            &rec.backend,
            rec.phase.as_str(),
            &rec.updated_at,
            &rec.last_error,
            &resources_json,
            &cleanup_json,
        ),
    )?;
    tx.commit()?;
    Ok(Ok(rec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Arc;

    use crate::testutil::open;

    /// The spec §8.3 table, written out independently of `can_transition_to`.
    const TABLE: &[(&str, &[&str])] = &[
        ("creating", &["created", "create_failed", "cleaning"]),
        ("created", &["starting", "stopping", "cleaning"]),
        (
            "starting",
            &["running", "start_failed", "stopping", "cleaning"],
        ),
        ("running", &["stopping", "cleaning"]),
        ("stopping", &["stopped", "stop_failed", "cleaning"]),
        ("stopped", &["cleaning", "cleaned"]),
        ("cleaning", &["cleaned", "cleanup_failed"]),
        ("create_failed", &["cleaning", "cleanup_failed"]),
        ("start_failed", &["stopping", "cleaning", "cleanup_failed"]),
        ("stop_failed", &["cleaning", "cleanup_failed"]),
        ("cleanup_failed", &["cleaning", "cleaned"]),
        ("cleaned", &[]),
    ];

    fn allowed(from: Phase, to: Phase) -> bool {
        from == to
            || TABLE
                .iter()
                .any(|(f, tos)| *f == from.as_str() && tos.contains(&to.as_str()))
    }

    /// Shortest path of phases from `creating` to `target` (excluding `creating`).
    fn path_to(target: Phase) -> Vec<Phase> {
        let mut prev: BTreeMap<Phase, Phase> = BTreeMap::new();
        let mut queue = VecDeque::from([Phase::Creating]);
        while let Some(p) = queue.pop_front() {
            for n in Phase::ALL {
                if n != Phase::Creating && allowed(p, n) && !prev.contains_key(&n) {
                    prev.insert(n, p);
                    queue.push_back(n);
                }
            }
        }
        let mut path = Vec::new();
        let mut cur = target;
        while cur != Phase::Creating {
            path.push(cur);
            cur = *prev.get(&cur).expect("reachable");
        }
        path.reverse();
        path
    }

    #[test]
    fn phase_strings_roundtrip() {
        for p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>().expect("parse"), p);
            assert_eq!(
                serde_json::to_value(p).expect("json"),
                serde_json::json!(p.as_str())
            );
        }
        assert!("bogus".parse::<Phase>().is_err());
    }

    #[test]
    fn table_matches_spec_exactly() {
        for from in Phase::ALL {
            for to in Phase::ALL {
                assert_eq!(
                    from.can_transition_to(to),
                    allowed(from, to),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn every_allowed_transition_is_accepted_by_the_db() {
        let (_tmp, db) = open();
        let mut n = 0;
        for from in Phase::ALL {
            for to in Phase::ALL.into_iter().filter(|&to| allowed(from, to)) {
                n += 1;
                let id = format!("vm-{n}");
                db.lifecycle_init(&id, "qemu").expect("init");
                for step in path_to(from) {
                    db.lifecycle_transition(&id, step, None).expect("path");
                }
                let rec = db.lifecycle_transition(&id, to, None).expect("allowed");
                assert_eq!(rec.phase, to);
            }
        }
        assert_eq!(n, 40, "12 self transitions + 28 in the table");
    }

    #[test]
    fn forbidden_transitions_are_rejected_and_not_written() {
        let (_tmp, db) = open();
        let cases = [
            (Phase::Creating, Phase::Running),
            (Phase::Created, Phase::Stopped),
            (Phase::Running, Phase::Cleaned),
            (Phase::Cleaned, Phase::Cleaning),
            (Phase::Cleaned, Phase::Creating),
            (Phase::Stopped, Phase::Running),
        ];
        for (i, (from, to)) in cases.into_iter().enumerate() {
            let id = format!("vm-{i}");
            db.lifecycle_init(&id, "qemu").expect("init");
            for step in path_to(from) {
                db.lifecycle_transition(&id, step, None).expect("path");
            }
            let before = db.lifecycle_history(&id).expect("history").len();
            let err = db
                .lifecycle_transition(&id, to, None)
                .expect_err("forbidden");
            assert_eq!(
                err.to_string(),
                format!("invalid lifecycle phase transition \"{from}\" -> \"{to}\"")
            );
            assert_eq!(db.lifecycle_history(&id).expect("history").len(), before);
            assert_eq!(
                db.lifecycle_latest(&id).expect("latest").map(|r| r.phase),
                Some(from)
            );
        }
    }

    #[test]
    fn exited_processes_are_forgotten_and_live_ones_kept() {
        let (_tmp, db) = open();
        db.lifecycle_init("vm-1", "qemu").expect("init");
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let gone = child.id();
        let gone_start = crate::process_start_time(gone).unwrap_or(1);
        child.wait().expect("wait");
        let me = std::process::id();
        let my_start = crate::process_start_time(me).expect("own start time");
        for (pid, start_time) in [(gone, gone_start), (me, my_start), (me, my_start + 1)] {
            db.record_resource(
                "vm-1",
                Resource::Process {
                    pid,
                    start_time,
                    name: "vm".into(),
                },
            )
            .expect("record");
        }
        assert_eq!(db.forget_exited_processes("vm-1").expect("forget"), 2);
        let rec = db
            .lifecycle_latest("vm-1")
            .expect("latest")
            .expect("record");
        let left: Vec<(u32, u64)> = rec
            .resources
            .processes
            .iter()
            .map(|p| (p.pid, p.start_time))
            .collect();
        assert_eq!(left, vec![(me, my_start)]);
    }

    #[test]
    fn init_twice_and_updates_without_init_fail() {
        let (_tmp, db) = open();
        assert!(matches!(
            db.lifecycle_transition("vm-x", Phase::Created, None),
            Err(StateError::LifecycleMissing { .. })
        ));
        assert!(matches!(
            db.record_resource("vm-x", Resource::File("/tmp/x".into())),
            Err(StateError::LifecycleMissing { .. })
        ));
        assert_eq!(db.lifecycle_latest("vm-x").expect("latest"), None);
        db.lifecycle_init("vm-x", "qemu").expect("init");
        assert!(matches!(
            db.lifecycle_init("vm-x", "qemu"),
            Err(StateError::LifecycleExists { .. })
        ));
    }

    #[test]
    fn history_is_append_only_with_increasing_versions() {
        let (_tmp, db) = open();
        let first = db.lifecycle_init("vm-1", "qemu").expect("init");
        assert_eq!((first.version, first.phase), (1, Phase::Creating));
        db.record_resource("vm-1", Resource::File("/d/upper.ext4".into()))
            .expect("file");
        db.record_resource("vm-1", Resource::File("/d/upper.ext4".into()))
            .expect("dup file");
        db.record_resource(
            "vm-1",
            Resource::Process {
                pid: 42,
                start_time: 7,
                name: "qemu".into(),
            },
        )
        .expect("proc");
        db.lifecycle_transition("vm-1", Phase::CreateFailed, Some("boom"))
            .expect("fail");
        db.record_cleanup("vm-1", "rootfs_remove", Ok(()))
            .expect("ok");
        db.record_cleanup("vm-1", "machine_close", Err("stuck".into()))
            .expect("err");
        let history = db.lifecycle_history("vm-1").expect("history");
        let versions: Vec<u64> = history.iter().map(|r| r.version).collect();
        assert_eq!(versions, (1..=7).collect::<Vec<_>>());
        assert!(history
            .windows(2)
            .all(|w| w[0].updated_at <= w[1].updated_at));
        // Older versions are unchanged.
        assert_eq!(history[0].resources, Resources::default());
        assert_eq!(history[0].phase, Phase::Creating);

        let latest = db.lifecycle_latest("vm-1").expect("latest").expect("some");
        assert_eq!(latest, history[6]);
        assert_eq!(latest.backend, "qemu");
        assert_eq!(latest.phase, Phase::CreateFailed);
        assert_eq!(latest.last_error, "boom");
        assert_eq!(latest.resources.files, [PathBuf::from("/d/upper.ext4")]);
        assert_eq!(latest.resources.processes.len(), 1);
        assert_eq!(latest.cleanup["rootfs_remove"].status, CleanupStatus::Ok);
        assert_eq!(latest.cleanup["machine_close"].error, "stuck");

        let v = serde_json::to_value(&latest).expect("json");
        assert_eq!(v["phase"], "create_failed");
        assert_eq!(v["cleanup"]["machine_close"]["status"], "error");
        assert!(v["cleanup"]["rootfs_remove"].get("error").is_none());
        assert_eq!(v["resources"]["processes"][0]["name"], "qemu");

        let back: LifecycleRecord = serde_json::from_value(v).expect("parse back");
        assert_eq!(back, latest);

        // A transition with no error clears it.
        let rec = db
            .lifecycle_transition("vm-1", Phase::Cleaning, None)
            .expect("clean");
        assert_eq!(rec.version, 8);
        assert!(serde_json::to_value(&rec)
            .expect("json")
            .get("last_error")
            .is_none());
    }

    #[test]
    fn concurrent_appends_never_lose_updates() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join(".matchlock");
        let shared = Arc::new(StateDb::open(&root).expect("open"));
        shared.lifecycle_init("vm-1", "qemu").expect("init");
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let root = root.clone();
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let own = StateDb::open(&root).expect("open");
                    for i in 0..15 {
                        let db = if i % 2 == 0 { &own } else { &*shared };
                        db.record_cleanup("vm-1", &format!("step-{t}-{i}"), Ok(()))
                            .expect("append");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("join");
        }
        let history = shared.lifecycle_history("vm-1").expect("history");
        let versions: Vec<u64> = history.iter().map(|r| r.version).collect();
        assert_eq!(versions, (1..=61).collect::<Vec<_>>());
        let latest = shared
            .lifecycle_latest("vm-1")
            .expect("latest")
            .expect("some");
        assert_eq!(latest.cleanup.len(), 60, "every step survives");
    }
    #[test]
    fn append_waits_for_another_writer_holding_the_lock() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join(".matchlock");
        let db = StateDb::open(&root).expect("open");
        db.lifecycle_init("vm-1", "qemu").expect("init");
        // Another "process" takes the write lock and holds it for a while.
        let mut other = Connection::open(root.join("state.db")).expect("raw open");
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let tx = other
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .expect("lock");
            locked_tx.send(()).expect("send");
            std::thread::sleep(Duration::from_millis(300));
            tx.commit().expect("commit");
        });
        locked_rx.recv().expect("locked");
        let started = std::time::Instant::now();
        let rec = db
            .lifecycle_transition("vm-1", Phase::Created, None)
            .expect("append after the lock is released");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(rec.version, 2);
        holder.join().expect("join");
    }
}
