//! The per-VM writable upper disk: a sparse file formatted as ext4 on the host.
//!
//! # Design
//! `mke2fs` formats a regular file without root. The journal is left out: the upper disk is
//! discarded with its VM, so crash consistency buys nothing and the journal costs boot time
//! and writes. Lazy inode-table init keeps formatting a 5 GiB sparse file in the tens of ms.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("create disk file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("size disk file {path} to {size_mb} MiB")]
    Truncate {
        path: PathBuf,
        size_mb: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mke2fs not found (looked in PATH, /usr/sbin, /sbin); install e2fsprogs")]
    MkfsNotFound,
    #[error("run {tool}")]
    MkfsSpawn {
        tool: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mke2fs failed on {path}: {stderr}")]
    MkfsFailed { path: PathBuf, stderr: String },
}

/// Finds `mke2fs` even when `/usr/sbin` is not on a normal user's PATH.
pub fn find_mkfs() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("mke2fs"))
            .find(|c| c.is_file())
    });
    from_path.or_else(|| {
        ["/usr/sbin/mke2fs", "/sbin/mke2fs"]
            .iter()
            .map(PathBuf::from)
            .find(|c| c.is_file())
    })
}

/// Creates `path` as a sparse ext4 image of `size_mb` MiB.
pub fn create_ext4(path: &Path, size_mb: u64) -> Result<(), DiskError> {
    let mkfs = find_mkfs().ok_or(DiskError::MkfsNotFound)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| DiskError::Create {
            path: path.to_path_buf(),
            source,
        })?;
    file.set_len(size_mb.saturating_mul(1 << 20))
        .map_err(|source| DiskError::Truncate {
            path: path.to_path_buf(),
            size_mb,
            source,
        })?;
    drop(file);
    format_ext4(
        &mkfs,
        path,
        &[
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-E",
            "lazy_itable_init=1,nodiscard",
        ],
    )
}

/// Formats the file `path` as ext4 with `mke2fs -q -F -t ext4 <options>` (no root needed
/// for a regular file); `mkfs` comes from [`find_mkfs`].
pub fn format_ext4(mkfs: &Path, path: &Path, options: &[&str]) -> Result<(), DiskError> {
    let out = Command::new(mkfs)
        .args(["-q", "-F", "-t", "ext4"])
        .args(options)
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| DiskError::MkfsSpawn {
            tool: mkfs.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(DiskError::MkfsFailed {
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sparse_ext4() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("upper.ext4");
        create_ext4(&p, 64).expect("mkfs");
        let meta = std::fs::metadata(&p).expect("meta");
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 16 << 20, "should be sparse");
        // ext4 superblock magic 0xEF53 at offset 1024 + 56.
        let bytes = std::fs::read(&p).expect("read");
        assert_eq!(&bytes[1080..1082], &[0x53, 0xEF]);
        assert!(create_ext4(&p, 64).is_err(), "never overwrites");
    }
}
