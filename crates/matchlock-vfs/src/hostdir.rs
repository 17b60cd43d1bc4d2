//! Plain READDIR of a host directory from `getdents64` alone, without looking entries up.
//!
//! # Design
//! `fuse-backend-rs` 0.14's `PassthroughFs::readdir` looks up every entry it lists
//! (`openat` + `statx` + inode-map insert and forget + `close`) to report its own node id
//! as `d_ino`; the mount tree shows the host's `st_ino` instead (see [`crate::nested`]),
//! which `getdents64` already gives. The library's directory handles are private, so
//! [`HostDirs`] re-opens the directory itself, per request:
//! - its path is the one the kernel gives for the library's `O_PATH` descriptor of the
//!   inode (`/proc/self/fd`), which must lie under the share root's;
//! - it is opened from a descriptor of the share root with `openat2` and
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`, so
//!   nothing a guest or a host process renames in between can lead it out of the share,
//!   through a symlink or onto another filesystem;
//! - its (`st_dev`, `st_ino`) must equal the inode's, so a rename between the two steps
//!   cannot list another directory. When any step fails the caller falls back to the
//!   library (the same answer, at the old cost);
//! - the listing starts at the request's offset with `lseek` and reads with `getdents64`
//!   into a buffer of at most [`MAX_BUF`] bytes, as the library does on its own descriptor:
//!   offsets are the filesystem's `d_off` cookies (telldir/seekdir semantics), valid on any
//!   descriptor of the directory, so chunks from the library's READDIRPLUS and from here
//!   mix. `.` and `..` are skipped, as the library skips them.
//! - `d_ino` is `getdents64`'s: the host inode number of the name in this directory. For a
//!   mount point that is the covered directory's, not what `stat` shows (the mounted root,
//!   possibly on another device), so names that are mount points in this directory
//!   (`/proc/self/mountinfo`) are reported with `d_ino` 0: the caller looks those up.
//!
//! # Limitations
//! - One `readlink`, `openat2`, `fstat`, mount-table read and `close` per READDIR request
//!   (a few syscalls, against three per entry before).
//! - A mount made between reading the mount table and listing is missed for that one
//!   request (the entry shows the covered directory's number until the next listing).
//! - A mount table larger than [`MAX_MOUNTINFO`] bytes makes every listing fall back.

use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use fuse_backend_rs::abi::fuse_abi::stat64;
use fuse_backend_rs::api::filesystem::{DirEntry, ROOT_ID};
use fuse_backend_rs::passthrough::PassthroughFs;
use rustix::fs::{FileType, Mode, OFlags, RawDir, ResolveFlags, SeekFrom};

/// Largest `getdents64` buffer one request uses.
pub const MAX_BUF: usize = 1 << 20;
/// Largest mount table read (bytes).
pub const MAX_MOUNTINFO: u64 = 4 << 20;
/// Bytes reserved for the mount table before reading it.
const MOUNTINFO_HINT: usize = 64 << 10;

/// Why the share root could not be opened for listings.
#[derive(Debug, thiserror::Error)]
pub enum HostDirError {
    #[error("find the share root's path")]
    RootPath(#[source] io::Error),
    #[error("open the share root {path:?}")]
    Open {
        path: PathBuf,
        #[source]
        source: rustix::io::Errno,
    },
}

/// Lists host directories beneath one share root (see the module docs).
pub struct HostDirs {
    root: OwnedFd,
    root_path: PathBuf,
}

/// What a listing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    /// The directory was listed (possibly partly: the caller's buffer filled).
    Done,
    /// The directory could not be re-opened safely: list it another way.
    Fallback,
}

impl HostDirs {
    /// Opens the root of `fs` (imported) for listings.
    pub fn new(fs: &PassthroughFs<()>) -> Result<HostDirs, HostDirError> {
        let root_path = fs
            .readlinkat_proc_file(ROOT_ID)
            .map_err(HostDirError::RootPath)?;
        let root = rustix::fs::open(
            &root_path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|source| HostDirError::Open {
            path: root_path.clone(),
            source,
        })?;
        Ok(HostDirs { root, root_path })
    }

    /// Lists directory `ino` of `fs` (whose attributes are `st`) from `offset`, calling
    /// `add` per entry until it returns 0 (full) or the directory ends.
    pub fn list(
        &self,
        fs: &PassthroughFs<()>,
        ino: u64,
        st: &stat64,
        size: u32,
        offset: u64,
        add: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<Listed> {
        let Some((fd, path)) = self.reopen(fs, ino, st) else {
            return Ok(Listed::Fallback);
        };
        let Some(mounted) = mount_points_in(&path) else {
            return Ok(Listed::Fallback);
        };
        rustix::fs::seek(&fd, SeekFrom::Start(offset))?;
        let len = usize::try_from(size)
            .unwrap_or(MAX_BUF)
            .clamp(1024, MAX_BUF);
        let mut buf = vec![MaybeUninit::<u8>::uninit(); len];
        let mut dir = RawDir::new(&fd, &mut buf);
        let mut added = 0usize;
        while let Some(entry) = dir.next() {
            let entry = match entry {
                Ok(e) => e,
                Err(e) if added == 0 => return Err(e.into()),
                // Entries already given cannot be taken back: end the chunk here.
                Err(_) => break,
            };
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let d = DirEntry {
                ino: if mounted.iter().any(|m| m == name) {
                    0
                } else {
                    entry.ino()
                },
                offset: entry.next_entry_cookie(),
                type_: dirent_type(entry.file_type()),
                name,
            };
            match add(d) {
                Ok(0) => break,
                Ok(_) => added += 1,
                Err(e) if added == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(Listed::Done)
    }

    /// A readable descriptor of directory `ino`, opened beneath the share root, and its
    /// host path; `None` when it is not (any longer) the inode's.
    fn reopen(&self, fs: &PassthroughFs<()>, ino: u64, st: &stat64) -> Option<(OwnedFd, PathBuf)> {
        let path = fs.readlinkat_proc_file(ino).ok()?;
        let rel = path.strip_prefix(&self.root_path).ok()?;
        let rel: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let fd = rustix::fs::openat2(
            &self.root,
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            ResolveFlags::BENEATH
                | ResolveFlags::NO_SYMLINKS
                | ResolveFlags::NO_MAGICLINKS
                | ResolveFlags::NO_XDEV,
        )
        .ok()?;
        let now = rustix::fs::fstat(&fd).ok()?;
        if now.st_dev != st.st_dev || now.st_ino != st.st_ino {
            tracing::debug!(
                ino,
                "directory moved while re-opening it; listing via lookups"
            );
            return None;
        }
        Some((fd, path))
    }
}

/// The names in directory `dir` that are mount points (from `/proc/self/mountinfo`);
/// `None` when the table cannot be read whole.
fn mount_points_in(dir: &Path) -> Option<Vec<Vec<u8>>> {
    let file = std::fs::File::open("/proc/self/mountinfo").ok()?;
    // Room for a typical table up front: the kernel fills a read whole, so this is one
    // `read` and the one that sees the end (growing from empty reads in small steps).
    let mut text = Vec::with_capacity(MOUNTINFO_HINT);
    file.take(MAX_MOUNTINFO + 1).read_to_end(&mut text).ok()?;
    if text.len() as u64 > MAX_MOUNTINFO {
        return None;
    }
    let dir = dir.as_os_str().as_bytes();
    let mut names = Vec::new();
    for line in text.split(|b| *b == b'\n') {
        // Fields: id, parent id, major:minor, root, mount point, ...
        let Some(point) = line.split(|b| *b == b' ').nth(4) else {
            continue;
        };
        let point = unescape(point);
        if let Some(name) = child_name(&point, dir) {
            names.push(name.to_vec());
        }
    }
    Some(names)
}

/// The last component of `point` when its parent is `dir`.
fn child_name<'a>(point: &'a [u8], dir: &[u8]) -> Option<&'a [u8]> {
    let rest = point.strip_prefix(dir)?;
    let rest = if dir.ends_with(b"/") {
        rest
    } else {
        rest.strip_prefix(b"/")?
    };
    (!rest.is_empty() && !rest.contains(&b'/')).then_some(rest)
}

/// A mountinfo field with its `\ooo` octal escapes (space, tab, newline, backslash) undone.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field.get(i + 1..i + 4).and_then(|d| {
            d.iter()
                .try_fold(0u32, |acc, c| {
                    (b'0'..=b'7')
                        .contains(c)
                        .then(|| acc * 8 + u32::from(c - b'0'))
                })
                .and_then(|v| u8::try_from(v).ok())
        });
        match (field[i], octal) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// The `d_type` of a file type (`DT_UNKNOWN` stays 0).
fn dirent_type(t: FileType) -> u32 {
    match t {
        FileType::Unknown => u32::from(libc::DT_UNKNOWN),
        t => t.as_raw_mode() >> 12,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_and_children() {
        assert_eq!(unescape(b"/a\\040b\\134c"), b"/a b\\c".to_vec());
        assert_eq!(unescape(b"/x\\04"), b"/x\\04".to_vec());
        assert_eq!(child_name(b"/s/d/m", b"/s/d"), Some(&b"m"[..]));
        assert_eq!(child_name(b"/s/dm", b"/s/d"), None);
        assert_eq!(child_name(b"/s/d/m/n", b"/s/d"), None);
        assert_eq!(child_name(b"/s/d", b"/s/d"), None);
        assert_eq!(child_name(b"/m", b"/"), Some(&b"m"[..]));
    }
}
