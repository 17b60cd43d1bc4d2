//! Reconciliation: reclaim every recorded host resource of a VM whose owner is gone.
//!
//! # Design
//! Only what was recorded is touched, and a recorded process is killed only if it is still
//! the *same* process (PID and start time), so `gc` can run at any time without harming
//! strangers. Processes are killed before files are removed (they may hold them open).
//! Every item gets a cleanup step in the lifecycle; the phase ends `cleaned` or
//! `cleanup_failed`. Running it again is harmless: gone things are not reported.
//!
//! # Limitations
//! A process that survives SIGKILL for 2 s (uninterruptible sleep) is reported as failed;
//! the next `gc` retries it.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::process;
use crate::{Phase, StateDb, StateError, VmStatus};

/// How long a SIGKILLed process may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// What `reconcile` did. Items are `process:<name>:<pid>` and `file:<path>`, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// Items reclaimed.
    pub cleaned: Vec<String>,
    /// Items that could not be reclaimed, with the error.
    pub failed: BTreeMap<String, String>,
    /// Why nothing was done (`"VM is running"`). A skip counts as an error for `gc`/`rm`.
    pub skipped: Option<String>,
}

impl ReconcileReport {
    /// True if nothing was skipped and nothing failed.
    pub fn is_success(&self) -> bool {
        self.skipped.is_none() && self.failed.is_empty()
    }
}

/// `SKIPPED_RUNNING` is the `skipped` reason when the owner is alive.
pub const SKIPPED_RUNNING: &str = "VM is running";

impl StateDb {
    /// Reclaims the recorded resources of VM `id` (spec §8.5, improved).
    ///
    /// - [`StateError::NotFound`] if there is no such VM.
    /// - If its owner is alive and `force_running` is false: nothing is done and
    ///   `skipped = Some("VM is running")` (callers treat that as an error).
    /// - Otherwise a dead `running` row becomes `crashed`, the lifecycle goes to `cleaning`
    ///   (a lifecycle with backend `unknown` is created if there is none), each recorded
    ///   process still alive with its recorded start time is SIGKILLed, each recorded file or
    ///   directory that exists is removed, each item becomes a cleanup step, and the phase
    ///   ends `cleaned` or `cleanup_failed` (with the joined errors).
    pub fn reconcile(&self, id: &str, force_running: bool) -> Result<ReconcileReport, StateError> {
        let rec = self.get(id)?;
        let mut report = ReconcileReport::default();
        if rec.status == VmStatus::Running {
            if self.is_owner_alive(&rec) {
                if !force_running {
                    report.skipped = Some(SKIPPED_RUNNING.to_owned());
                    return Ok(report);
                }
            } else {
                self.mark_crashed(&rec)?;
            }
        }

        let lc = match self.lifecycle_latest(id)? {
            Some(lc) => lc,
            None => self.lifecycle_init(id, "unknown")?,
        };
        // `cleaned` may not go back to `cleaning`; it still gets swept (idempotent).
        let was_cleaned = lc.phase == Phase::Cleaned;
        if !was_cleaned {
            self.lifecycle_transition(id, Phase::Cleaning, None)?;
        }

        let mut steps: Vec<(String, Result<(), String>)> = Vec::new();
        for p in &lc.resources.processes {
            if !process::is_alive(p.pid, p.start_time) {
                continue;
            }
            let item = format!("process:{}:{}", p.name, p.pid);
            match process::kill_and_wait(p.pid, p.start_time, KILL_WAIT) {
                Ok(true) => steps.push((item, Ok(()))),
                Ok(false) => {} // exited on its own meanwhile
                Err(e) => steps.push((item, Err(error_chain(&e)))),
            }
        }
        for path in &lc.resources.files {
            let item = format!("file:{}", path.display());
            match remove_path(path) {
                Ok(true) => steps.push((item, Ok(()))),
                Ok(false) => {}
                Err(e) => steps.push((item, Err(e.to_string()))),
            }
        }

        for (item, result) in &steps {
            self.record_cleanup(id, item, result.clone())?;
            match result {
                Ok(()) => report.cleaned.push(item.clone()),
                Err(e) => {
                    report.failed.insert(item.clone(), e.clone());
                }
            }
        }
        report.cleaned.sort();

        if report.failed.is_empty() {
            self.lifecycle_transition(id, Phase::Cleaned, None)?;
        } else {
            let joined = report
                .failed
                .iter()
                .map(|(item, e)| format!("{item}: {e}"))
                .collect::<Vec<_>>()
                .join("; ");
            if was_cleaned {
                tracing::warn!(id, errors = %joined, "cleanup of a cleaned VM failed");
            } else {
                self.lifecycle_transition(id, Phase::CleanupFailed, Some(&joined))?;
            }
        }
        tracing::debug!(
            id,
            cleaned = report.cleaned.len(),
            failed = report.failed.len(),
            "reconciled"
        );
        Ok(report)
    }
}

/// Removes a file, symlink (not its target) or directory tree; `Ok(false)` if absent.
fn remove_path(path: &Path) -> io::Result<bool> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let res = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match res {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// `error: source: source...`, for storing in a cleanup step.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{process_start_time, CleanupStatus, Resource};
    use serde_json::Value;
    use std::os::unix::process::ExitStatusExt;

    use crate::testutil::open;

    use crate::testutil::sleeper;

    /// Registers `id` with an owner that is already dead (a reaped child).
    fn register_crashed(db: &StateDb, id: &str) {
        let mut owner = sleeper();
        db.register(id, owner.id(), "img", &Value::Null)
            .expect("register");
        owner.kill().expect("kill");
        owner.wait().expect("wait");
    }

    #[test]
    fn kills_recorded_live_process_and_removes_recorded_files() {
        let (tmp, db) = open();
        register_crashed(&db, "vm-1");
        db.lifecycle_init("vm-1", "qemu").expect("init");
        let dir = db.vm_dir("vm-1");
        let disk = dir.join("upper.ext4");
        let overlay = dir.join("overlay");
        let outside = tmp.path().join("matchlock-layer-1.tar");
        let never_created = dir.join("vsock.sock");
        for f in [&disk, &overlay, &outside, &never_created] {
            db.record_resource("vm-1", Resource::File(f.clone()))
                .expect("record file");
        }
        fs::write(&disk, b"disk").expect("disk");
        fs::create_dir_all(overlay.join("mount-000/sub")).expect("overlay");
        fs::write(overlay.join("mount-000/sub/f"), b"x").expect("overlay file");
        fs::write(&outside, b"tar").expect("outside");
        let mut qemu = sleeper();
        db.record_resource(
            "vm-1",
            Resource::Process {
                pid: qemu.id(),
                start_time: process_start_time(qemu.id()).expect("start"),
                name: "qemu".into(),
            },
        )
        .expect("record process");

        let report = db.reconcile("vm-1", false).expect("reconcile");
        assert_eq!(report.skipped, None);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let mut expected = vec![
            format!("file:{}", disk.display()),
            format!("file:{}", overlay.display()),
            format!("file:{}", outside.display()),
            format!("process:qemu:{}", qemu.id()),
        ];
        expected.sort();
        assert_eq!(report.cleaned, expected);
        assert!(report.is_success());
        assert_eq!(qemu.wait().expect("wait").signal(), Some(9));
        for f in [&disk, &overlay, &outside] {
            assert!(!f.exists(), "{}", f.display());
        }
        assert!(dir.join("logs").exists(), "unrecorded files are left alone");

        let lc = db.lifecycle_latest("vm-1").expect("latest").expect("some");
        assert_eq!(lc.phase, Phase::Cleaned);
        assert_eq!(lc.cleanup.len(), 4);
        assert!(lc.cleanup.values().all(|s| s.status == CleanupStatus::Ok));
        let phases: Vec<Phase> = db
            .lifecycle_history("vm-1")
            .expect("history")
            .iter()
            .map(|r| r.phase)
            .collect();
        assert!(phases.contains(&Phase::Cleaning));
        assert_eq!(db.get("vm-1").expect("get").status, VmStatus::Crashed);

        // Idempotent: a second run finds nothing to do.
        let again = db.reconcile("vm-1", false).expect("again");
        assert!(again.cleaned.is_empty() && again.is_success());
        db.remove("vm-1").expect("remove");
        assert!(db.lifecycle_history("vm-1").expect("history").is_empty());
    }

    #[test]
    fn process_with_other_start_time_is_left_alone() {
        let (_tmp, db) = open();
        register_crashed(&db, "vm-1");
        db.lifecycle_init("vm-1", "qemu").expect("init");
        let mut stranger = sleeper();
        let st = process_start_time(stranger.id()).expect("start");
        db.record_resource(
            "vm-1",
            Resource::Process {
                pid: stranger.id(),
                start_time: st + 1,
                name: "qemu".into(),
            },
        )
        .expect("record");
        let report = db.reconcile("vm-1", false).expect("reconcile");
        assert!(report.cleaned.is_empty() && report.is_success());
        assert!(
            stranger.try_wait().expect("try_wait").is_none(),
            "stranger killed"
        );
        stranger.kill().expect("kill");
        stranger.wait().expect("wait");
    }

    #[test]
    fn live_owner_is_skipped_unless_forced() {
        let (tmp, db) = open();
        db.register("vm-1", std::process::id(), "img", &Value::Null)
            .expect("register");
        db.lifecycle_init("vm-1", "qemu").expect("init");
        let f = tmp.path().join("leak");
        db.record_resource("vm-1", Resource::File(f.clone()))
            .expect("record");
        fs::write(&f, b"x").expect("write");

        let report = db.reconcile("vm-1", false).expect("reconcile");
        assert_eq!(report.skipped.as_deref(), Some(SKIPPED_RUNNING));
        assert!(!report.is_success());
        assert!(f.exists());
        assert_eq!(db.lifecycle_history("vm-1").expect("history").len(), 2);

        let report = db.reconcile("vm-1", true).expect("forced");
        assert_eq!(report.skipped, None);
        assert_eq!(report.cleaned, [format!("file:{}", f.display())]);
        assert!(!f.exists());
        assert_eq!(db.get("vm-1").expect("get").status, VmStatus::Running);
    }

    #[test]
    fn nothing_recorded_gives_empty_report_and_unknown_backend() {
        let (_tmp, db) = open();
        register_crashed(&db, "vm-1");
        let report = db.reconcile("vm-1", false).expect("reconcile");
        assert_eq!(report, ReconcileReport::default());
        let lc = db.lifecycle_latest("vm-1").expect("latest").expect("some");
        assert_eq!((lc.backend.as_str(), lc.phase), ("unknown", Phase::Cleaned));
    }

    #[test]
    fn failures_are_reported_recorded_and_block_remove() {
        let (tmp, db) = open();
        register_crashed(&db, "vm-1");
        db.lifecycle_init("vm-1", "qemu").expect("init");
        // A path under a regular file: lstat fails with ENOTDIR, never NotFound.
        let file = tmp.path().join("plain");
        fs::write(&file, b"x").expect("write");
        let bad = file.join("child");
        db.record_resource("vm-1", Resource::File(bad.clone()))
            .expect("record");

        let report = db.reconcile("vm-1", false).expect("reconcile");
        let item = format!("file:{}", bad.display());
        assert!(report.failed.contains_key(&item), "{report:?}");
        let lc = db.lifecycle_latest("vm-1").expect("latest").expect("some");
        assert_eq!(lc.phase, Phase::CleanupFailed);
        assert!(lc.last_error.contains(&item), "{}", lc.last_error);
        assert_eq!(lc.cleanup[&item].status, CleanupStatus::Error);

        let err = db.remove("vm-1").expect_err("must keep metadata");
        assert!(matches!(err, StateError::CleanupIncomplete { .. }), "{err}");
        assert!(db.get("vm-1").is_ok());
        assert!(db.vm_dir("vm-1").exists());

        // Once the obstacle is gone, remove reconciles and succeeds.
        fs::remove_file(&file).expect("rm");
        db.remove("vm-1").expect("remove");
        assert!(matches!(db.get("vm-1"), Err(StateError::NotFound { .. })));
    }

    #[test]
    fn remove_reclaims_resources_left_by_an_unclean_stop() {
        let (tmp, db) = open();
        db.register("vm-1", std::process::id(), "img", &Value::Null)
            .expect("register");
        db.lifecycle_init("vm-1", "qemu").expect("init");
        let f = tmp.path().join("matchlock-build-output-1");
        db.record_resource("vm-1", Resource::File(f.clone()))
            .expect("record");
        fs::write(&f, b"x").expect("write");
        db.set_stopped("vm-1").expect("stop");
        db.remove("vm-1").expect("remove");
        assert!(!f.exists());
    }
}
