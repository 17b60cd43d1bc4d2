//! The image store: directories, the metadata DB, lookups, removal and garbage collection.
//!
//! # Design
//! - SQLite in WAL mode with a busy timeout, so several `matchlock` processes can share the
//!   store; schema changes are numbered migrations recorded in `schema_migrations`.
//! - A DB row is written only after every file it names is durable; readers treat a row whose
//!   files are missing as absent (the caller re-imports or re-pulls).
//! - Pruning deletes layer and rootfs files no row references, and temp files. It runs under
//!   the exclusive store lock (see the crate docs).
//!
//! - The store is private to its user: the root, its subdirectories and, when it is named
//!   `matchlock`, the directory holding the root (the Matchlock cache directory) are created
//!   0700, and tightened to 0700 on open if an older version or a loose umask left them
//!   readable by others. Directories owned by someone else and shared sticky directories
//!   (`/tmp`) are never changed.
//!
//! # Limitations
//! - One connection per store guarded by a mutex: fine for a CLI, not a high-QPS server.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::{ImageConfig, ImageLimits, ImageRecord, Scope};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("create store directory {path}")]
    CreateDir {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("open image database {path}")]
    OpenDb {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("migrate image database to version {version}")]
    Migrate {
        version: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("look up image {tag:?}")]
    Lookup {
        tag: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("list images")]
    List(#[source] rusqlite::Error),
    #[error("save image {tag:?}")]
    Save {
        tag: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("remove image {tag:?}")]
    Delete {
        tag: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("image not found: {tag:?}")]
    NotFound { tag: String },
    #[error("read image references")]
    References(#[source] rusqlite::Error),
    #[error("lock image store {path}")]
    Lock {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("list {path}")]
    ReadDir {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("delete {path}")]
    RemoveFile {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("image database mutex poisoned")]
    Poisoned,
    #[error("{var}={value:?} is not a positive whole number")]
    BadLimit { var: &'static str, value: String },
}

const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "create_images",
    "CREATE TABLE images (
        scope TEXT NOT NULL, tag TEXT NOT NULL, digest TEXT, size INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL, source TEXT, rootfs_path TEXT NOT NULL, oci_json TEXT,
        updated_at TEXT NOT NULL, PRIMARY KEY (scope, tag));
     CREATE INDEX idx_images_scope_created ON images (scope, created_at DESC);
     CREATE INDEX idx_images_digest ON images (digest);
     CREATE TABLE image_layers (
        scope TEXT NOT NULL, tag TEXT NOT NULL, ordinal INTEGER NOT NULL, digest TEXT NOT NULL,
        size INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (scope, tag, ordinal));
     CREATE INDEX idx_image_layers_digest ON image_layers (digest);",
)];

/// A local image store rooted at a directory (normally `~/.cache/matchlock/images`).
pub struct ImageStore {
    pub(crate) root: PathBuf,
    db: Mutex<Connection>,
    limits: ImageLimits,
}

/// What `save` writes (everything but the timestamps).
pub(crate) struct NewImage<'a> {
    pub tag: &'a str,
    pub scope: Scope,
    pub source: &'a str,
    pub digest: &'a str,
    pub size: u64,
    pub rootfs: &'a Path,
    pub layers: &'a [(String, u64)],
    pub config: &'a ImageConfig,
}

pub(crate) fn now_rfc3339() -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000000000Z".to_owned())
}

/// A held store lock; released on drop.
pub(crate) struct StoreLock(File);

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root`, with [`ImageLimits::from_env`].
    pub fn open(root: &Path) -> Result<ImageStore, StoreError> {
        let limits = ImageLimits::from_env()?;
        let dirs = vec![
            root.to_path_buf(),
            root.join("layers"),
            root.join("layers/sha256"),
            root.join("rootfs"),
            root.join("tmp"),
        ];
        for dir in dirs {
            private_dir(&dir).map_err(|source| StoreError::CreateDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        // The Matchlock cache directory holding the store (`~/.cache/matchlock/images`):
        // best effort, and only when it is really ours (see `private_dir`).
        if let Some(cache) = root
            .parent()
            .filter(|p| p.file_name().is_some_and(|n| n == "matchlock"))
        {
            if let Err(e) = private_dir(cache) {
                tracing::warn!(path = %cache.display(), error = %e, "cannot make the cache directory private");
            }
        }
        let db_path = root.join("metadata.db");
        let open_err = |source| StoreError::OpenDb {
            path: db_path.display().to_string(),
            source,
        };
        let conn = Connection::open(&db_path).map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        migrate(&conn)?;
        Ok(ImageStore {
            root: root.to_path_buf(),
            db: Mutex::new(conn),
            limits,
        })
    }

    /// Replaces the caps imports and pulls through this store obey.
    pub fn with_limits(mut self, limits: ImageLimits) -> ImageStore {
        self.limits = limits;
        self
    }

    /// The caps imports and pulls through this store obey.
    pub fn limits(&self) -> ImageLimits {
        self.limits
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn layers_dir(&self) -> PathBuf {
        self.root.join("layers").join("sha256")
    }
    pub(crate) fn rootfs_dir(&self) -> PathBuf {
        self.root.join("rootfs")
    }
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.db.lock().map_err(|_| StoreError::Poisoned)
    }

    fn lock_file(&self) -> Result<(File, String), StoreError> {
        let path = self.root.join(".lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StoreError::Lock {
                path: path.display().to_string(),
                source,
            })?;
        Ok((f, path.display().to_string()))
    }

    /// Shared lock held by imports.
    pub(crate) fn lock_shared(&self) -> Result<StoreLock, StoreError> {
        let (f, path) = self.lock_file()?;
        f.lock_shared()
            .map_err(|source| StoreError::Lock { path, source })?;
        Ok(StoreLock(f))
    }

    /// Exclusive lock for pruning; `None` if `wait` is false and someone holds it.
    fn lock_exclusive(&self, wait: bool) -> Result<Option<StoreLock>, StoreError> {
        let (f, path) = self.lock_file()?;
        if wait {
            f.lock()
                .map_err(|source| StoreError::Lock { path, source })?;
            return Ok(Some(StoreLock(f)));
        }
        match f.try_lock() {
            Ok(()) => Ok(Some(StoreLock(f))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(source)) => Err(StoreError::Lock { path, source }),
        }
    }

    /// Replaces the row for (scope, tag) and its layer rows in one transaction.
    pub(crate) fn save(&self, img: &NewImage<'_>) -> Result<ImageRecord, StoreError> {
        let save_err = |source| StoreError::Save {
            tag: img.tag.to_owned(),
            source,
        };
        let now = now_rfc3339();
        let oci_json = serde_json::to_string(img.config).unwrap_or_default();
        let rootfs = img.rootfs.display().to_string();
        let scope = img.scope.as_str();
        let mut conn = self.conn()?;
        let tx = conn.transaction().map_err(save_err)?;
        tx.execute(
            "DELETE FROM images WHERE scope = ?1 AND tag = ?2",
            params![scope, img.tag],
        )
        .map_err(save_err)?;
        tx.execute(
            "DELETE FROM image_layers WHERE scope = ?1 AND tag = ?2",
            params![scope, img.tag],
        )
        .map_err(save_err)?;
        tx.execute(
            "INSERT INTO images (scope, tag, digest, size, created_at, source, rootfs_path, oci_json, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?5)",
            params![scope, img.tag, img.digest, img.size as i64, now, img.source, rootfs, oci_json],
        )
        .map_err(save_err)?;
        for (i, (diff, size)) in img.layers.iter().enumerate() {
            tx.execute(
                "INSERT INTO image_layers (scope, tag, ordinal, digest, size) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![scope, img.tag, i as i64, format!("sha256:{diff}"), *size as i64],
            )
            .map_err(save_err)?;
        }
        tx.commit().map_err(save_err)?;
        Ok(ImageRecord {
            tag: img.tag.to_owned(),
            scope: img.scope,
            source: img.source.to_owned(),
            digest: img.digest.to_owned(),
            size_bytes: img.size,
            created_at: now,
            rootfs: img.rootfs.to_path_buf(),
            layers: img
                .layers
                .iter()
                .map(|(d, _)| format!("sha256:{d}"))
                .collect(),
            config: img.config.clone(),
        })
    }

    fn load(
        conn: &Connection,
        scope: Scope,
        tag: &str,
    ) -> Result<Option<ImageRecord>, rusqlite::Error> {
        let row = conn
            .query_row(
                "SELECT digest, size, created_at, source, rootfs_path, oci_json FROM images WHERE scope = ?1 AND tag = ?2",
                params![scope.as_str(), tag],
                |r| {
                    Ok((
                        r.get::<_, Option<String>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, Option<String>>(5)?,
                    ))
                },
            )
            .optional()?;
        let Some((digest, size, created_at, source, rootfs, oci_json)) = row else {
            return Ok(None);
        };
        let mut stmt = conn.prepare(
            "SELECT digest FROM image_layers WHERE scope = ?1 AND tag = ?2 ORDER BY ordinal",
        )?;
        let layers = stmt
            .query_map(params![scope.as_str(), tag], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let config = oci_json.map(|j| decode_config(&j)).unwrap_or_default();
        let source = match source.as_deref() {
            None | Some("") => "local".to_owned(),
            Some(s) => s.to_owned(),
        };
        Ok(Some(ImageRecord {
            tag: tag.to_owned(),
            scope,
            source,
            digest: digest.unwrap_or_default(),
            size_bytes: u64::try_from(size).unwrap_or(0),
            created_at,
            rootfs: PathBuf::from(rootfs),
            layers,
            config,
        }))
    }

    /// True if the rootfs and every layer file a record names exist and are non-empty.
    fn files_present(&self, rec: &ImageRecord) -> bool {
        let nonempty = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.len() > 0);
        nonempty(&rec.rootfs)
            && rec.layers.iter().all(|d| {
                d.strip_prefix("sha256:")
                    .is_some_and(|h| nonempty(&crate::layers::layer_path(&self.layers_dir(), h)))
            })
    }

    /// Looks `tag` up in the local scope, then the registry scope. A row whose files are
    /// missing counts as a miss.
    pub fn get(&self, tag: &str) -> Result<Option<ImageRecord>, StoreError> {
        let conn = self.conn()?;
        for scope in [Scope::Local, Scope::Registry] {
            let rec = Self::load(&conn, scope, tag).map_err(|source| StoreError::Lookup {
                tag: tag.to_owned(),
                source,
            })?;
            if let Some(rec) = rec {
                if self.files_present(&rec) {
                    return Ok(Some(rec));
                }
                tracing::warn!(
                    tag,
                    scope = scope.as_str(),
                    "image files missing; treating as not found"
                );
            }
        }
        Ok(None)
    }

    /// All images: local scope (newest first), then registry scope (newest first).
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let conn = self.conn()?;
        let mut out = Vec::new();
        for scope in [Scope::Local, Scope::Registry] {
            let tags: Vec<String> = {
                let mut stmt = conn
                    .prepare(
                        "SELECT tag FROM images WHERE scope = ?1 ORDER BY created_at DESC, tag",
                    )
                    .map_err(StoreError::List)?;
                let rows = stmt
                    .query_map([scope.as_str()], |r| r.get(0))
                    .map_err(StoreError::List)?;
                rows.collect::<Result<_, _>>().map_err(StoreError::List)?
            };
            for tag in tags {
                if let Some(rec) = Self::load(&conn, scope, &tag).map_err(StoreError::List)? {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    /// Removes `tag` from the local scope, else from the registry scope, then prunes
    /// unreferenced files (skipped while an import is running; `gc` catches up).
    pub fn remove(&self, tag: &str) -> Result<(), StoreError> {
        let del_err = |source| StoreError::Delete {
            tag: tag.to_owned(),
            source,
        };
        let removed = {
            let mut conn = self.conn()?;
            let tx = conn.transaction().map_err(del_err)?;
            let mut removed = false;
            for scope in [Scope::Local, Scope::Registry] {
                let n = tx
                    .execute(
                        "DELETE FROM images WHERE scope = ?1 AND tag = ?2",
                        params![scope.as_str(), tag],
                    )
                    .map_err(del_err)?;
                tx.execute(
                    "DELETE FROM image_layers WHERE scope = ?1 AND tag = ?2",
                    params![scope.as_str(), tag],
                )
                .map_err(del_err)?;
                if n > 0 {
                    removed = true;
                    break;
                }
            }
            tx.commit().map_err(del_err)?;
            removed
        };
        if !removed {
            return Err(StoreError::NotFound {
                tag: tag.to_owned(),
            });
        }
        self.prune_if_idle()?;
        Ok(())
    }

    /// Prunes unless an import holds the store lock.
    pub(crate) fn prune_if_idle(&self) -> Result<usize, StoreError> {
        match self.lock_exclusive(false)? {
            Some(_lock) => self.prune(false),
            None => {
                tracing::debug!("import in progress; skipping prune");
                Ok(0)
            }
        }
    }

    /// Deletes unreferenced layer and rootfs files and stale temp files; returns the count.
    pub fn gc(&self) -> Result<usize, StoreError> {
        let _lock = self.lock_exclusive(true)?;
        self.prune(true)
    }

    /// Caller holds the exclusive lock.
    fn prune(&self, temps: bool) -> Result<usize, StoreError> {
        let (layer_refs, rootfs_refs) = {
            let conn = self.conn()?;
            let layers: HashSet<String> = {
                let mut stmt = conn
                    .prepare("SELECT DISTINCT digest FROM image_layers")
                    .map_err(StoreError::References)?;
                let rows = stmt
                    .query_map([], |r| r.get::<_, String>(0))
                    .map_err(StoreError::References)?;
                rows.collect::<Result<_, _>>()
                    .map_err(StoreError::References)?
            };
            let rootfs: HashSet<PathBuf> = {
                let mut stmt = conn
                    .prepare("SELECT DISTINCT rootfs_path FROM images")
                    .map_err(StoreError::References)?;
                let rows = stmt
                    .query_map([], |r| r.get::<_, String>(0))
                    .map_err(StoreError::References)?;
                rows.map(|r| r.map(PathBuf::from))
                    .collect::<Result<_, _>>()
                    .map_err(StoreError::References)?
            };
            (layers, rootfs)
        };
        let mut removed = 0;
        removed += remove_where(&self.layers_dir(), |p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let referenced = name
                .strip_suffix(".tar")
                .is_some_and(|hex| layer_refs.contains(&format!("sha256:{hex}")));
            !referenced
        })?;
        removed += remove_where(&self.rootfs_dir(), |p| !rootfs_refs.contains(p))?;
        if temps {
            removed += remove_where(&self.tmp_dir(), |_| true)?;
        }
        if removed > 0 {
            tracing::info!(removed, "pruned unreferenced image files");
        }
        Ok(removed)
    }
}

/// Creates `dir` (and missing parents) 0700, or sets an existing one to 0700 if it grants
/// group or other users anything. Left alone: symlinks, directories owned by another user
/// and shared sticky directories such as `/tmp` (never ours to tighten, even as root).
fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    let mode = meta.permissions().mode();
    let ours = meta.uid() == rustix::process::geteuid().as_raw();
    if ours && !meta.file_type().is_symlink() && mode & 0o1000 == 0 && mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Deletes regular files in `dir` matching `pred`; returns how many.
fn remove_where(dir: &Path, pred: impl Fn(&Path) -> bool) -> Result<usize, StoreError> {
    let rd_err = |source| StoreError::ReadDir {
        path: dir.display().to_string(),
        source,
    };
    let mut n = 0;
    for entry in std::fs::read_dir(dir).map_err(rd_err)? {
        let entry = entry.map_err(rd_err)?;
        let path = entry.path();
        if !entry.file_type().map_err(rd_err)?.is_file() || !pred(&path) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StoreError::RemoveFile {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
    }
    Ok(n)
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let mig_err = |version| move |source| StoreError::Migrate { version, source };
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)",
    )
    .map_err(mig_err(0))?;
    for (version, name, sql) in MIGRATIONS {
        // IMMEDIATE: concurrent openers serialise here instead of racing to create tables.
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
            .map_err(mig_err(*version))?;
        let done: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = ?1)",
                [version],
                |r| r.get(0),
            )
            .map_err(mig_err(*version))?;
        if done {
            continue;
        }
        tx.execute_batch(sql).map_err(mig_err(*version))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![version, name, now_rfc3339()],
        )
        .map_err(mig_err(*version))?;
        tx.commit().map_err(mig_err(*version))?;
    }
    Ok(())
}

/// Decodes a stored image config. Rows written before the config type was shared with the
/// sandbox schema keep `env` as `[[key, value], ...]` in image order; later keys win, as
/// they do when the guest applies them.
fn decode_config(json: &str) -> ImageConfig {
    if let Ok(c) = serde_json::from_str::<ImageConfig>(json) {
        return c;
    }
    #[derive(serde::Deserialize)]
    struct Legacy {
        #[serde(default)]
        user: String,
        #[serde(default)]
        working_dir: String,
        #[serde(default)]
        entrypoint: Vec<String>,
        #[serde(default)]
        cmd: Vec<String>,
        #[serde(default)]
        env: Vec<(String, String)>,
    }
    match serde_json::from_str::<Legacy>(json) {
        Ok(l) => ImageConfig {
            user: l.user,
            working_dir: l.working_dir,
            entrypoint: l.entrypoint,
            cmd: l.cmd,
            env: l.env.into_iter().collect(),
        },
        Err(e) => {
            tracing::warn!(error = %e, "stored image config is unreadable; using defaults");
            ImageConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_configs_old_and_new() {
        let legacy = r#"{"user":"u","working_dir":"/w","entrypoint":["/e"],"cmd":[],"env":[["A","1"],["B","x=y"],["A","2"]]}"#;
        let c = decode_config(legacy);
        assert_eq!((c.user.as_str(), c.working_dir.as_str()), ("u", "/w"));
        assert_eq!(c.entrypoint, ["/e"]);
        assert_eq!((c.env["A"].as_str(), c.env["B"].as_str()), ("2", "x=y"));
        let current = serde_json::to_string(&c).expect("encode");
        assert_eq!(decode_config(&current), c);
        assert_eq!(decode_config("{\"env\": 5}"), ImageConfig::default());
    }

    fn fake(s: &ImageStore, scope: Scope, tag: &str, name: &str) -> ImageRecord {
        let rootfs = s.rootfs_dir().join(format!("{name}.sqfs"));
        std::fs::write(&rootfs, b"sqsh").expect("write rootfs");
        let diff = name.repeat(64);
        std::fs::write(crate::layers::layer_path(&s.layers_dir(), &diff), b"tar")
            .expect("write layer");
        let config = ImageConfig {
            cmd: vec![name.to_owned()],
            ..Default::default()
        };
        s.save(&NewImage {
            tag,
            scope,
            source: if scope == Scope::Local {
                "import"
            } else {
                "registry"
            },
            digest: "sha256:00",
            size: 4,
            rootfs: &rootfs,
            layers: &[(diff, 3)],
            config: &config,
        })
        .expect("save")
    }

    #[test]
    fn scopes_lookup_order_listing_and_removal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = ImageStore::open(dir.path()).expect("open");
        let reg = fake(&s, Scope::Registry, "alpine:latest", "a");
        assert_eq!(s.get("alpine:latest").expect("get"), Some(reg.clone()));
        let local = fake(&s, Scope::Local, "alpine:latest", "b");
        let other = fake(&s, Scope::Local, "other", "c");
        // Local scope wins over the registry cache.
        assert_eq!(s.get("alpine:latest").expect("get"), Some(local.clone()));
        let listed: Vec<(Scope, String)> = s
            .list()
            .expect("list")
            .into_iter()
            .map(|r| (r.scope, r.tag))
            .collect();
        assert_eq!(
            listed,
            vec![
                (Scope::Local, "other".to_owned()),
                (Scope::Local, "alpine:latest".to_owned()),
                (Scope::Registry, "alpine:latest".to_owned())
            ]
        );
        // rm takes the local one first, then the registry one, then fails.
        s.remove("alpine:latest").expect("rm local");
        assert_eq!(
            s.get("alpine:latest").expect("get").map(|r| r.scope),
            Some(Scope::Registry)
        );
        assert!(!local.rootfs.exists() && reg.rootfs.exists() && other.rootfs.exists());
        s.remove("alpine:latest").expect("rm registry");
        assert!(matches!(
            s.remove("alpine:latest"),
            Err(StoreError::NotFound { .. })
        ));
        assert!(!reg.rootfs.exists());
    }

    #[test]
    fn open_creates_private_dirs_and_tightens_loose_ones() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("cache/matchlock");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        drop(ImageStore::open(&cache.join("images")).expect("open"));
        for d in [
            "",
            "images",
            "images/layers/sha256",
            "images/rootfs",
            "images/tmp",
        ] {
            assert_eq!(mode(&cache.join(d)), 0o700, "{d}");
        }
        for d in ["", "images", "images/tmp"] {
            std::fs::set_permissions(cache.join(d), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        drop(ImageStore::open(&cache.join("images")).expect("reopen"));
        for d in ["", "images", "images/tmp"] {
            assert_eq!(mode(&cache.join(d)), 0o700, "{d} tightened");
        }
        // A store directly in a shared sticky directory (like /tmp) leaves that alone, and
        // a parent not named `matchlock` is not touched.
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        drop(ImageStore::open(&shared).expect("open in sticky dir"));
        assert_eq!(mode(&shared) | 0o1000, 0o1777);
        let parent = dir.path().join("other");
        std::fs::create_dir(&parent).expect("mkdir");
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        drop(ImageStore::open(&parent.join("images")).expect("open"));
        assert_eq!(mode(&parent), 0o755);
    }

    #[test]
    fn migrations_recorded_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(ImageStore::open(dir.path()).expect("open"));
        let s = ImageStore::open(dir.path()).expect("reopen");
        let n: i64 = s
            .conn()
            .expect("conn")
            .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, MIGRATIONS.len() as i64);
    }
}
