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

use crate::guard::swap_owner;
use crate::memory::node::{Attr, Time};
use crate::memory::tree::{errno, MAX_NAME, MAX_SYMLINK};

/// Where a regular file's bytes are on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Still the lower file (relative to the lower root).
    Lower(PathBuf),
    /// The guest's own copy, `upper/<id>`.
    Upper(u64),
}

/// A regular file's bytes on the host, with a descriptor cached while the guest has the file
/// open (so the number of host descriptors follows the guest's open files, not the number of
/// files it has touched).
#[derive(Debug)]
pub struct HostFile {
    source: Source,
    file: Option<File>,
}

impl HostFile {
    pub fn lower(path: PathBuf) -> HostFile {
        HostFile {
            source: Source::Lower(path),
            file: None,
        }
    }

    /// Closes the cached descriptor (the last guest handle was released).
    pub fn close(&mut self) {
        self.file = None;
    }

    pub fn source(&self) -> &Source {
        &self.source
    }
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

/// Attributes of a host file as the guest first sees them. The owner's uid/gid and root are
/// swapped, as on `host_fs` shares (`guard::swap_owner`), so an unprivileged owner's files
/// are the guest root's own (`git` refuses a repository owned by someone else); the
/// identity when the owner runs as root.
pub fn attr_of(meta: &fs::Metadata) -> Attr {
    let t = |sec: i64, nsec: i64| Time { sec, nsec };
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    Attr {
        mode: meta.mode(),
        uid: swap_owner(meta.uid(), uid),
        gid: swap_owner(meta.gid(), gid),
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
                LowerKind::File(HostFile::lower(child))
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

    fn open_upper(&self, id: u64, create: bool) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.upper.join(id.to_string()))
    }

    /// A new empty file in the upper directory (its descriptor cached: it is being opened).
    pub fn create_upper(&self) -> io::Result<HostFile> {
        let id = self.next_upper.fetch_add(1, Ordering::Relaxed);
        let file = self.open_upper(id, true)?;
        Ok(HostFile {
            source: Source::Upper(id),
            file: Some(file),
        })
    }

    /// The file's descriptor, opened if not cached.
    fn file<'a>(&self, f: &'a mut HostFile) -> io::Result<&'a File> {
        match &mut f.file {
            Some(file) => Ok(file),
            slot => {
                let file = match &f.source {
                    Source::Lower(path) => self.open_lower(path)?,
                    Source::Upper(id) => self.open_upper(*id, false)?,
                };
                Ok(slot.insert(file))
            }
        }
    }

    /// Replaces a lower file by an upper copy of its first `keep` bytes.
    fn copy_up(&self, f: &mut HostFile, keep: u64) -> io::Result<()> {
        let Source::Lower(path) = &f.source else {
            return Ok(());
        };
        let path = path.clone();
        let mut upper = self.create_upper()?;
        if keep > 0 {
            let lower = self.file(f)?;
            let mut src = lower.take(keep);
            let mut dst = self.file(&mut upper)?;
            // `take` reads from the descriptor's position: start at the beginning.
            io::Seek::seek(&mut src.get_mut(), io::SeekFrom::Start(0))?;
            io::copy(&mut src, &mut dst)?;
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
        let file = self.file(f)?;
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
        self.file(f)?.write_all_at(data, offset)
    }

    pub fn set_len(&self, f: &mut HostFile, old: u64, new: u64) -> io::Result<()> {
        self.copy_up(f, old.min(new))?;
        self.file(f)?.set_len(new)
    }

    /// Deletes a freed inode's upper copy.
    pub fn discard(&self, ino: u64, f: HostFile) {
        if let Source::Upper(id) = f.source {
            drop(f.file);
            if let Err(e) = fs::remove_file(self.upper.join(id.to_string())) {
                warn!(ino, error = %e, "overlay: removing an upper copy failed");
            }
        }
    }
}
