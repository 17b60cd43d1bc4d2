//! The per-VM writable upper disk: a sparse file formatted as ext4 on the host.
//!
//! # Design
//! `mke2fs` formats a regular file without root. The journal is left out: the upper disk is
//! discarded with its VM, so crash consistency buys nothing and the journal costs boot time
//! and writes. Lazy inode-table init keeps formatting a 5 GiB sparse file in the tens of ms.
//!
//! Those tens of ms were a tenth of a cold start (issue 11), so [`create_upper`] formats
//! once per size into a template in the cache and gives each VM a sparse copy of it: only the
//! template's data extents (`SEEK_DATA`/`SEEK_HOLE`, ~3 MB for 5 GiB) are copied, the holes
//! stay holes. Templates are written under a unique name and renamed into place, so
//! concurrent first uses each produce a complete file and the last rename wins.
//!
//! # Limitations
//! Every copy of a template has the same filesystem UUID; each VM sees only its own upper
//! disk, so nothing in the guest can confuse them. A template whose size is wrong (e.g.
//! truncated by hand) is re-made; one altered in place by the user is used as it is (the
//! cache is the user's own, like the image store).

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
    #[error("create the disk template directory {path}")]
    TemplateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("move the disk template into place at {path}")]
    TemplateRename {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("copy disk template {from} to {to}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// Bumped when [`create_ext4`]'s options change, so old templates are not reused.
const TEMPLATE_VERSION: u32 = 1;

/// Creates `path` (which must not exist) as a sparse ext4 image of `size_mb` MiB: a copy of
/// the template for that size in `templates`, formatted there first if missing.
pub fn create_upper(path: &Path, size_mb: u64, templates: &Path) -> Result<(), DiskError> {
    let template = templates.join(format!("upper-v{TEMPLATE_VERSION}-{size_mb}m.ext4"));
    let want = size_mb.saturating_mul(1 << 20);
    let usable = std::fs::metadata(&template).is_ok_and(|m| m.is_file() && m.len() == want);
    if !usable {
        make_template(&template, size_mb)?;
    }
    copy_sparse(&template, path)
}

/// Formats a template under a unique name next to `template`, then renames it into place.
fn make_template(template: &Path, size_mb: u64) -> Result<(), DiskError> {
    let dir = template.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| DiskError::TemplateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let tmp = template.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let made = create_ext4(&tmp, size_mb).and_then(|()| {
        std::fs::rename(&tmp, template).map_err(|source| DiskError::TemplateRename {
            path: template.to_path_buf(),
            source,
        })
    });
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made
}

/// Copies `src` to the new file `dst` (mode 0600) with the same length, writing only
/// `src`'s data extents (holes stay holes). Each extent goes through `copy_file_range`
/// (no copy through user space; a reflink on filesystems that share extents), falling
/// back to reads and writes where the kernel cannot (e.g. across filesystems).
pub(crate) fn copy_sparse(src: &Path, dst: &Path) -> Result<(), DiskError> {
    copy_sparse_via(src, dst, true)
}

/// [`copy_sparse`], starting in the kernel (`in_kernel`) or in user space.
fn copy_sparse_via(src: &Path, dst: &Path, mut in_kernel: bool) -> Result<(), DiskError> {
    use std::os::unix::fs::OpenOptionsExt;
    let copy_err = |source: std::io::Error| DiskError::Copy {
        from: src.to_path_buf(),
        to: dst.to_path_buf(),
        source,
    };
    let from = std::fs::File::open(src).map_err(copy_err)?;
    let len = from.metadata().map_err(copy_err)?.len();
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|source| DiskError::Create {
            path: dst.to_path_buf(),
            source,
        })?;
    to.set_len(len).map_err(copy_err)?;
    let mut buf = Vec::new();
    let mut pos = 0u64;
    while let Some((start, end)) = next_extent(&from, pos, len).map_err(copy_err)? {
        let mut at = start;
        while at < end {
            let want = usize::try_from(end - at).unwrap_or(usize::MAX).min(1 << 30);
            let n = if in_kernel {
                match copy_range(&from, &to, at, want) {
                    Ok(n) => n,
                    Err(e) if kernel_cannot_copy(e) => {
                        in_kernel = false;
                        continue;
                    }
                    Err(e) => return Err(copy_err(e.into())),
                }
            } else {
                if buf.is_empty() {
                    buf = vec![0u8; 1 << 20];
                }
                copy_through(&from, &to, at, &mut buf[..want.min(1 << 20)]).map_err(copy_err)?
            };
            if n == 0 {
                return Err(copy_err(std::io::ErrorKind::UnexpectedEof.into()));
            }
            at += n as u64;
        }
        pos = end;
    }
    Ok(())
}

/// One `copy_file_range` of up to `len` bytes at the same offset in both files.
fn copy_range(
    from: &std::fs::File,
    to: &std::fs::File,
    at: u64,
    len: usize,
) -> Result<usize, nix::errno::Errno> {
    let mut off_in = i64::try_from(at).map_err(|_| nix::errno::Errno::EINVAL)?;
    let mut off_out = off_in;
    nix::fcntl::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), len)
}

/// Whether `copy_file_range` failed because the kernel or filesystem cannot do it here
/// (then the copy goes through user space), not because of an I/O error.
fn kernel_cannot_copy(e: nix::errno::Errno) -> bool {
    use nix::errno::Errno;
    matches!(
        e,
        Errno::EXDEV | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EINVAL | Errno::EPERM
    )
}

/// Reads up to `buf.len()` bytes at `at` and writes them at the same offset.
fn copy_through(
    from: &std::fs::File,
    to: &std::fs::File,
    at: u64,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let n = from.read_at(buf, at)?;
    to.write_all_at(&buf[..n], at)?;
    Ok(n)
}

/// The next data extent `[start, end)` of `f` at or after `pos`, or `None` past the last.
fn next_extent(f: &std::fs::File, pos: u64, len: u64) -> std::io::Result<Option<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    if pos >= len {
        return Ok(None);
    }
    let off = |v: u64| {
        i64::try_from(v).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let start = match lseek(f.as_raw_fd(), off(pos)?, Whence::SeekData) {
        Ok(s) => s,
        // No data at or after `pos`.
        Err(nix::errno::Errno::ENXIO) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let end = lseek(f.as_raw_fd(), start, Whence::SeekHole)?;
    let (start, end) = (start.unsigned_abs(), end.unsigned_abs().min(len));
    Ok((start < end).then_some((start, end)))
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

    #[test]
    fn upper_disks_are_sparse_copies_of_one_template() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tmp");
        let templates = dir.path().join("templates");
        let (a, b) = (dir.path().join("a.ext4"), dir.path().join("b.ext4"));
        create_upper(&a, 64, &templates).expect("first");
        let template = templates.join(format!("upper-v{TEMPLATE_VERSION}-64m.ext4"));
        let made = std::fs::metadata(&template)
            .expect("template")
            .modified()
            .expect("mtime");
        create_upper(&b, 64, &templates).expect("second");
        // Reused, not re-made; the copies equal the template, and stay sparse.
        assert_eq!(
            std::fs::metadata(&template)
                .expect("t")
                .modified()
                .expect("m"),
            made
        );
        let t = std::fs::read(&template).expect("read");
        for p in [&a, &b] {
            let meta = std::fs::metadata(p).expect("meta");
            assert_eq!(meta.len(), 64 << 20);
            assert!(
                meta.blocks() * 512 < 16 << 20,
                "not sparse: {}",
                meta.blocks()
            );
            assert!(std::fs::read(p).expect("read") == t, "copy differs");
        }
        assert!(
            create_upper(&a, 64, &templates).is_err(),
            "never overwrites"
        );
        // A template of the wrong size is re-made.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&template)
            .expect("open")
            .set_len(1 << 20)
            .expect("truncate");
        let c = dir.path().join("c.ext4");
        create_upper(&c, 64, &templates).expect("re-made");
        assert_eq!(std::fs::metadata(&c).expect("c").len(), 64 << 20);
        assert_eq!(&std::fs::read(&c).expect("c")[1080..1082], &[0x53, 0xEF]);
    }
    #[test]
    fn sparse_copies_keep_data_holes_and_a_private_mode() {
        use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().expect("tmp");
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        let f = std::fs::File::create(&src).expect("src");
        f.set_len(32 << 20).expect("len");
        // Data at the start, in the middle across a MiB boundary, and in the last page.
        let pattern: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        f.write_all_at(b"head", 0).expect("head");
        f.write_all_at(&pattern, (8 << 20) - 4096).expect("middle");
        f.write_all_at(b"tail", (32 << 20) - 4).expect("tail");
        drop(f);
        let want = std::fs::read(&src).expect("src");
        for in_kernel in [true, false] {
            let dst = dst.with_extension(format!("{in_kernel}"));
            copy_sparse_via(&src, &dst, in_kernel).expect("copy");
            let meta = std::fs::metadata(&dst).expect("meta");
            assert_eq!(meta.len(), 32 << 20);
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            assert!(
                meta.blocks() * 512 < 8 << 20,
                "not sparse: {}",
                meta.blocks()
            );
            assert!(
                std::fs::read(&dst).expect("dst") == want,
                "in_kernel {in_kernel}"
            );
            assert!(copy_sparse(&src, &dst).is_err(), "never overwrites");
        }
        // An empty source gives an empty copy.
        let (e, e2) = (dir.path().join("empty"), dir.path().join("empty2"));
        std::fs::File::create(&e).expect("empty");
        copy_sparse(&e, &e2).expect("copy empty");
        assert_eq!(std::fs::metadata(&e2).expect("e2").len(), 0);
    }
}
