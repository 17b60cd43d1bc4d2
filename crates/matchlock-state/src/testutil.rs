//! Fixtures shared by this crate's unit tests.

use std::process::{Child, Command};

use crate::StateDb;

/// A fresh state DB under a temp dir (keep the dir alive as long as the DB).
pub(crate) fn open() -> (tempfile::TempDir, StateDb) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = StateDb::open(&tmp.path().join(".matchlock")).expect("open");
    (tmp, db)
}

/// A long-lived child process to stand in for an owner or a VM helper.
pub(crate) fn sleeper() -> Child {
    Command::new("sleep")
        .arg("1000")
        .spawn()
        .expect("spawn sleep")
}
