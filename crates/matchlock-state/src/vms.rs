//! VM rows: register, status, get, list, kill, remove.

use std::fmt;
use std::fs;
use std::io;
use std::str::FromStr;

use rusqlite::{OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::db::{create_private_dir, now_rfc3339, with_retry};
use crate::process::{self, process_start_time};
use crate::{redact_config, Phase, StateDb, StateError};

/// Status of a VM row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    /// The owner was alive at the last look.
    Running,
    /// The owner unregistered it cleanly.
    Stopped,
    /// It was `running` but its owner died.
    Crashed,
}

impl VmStatus {
    /// The stored string.
    pub fn as_str(self) -> &'static str {
        match self {
            VmStatus::Running => "running",
            VmStatus::Stopped => "stopped",
            VmStatus::Crashed => "crashed",
        }
    }
}

impl fmt::Display for VmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VmStatus {
    type Err = StateError;

    fn from_str(s: &str) -> Result<Self, StateError> {
        match s {
            "running" => Ok(VmStatus::Running),
            "stopped" => Ok(VmStatus::Stopped),
            "crashed" => Ok(VmStatus::Crashed),
            other => Err(StateError::UnknownStatus {
                value: other.to_owned(),
            }),
        }
    }
}

/// One VM row. Serialises as the `get` JSON: `{id, pid, status, image, created_at, config}`
/// (and parses it back, with `owner_start_time` 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    /// PID of the owning matchlock process (`run`/`rpc`), 0 once stopped.
    pub pid: u32,
    pub status: VmStatus,
    pub image: String,
    /// UTC RFC3339.
    pub created_at: String,
    /// The config given to `register`, with secret values redacted.
    pub config: Value,
    /// Start time of `pid` (clock ticks since boot); tells a reused PID from the owner.
    #[serde(skip)]
    pub owner_start_time: u64,
}

/// Checks that `id` is safe as a directory name: 1-64 characters from `[A-Za-z0-9_.-]`,
/// starting with a letter or digit.
pub fn validate_vm_id(id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(StateError::InvalidId { id: id.to_owned() })
    }
}

const VM_COLUMNS: &str = "id, pid, pid_start_time, status, image, config_json, created_at";

/// A row as stored, before validation of its strings.
struct RawVm {
    id: String,
    pid: u32,
    start_time: u64,
    status: String,
    image: String,
    config_json: Option<String>,
    created_at: String,
}

impl RawVm {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<RawVm> {
        Ok(RawVm {
            id: row.get(0)?,
            pid: row.get(1)?,
            start_time: row.get(2)?,
            status: row.get(3)?,
            image: row.get(4)?,
            config_json: row.get(5)?,
            created_at: row.get(6)?,
        })
    }

    fn into_record(self) -> Result<VmRecord, StateError> {
        let status = self.status.parse()?;
        let config = match self.config_json.as_deref() {
            None | Some("") => Value::Null,
            Some(text) => serde_json::from_str(text).unwrap_or_else(|e| {
                tracing::warn!(id = %self.id, error = %e, "stored config is not valid JSON");
                Value::Null
            }),
        };
        let mut image = self.image;
        if image.is_empty() {
            if let Some(i) = config.get("image").and_then(Value::as_str) {
                image = i.to_owned();
            }
        }
        Ok(VmRecord {
            id: self.id,
            pid: self.pid,
            status,
            image,
            created_at: self.created_at,
            config,
            owner_start_time: self.start_time,
        })
    }
}

impl StateDb {
    /// Records VM `id` as `running`, owned by process `pid` (normally `std::process::id()`),
    /// then creates `vms/<id>/` and `vms/<id>/logs/` (0700). The owner's start time is stored
    /// so that a reused PID is never taken for the owner. Secret values in `config` are
    /// redacted before storing. If the directories cannot be created the row is removed again.
    pub fn register(
        &self,
        id: &str,
        pid: u32,
        image: &str,
        config: &Value,
    ) -> Result<(), StateError> {
        validate_vm_id(id)?;
        let start_time = process_start_time(pid)?;
        let mut config = config.clone();
        redact_config(&mut config);
        let config_json =
            serde_json::to_string(&config).map_err(|source| StateError::SerializeConfig {
                id: id.to_owned(),
                source,
            })?;
        let now = now_rfc3339();
        let inserted = with_retry(&mut self.conn(), |c| {
            c.execute(
                "INSERT INTO vms (id, pid, pid_start_time, status, image, config_json, created_at, updated_at)
                 VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?6)
                 ON CONFLICT(id) DO NOTHING",
                (id, pid, start_time, image, &config_json, &now),
            )
        })
        .map_err(|source| StateError::InsertVm {
            id: id.to_owned(),
            source,
        })?;
        if inserted == 0 {
            return Err(StateError::AlreadyExists { id: id.to_owned() });
        }

        let dir = self.vm_dir(id);
        let logs = dir.join("logs");
        if let Err(source) = create_private_dir(&logs) {
            // Best effort undo; the row is what `gc` would need, so drop it last.
            if let Err(e) = fs::remove_dir_all(&dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(id, error = %e, "cannot remove partial VM directory");
                }
            }
            if let Err(e) = self.delete_rows(id) {
                tracing::warn!(id, error = %e, "cannot remove VM row after failed register");
            }
            return Err(StateError::CreateVmDir { path: logs, source });
        }
        tracing::debug!(id, pid, "registered VM");
        Ok(())
    }

    /// Marks VM `id` as `stopped` with pid 0 (its owner is shutting it down cleanly).
    pub fn set_stopped(&self, id: &str) -> Result<(), StateError> {
        let now = now_rfc3339();
        let changed = with_retry(&mut self.conn(), |c| {
            c.execute(
                "UPDATE vms SET status = 'stopped', pid = 0, pid_start_time = 0, updated_at = ?2
                 WHERE id = ?1",
                (id, &now),
            )
        })
        .map_err(|source| StateError::UpdateStatus {
            id: id.to_owned(),
            source,
        })?;
        if changed == 0 {
            return Err(StateError::NotFound { id: id.to_owned() });
        }
        Ok(())
    }

    /// The row of VM `id`; [`StateError::NotFound`] (`VM <id> not found`) if there is none.
    pub fn get(&self, id: &str) -> Result<VmRecord, StateError> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"),
                [id],
                RawVm::from_row,
            )
            .optional()
            .map_err(|source| StateError::ReadVm {
                id: id.to_owned(),
                source,
            })?;
        raw.ok_or_else(|| StateError::NotFound { id: id.to_owned() })?
            .into_record()
    }

    /// All VMs, newest first. A `running` row whose owner is dead (or was replaced by another
    /// process with the same PID) is returned and persisted as `crashed`.
    pub fn list(&self) -> Result<Vec<VmRecord>, StateError> {
        let raws = {
            let conn = self.conn();
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {VM_COLUMNS} FROM vms ORDER BY created_at DESC, rowid DESC"
                ))
                .map_err(|source| StateError::ListVms { source })?;
            let rows = stmt
                .query_map([], RawVm::from_row)
                .map_err(|source| StateError::ListVms { source })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(|source| StateError::ListVms { source })?
        };
        let mut out = Vec::with_capacity(raws.len());
        for raw in raws {
            let mut rec = raw.into_record()?;
            if rec.status == VmStatus::Running && !self.is_owner_alive(&rec) {
                self.mark_crashed(&rec)?;
                rec.status = VmStatus::Crashed;
            }
            out.push(rec);
        }
        Ok(out)
    }

    /// True if the process recorded as owner of `rec` is alive and is the same process (same
    /// start time), not a zombie and not a stranger that got the PID later.
    pub fn is_owner_alive(&self, rec: &VmRecord) -> bool {
        process::is_alive(rec.pid, rec.owner_start_time)
    }

    /// Sends SIGTERM to the owner of VM `id` (the `run`/`rpc` process, which then closes the VM
    /// in order). [`StateError::NotRunning`] if the VM is not `running` or its owner is gone.
    pub fn kill(&self, id: &str) -> Result<(), StateError> {
        let rec = self.get(id)?;
        if rec.status != VmStatus::Running || rec.pid == 0 {
            return Err(StateError::NotRunning { id: id.to_owned() });
        }
        if !process::terminate(rec.pid, rec.owner_start_time)? {
            return Err(StateError::NotRunning { id: id.to_owned() });
        }
        tracing::info!(id, pid = rec.pid, "sent SIGTERM to VM owner");
        Ok(())
    }

    /// Waits until the owner of VM `id` has exited (it stops the VM and cleans up before it
    /// exits); false if it is still alive after `timeout`.
    pub fn wait_stopped(&self, id: &str, timeout: std::time::Duration) -> Result<bool, StateError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let rec = self.get(id)?;
            if !self.is_owner_alive(&rec) {
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Removes VM `id`: its directory, its row and its lifecycle history. Refuses while the
    /// owner is alive ([`StateError::RemoveRunning`]). If lifecycle records exist and are not
    /// `cleaned`, reconciles first and refuses ([`StateError::CleanupIncomplete`]) when some
    /// recorded resource could not be reclaimed, keeping every row so `gc` can retry.
    pub fn remove(&self, id: &str) -> Result<(), StateError> {
        let rec = self.get(id)?;
        validate_vm_id(id)?;
        if rec.status == VmStatus::Running {
            if self.is_owner_alive(&rec) {
                return Err(StateError::RemoveRunning { id: id.to_owned() });
            }
            self.mark_crashed(&rec)?;
        }
        let needs_cleanup = self
            .lifecycle_latest(id)?
            .is_some_and(|l| l.phase != Phase::Cleaned);
        if needs_cleanup {
            let report = self.reconcile(id, false)?;
            if report.skipped.is_some() {
                return Err(StateError::RemoveRunning { id: id.to_owned() });
            }
            if !report.failed.is_empty() {
                let items = report.failed.keys().cloned().collect::<Vec<_>>().join(", ");
                return Err(StateError::CleanupIncomplete {
                    id: id.to_owned(),
                    items,
                });
            }
        }
        // Directory first: if deleting rows then fails, the row still points at what is left.
        let dir = self.vm_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(StateError::RemoveVmDir { path: dir, source }),
        }
        self.delete_rows(id)?;
        tracing::debug!(id, "removed VM");
        Ok(())
    }

    /// `running` -> `crashed`, only if the row still has the owner we judged dead.
    pub(crate) fn mark_crashed(&self, rec: &VmRecord) -> Result<(), StateError> {
        let now = now_rfc3339();
        with_retry(&mut self.conn(), |c| {
            c.execute(
                "UPDATE vms SET status = 'crashed', updated_at = ?4
                 WHERE id = ?1 AND status = 'running' AND pid = ?2 AND pid_start_time = ?3",
                (&rec.id, rec.pid, rec.owner_start_time, &now),
            )
        })
        .map_err(|source| StateError::UpdateStatus {
            id: rec.id.clone(),
            source,
        })?;
        tracing::info!(id = %rec.id, pid = rec.pid, "VM owner is gone, marked crashed");
        Ok(())
    }

    /// Deletes the VM row and its lifecycle rows in one transaction.
    fn delete_rows(&self, id: &str) -> Result<(), StateError> {
        with_retry(&mut self.conn(), |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM vms WHERE id = ?1", [id])?;
            tx.execute("DELETE FROM vm_lifecycle WHERE vm_id = ?1", [id])?;
            tx.execute("DELETE FROM vm_lifecycle_head WHERE vm_id = ?1", [id])?;
            tx.commit()
        })
        .map_err(|source| StateError::DeleteVm {
            id: id.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::ExitStatusExt;
    use std::sync::Arc;
    use std::thread;

    use crate::testutil::open;

    use crate::testutil::sleeper;

    fn me() -> u32 {
        std::process::id()
    }

    #[test]
    fn register_get_list_remove_roundtrip() {
        let (_tmp, db) = open();
        let cfg = json!({"image": "alpine:latest", "env": {"A": "1"}});
        db.register("vm-00000001", me(), "alpine:latest", &cfg)
            .expect("register");
        let dir = db.vm_dir("vm-00000001");
        for d in [dir.clone(), dir.join("logs"), db.root().join("vms")] {
            let mode = fs::metadata(&d).expect("dir").permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        let rec = db.get("vm-00000001").expect("get");
        assert_eq!(rec.id, "vm-00000001");
        assert_eq!(rec.pid, me());
        assert_eq!(rec.status, VmStatus::Running);
        assert_eq!(rec.image, "alpine:latest");
        assert_eq!(rec.config, cfg);
        assert!(db.is_owner_alive(&rec));
        let v = serde_json::to_value(&rec).expect("json");
        let keys: Vec<_> = v.as_object().expect("object").keys().cloned().collect();
        assert_eq!(keys.len(), 6, "{keys:?}");
        assert_eq!(v["status"], "running");
        assert_eq!(v["config"]["env"]["A"], "1");

        let list = db.list().expect("list");
        assert_eq!(list.len(), 1);
        assert_eq!(
            list[0].status,
            VmStatus::Running,
            "live owner stays running"
        );

        let err = db.remove("vm-00000001").expect_err("live VM");
        assert_eq!(
            err.to_string(),
            "cannot remove running VM vm-00000001, kill it first"
        );
        db.set_stopped("vm-00000001").expect("stop");
        let rec = db.get("vm-00000001").expect("get");
        assert_eq!((rec.status, rec.pid), (VmStatus::Stopped, 0));
        assert!(!db.is_owner_alive(&rec));
        db.remove("vm-00000001").expect("remove");
        assert!(!dir.exists());
        assert!(db.list().expect("list").is_empty());
        assert!(matches!(
            db.get("vm-00000001"),
            Err(StateError::NotFound { .. })
        ));
    }

    #[test]
    fn not_found_messages() {
        let (_tmp, db) = open();
        let msg = "VM vm-nope not found";
        assert_eq!(db.get("vm-nope").expect_err("get").to_string(), msg);
        assert_eq!(
            db.set_stopped("vm-nope").expect_err("stop").to_string(),
            msg
        );
        assert_eq!(db.kill("vm-nope").expect_err("kill").to_string(), msg);
        assert_eq!(db.remove("vm-nope").expect_err("rm").to_string(), msg);
        assert_eq!(
            db.reconcile("vm-nope", true).expect_err("gc").to_string(),
            msg
        );
    }

    #[test]
    fn register_rejects_bad_ids_duplicates_and_dead_owners() {
        let (_tmp, db) = open();
        for bad in ["", "../x", "a/b", ".hidden", "x y", &"a".repeat(65)] {
            assert!(
                matches!(
                    db.register(bad, me(), "", &Value::Null),
                    Err(StateError::InvalidId { .. })
                ),
                "{bad:?}"
            );
        }
        db.register("vm-1", me(), "", &Value::Null).expect("first");
        assert_eq!(
            db.register("vm-1", me(), "", &Value::Null)
                .expect_err("dup")
                .to_string(),
            "VM vm-1 already exists"
        );
        let mut child = sleeper();
        let pid = child.id();
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(db.register("vm-2", pid, "", &Value::Null).is_err());
        assert!(matches!(db.get("vm-2"), Err(StateError::NotFound { .. })));
    }

    #[test]
    fn image_recovered_from_config_when_column_empty() {
        let (_tmp, db) = open();
        db.register("vm-1", me(), "", &json!({"image": "busybox"}))
            .expect("register");
        assert_eq!(db.get("vm-1").expect("get").image, "busybox");
    }

    #[test]
    fn list_marks_dead_owner_crashed_and_persists_it() {
        let (_tmp, db) = open();
        let mut child = sleeper();
        db.register("vm-dead", child.id(), "img", &Value::Null)
            .expect("register");
        db.register("vm-live", me(), "img", &Value::Null)
            .expect("register");
        child.kill().expect("kill");
        child.wait().expect("wait");
        let list = db.list().expect("list");
        let ids: Vec<_> = list.iter().map(|r| (r.id.as_str(), r.status)).collect();
        // Newest first.
        assert_eq!(
            ids,
            [
                ("vm-live", VmStatus::Running),
                ("vm-dead", VmStatus::Crashed)
            ]
        );
        assert_eq!(db.get("vm-dead").expect("get").status, VmStatus::Crashed);
        assert_eq!(
            db.kill("vm-dead").expect_err("kill").to_string(),
            "VM vm-dead is not running"
        );
        // A crashed VM without lifecycle can be removed.
        db.remove("vm-dead").expect("remove");
    }

    #[test]
    fn zombie_owner_counts_as_dead() {
        let (_tmp, db) = open();
        let mut child = sleeper();
        db.register("vm-z", child.id(), "", &Value::Null)
            .expect("register");
        child.kill().expect("kill");
        // Not reaped yet: a zombie; wait until the kernel has made it one.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while db.is_owner_alive(&db.get("vm-z").expect("get")) {
            assert!(
                std::time::Instant::now() < deadline,
                "never became a zombie"
            );
            thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(db.list().expect("list")[0].status, VmStatus::Crashed);
        child.wait().expect("wait");
    }

    #[test]
    fn reused_pid_is_not_the_owner() {
        let (_tmp, db) = open();
        let mut child = sleeper();
        db.register("vm-1", child.id(), "", &Value::Null)
            .expect("register");
        // Simulate PID reuse: same PID, different start time than recorded.
        db.conn()
            .execute(
                "UPDATE vms SET pid_start_time = pid_start_time + 1 WHERE id = 'vm-1'",
                [],
            )
            .expect("tamper");
        let rec = db.get("vm-1").expect("get");
        assert!(!db.is_owner_alive(&rec));
        assert!(matches!(
            db.kill("vm-1"),
            Err(StateError::NotRunning { .. })
        ));
        assert_eq!(db.list().expect("list")[0].status, VmStatus::Crashed);
        // The stranger was not signalled.
        assert!(child.try_wait().expect("try_wait").is_none());
        child.kill().expect("kill");
        child.wait().expect("wait");
    }

    #[test]
    fn kill_sends_sigterm_to_live_owner() {
        let (_tmp, db) = open();
        let mut child = sleeper();
        db.register("vm-1", child.id(), "", &Value::Null)
            .expect("register");
        db.kill("vm-1").expect("kill");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(15));
        db.set_stopped("vm-1").expect("stop");
        assert_eq!(
            db.kill("vm-1").expect_err("stopped").to_string(),
            "VM vm-1 is not running"
        );
    }

    #[test]
    fn secrets_are_never_stored() {
        let (_tmp, db) = open();
        let cfg =
            json!({"network": {"secrets": {"API": {"value": "sk-supersecret", "hosts": ["a.b"]}}}});
        db.register("vm-1", me(), "", &cfg).expect("register");
        let rec = db.get("vm-1").expect("get");
        assert_eq!(
            rec.config["network"]["secrets"]["API"]["value"],
            "[redacted]"
        );
        assert_eq!(rec.config["network"]["secrets"]["API"]["hosts"][0], "a.b");
        let raw: String = db
            .conn()
            .query_row("SELECT config_json FROM vms WHERE id = 'vm-1'", [], |r| {
                r.get(0)
            })
            .expect("raw");
        assert!(!raw.contains("sk-supersecret"), "{raw}");
    }

    #[test]
    fn concurrent_writers_from_threads_and_handles() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join(".matchlock");
        let shared = Arc::new(StateDb::open(&root).expect("open"));
        let mut handles = Vec::new();
        for t in 0..4 {
            let root = root.clone();
            let shared = Arc::clone(&shared);
            handles.push(thread::spawn(move || {
                // Half the threads use their own connection, like separate CLI processes.
                let own;
                let db: &StateDb = if t % 2 == 0 {
                    own = StateDb::open(&root).expect("open");
                    &own
                } else {
                    &shared
                };
                for i in 0..10 {
                    let id = format!("vm-{t}-{i}");
                    db.register(&id, std::process::id(), "img", &Value::Null)
                        .expect("register");
                    db.set_stopped(&id).expect("stop");
                    db.list().expect("list");
                }
            }));
        }
        for h in handles {
            h.join().expect("join");
        }
        let list = shared.list().expect("list");
        assert_eq!(list.len(), 40);
        assert!(list.iter().all(|r| r.status == VmStatus::Stopped));
    }
}
