//! The `overlay` provider: a copy-on-write view of a host directory.
//!
//! # Design
//! The guest sees the host directory (the *lower* tree) and may change anything in it; its
//! changes never reach the lower tree and nothing is copied at start. [`OverlayFs`] is the
//! memory provider's inode table (`memory::tree`) with two differences:
//! - a directory that came from the lower tree is listed from the host (`lstat` semantics) the
//!   first time the guest uses it, and its entries become ordinary nodes; from then on
//!   creation, unlink, rename (files and whole directories), links and attribute changes are
//!   operations on the table, so a deleted lower file simply has no name any more (no
//!   whiteout files on disk), and readdir shows the merged view;
//! - a regular file's bytes stay in the lower file until the guest first writes or truncates
//!   it; then the file is copied into the *upper* directory (one flat file per copy, named by
//!   a counter, mode 0600, owned by the sandbox owner) and used from there. Files the guest
//!   creates live in the upper directory from the start.
//!
//! `fuse_backend_rs::overlayfs` was evaluated and not used: in 0.14 its `rename` returns
//! `EXDEV` for every call ("implement it later"), which breaks atomic replace-by-rename
//! (editors, `git`, package managers), and its whiteouts are 0/0 character devices that an
//! unprivileged owner cannot `mknod`. Both needs are met by keeping the namespace in memory.
//!
//! Lower files show the owner's ids and root swapped, as `host_fs` does (the guest root
//! owns the user's files); ownership changes stay in the table like every other change.
//!
//! Symlinks in the lower tree are read with `readlink` and shown as symlinks; the host never
//! follows them (see `store`). Lower FIFOs, sockets and devices are not shown.
//!
//! # Limitations
//! - A single file as the lower path is refused ([`OverlayError::LowerNotDirectory`]).
//! - A lower directory is read once, when first used (one `readdir` + `lstat` per entry of
//!   that one directory, never the whole tree, never again per operation): host changes to
//!   it after that are not seen. An uncopied file's bytes are read live, with the size
//!   recorded at listing.
//! - The merged namespace and all attributes live in memory (a few hundred bytes per lower
//!   entry the guest has visited); only file data goes to the upper directory.
//! - The upper directory is bounded by a quota ([`OverlayFs::with_quota`]; the router gives
//!   each overlay mount `router::OVERLAY_QUOTA`): a copy-up charges the file's size, writes
//!   and truncates charge growth, holes included (the charge is by size, whatever the host
//!   filesystem allocates), unlink and shrinking give it back; past it the guest gets
//!   `ENOSPC` before anything is copied or written. Lower entries the guest lists count
//!   their namespace charge (they may take the total past the quota; only new data is
//!   refused). `statfs` reports the quota.
//! - Host I/O runs under the table's lock: copying up a large file stalls the mount's other
//!   operations for the duration of the copy.
//! - Host descriptors are held only while the guest has a file open.
//! - Two lower names of one host inode (a hard link in the lower tree) are two separate files
//!   in the view: a write through one name is not seen through the other.

pub mod store;

use std::fs;
use std::path::{Path, PathBuf};

use crate::memory::tree::Tree;
use store::Store;

/// Why an overlay could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay lower directory {path} cannot be resolved")]
    LowerResolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("overlay lower path {path} is not a directory (single-file overlay mounts are not supported; use host_fs or ro)")]
    LowerNotDirectory { path: PathBuf },
    #[error("overlay lower directory {path} cannot be read")]
    LowerStat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("overlay upper directory {path} cannot be read")]
    UpperRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("overlay upper path {path} is not a directory")]
    UpperNotDirectory { path: PathBuf },
    #[error("overlay upper directory {path} is not empty")]
    UpperNotEmpty { path: PathBuf },
}

/// The copy-on-write provider over a host directory.
#[derive(Debug)]
pub struct OverlayFs {
    tree: Tree,
}

impl OverlayFs {
    /// A view of `lower` whose changes go to `upper_dir`, which must be an existing empty
    /// directory (the owner creates it in the VM's state directory and deletes it at stop),
    /// without a quota.
    pub fn new(lower: &Path, upper_dir: &Path) -> Result<OverlayFs, OverlayError> {
        OverlayFs::with_quota(lower, upper_dir, u64::MAX)
    }

    /// [`OverlayFs::new`] with at most `quota` bytes in the upper directory (copied-up and
    /// created files by size, plus the namespace's per-inode and per-name charge); past it
    /// the guest gets `ENOSPC`.
    pub fn with_quota(
        lower: &Path,
        upper_dir: &Path,
        quota: u64,
    ) -> Result<OverlayFs, OverlayError> {
        let lower = fs::canonicalize(lower).map_err(|source| OverlayError::LowerResolve {
            path: lower.to_path_buf(),
            source,
        })?;
        let meta = fs::symlink_metadata(&lower).map_err(|source| OverlayError::LowerStat {
            path: lower.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(OverlayError::LowerNotDirectory { path: lower });
        }
        let upper_err = |source| OverlayError::UpperRead {
            path: upper_dir.to_path_buf(),
            source,
        };
        let upper_meta = fs::symlink_metadata(upper_dir).map_err(upper_err)?;
        if !upper_meta.is_dir() {
            return Err(OverlayError::UpperNotDirectory {
                path: upper_dir.to_path_buf(),
            });
        }
        let mut entries = fs::read_dir(upper_dir).map_err(upper_err)?;
        if entries.next().is_some() {
            return Err(OverlayError::UpperNotEmpty {
                path: upper_dir.to_path_buf(),
            });
        }
        let root_attr = store::attr_of(&meta);
        let store = Store::new(lower, upper_dir.to_path_buf());
        Ok(OverlayFs {
            tree: Tree::new(quota, Some(store), Some(root_attr)),
        })
    }
}

crate::memory::fs::tree_filesystem!(OverlayFs);
