//! The mount router: one guarded provider per `vfs.mounts` entry, mounted at its guest path
//! relative to the workspace in a [`MountTree`].
//!
//! # Design
//! The tree resolves by the longest guest prefix, mounts nested in other mounts included,
//! and synthesises the intermediate directories (`/workspace/.host/example` makes `.host`
//! appear; see [`crate::nested`]); a mount equal to the workspace is the tree's root.
//! Providers:
//! - `host_fs`: `PassthroughFs` rooted at the canonical host path. It opens every entry by
//!   parent descriptor plus one name with `O_PATH | O_NOFOLLOW`, so a symlink in the share is
//!   served as a symlink (the guest resolves it in its own tree) and never followed on the
//!   host; the [`Guard`] refuses `..`. A single file is served as the one entry of its
//!   parent directory ([`GuardOptions::single_file`]).
//! - `memory`: [`MemFs`] with a quota of [`MEMORY_QUOTA`] (the guest cannot grow the
//!   owner's memory without bound).
//! - `overlay`: [`OverlayFs`] over the host directory, its copy-ups in a fresh directory
//!   under the caller's scratch directory (the VM's state directory), removed with it.
//!
//! `host_fs` mounts show the host's inode numbers where they cannot collide with others in
//! the tree (see [`crate::nested`]); the other types show the tree's own numbers.
//!
//! A read-only mount of any type is also wrapped in the [`Guard`] (`EROFS` on every write
//! path); `memory` and `overlay` keep the guest's uid/gid on what it creates, since
//! nothing reaches a host file's ownership through them.
//!
//! # Limitations
//! A mount nested inside a single-file mount is refused (a file has no children).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fuse_backend_rs::api::BackFileSystem;
use fuse_backend_rs::passthrough::{CachePolicy, Config as PassthroughConfig, PassthroughFs};
use matchlock_api::{guest_path_within, MountConfig, VfsConfig};

use crate::guard::{Guard, GuardOptions};
use crate::memory::MemFs;
use crate::nested::{MountTree, NestedError, TreeMount};
use crate::overlay::OverlayFs;

/// How long the guest may cache names and attributes of host files: host-side changes show
/// within this time.
pub const CACHE_TIMEOUT: Duration = Duration::from_secs(1);

/// Bytes a `memory` mount may hold (file data plus a small per-inode charge).
pub const MEMORY_QUOTA: u64 = 256 << 20;

/// Bytes an `overlay` mount's copy-ups may hold in the state directory: the default size of
/// the sandbox's own disk, so a guest cannot fill the owner's filesystem through a share
/// faster than through its root disk.
pub const OVERLAY_QUOTA: u64 = matchlock_api::DEFAULT_DISK_SIZE_MB << 20;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("invalid vfs configuration")]
    Config(#[source] matchlock_api::ConfigError),
    #[error("a workspace at / is not supported: it would hide the guest's root filesystem")]
    RootWorkspace,
    #[error("mount {inner:?} is nested inside mount {outer:?}, which is a single file")]
    NestedInFile { outer: String, inner: String },
    #[error("mount tree")]
    Tree(#[source] NestedError),
    #[error("mount {guest:?}: owner_uid/owner_gid are only supported for host_fs mounts")]
    OwnerOverride { guest: String },
    #[error("invalid vfs.interception")]
    Interception(#[source] crate::intercept::RulesError),
    #[error("mount {guest:?}: overlay")]
    Overlay {
        guest: String,
        #[source]
        source: crate::overlay::OverlayError,
    },
    #[error("mount {guest:?}: create the overlay's upper directory {path}")]
    Upper {
        guest: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {guest:?}: host_path is required")]
    NoHostPath { guest: String },
    #[error("mount {guest:?}: host path does not exist: {path}")]
    HostPath {
        guest: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {guest:?}: host path {path} is neither a directory nor a regular file")]
    HostKind { guest: String, path: PathBuf },
    #[error("mount {guest:?}: open the host directory {path}")]
    Passthrough {
        guest: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The router the server serves.
pub type Router = MountTree;

/// Checks `cfg` without opening anything: validation, host paths, nesting (so a bad mount
/// fails before anything boots); returns the compiled interception rules (empty when
/// there are none).
pub fn preflight(cfg: &VfsConfig) -> Result<crate::intercept::Rules, RouterError> {
    check_shape(cfg)?;
    let rules = crate::intercept::Rules::from_config(cfg.interception.as_ref())
        .map_err(RouterError::Interception)?
        .unwrap_or_default();
    for (guest, m) in &cfg.mounts {
        match m.kind.as_str() {
            "host_fs" => {
                host_path(guest, m)?;
            }
            "overlay" => {
                let (path, meta) = host_path(guest, m)?;
                if !meta.is_dir() {
                    return Err(RouterError::Overlay {
                        guest: guest.clone(),
                        source: crate::overlay::OverlayError::LowerNotDirectory { path },
                    });
                }
            }
            _ => {}
        }
        check_not_in_file(cfg, guest, m)?;
        if m.kind != "host_fs" && (m.owner_uid.is_some() || m.owner_gid.is_some()) {
            return Err(RouterError::OwnerOverride {
                guest: guest.clone(),
            });
        }
    }
    Ok(rules)
}

/// Builds the router for `cfg` (validated here again); overlay mounts keep their copy-ups
/// in new directories under `scratch`.
pub fn build(cfg: &VfsConfig, scratch: &Path) -> Result<Router, RouterError> {
    check_shape(cfg)?;
    let ws = cfg.workspace();
    let mut mounts = Vec::with_capacity(cfg.mounts.len());
    for (i, (guest, m)) in cfg.mounts.iter().enumerate() {
        let fs = provider(guest, m, &scratch.join(format!("mount-{i:03}")))?;
        tracing::debug!(guest = %guest, kind = %m.kind, readonly = m.readonly, "mount");
        mounts.push(TreeMount {
            path: relative(guest, ws),
            fs,
            host_inodes: m.kind == "host_fs",
        });
    }
    MountTree::with_mounts(mounts).map_err(RouterError::Tree)
}

/// `guest` relative to the workspace, as an absolute router path (`/` for the workspace).
fn relative(guest: &str, ws: &str) -> String {
    match guest.strip_prefix(ws.trim_end_matches('/')) {
        Some("") | None => "/".to_string(),
        Some(rest) => rest.to_string(),
    }
}

/// The configuration's own rules: `ValidateVFS`, no workspace at `/`.
fn check_shape(cfg: &VfsConfig) -> Result<(), RouterError> {
    cfg.validate().map_err(RouterError::Config)?;
    if cfg.workspace() == "/" {
        return Err(RouterError::RootWorkspace);
    }
    Ok(())
}

/// Refuses a mount below `outer` when `outer` is a host_fs mount of a single file.
fn check_not_in_file(cfg: &VfsConfig, outer: &str, m: &MountConfig) -> Result<(), RouterError> {
    let Some(inner) = cfg
        .mounts
        .keys()
        .find(|k| k.as_str() != outer && guest_path_within(k, outer))
    else {
        return Ok(());
    };
    if m.kind == "host_fs" && host_path(outer, m)?.1.is_file() {
        return Err(RouterError::NestedInFile {
            outer: outer.to_string(),
            inner: inner.clone(),
        });
    }
    Ok(())
}

/// The provider of one mount; `upper` is where an overlay keeps its copy-ups (created
/// here, must not exist yet).
pub fn provider(guest: &str, m: &MountConfig, upper: &Path) -> Result<BackFileSystem, RouterError> {
    let fs: BackFileSystem = match m.kind.as_str() {
        "host_fs" => return host_fs(guest, m),
        "overlay" => {
            let (lower, _) = host_path(guest, m)?;
            std::fs::create_dir_all(upper).map_err(|source| RouterError::Upper {
                guest: guest.to_string(),
                path: upper.to_path_buf(),
                source,
            })?;
            let fs = OverlayFs::with_quota(&lower, upper, OVERLAY_QUOTA).map_err(|source| {
                RouterError::Overlay {
                    guest: guest.to_string(),
                    source,
                }
            })?;
            Box::new(fs)
        }
        // The reference falls back to memory for an empty or unknown type.
        _ => Box::new(MemFs::new(MEMORY_QUOTA)),
    };
    Ok(if m.readonly {
        Box::new(Guard::new(
            fs,
            GuardOptions {
                readonly: true,
                ..GuardOptions::default()
            },
        ))
    } else {
        fs
    })
}

/// The canonical host path of a mount and its metadata.
fn host_path(guest: &str, m: &MountConfig) -> Result<(PathBuf, std::fs::Metadata), RouterError> {
    if m.host_path.is_empty() {
        return Err(RouterError::NoHostPath {
            guest: guest.to_string(),
        });
    }
    let path = std::fs::canonicalize(&m.host_path).map_err(|source| RouterError::HostPath {
        guest: guest.to_string(),
        path: PathBuf::from(&m.host_path),
        source,
    })?;
    let meta = std::fs::metadata(&path).map_err(|source| RouterError::HostPath {
        guest: guest.to_string(),
        path: path.clone(),
        source,
    })?;
    Ok((path, meta))
}

fn host_fs(guest: &str, m: &MountConfig) -> Result<BackFileSystem, RouterError> {
    let (path, meta) = host_path(guest, m)?;
    let (root, single_file) = if meta.is_dir() {
        (path.clone(), None)
    } else if meta.is_file() {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(RouterError::HostKind {
                guest: guest.to_string(),
                path,
            });
        };
        let name = CString::new(name.as_bytes()).map_err(|_| RouterError::HostKind {
            guest: guest.to_string(),
            path: path.clone(),
        })?;
        (parent.to_path_buf(), Some(name))
    } else {
        return Err(RouterError::HostKind {
            guest: guest.to_string(),
            path,
        });
    };
    let inner = passthrough(&root).map_err(|source| RouterError::Passthrough {
        guest: guest.to_string(),
        path: root.clone(),
        source,
    })?;
    Ok(Box::new(Guard::new(
        inner,
        GuardOptions {
            readonly: m.readonly,
            single_file,
            owner_uid: m.owner_uid,
            owner_gid: m.owner_gid,
        },
    )))
}

/// A `PassthroughFs` rooted at `root` (a canonical directory), imported and ready to mount.
pub fn passthrough(root: &Path) -> std::io::Result<BackFileSystem> {
    let root_dir = root
        .to_str()
        .ok_or_else(|| std::io::Error::other("host path is not UTF-8"))?
        .to_string();
    let fs: PassthroughFs<()> = PassthroughFs::new(PassthroughConfig {
        root_dir,
        do_import: false,
        entry_timeout: CACHE_TIMEOUT,
        attr_timeout: CACHE_TIMEOUT,
        cache_policy: CachePolicy::Auto,
        writeback: false,
        xattr: false,
        ..PassthroughConfig::default()
    })?;
    fs.import()?;
    Ok(Box::new(fs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(relative("/workspace", "/workspace"), "/");
        assert_eq!(relative("/workspace/a/b", "/workspace"), "/a/b");
    }

    #[test]
    fn nesting_builds_and_every_type_builds() {
        let dir = tempfile::tempdir().expect("tmp");
        let host = dir.path().to_str().expect("utf8").to_string();
        let m = |kind: &str| MountConfig {
            kind: kind.into(),
            host_path: host.clone(),
            ..MountConfig::default()
        };
        let mut cfg = VfsConfig {
            workspace: "/ws".into(),
            ..VfsConfig::default()
        };
        cfg.mounts.insert("/ws".into(), m("host_fs"));
        cfg.mounts.insert("/ws/sub".into(), m("host_fs"));
        let scratch = tempfile::tempdir().expect("scratch");
        preflight(&cfg).expect("nested preflight");
        build(&cfg, scratch.path()).expect("nested");
        // Nothing can be mounted below a single file.
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").expect("file");
        cfg.mounts.insert(
            "/ws".into(),
            MountConfig {
                kind: "host_fs".into(),
                host_path: file.to_str().expect("utf8").into(),
                ..MountConfig::default()
            },
        );
        let e = preflight(&cfg).expect_err("below a file");
        assert!(e.to_string().contains("single file"), "{e}");
        let e = build(&cfg, scratch.path()).err().expect("below a file");
        assert!(format!("{e:?}").contains("InsideFile"), "{e:?}");
        cfg.mounts.remove("/ws");
        cfg.mounts.insert("/ws/other".into(), m("host_fs"));
        build(&cfg, scratch.path()).expect("siblings");
        // Overlay and memory mount next to host_fs; the overlay's copy-ups get a fresh
        // directory under the scratch directory.
        cfg.mounts.insert("/ws/o".into(), m("overlay"));
        cfg.mounts.insert("/ws/m".into(), m(""));
        let fresh = tempfile::tempdir().expect("scratch");
        build(&cfg, fresh.path()).expect("overlay and memory");
        let uppers: Vec<_> = std::fs::read_dir(fresh.path())
            .expect("scratch listing")
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(uppers.len(), 1, "only the overlay needs an upper directory");
        cfg.mounts.remove("/ws/m");
        cfg.mounts.insert(
            "/ws/o".into(),
            MountConfig {
                kind: "host_fs".into(),
                host_path: format!("{host}/missing"),
                ..MountConfig::default()
            },
        );
        let e = build(&cfg, scratch.path()).err().expect("missing");
        assert!(e.to_string().contains("host path does not exist"), "{e}");
        cfg.mounts.insert(
            "/ws/o".into(),
            MountConfig {
                kind: "memory".into(),
                owner_uid: Some(1),
                ..MountConfig::default()
            },
        );
        let e = preflight(&cfg).expect_err("owner on memory");
        assert!(e.to_string().contains("only supported for host_fs"), "{e}");
        cfg.mounts.insert(
            "/ws/o".into(),
            MountConfig {
                kind: "host_fs".into(),
                host_path: format!("{host}/missing"),
                ..MountConfig::default()
            },
        );
        let e = build(&cfg, scratch.path()).err().expect("missing");
        assert!(e.to_string().contains("host path does not exist"), "{e}");
    }
}
