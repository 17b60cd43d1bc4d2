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
