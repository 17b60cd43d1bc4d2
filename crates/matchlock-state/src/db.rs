//! Opening the database: directory, init lock, pragmas, migrations; shared helpers.

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
        create_private_dir(root).map_err(|source| StateError::CreateRoot {
            path: root.to_path_buf(),
            source,
        })?;
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
