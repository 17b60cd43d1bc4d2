//! Opening the database: directory, init lock, pragmas, migrations; shared helpers.
//!
//! # Design
//! - Everything under the state root is owner-only: directories 0700, files 0600. The root
//!   holds sandbox configs, exec sockets and logs, which other local users must not read.
//!   Opening the database creates the root 0700 and tightens what an older version, a
//!   different umask or a user left looser: the root and its files, `vms/`, each VM
//!   directory, its `logs/` and the log files in it. Symlinks are never followed or changed.
//!
//! # Limitations
//! - Tightening is by mode bits only (no ACLs); files deeper in a VM directory (disks,
//!   sockets) are created private by their owners and not revisited.

use std::fs::{self, DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use rustix::fs::{flock, FlockOperation};
use time::macros::format_description;
use time::OffsetDateTime;

use crate::StateError;

/// How long a connection waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts for a write that still sees SQLITE_BUSY/LOCKED after the busy timeout.
pub(crate) const MAX_ATTEMPTS: u32 = 8;

struct Migration {
    module: &'static str,
    version: u32,
    name: &'static str,
    sql: &'static str,
}

/// All migrations, applied in this order (module, version). Never edit one that shipped.
const MIGRATIONS: &[Migration] = &[
    Migration {
        module: "state",
        version: 1,
        name: "create_vms",
        sql: "CREATE TABLE vms (
                id TEXT PRIMARY KEY,
                pid INTEGER NOT NULL DEFAULT 0,
                pid_start_time INTEGER NOT NULL DEFAULT 0,
                status TEXT NOT NULL,
                image TEXT NOT NULL DEFAULT '',
                config_json TEXT,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL
              );
              CREATE INDEX idx_vms_status ON vms(status);
              CREATE INDEX idx_vms_created_at ON vms(created_at);",
    },
    Migration {
        module: "lifecycle",
        version: 1,
        name: "create_append_only_vm_lifecycle_table",
        sql: "CREATE TABLE vm_lifecycle (
                vm_id TEXT NOT NULL,
                version INTEGER NOT NULL,
                backend TEXT NOT NULL DEFAULT '',
                phase TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                last_error TEXT NOT NULL DEFAULT '',
                resources_json TEXT NOT NULL DEFAULT '{}',
                cleanup_json TEXT NOT NULL DEFAULT '{}',
                PRIMARY KEY (vm_id, version)
              );
              CREATE INDEX idx_vm_lifecycle_phase ON vm_lifecycle(phase);
              CREATE INDEX idx_vm_lifecycle_vm_version ON vm_lifecycle(vm_id, version DESC);",
    },
    Migration {
        module: "lifecycle",
        version: 2,
        name: "create_vm_lifecycle_head",
        sql: "CREATE TABLE vm_lifecycle_head (
                vm_id TEXT PRIMARY KEY,
                last_version INTEGER NOT NULL
              );",
    },
];

/// Handle on `<root>/state.db`. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct StateDb {
    root: PathBuf,
    conn: Mutex<Connection>,
}

impl StateDb {
    /// Opens (creating if needed) `<root>/state.db`. Creates `root` with mode 0700, sets WAL
    /// mode and a 15 s busy timeout, and applies pending migrations under an exclusive flock on
    /// `<root>/state.db.init.lock`.
    pub fn open(root: &Path) -> Result<StateDb, StateError> {
        StateDb::ensure_private_dir(root).map_err(|source| StateError::CreateRoot {
            path: root.to_path_buf(),
            source,
        })?;
        tighten_state_tree(root);
        let db_path = root.join("state.db");
        let lock_path = root.join("state.db.init.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| StateError::OpenInitLock {
                path: lock_path.clone(),
                source,
            })?;
        flock(&lock, FlockOperation::LockExclusive).map_err(|e| StateError::LockInit {
            path: lock_path.clone(),
            source: e.into(),
        })?;

        let mut conn = Connection::open(&db_path).map_err(|source| StateError::OpenDb {
            path: db_path.clone(),
            source,
        })?;
        // The db holds sandbox configs: owner-only, like the rest of the root.
        fs::set_permissions(&db_path, fs::Permissions::from_mode(0o600)).map_err(|source| {
            StateError::ChmodDb {
                path: db_path.clone(),
                source,
            }
        })?;
        configure(&conn)?;
        migrate(&mut conn)?;
        // Dropping `lock` closes the fd, which releases the flock.
        drop(lock);
        Ok(StateDb {
            root: root.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// Creates `path` (and missing parents) 0700; an existing directory that grants group or
    /// other users anything is set to 0700. A symlink is left alone.
    pub fn ensure_private_dir(path: &Path) -> std::io::Result<()> {
        create_private_dir(path)?;
        tighten(path, 0o700)
    }

    /// The state root given to [`StateDb::open`].
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/vms/<id>`: the VM's private state directory.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.root.join("vms").join(id)
    }

    /// A fresh id: `vm-` followed by 8 random lowercase hex digits.
    pub fn new_vm_id() -> String {
        format!("vm-{:08x}", rand::random::<u32>())
    }

    /// The connection; a poisoned mutex is recovered (SQLite state is transactional, so a
    /// panic in another thread cannot leave it half-written).
    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Creates `path` (and missing parents) with mode 0700; an existing directory is fine.
pub(crate) fn create_private_dir(path: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// Sets `mode` on `path` if it grants group or other users anything. Left alone: symlinks,
/// vanished paths, paths owned by another user and shared sticky directories like `/tmp`
/// (never ours to tighten, even as root).
fn tighten(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let current = meta.permissions().mode();
    let ours = meta.uid() == rustix::process::geteuid().as_raw();
    if !ours || meta.file_type().is_symlink() || current & 0o1000 != 0 || current & 0o077 == 0 {
        return Ok(());
    }
    tracing::info!(path = %path.display(), from = format!("{:o}", meta.permissions().mode() & 0o7777), to = format!("{mode:o}"), "tightening permissions");
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Directories 0700 and files 0600 for `dir`'s direct entries (sockets keep their mode).
fn tighten_entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut subdirs = Vec::new();
    for entry in rd.flatten() {
        let path = entry.path();
        let Ok(ft) = entry.file_type() else { continue };
        let res = if ft.is_dir() {
            subdirs.push(path.clone());
            tighten(&path, 0o700)
        } else if ft.is_file() {
            tighten(&path, 0o600)
        } else {
            Ok(())
        };
        if let Err(e) = res {
            tracing::warn!(path = %path.display(), error = %e, "cannot tighten permissions");
        }
    }
    subdirs
}

/// Tightens the root's files, `vms/`, every VM directory, its `logs/` and the logs in it.
fn tighten_state_tree(root: &Path) {
    tighten_entries(root);
    for vm in tighten_entries(&root.join("vms")) {
        tighten_entries(&vm);
        tighten_entries(&vm.join("logs"));
    }
}

fn configure(conn: &Connection) -> Result<(), StateError> {
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|source| StateError::ConfigureDb {
            setting: "busy_timeout",
            source,
        })?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(|source| StateError::ConfigureDb {
            setting: "foreign_keys",
            source,
        })?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|source| StateError::ConfigureDb {
            setting: "synchronous",
            source,
        })?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
        .map_err(|source| StateError::ConfigureDb {
            setting: "journal_mode",
            source,
        })?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), StateError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            module TEXT NOT NULL,
            version INTEGER NOT NULL,
            name TEXT NOT NULL,
            applied_at TEXT NOT NULL,
            PRIMARY KEY (module, version)
        );",
    )
    .map_err(|source| StateError::Migrate {
        module: "schema",
        version: 0,
        name: "create_schema_migrations",
        source,
    })?;
    for m in MIGRATIONS {
        apply(conn, m).map_err(|source| StateError::Migrate {
            module: m.module,
            version: m.version,
            name: m.name,
            source,
        })?;
    }
    Ok(())
}

/// Applies one migration in its own transaction unless already recorded.
fn apply(conn: &mut Connection, m: &Migration) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied = tx
        .query_row(
            "SELECT 1 FROM schema_migrations WHERE module = ?1 AND version = ?2",
            (m.module, m.version),
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if applied {
        return tx.commit();
    }
    tx.execute_batch(m.sql)?;
    tx.execute(
        "INSERT INTO schema_migrations (module, version, name, applied_at) VALUES (?1, ?2, ?3, ?4)",
        (m.module, m.version, m.name, now_rfc3339()),
    )?;
    tracing::debug!(
        module = m.module,
        version = m.version,
        name = m.name,
        "applied migration"
    );
    tx.commit()
}

/// True for errors worth retrying: another connection holds the lock.
pub(crate) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Runs `f` up to [`MAX_ATTEMPTS`] times while it fails with SQLITE_BUSY/LOCKED, sleeping
/// 25 ms × attempt in between.
pub(crate) fn with_retry<T>(
    conn: &mut Connection,
    mut f: impl FnMut(&mut Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let mut attempt = 1;
    loop {
        match f(conn) {
            Err(e) if is_busy(&e) && attempt < MAX_ATTEMPTS => {
                tracing::debug!(attempt, "database busy, retrying");
                thread::sleep(Duration::from_millis(25 * u64::from(attempt)));
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Now, UTC, RFC3339 with exactly nine fractional digits (so lexical order = time order).
pub(crate) fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
        ))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_creates_private_root_and_reopen_is_idempotent() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("a/b/.matchlock");
        let db = StateDb::open(&root).expect("open");
        let mode = fs::metadata(&root).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let mode = fs::metadata(root.join("state.db"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let count = |db: &StateDb| -> i64 {
            db.conn()
                .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
                .expect("count")
        };
        assert_eq!(count(&db), MIGRATIONS.len() as i64);
        let mode: String = db
            .conn()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, "wal");
        drop(db);
        let db = StateDb::open(&root).expect("reopen");
        assert_eq!(count(&db), MIGRATIONS.len() as i64);
    }

    #[test]
    fn open_tightens_loose_root_files_and_logs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join(".matchlock");
        let vm = root.join("vms/vm-0000abcd");
        let logs = vm.join("logs");
        fs::create_dir_all(&logs).expect("mkdir");
        let loose_dirs = [root.clone(), root.join("vms"), vm.clone(), logs.clone()];
        for d in &loose_dirs {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let loose_files = [
            root.join("state.db"),
            root.join("detach-42.log"),
            logs.join("vm.log"),
        ];
        for f in &loose_files {
            fs::write(f, b"").expect("write");
            fs::set_permissions(f, fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        // A symlink in the tree is not followed: its target keeps its mode.
        let outside = tmp.path().join("outside.txt");
        fs::write(&outside, b"x").expect("write");
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).expect("chmod");
        std::os::unix::fs::symlink(&outside, logs.join("link.log")).expect("symlink");

        let _db = StateDb::open(&root).expect("open");
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        for d in &loose_dirs {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        for f in &loose_files {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        for f in ["state.db-wal", "state.db-shm", "state.db.init.lock"] {
            let p = root.join(f);
            if p.exists() {
                assert_eq!(mode(&p), 0o600, "{}", p.display());
            }
        }
        assert_eq!(mode(&outside), 0o644, "symlink target left alone");
        // A state root in a shared sticky directory is not tightened (like `/tmp`).
        let sticky = tmp.path().join("sticky");
        fs::create_dir(&sticky).expect("mkdir");
        fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).expect("chmod");
        drop(StateDb::open(&sticky).expect("open"));
        assert_eq!(
            fs::metadata(&sticky).expect("meta").permissions().mode() & 0o7777,
            0o1777
        );
    }

    #[test]
    fn concurrent_first_opens_do_not_race() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_path_buf();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let root = root.clone();
                thread::spawn(move || StateDb::open(&root).map(|_| ()))
            })
            .collect();
        for h in handles {
            h.join().expect("join").expect("open");
        }
    }

    #[test]
    fn timestamps_are_fixed_width_utc() {
        let t = now_rfc3339();
        assert_eq!(t.len(), "2026-01-01T00:00:00.000000000Z".len(), "{t}");
        assert!(t.ends_with('Z'));
        OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).expect("parse");
    }

    #[test]
    fn new_vm_id_shape() {
        let id = StateDb::new_vm_id();
        assert_eq!(id.len(), 11);
        assert!(id.starts_with("vm-"));
        assert!(id[3..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }
}
