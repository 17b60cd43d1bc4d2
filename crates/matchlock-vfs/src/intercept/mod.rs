//! VFS interception: block rules and file events over the whole workspace (spec §9.4, §9.5).
//!
//! # Design
//! [`Intercept`] wraps the mount router, so one layer sees every guest filesystem operation,
//! whichever provider serves it, and the RPC file calls too (the guest agent performs
//! `read_file`/`write_file`/`list_files` on the guest's filesystem, so a path inside the
//! workspace reaches the host through here). FUSE names inodes; rules name guest paths, so
//! the wrapper learns each inode's path from the entries it hands the kernel ([`paths`]).
//! A blocked operation fails with `EPERM` before the provider sees it. After an operation
//! completes, a [`FileEvent`] goes to the sink when events are on; the sink must not block
//! (the sandbox queues and drops), so after-hooks never slow the filesystem path.
//!
//! FUSE operations map to the reference's hook ops: lookup/getattr = `stat`, opendir =
//! `readdir`, open = `open`, create/mknod/link = `create`, mkdir, setattr of mode or owner
//! and set/remove xattr = `chmod`, setattr of size = `truncate`, unlink/rmdir = `remove`,
//! rename (checked on the old **and** the new path, stricter than the reference, which
//! checks only the old one), symlink, readlink, read, write/fallocate = `write`, release =
//! `close` (event only: a close cannot be refused), fsync/fsyncdir = `sync`.
//!
//! A lookup of a name that does not exist is answered as a negative entry (inode 0) valid
//! for [`NEGATIVE_TIMEOUT`] instead of `ENOENT`, so the guest kernel caches the miss, as
//! upstream `virtiofsd` does with `cache=auto`: `git status` and compilers probe many names
//! that are not there (`.gitignore` in every directory, include paths). The coherence cost
//! is the same as for positive entries: a name the host creates after the guest missed it
//! shows in the guest within that time (a name the guest creates shows at once: the kernel
//! drops its own negative entry).
//!
//! # Limitations
//! An inode whose path is unknown (see [`paths`]) is refused while any block rule could
//! apply to the op (fail closed). Timestamps-only `setattr`, `getxattr`, `listxattr`, `access`,
//! `statfs`, locks and `lseek` are not hook ops and pass through unchecked, as in the
//! reference.

pub mod paths;
pub mod rules;

use std::ffi::CStr;
use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::transport::FsCacheReqHandler;

pub use matchlock_api::rpc::go_file_mode;
pub use paths::Paths;
pub use rules::{InterceptionWire, Op, Rules, RulesError};

/// One filesystem operation the guest performed (spec §9.5 `file` payload, before the
/// sandbox stamps it with a time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEvent {
    pub op: Op,
    /// Absolute guest path (for `rename` and `symlink`, the old path / the link).
    pub path: String,
    /// Bytes transferred (read/write), the new size (truncate), else 0.
    pub size: u64,
    /// Go `os.FileMode` bits as the reference reports them (0 when not known).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// How long the guest may cache a name that does not exist (see the module docs).
pub const NEGATIVE_TIMEOUT: Duration = crate::router::CACHE_TIMEOUT;

/// Where events go. Must not block.
pub type EventSink = Arc<dyn Fn(FileEvent) + Send + Sync>;

/// The interception layer over a filesystem whose root is the guest's workspace.
pub struct Intercept<F> {
    inner: F,
    rules: Rules,
    paths: Paths,
    workspace: String,
    sink: Option<EventSink>,
    /// Attributes sent with negative entries (the kernel ignores them; FUSE needs some).
    negative_attr: OnceLock<stat64>,
}

fn eperm() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

impl<F: FileSystem> Intercept<F> {
    /// Wraps `inner`, whose root is the guest directory `workspace`.
    pub fn new(inner: F, rules: Rules, workspace: &str, sink: Option<EventSink>) -> Self {
        let trimmed = workspace.trim_end_matches('/');
        Intercept {
            inner,
            rules,
            paths: Paths::default(),
            workspace: trimmed.to_string(),
            sink,
            negative_attr: OnceLock::new(),
        }
    }

    /// `ENOENT` from a lookup of `parent` as a negative entry the guest may cache.
    fn negative(&self, ctx: &Context, parent: u64, e: io::Error) -> io::Result<Entry> {
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
        let attr = match self.negative_attr.get() {
            Some(a) => *a,
            None => {
                // Any valid stat will do; the parent's is at hand (and exists: its lookup
                // just ran).
                let Ok((a, _)) = self.inner.getattr(ctx, parent.into(), None) else {
                    return Err(e);
                };
                *self.negative_attr.get_or_init(|| a)
            }
        };
        Ok(Entry {
            inode: 0,
            generation: 0,
            attr,
            attr_flags: 0,
            attr_timeout: Duration::ZERO,
            entry_timeout: NEGATIVE_TIMEOUT,
        })
    }

    /// The inode table (tests, diagnostics).
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    fn guest(&self, rel: Option<String>) -> Option<String> {
        let rel = rel?;
        Some(if rel == "/" {
            if self.workspace.is_empty() {
                "/".to_string()
            } else {
                self.workspace.clone()
            }
        } else {
            format!("{}{rel}", self.workspace)
        })
    }

    /// Whether paths are needed at all: with no block rule and no events the layer is a
    /// plain pass-through and keeps no table.
    fn track(&self) -> bool {
        !self.rules.blocks.is_empty() || self.events_on()
    }

    fn path_of(&self, inode: u64) -> Option<String> {
        if !self.track() {
            return None;
        }
        self.guest(self.paths.path(inode))
    }

    fn child_of(&self, parent: u64, name: &CStr) -> Option<String> {
        if !self.track() {
            return None;
        }
        self.guest(self.paths.child(parent, name.to_bytes()))
    }

    /// Refuses `op` on `path` when a block rule matches, or when the path is unknown and a
    /// rule for this op exists.
    fn gate(&self, op: Op, path: Option<&str>) -> io::Result<()> {
        if self.rules.blocks.is_empty() {
            return Ok(());
        }
        match path {
            Some(p) => match self.rules.blocking(op, p) {
                Some(rule) => {
                    tracing::debug!(op = op.as_str(), path = p, rule = %rule.name, "vfs operation blocked");
                    Err(eperm())
                }
                None => Ok(()),
            },
            None if self
                .rules
                .blocks
                .iter()
                .any(|r| r.ops.is_empty() || r.ops.contains(&op)) =>
            {
                tracing::warn!(
                    op = op.as_str(),
                    "vfs operation on an inode of unknown path refused"
                );
                Err(eperm())
            }
            None => Ok(()),
        }
    }

    fn emit(&self, ctx: &Context, op: Op, path: Option<String>, size: u64, mode: u32) {
        let (Some(sink), Some(path)) = (&self.sink, path) else {
            return;
        };
        if !self.rules.emit_events {
            return;
        }
        sink(FileEvent {
            op,
            path,
            size,
            mode: if mode == 0 { 0 } else { go_file_mode(mode) },
            uid: ctx.uid,
            gid: ctx.gid,
        });
    }

    fn events_on(&self) -> bool {
        self.sink.is_some() && self.rules.emit_events
    }

    /// Gate, run, learn the entry, emit: the shape of every entry-creating op.
    fn entry_op(
        &self,
        ctx: &Context,
        op: Op,
        parent: u64,
        name: &CStr,
        mode: u32,
        f: impl FnOnce() -> io::Result<Entry>,
    ) -> io::Result<Entry> {
        let path = self.child_of(parent, name);
        self.gate(op, path.as_deref())?;
        let entry = f()?;
        if entry.inode != 0 && self.track() {
            self.paths.learn(entry.inode, parent, name.to_bytes());
        }
        self.emit(ctx, op, path, 0, mode);
        Ok(entry)
    }

    /// Gate, run, emit: the shape of every op on an existing inode.
    fn inode_op<T>(
        &self,
        ctx: &Context,
        op: Op,
        inode: u64,
        f: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let path = self.path_of(inode);
        self.gate(op, path.as_deref())?;
        let out = f()?;
        self.emit(ctx, op, path, 0, 0);
        Ok(out)
    }

    /// Re-homes `name` in `dir` after a rename moved an inode there.
    fn relearn(&self, ctx: &Context, dir: u64, name: &CStr) {
        if !self.track() {
            return;
        }
        if let Ok(e) = self.inner.lookup(ctx, dir.into(), name) {
            self.paths.moved(e.inode, dir, name.to_bytes());
            self.inner.forget(ctx, e.inode.into(), 1);
        }
    }
}

impl<F: FileSystem> FileSystem for Intercept<F> {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.entry_op(ctx, Op::Stat, parent, name, 0, || {
            self.inner.lookup(ctx, parent.into(), name)
        })
        .or_else(|e| self.negative(ctx, parent, e))
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.paths.forget(inode, count);
        self.inner.forget(ctx, inode.into(), count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in &requests {
            self.paths.forget(*inode, *count);
        }
        self.inner.batch_forget(
            ctx,
            requests.into_iter().map(|(i, n)| (i.into(), n)).collect(),
        )
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inode_op(ctx, Op::Stat, inode, || {
            self.inner
                .getattr(ctx, inode.into(), handle.map(Into::into))
        })
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let op = if valid.contains(SetattrValid::SIZE) {
            Op::Truncate
        } else if valid.intersects(SetattrValid::MODE | SetattrValid::UID | SetattrValid::GID) {
            Op::Chmod
        } else {
            return self
                .inner
                .setattr(ctx, inode.into(), attr, handle.map(Into::into), valid);
        };
        let path = self.path_of(inode);
        self.gate(op, path.as_deref())?;
        let out = self
            .inner
            .setattr(ctx, inode.into(), attr, handle.map(Into::into), valid)?;
        let (size, mode) = match op {
            Op::Truncate => (u64::try_from(attr.st_size).unwrap_or(0), 0),
            _ => (0, out.0.st_mode),
        };
        self.emit(ctx, op, path, size, mode);
        Ok(out)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inode_op(ctx, Op::Readlink, inode, || {
            self.inner.readlink(ctx, inode.into())
        })
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.entry_op(ctx, Op::Symlink, parent, name, 0, || {
            self.inner.symlink(ctx, linkname, parent.into(), name)
        })
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.entry_op(ctx, Op::Create, parent, name, mode, || {
            self.inner
                .mknod(ctx, parent.into(), name, mode, rdev, umask)
        })
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.entry_op(ctx, Op::Mkdir, parent, name, mode | libc::S_IFDIR, || {
            self.inner.mkdir(ctx, parent.into(), name, mode, umask)
        })
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let path = self.child_of(parent, name);
        self.gate(Op::Remove, path.as_deref())?;
        self.inner.unlink(ctx, parent.into(), name)?;
        self.emit(ctx, Op::Remove, path, 0, 0);
        Ok(())
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let path = self.child_of(parent, name);
        self.gate(Op::Remove, path.as_deref())?;
        self.inner.rmdir(ctx, parent.into(), name)?;
        self.emit(ctx, Op::Remove, path, 0, 0);
        Ok(())
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        let old = self.child_of(olddir, oldname);
        let new = self.child_of(newdir, newname);
        self.gate(Op::Rename, old.as_deref())?;
        self.gate(Op::Rename, new.as_deref())?;
        self.inner
            .rename(ctx, olddir.into(), oldname, newdir.into(), newname, flags)?;
        self.relearn(ctx, newdir, newname);
        if flags & libc::RENAME_EXCHANGE != 0 {
            self.relearn(ctx, olddir, oldname);
        }
        self.emit(ctx, Op::Rename, old, 0, 0);
        Ok(())
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.entry_op(ctx, Op::Create, newparent, newname, 0, || {
            self.inner
                .link(ctx, inode.into(), newparent.into(), newname)
        })
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        self.inode_op(ctx, Op::Open, inode, || {
            let (h, opts, passthrough) = self.inner.open(ctx, inode.into(), flags, fuse_flags)?;
            Ok((h.map(Into::into), opts, passthrough))
        })
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let path = self.child_of(parent, name);
        self.gate(Op::Create, path.as_deref())?;
        let out = self.inner.create(ctx, parent.into(), name, args)?;
        if out.0.inode != 0 && self.track() {
            self.paths.learn(out.0.inode, parent, name.to_bytes());
        }
        self.emit(ctx, Op::Create, path, 0, out.0.attr.st_mode);
        Ok((out.0, out.1.map(Into::into), out.2, out.3))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let path = self.path_of(inode);
        self.gate(Op::Read, path.as_deref())?;
        let n = self.inner.read(
            ctx,
            inode.into(),
            handle.into(),
            w,
            size,
            offset,
            lock_owner,
            flags,
        )?;
        self.emit(ctx, Op::Read, path, n as u64, 0);
        Ok(n)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let path = self.path_of(inode);
        self.gate(Op::Write, path.as_deref())?;
        let n = self.inner.write(
            ctx,
            inode.into(),
            handle.into(),
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )?;
        if self.events_on() {
            // The reference reports the file's mode and owner after the write.
            let (mode, uid, gid) = match self.inner.getattr(ctx, inode.into(), Some(handle.into()))
            {
                Ok((st, _)) => (st.st_mode, st.st_uid, st.st_gid),
                Err(_) => (0, ctx.uid, ctx.gid),
            };
            let owner = Context { uid, gid, ..*ctx };
            self.emit(&owner, Op::Write, path, n as u64, mode);
        }
        Ok(n)
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner
            .flush(ctx, inode.into(), handle.into(), lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inode_op(ctx, Op::Sync, inode, || {
            self.inner.fsync(ctx, inode.into(), datasync, handle.into())
        })
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inode_op(ctx, Op::Write, inode, || {
            self.inner
                .fallocate(ctx, inode.into(), handle.into(), mode, offset, length)
        })
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let out = self.inner.release(
            ctx,
            inode.into(),
            flags,
            handle.into(),
            flush,
            flock_release,
            lock_owner,
        );
        if self.events_on() {
            self.emit(ctx, Op::Close, self.path_of(inode), 0, 0);
        }
        out
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode.into())
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.inode_op(ctx, Op::Chmod, inode, || {
            self.inner.setxattr(ctx, inode.into(), name, value, flags)
        })
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode.into(), name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode.into(), size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.inode_op(ctx, Op::Chmod, inode, || {
            self.inner.removexattr(ctx, inode.into(), name)
        })
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.inode_op(ctx, Op::ReadDir, inode, || {
            let (h, opts) = self.inner.opendir(ctx, inode.into(), flags)?;
            Ok((h.map(Into::into), opts))
        })
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode.into(), handle.into(), size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let mut learn = |d: DirEntry, e: Entry| {
            let name = d.name;
            let ino = e.inode;
            let n = add_entry(d, e)?;
            if n > 0 && ino != 0 && name != b"." && name != b".." && self.track() {
                self.paths.learn(ino, inode, name);
            }
            Ok(n)
        };
        self.inner
            .readdirplus(ctx, inode.into(), handle.into(), size, offset, &mut learn)
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inode_op(ctx, Op::Sync, inode, || {
            self.inner
                .fsyncdir(ctx, inode.into(), datasync, handle.into())
        })
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner
            .releasedir(ctx, inode.into(), flags, handle.into())
    }

    fn setupmapping(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner.setupmapping(
            ctx,
            inode.into(),
            handle.into(),
            foffset,
            len,
            flags,
            moffset,
            vu_req,
        )
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: u64,
        requests: Vec<fuse_backend_rs::abi::virtio_fs::RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner
            .removemapping(ctx, inode.into(), requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode.into(), mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner
            .lseek(ctx, inode.into(), handle.into(), offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner
            .getlk(ctx, inode.into(), handle.into(), owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner
            .setlk(ctx, inode.into(), handle.into(), owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner
            .setlkw(ctx, inode.into(), handle.into(), owner, lock, flags)
    }

    fn ioctl(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.inner
            .ioctl(ctx, inode.into(), handle.into(), flags, cmd, data, out_size)
    }

    fn bmap(&self, ctx: &Context, inode: u64, block: u64, blocksize: u32) -> io::Result<u64> {
        self.inner.bmap(ctx, inode.into(), block, blocksize)
    }

    fn poll(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        khandle: u64,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.inner.poll(
            ctx,
            inode.into(),
            handle.into(),
            khandle.into(),
            flags,
            events,
        )
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }
}
