//! Advisory locks that keep a disk image (a named volume or a `--disk` host file) from being
//! attached to two sandboxes in conflicting modes.
//!
//! # Design
//! Two VMs writing one ext4 image at once corrupt it silently (the reference does exactly
//! that). So the owner process opens every extra disk and takes a non-blocking `flock` on it
//! before QEMU starts: exclusive for read-write, shared for read-only. Read-only attachments
//! share; a read-write one excludes everything else. The lock belongs to the open file the
//! owner holds for the sandbox's life; the kernel drops it when the owner closes the file or
//! dies, so a crashed owner never leaves a stale lock behind (its QEMU dies with it,
//! `PR_SET_PDEATHSIG`). Locks are per inode, so a symlink or a hard link to the same image
//! conflicts too. After locking, the path must still name the locked inode: an image removed
//! and re-created meanwhile is refused instead of attached unlocked.
//!
//! `flock` and QEMU's own image locks (OFD byte-range locks, `file.locking`) are independent on
//! Linux. Ours is taken first, so the user gets a message naming the disk and the sandbox
//! holding it (found in the state DB: running sandboxes whose config attaches the same
//! inode), not QEMU's "Failed to get write lock"; QEMU's locks stay as a second line.
//!
//! `matchlock volume rm` (exclusive) and `volume cp` (shared on the source, exclusive on the
//! new copy) take the same locks, so neither can race a running sandbox.
//!
//! # Limitations
//! Advisory: a program that does not take these locks (another tool writing the image file)
//! is not stopped. Locks are host-local (one machine's kernel).

use std::fs::{File, TryLockError};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use matchlock_state::{StateDb, VmStatus};

/// How a disk is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ReadWrite,
    ReadOnly,
}

impl Mode {
    pub fn from_readonly(readonly: bool) -> Mode {
        if readonly {
            Mode::ReadOnly
        } else {
            Mode::ReadWrite
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskLockError {
    #[error("open disk {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lock disk {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("check disk {path} after locking it")]
    Recheck {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{disk} is not a disk image (a regular file or a block device)")]
    NotADisk { disk: String },
    #[error("{disk} was replaced while it was being locked; try again")]
    Replaced { disk: String },
    #[error("{disk} is attached read-write to another running sandbox{holder}")]
    HeldReadWrite { disk: String, holder: String },
    #[error("{disk} is attached read-only to another running sandbox{holder}; it can be shared read-only but not attached read-write")]
    HeldReadOnly { disk: String, holder: String },
    #[error("{disk} is attached twice to this sandbox and one of them is read-write")]
    Twice { disk: String },
    #[error("{disk} is in use by another matchlock process (a sandbox starting or stopping, or a volume copy); try again when it has finished")]
    Busy { disk: String },
}

/// A held lock on one disk image; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DiskLock {
    file: File,
    pub path: PathBuf,
    pub mode: Mode,
}

impl DiskLock {
    /// The locked image, open read-only.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Locks every disk of one sandbox (`(path, mode, name)` in attach order). The same image
/// twice is refused with its own message when either attachment is read-write.
pub fn acquire_all<'a>(
    disks: impl IntoIterator<Item = (&'a Path, Mode, String)>,
    state: Option<&StateDb>,
    self_id: &str,
) -> Result<Vec<DiskLock>, DiskLockError> {
    let mut held: Vec<DiskLock> = Vec::new();
    for (path, mode, name) in disks {
        let twice = std::fs::metadata(path).ok().is_some_and(|m| {
            held.iter().any(|h| {
                let same = h
                    .file
                    .metadata()
                    .is_ok_and(|hm| hm.dev() == m.dev() && hm.ino() == m.ino());
                same && (h.mode == Mode::ReadWrite || mode == Mode::ReadWrite)
            })
        });
        if twice {
            return Err(DiskLockError::Twice { disk: name });
        }
        held.push(acquire(path, mode, &name, state, self_id)?);
    }
    Ok(held)
}

/// How to name `path` in messages: `named volume "NAME"` for an image in `volumes_dir`,
/// else `disk "PATH"`.
pub fn describe(path: &Path, volumes_dir: &Path) -> String {
    let in_volumes =
        path.parent() == Some(volumes_dir) && path.extension().is_some_and(|e| e == "ext4");
    match path.file_stem().and_then(|s| s.to_str()) {
        Some(name) if in_volumes => format!("named volume {name:?}"),
        _ => format!("disk {:?}", path.display().to_string()),
    }
}

/// Locks `path` for `mode` without waiting. `disk` names it in errors (see [`describe`]);
/// `state` (minus the sandbox `self_id`) is searched for the holder when the lock is taken.
pub fn acquire(
    path: &Path,
    mode: Mode,
    disk: &str,
    state: Option<&StateDb>,
    self_id: &str,
) -> Result<DiskLock, DiskLockError> {
    // O_NONBLOCK: a FIFO given as a disk must not hang the owner in open(2).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| DiskLockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let kind = file
        .metadata()
        .map_err(|source| DiskLockError::Open {
            path: path.to_path_buf(),
            source,
        })?
        .file_type();
    if !(kind.is_file() || kind.is_block_device()) {
        return Err(DiskLockError::NotADisk {
            disk: disk.to_string(),
        });
    }
    let r = match mode {
        Mode::ReadWrite => file.try_lock(),
        Mode::ReadOnly => file.try_lock_shared(),
    };
    match r {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(conflict(&file, path, mode, disk, state, self_id));
        }
        Err(TryLockError::Error(source)) => {
            return Err(DiskLockError::Lock {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let recheck = |source| DiskLockError::Recheck {
        path: path.to_path_buf(),
        source,
    };
    let held = file.metadata().map_err(recheck)?;
    match std::fs::metadata(path) {
        Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {}
        Ok(_) => {
            return Err(DiskLockError::Replaced {
                disk: disk.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DiskLockError::Replaced {
                disk: disk.to_string(),
            })
        }
        Err(e) => return Err(recheck(e)),
    }
    tracing::debug!(path = %path.display(), ?mode, "disk locked");
    Ok(DiskLock {
        file,
        path: path.to_path_buf(),
        mode,
    })
}

/// The error for a lock held elsewhere: names the sandbox holding it when the state DB knows
/// one, else tells a read-write holder from read-only ones by probing for a shared lock.
fn conflict(
    file: &File,
    path: &Path,
    mode: Mode,
    disk: &str,
    state: Option<&StateDb>,
    self_id: &str,
) -> DiskLockError {
    let disk = disk.to_string();
    let holders = state.map(|s| holders(s, path, self_id)).unwrap_or_default();
    if let Some((id, _)) = holders.iter().find(|(_, m)| *m == Mode::ReadWrite) {
        return DiskLockError::HeldReadWrite {
            disk,
            holder: format!(" ({id})"),
        };
    }
    if let Some((id, _)) = holders.first() {
        if mode == Mode::ReadWrite {
            return DiskLockError::HeldReadOnly {
                disk,
                holder: format!(" ({id})"),
            };
        }
    }
    // No sandbox in the state DB explains it: a volume copy or removal, or this sandbox
    // attaching the same image twice.
    let shared_ok = mode == Mode::ReadWrite && file.try_lock_shared().is_ok();
    if shared_ok {
        let _ = file.unlock();
        return DiskLockError::HeldReadOnly {
            disk,
            holder: String::new(),
        };
    }
    DiskLockError::Busy { disk }
}

/// Running sandboxes (other than `exclude`) whose recorded config attaches the inode at
/// `path`, with the mode they attach it in.
pub fn holders(state: &StateDb, path: &Path, exclude: &str) -> Vec<(String, Mode)> {
    let Ok(target) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let Ok(records) = state.list() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for rec in records {
        if rec.status != VmStatus::Running || rec.id == exclude {
            continue;
        }
        let disks = rec
            .config
            .get("extra_disks")
            .and_then(|d| d.as_array())
            .cloned()
            .unwrap_or_default();
        for d in disks {
            let Some(host) = d.get("host_path").and_then(|p| p.as_str()) else {
                continue;
            };
            let same = std::fs::metadata(host)
                .is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino());
            if same {
                let ro = d.get("readonly").and_then(|r| r.as_bool()) == Some(true);
                out.push((rec.id.clone(), Mode::from_readonly(ro)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("v.ext4");
        std::fs::write(&p, b"x").expect("write");
        (dir, p)
    }

    #[test]
    fn rw_excludes_and_ro_shares() {
        let (_d, p) = image();
        let rw = acquire(&p, Mode::ReadWrite, "disk", None, "a").expect("rw");
        let e = acquire(&p, Mode::ReadWrite, "disk \"p\"", None, "b").expect_err("rw+rw");
        assert!(matches!(e, DiskLockError::Busy { .. }), "{e}");
        assert!(acquire(&p, Mode::ReadOnly, "disk", None, "b").is_err());
        drop(rw);
        let ro1 = acquire(&p, Mode::ReadOnly, "disk", None, "a").expect("ro");
        let _ro2 = acquire(&p, Mode::ReadOnly, "disk", None, "b").expect("ro+ro");
        let e = acquire(&p, Mode::ReadWrite, "disk \"p\"", None, "c").expect_err("ro+rw");
        assert!(matches!(e, DiskLockError::HeldReadOnly { .. }), "{e}");
        drop(ro1);
    }

    #[test]
    fn same_image_twice() {
        let (d, p) = image();
        let link = d.path().join("alias");
        std::fs::hard_link(&p, &link).expect("link");
        let ro = |q: &Path| (q.to_path_buf(), Mode::ReadOnly);
        let both: Vec<(PathBuf, Mode)> = vec![ro(&p), ro(&link)];
        let all = acquire_all(
            both.iter().map(|(q, m)| (q.as_path(), *m, "d".into())),
            None,
            "a",
        )
        .expect("ro twice");
        drop(all);
        let mixed = [(p.clone(), Mode::ReadOnly), (link.clone(), Mode::ReadWrite)];
        let e = acquire_all(
            mixed.iter().map(|(q, m)| (q.as_path(), *m, "d".into())),
            None,
            "a",
        )
        .expect_err("rw twice");
        assert!(matches!(e, DiskLockError::Twice { .. }), "{e}");
    }

    #[test]
    fn hard_link_conflicts() {
        let (d, p) = image();
        let link = d.path().join("other-name");
        std::fs::hard_link(&p, &link).expect("link");
        let _rw = acquire(&p, Mode::ReadWrite, "disk", None, "a").expect("rw");
        assert!(acquire(&link, Mode::ReadOnly, "disk", None, "b").is_err());
    }

    #[test]
    fn describes_volumes_by_name() {
        let v = Path::new("/c/volumes");
        assert_eq!(
            describe(Path::new("/c/volumes/data.ext4"), v),
            "named volume \"data\""
        );
        assert_eq!(
            describe(Path::new("/x/data.ext4"), v),
            "disk \"/x/data.ext4\""
        );
    }

    #[test]
    fn only_files_and_block_devices() {
        let dir = tempfile::tempdir().expect("tmp");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let e = acquire(&fifo, Mode::ReadOnly, "disk \"f\"", None, "a").expect_err("fifo");
        assert!(matches!(e, DiskLockError::NotADisk { .. }), "{e}");
        let e = acquire(dir.path(), Mode::ReadOnly, "d", None, "a").expect_err("dir");
        assert!(matches!(e, DiskLockError::NotADisk { .. }), "{e}");
    }

    #[test]
    fn missing_file_is_an_open_error() {
        let e = acquire(Path::new("/nonexistent/x"), Mode::ReadOnly, "d", None, "a");
        assert!(matches!(e, Err(DiskLockError::Open { .. })));
    }
}
