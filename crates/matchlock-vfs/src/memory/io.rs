//! File data and attribute operations: open, read, write, setattr, readdir, statfs, access.
//!
//! # Design
//! A handle remembers its open flags: writes through a read-only handle fail with `EBADF`,
//! `O_APPEND` handles write at the current end (unless the kernel negotiated a writeback cache,
//! in which case the kernel owns the file size and passes the real offset), and `O_TRUNC` with
//! write access truncates at open. Data is copied out of the table before the lock is released
//! and only then written to guest memory.

use std::io;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};

use super::node::{Content, Kind, Time, DOTDOT_SEQ, DOT_SEQ};
use super::tree::{errno, OpenFile, State, Tree, INODE_COST, MAX_FILE_SIZE};
use crate::overlay::store::Source;

/// Largest single read or write the provider serves (the FUSE transport's own bound is lower).
const MAX_IO: u32 = 16 * 1024 * 1024;

fn access_mode(flags: u32) -> u32 {
    flags & libc::O_ACCMODE as u32
}

fn can_write(flags: u32) -> bool {
    matches!(access_mode(flags) as i32, libc::O_WRONLY | libc::O_RDWR)
}

impl Tree {
    pub fn getattr(&self, ino: u64) -> io::Result<stat64> {
        let st = self.lock();
        Ok(st.node(ino)?.stat(ino))
    }

    pub fn open(&self, ino: u64, flags: u32) -> io::Result<u64> {
        let mut st = self.lock();
        self.open_locked(&mut st, ino, flags)
    }

    pub fn open_locked(&self, st: &mut State, ino: u64, flags: u32) -> io::Result<u64> {
        let node = st.node(ino)?;
        match &node.kind {
            Kind::Dir(_) if can_write(flags) => return Err(errno(libc::EISDIR)),
            Kind::Symlink(_) => return Err(errno(libc::ELOOP)),
            _ => {}
        }
        if can_write(flags) && flags & libc::O_TRUNC as u32 != 0 && node.attr.size > 0 {
            self.truncate(st, ino, 0)?;
        }
        let node = st.node_mut(ino)?;
        node.opens += 1;
        Ok(st.alloc_fh(OpenFile { ino, flags }))
    }

    pub fn release(&self, fh: u64) {
        let mut st = self.lock();
        if let Some(h) = st.handles.remove(&fh) {
            if let Some(node) = st.nodes.get_mut(&h.ino) {
                node.opens = node.opens.saturating_sub(1);
                node.close_if_idle();
            }
            self.maybe_free(&mut st, h.ino);
        }
    }

    pub fn read(&self, ino: u64, fh: u64, size: u32, offset: u64) -> io::Result<Vec<u8>> {
        let size = u64::from(size.min(MAX_IO));
        let mut st = self.lock();
        let h = st.handle(fh, ino)?;
        if access_mode(h.flags) == libc::O_WRONLY as u32 && !self.writeback() {
            return Err(errno(libc::EBADF));
        }
        let node = st.node_mut(ino)?;
        let file_size = node.attr.size;
        node.attr.atime = Time::now();
        match &mut node.kind {
            Kind::File(Content::Mem(d)) => Ok(d.read(file_size, offset, size)),
            Kind::File(Content::Host(f)) => match &self.store {
                Some(store) => store.read(f, file_size, offset, size),
                None => Err(errno(libc::EIO)),
            },
            Kind::Dir(_) => Err(errno(libc::EISDIR)),
            _ => Err(errno(libc::EINVAL)),
        }
    }

    pub fn write(&self, ino: u64, fh: u64, data: &[u8], offset: u64) -> io::Result<usize> {
        let mut st = self.lock();
        let h = st.handle(fh, ino)?;
        if !can_write(h.flags) {
            return Err(errno(libc::EBADF));
        }
        let size = st.node(ino)?.attr.size;
        let offset = if h.flags & libc::O_APPEND as u32 != 0 && !self.writeback() {
            size
        } else {
            offset
        };
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or_else(|| errno(libc::EFBIG))?;
        self.write_content(&mut st, ino, offset, data)?;
        let node = st.node_mut(ino)?;
        node.attr.size = node.attr.size.max(end);
        node.attr.touch_modified();
        Ok(data.len())
    }

    fn write_content(&self, st: &mut State, ino: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        let node = st.node(ino)?;
        let size = node.attr.size;
        let end = offset.saturating_add(data.len() as u64);
        let growth = match &node.kind {
            Kind::File(Content::Mem(d)) => d.growth_for_write(offset, data.len() as u64),
            Kind::File(Content::Host(f)) => upper_growth(f, size, end.max(size)),
            Kind::Dir(_) => return Err(errno(libc::EISDIR)),
            _ => return Err(errno(libc::EINVAL)),
        };
        st.charge(growth)?;
        let result = match &mut st.node_mut(ino)?.kind {
            Kind::File(Content::Mem(d)) => {
                d.write(offset, data);
                Ok(())
            }
            Kind::File(Content::Host(f)) => {
                let was_lower = matches!(f.source(), Source::Lower(_));
                match &self.store {
                    Some(store) => store
                        .write(f, size, offset, data)
                        .map_err(|e| (e, was_lower && matches!(f.source(), Source::Upper(_)))),
                    None => Err((errno(libc::EIO), false)),
                }
            }
            _ => Err((errno(libc::EINVAL), false)),
        };
        result.map_err(|(e, copied_up)| {
            settle_failed(st, growth, copied_up, size);
            e
        })
    }

    /// Sets a regular file's size: shrinking frees data, growing leaves a hole.
    pub fn truncate(&self, st: &mut State, ino: u64, new_size: u64) -> io::Result<()> {
        if new_size > MAX_FILE_SIZE {
            return Err(errno(libc::EFBIG));
        }
        let node = st.node(ino)?;
        let old = node.attr.size;
        if let Kind::File(Content::Host(f)) = &node.kind {
            let growth = upper_growth(f, old, new_size);
            st.charge(growth)?;
        }
        let node = st.node_mut(ino)?;
        let freed = match &mut node.kind {
            Kind::File(Content::Mem(d)) => d.truncate(new_size),
            Kind::File(Content::Host(f)) => match &self.store {
                Some(store) => {
                    let was_upper = matches!(f.source(), Source::Upper(_));
                    let growth = upper_growth(f, old, new_size);
                    if let Err(e) = store.set_len(f, old, new_size) {
                        let copied_up = !was_upper && matches!(f.source(), Source::Upper(_));
                        settle_failed(st, growth, copied_up, old.min(new_size));
                        return Err(e);
                    }
                    if was_upper {
                        old.saturating_sub(new_size)
                    } else {
                        0
                    }
                }
                None => return Err(errno(libc::EIO)),
            },
            Kind::Dir(_) => return Err(errno(libc::EISDIR)),
            _ => return Err(errno(libc::EINVAL)),
        };
        node.attr.size = new_size;
        node.attr.touch_modified();
        node.close_if_idle();
        st.release_quota(freed);
        Ok(())
    }

    pub fn setattr(
        &self,
        ino: u64,
        attr: &stat64,
        fh: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<stat64> {
        let mut st = self.lock();
        if valid.contains(SetattrValid::SIZE) {
            if let Some(fh) = fh {
                if !can_write(st.handle(fh, ino)?.flags) {
                    return Err(errno(libc::EBADF));
                }
            }
            let size = u64::try_from(attr.st_size).map_err(|_| errno(libc::EINVAL))?;
            self.truncate(&mut st, ino, size)?;
        }
        let node = st.node_mut(ino)?;
        let a = &mut node.attr;
        let now = Time::now();
        if valid.contains(SetattrValid::MODE) {
            a.mode = (a.mode & libc::S_IFMT) | (attr.st_mode & 0o7777);
        }
        if valid.contains(SetattrValid::UID) {
            a.uid = attr.st_uid;
        }
        if valid.contains(SetattrValid::GID) {
            a.gid = attr.st_gid;
        }
        if valid.contains(SetattrValid::KILL_SUIDGID) {
            a.mode &= !(libc::S_ISUID | libc::S_ISGID);
        }
        if valid.contains(SetattrValid::ATIME_NOW) {
            a.atime = now;
        } else if valid.contains(SetattrValid::ATIME) {
            a.atime = Time {
                sec: attr.st_atime,
                nsec: attr.st_atime_nsec,
            };
        }
        if valid.contains(SetattrValid::MTIME_NOW) {
            a.mtime = now;
        } else if valid.contains(SetattrValid::MTIME) {
            a.mtime = Time {
                sec: attr.st_mtime,
                nsec: attr.st_mtime_nsec,
            };
        }
        a.ctime = now;
        Ok(node.stat(ino))
    }

    pub fn fallocate(&self, ino: u64, fh: u64, mode: u32, offset: u64, len: u64) -> io::Result<()> {
        if mode != 0 {
            return Err(errno(libc::EOPNOTSUPP));
        }
        let mut st = self.lock();
        if !can_write(st.handle(fh, ino)?.flags) {
            return Err(errno(libc::EBADF));
        }
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or_else(|| errno(libc::EFBIG))?;
        if end > st.node(ino)?.attr.size {
            self.truncate(&mut st, ino, end)?;
        }
        Ok(())
    }

    pub fn opendir(&self, ino: u64) -> io::Result<()> {
        let mut st = self.lock();
        st.dir(ino)?;
        self.populate(&mut st, ino)
    }

    /// Lists `ino` from cookie `offset`; with `plus`, each entry emitted is a kernel reference.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        add: &mut dyn FnMut(DirEntry, Option<Entry>) -> io::Result<usize>,
        plus: bool,
    ) -> io::Result<()> {
        let mut st = self.lock();
        self.populate(&mut st, ino)?;
        let parent = st.dir(ino)?.parent;
        for (seq, name, target) in [(DOT_SEQ, &b"."[..], ino), (DOTDOT_SEQ, b"..", parent)] {
            if offset < seq {
                // `.` and `..` are never references the kernel keeps (it skips linking them).
                let entry = if plus {
                    Some(self.entry(&st, target)?)
                } else {
                    None
                };
                let d = dirent(seq, name, target, libc::S_IFDIR);
                if add(d, entry)? == 0 {
                    return Ok(());
                }
            }
        }
        let mut emitted = Vec::new();
        {
            let dir = st.dir(ino)?;
            for (seq, name, child) in dir.after(offset) {
                let node = st.node(child)?;
                let entry = if plus {
                    Some(self.entry(&st, child)?)
                } else {
                    None
                };
                if add(dirent(seq, name, child, node.attr.file_type()), entry)? == 0 {
                    break;
                }
                emitted.push(child);
            }
        }
        if plus {
            for child in emitted {
                let node = st.node_mut(child)?;
                node.lookups = node.lookups.saturating_add(1);
            }
        }
        Ok(())
    }

    pub fn statfs(&self) -> io::Result<statvfs64> {
        let st = self.lock();
        let mut s = zeroed_statvfs()?;
        let bsize = 4096;
        s.f_bsize = bsize;
        s.f_frsize = bsize;
        s.f_blocks = st.quota / bsize;
        let free = st.quota.saturating_sub(st.used);
        s.f_bfree = free / bsize;
        s.f_bavail = free / bsize;
        s.f_files = (st.quota / INODE_COST).max(st.nodes.len() as u64);
        s.f_ffree = free / INODE_COST;
        s.f_favail = free / INODE_COST;
        s.f_namemax = super::tree::MAX_NAME as u64;
        Ok(s)
    }

    /// `access(2)` against the inode's mode for the caller (root passes read and write, and
    /// execute when any execute bit is set).
    pub fn access(&self, ctx: &Context, ino: u64, mask: u32) -> io::Result<()> {
        let st = self.lock();
        let a = st.node(ino)?.attr;
        let mask = mask & 0o7;
        if mask == 0 {
            return Ok(());
        }
        let granted = if ctx.uid == 0 {
            let exec = if a.mode & 0o111 != 0 || a.is_dir() {
                1
            } else {
                0
            };
            6 | exec
        } else if ctx.uid == a.uid {
            (a.mode >> 6) & 7
        } else if ctx.gid == a.gid {
            (a.mode >> 3) & 7
        } else {
            a.mode & 7
        };
        if mask & !granted == 0 {
            Ok(())
        } else {
            Err(errno(libc::EACCES))
        }
    }
}

fn dirent(seq: u64, name: &[u8], ino: u64, file_type: u32) -> DirEntry<'_> {
    DirEntry {
        ino,
        offset: seq,
        // DT_* values are the S_IFMT bits shifted down.
        type_: file_type >> 12,
        name,
    }
}

/// A `statvfs64` with every field zero except what the FUSE default sets.
///
/// The struct has private padding fields, so it cannot be built literally; the library's
/// default `statfs` returns a zeroed one, which a provider with no overrides exposes.
fn zeroed_statvfs() -> io::Result<statvfs64> {
    struct Defaults;
    impl FileSystem for Defaults {
        type Inode = u64;
        type Handle = u64;
    }
    Defaults.statfs(&Context::new(), 0)
}

/// Quota bytes an overlay file's upper copy grows by when its size goes from `size` to
/// `new_size`: a file still in the lower tree is copied up first (its bytes up to the new
/// size then count), an upper copy grows by the difference. Holes count (the charge is by
/// size, so it bounds the upper directory whatever the host filesystem allocates).
fn upper_growth(f: &crate::overlay::store::HostFile, size: u64, new_size: u64) -> u64 {
    match f.source() {
        Source::Lower(_) => new_size,
        Source::Upper(_) => new_size.saturating_sub(size),
    }
}

/// Gives back the charge of a failed overlay write or truncate, keeping what a copy-up made
/// before the failure holds (`kept` bytes now in the upper directory).
fn settle_failed(st: &mut State, growth: u64, copied_up: bool, kept: u64) {
    st.release_quota(growth);
    if copied_up {
        st.used = st.used.saturating_add(kept);
    }
}

/// Reads a FUSE write's payload (bounded by the request's size).
pub fn read_payload(r: &mut dyn ZeroCopyReader, size: u32) -> io::Result<Vec<u8>> {
    if size > MAX_IO {
        return Err(errno(libc::EINVAL));
    }
    let mut buf = vec![0u8; size as usize];
    io::Read::read_exact(r, &mut buf)?;
    Ok(buf)
}

/// Writes a FUSE read's reply.
pub fn write_reply(w: &mut dyn ZeroCopyWriter, data: &[u8]) -> io::Result<usize> {
    io::Write::write_all(w, data)?;
    Ok(data.len())
}
