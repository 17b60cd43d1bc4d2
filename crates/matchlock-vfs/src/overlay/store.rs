//! Host side of the overlay: reading the lower tree, and the flat upper directory of copies.
//!
//! # Design
//! The lower tree is only ever opened read-only, by `lstat`-style listing (a symlink is read
//! with `readlink` and becomes a symlink node the guest kernel resolves in its own view) and by
//! opening regular files with `O_NOFOLLOW | O_NONBLOCK` and checking they are regular files.
//! Every component leading to a lower path was seen as a directory (not a symlink) when its
//! parent was listed. Upper files are named by a counter (`upper/1`, `upper/2`, ...) and
//! created with `O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600: the guest's names never become host
//! paths, so no guest-chosen name can traverse anything on the host.
//!
//! # Limitations
//! A host process that replaces a directory of the lower tree with a symlink between the
//! listing and a later open could redirect that open (the host user owns the lower tree; the
//! guest cannot do this).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, warn};

use crate::memory::node::{Attr, Time};
use crate::memory::tree::{errno, MAX_NAME, MAX_SYMLINK};

/// A regular file's bytes on the host.
#[derive(Debug)]
pub enum HostFile {
    /// Still the lower file (relative to the lower root), opened on first read.
    Lower { path: PathBuf, file: Option<File> },
    /// The guest's own copy in the upper directory.
    Upper { id: u64, file: File },
}

/// What a lower directory entry is.
#[derive(Debug)]
pub enum LowerKind {
    Dir(PathBuf),
    File(HostFile),
    Symlink(Vec<u8>),
}

/// One entry of a lower directory.
#[derive(Debug)]
pub struct LowerEntry {
    pub name: Vec<u8>,
    pub kind: LowerKind,
    pub attr: Attr,
}

/// The lower root and the upper directory.
#[derive(Debug)]
pub struct Store {
    lower: PathBuf,
    upper: PathBuf,
    next_upper: AtomicU64,
}

/// Attributes of a host file as the guest first sees them.
pub fn attr_of(meta: &fs::Metadata) -> Attr {
    let t = |sec: i64, nsec: i64| Time { sec, nsec };
    Attr {
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        nlink: 1,
        size: if meta.is_dir() { 0 } else { meta.len() },
        atime: t(meta.atime(), meta.atime_nsec()),
        mtime: t(meta.mtime(), meta.mtime_nsec()),
        ctime: t(meta.ctime(), meta.ctime_nsec()),
    }
}

impl Store {
    pub fn new(lower: PathBuf, upper: PathBuf) -> Store {
        Store {
            lower,
            upper,
            next_upper: AtomicU64::new(1),
        }
    }

    /// Lists a lower directory without following symlinks. Entries other than directories,
    /// regular files and symlinks (devices, FIFOs, sockets) are not shown.
    pub fn list(&self, rel: &Path) -> io::Result<Vec<LowerEntry>> {
        let mut out = Vec::new();
        for ent in fs::read_dir(self.lower.join(rel))? {
            let ent = ent?;
            let name = ent.file_name().as_bytes().to_vec();
            if name.len() > MAX_NAME {
                debug!(len = name.len(), "overlay: lower name too long, not shown");
                continue;
            }
            // `DirEntry::metadata` is `lstat`: it does not follow a symlink.
            let meta = match ent.metadata() {
                Ok(meta) => meta,
                // Removed on the host since the listing started.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let ft = meta.file_type();
            let child = rel.join(ent.file_name());
            let mut attr = attr_of(&meta);
            let kind = if ft.is_dir() {
                LowerKind::Dir(child)
            } else if ft.is_file() {
                LowerKind::File(HostFile::Lower {
                    path: child,
                    file: None,
                })
            } else if ft.is_symlink() {
                let target = fs::read_link(ent.path())?.as_os_str().as_bytes().to_vec();
                if target.len() > MAX_SYMLINK || target.is_empty() {
                    continue;
                }
                attr.size = target.len() as u64;
                LowerKind::Symlink(target)
            } else {
                debug!("overlay: lower special file not shown");
                continue;
            };
            out.push(LowerEntry { name, kind, attr });
        }
        Ok(out)
    }

    fn open_lower(&self, rel: &Path) -> io::Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(self.lower.join(rel))?;
        if !file.metadata()?.is_file() {
            return Err(errno(libc::EIO));
        }
        Ok(file)
    }

    /// A new empty file in the upper directory.
    pub fn create_upper(&self) -> io::Result<HostFile> {
        let id = self.next_upper.fetch_add(1, Ordering::Relaxed);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.upper.join(id.to_string()))?;
        Ok(HostFile::Upper { id, file })
    }

    /// Replaces a lower file by an upper copy of its first `keep` bytes.
    fn copy_up(&self, f: &mut HostFile, keep: u64) -> io::Result<()> {
        let HostFile::Lower { path, file } = f else {
            return Ok(());
        };
        let upper = self.create_upper()?;
        if keep > 0 {
            let lower = match file.take() {
                Some(file) => file,
                None => self.open_lower(path)?,
            };
            if let HostFile::Upper { file: dst, .. } = &upper {
                let mut src = (&lower).take(keep);
                let mut dst = dst;
                io::copy(&mut src, &mut dst)?;
            }
        }
        debug!(path = %path.display(), "overlay: copied up");
        *f = upper;
        Ok(())
    }

    pub fn read(&self, f: &mut HostFile, size: u64, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        if offset >= size {
            return Ok(Vec::new());
        }
        let len = usize::try_from(len.min(size - offset)).map_err(|_| errno(libc::EINVAL))?;
        let file: &File = match f {
            HostFile::Lower { path, file } => match file {
                Some(file) => file,
                None => file.insert(self.open_lower(path)?),
            },
            HostFile::Upper { file, .. } => file,
        };
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    pub fn write(&self, f: &mut HostFile, size: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        self.copy_up(f, size)?;
        match f {
            HostFile::Upper { file, .. } => file.write_all_at(data, offset),
            HostFile::Lower { .. } => Err(errno(libc::EIO)),
        }
    }

    pub fn set_len(&self, f: &mut HostFile, old: u64, new: u64) -> io::Result<()> {
        self.copy_up(f, old.min(new))?;
        match f {
            HostFile::Upper { file, .. } => file.set_len(new),
            HostFile::Lower { .. } => Err(errno(libc::EIO)),
        }
    }

    /// Deletes a freed inode's upper copy.
    pub fn discard(&self, ino: u64, f: HostFile) {
        if let HostFile::Upper { id, file } = f {
            drop(file);
            if let Err(e) = fs::remove_file(self.upper.join(id.to_string())) {
                warn!(ino, error = %e, "overlay: removing an upper copy failed");
            }
        }
    }
}
