//! The policy every provider is served through: names, device nodes, set-id bits, the
//! caller's identity, read-only mounts and single-file mounts.
//!
//! # Design
//! [`Guard`] wraps any `fuse-backend-rs` backend and forwards each FUSE operation after
//! checking it, so the providers stay plain filesystems and the rules live in one place:
//! - a name in a request is one path component: empty names and names with `/` are EINVAL,
//!   `.` and `..` are EPERM (the guest kernel never sends them for a virtio-fs mount; a
//!   hostile one could use `..` on the share's root to reach its host parent);
//! - character and block device nodes are EPERM (a guest must not plant a device node in a
//!   user's tree); fifos and sockets are allowed;
//! - set-user-id and set-group-id bits are stripped on create, mkdir, mknod and chmod (a guest
//!   must not plant a set-id binary in a user's tree);
//! - the backend always sees uid/gid 0 in the request context, so a passthrough backend never
//!   switches credentials: files land owned by the sandbox owner's user, whoever the guest
//!   caller is;
//! - over host files (a `PassthroughFs` backend) the owner's user and group are shown to the
//!   guest as root and host root as the owner's ids (a swap, so `chown` maps back the same
//!   way): what the guest's root creates lands owned by the owner's user and still looks like
//!   its own in the guest. Without it, an unprivileged owner's files look foreign to the
//!   guest's root and tools that check ownership refuse them (`git`: "detected dubious
//!   ownership"). The swap is the identity when the owner runs as root;
//! - a read-only guard answers EROFS to every operation that writes (data, metadata,
//!   names, xattrs, opens for writing or truncating);
//! - a single-file guard serves one entry of a directory as the mount's root and refuses
//!   every request on the directory itself, so the rest of that directory stays unreachable.
//!
//! - a backend out of descriptors (`EMFILE`/`ENFILE`: a passthrough backend holds one per
//!   inode the guest has looked up, and the owner's hard open-file limit caps them) fails
//!   that request with the error, which the guest sees as "Too many open files", and the
//!   owner logs a warning (at most every [`FD_WARN_EVERY`]) naming the limit: the guest
//!   recovers once its kernel forgets inodes (memory pressure, `drop_caches`).
//!
//! # Limitations
//! Ownership changes (`chown`) are passed through (after the swap): the host kernel decides
//! with the owner's privileges, so an unprivileged owner's guest cannot give files away.
//! Host files owned by root and by the owner's user are told apart in the guest only through
//! the swap (root's look owned by the owner's uid). Extended attributes are passed through (read-only guards refuse writes).
//! With an unprivileged owner, `git` on both sides sees other uid/gid than the index the
//! other side wrote, so each refreshes (re-reads) and rewrites it after the other touched
//! it; `core.checkStat minimal` in the repository avoids that (docs/testing.md has the
//! figures). The swap stays: without it the guest's git refuses the repository.

use std::any::Any;
use std::ffi::{CStr, CString};
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::api::{BackFileSystem, BackendFileSystem, VFS_MAX_INO};
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::FsCacheReqHandler;

use crate::hostdir::{HostDirs, Listed};

type Inode = u64;
type Handle = u64;

/// Least time between two out-of-descriptors warnings.
pub const FD_WARN_EVERY: Duration = Duration::from_secs(10);

/// Seconds since the epoch of the last out-of-descriptors warning (0: none yet).
static FD_WARNED_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Passes `r` through; on `EMFILE`/`ENFILE` warns the owner (rate-limited).
fn note_fd_pressure<T>(r: io::Result<T>) -> io::Result<T> {
    if let Err(e) = &r {
        if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
            warn_fd_pressure();
        }
    }
    r
}

fn warn_fd_pressure() {
    use std::sync::atomic::Ordering;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = FD_WARNED_AT.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last) < FD_WARN_EVERY.as_secs() {
        return;
    }
    if FD_WARNED_AT
        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(0, |(soft, _)| soft);
    tracing::warn!(
        limit,
        "workspace: the open-file limit is reached (one descriptor per file the guest has \
         looked up); the guest gets \"Too many open files\" until it forgets some \
         (raise the hard limit: ulimit -Hn)"
    );
}

/// How a [`Guard`] restricts its backend.
#[derive(Debug, Clone, Default)]
pub struct GuardOptions {
    /// Answer EROFS to every write.
    pub readonly: bool,
    /// Serve only this entry of the backend's root directory, as the mount's root.
    pub single_file: Option<CString>,
    /// Owner reported to the guest for every file, whatever the host says (`owner_uid`).
    pub owner_uid: Option<u32>,
    /// Group reported to the guest for every file (`owner_gid`).
    pub owner_gid: Option<u32>,
}

/// A backend behind the sandbox's filesystem rules (see the module docs).
pub struct Guard {
    inner: BackFileSystem,
    opts: GuardOptions,
    /// The owner's host user and group, swapped with root in what the guest sees; `None`
    /// when the backend does not serve host files (its ids are the guest's own).
    host_owner: Option<(u32, u32)>,
    /// Plain READDIR from `getdents64` over a `PassthroughFs` (see [`crate::hostdir`]);
    /// `None` when the share root could not be opened (listings then fall back).
    dirs: Option<HostDirs>,
}

/// `id` as seen from the other side of the owner <-> root swap (its own inverse).
pub fn swap_owner(id: u32, owner: u32) -> u32 {
    if id == owner {
        0
    } else if id == 0 {
        owner
    } else {
        id
    }
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// EINVAL for empty names or names with `/` (or NUL), EPERM for `.` and `..`.
pub fn check_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b.contains(&b'/') {
        return Err(err(libc::EINVAL));
    }
    if b == b"." || b == b".." {
        return Err(err(libc::EPERM));
    }
    Ok(())
}

/// `mode` without the set-user-id and set-group-id bits.
pub fn strip_setid(mode: u32) -> u32 {
    mode & !(libc::S_ISUID | libc::S_ISGID)
}

/// Whether opening with `flags` could change the file.
pub fn open_writes(flags: u32) -> bool {
    // Flags are the guest's open(2) flags; reinterpret the bits.
    #[allow(clippy::cast_possible_wrap)]
    let f = flags as i32;
    f & libc::O_ACCMODE != libc::O_RDONLY
        || f & (libc::O_TRUNC | libc::O_APPEND | libc::O_CREAT) != 0
}

/// The context the backend sees: the guest's pid, uid/gid 0 (never switch credentials).
fn owner(ctx: &Context) -> Context {
    Context {
        uid: 0,
        gid: 0,
        pid: ctx.pid,
    }
}

impl Guard {
    pub fn new(inner: BackFileSystem, opts: GuardOptions) -> Guard {
        let host_files = inner.as_any().is::<PassthroughFs<()>>();
        let owner = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        Guard::with_host_owner(inner, opts, host_files.then_some(owner))
    }

    /// A guard that swaps `host_owner` (uid, gid) with root in what the guest sees.
    pub fn with_host_owner(
        inner: BackFileSystem,
        opts: GuardOptions,
        host_owner: Option<(u32, u32)>,
    ) -> Guard {
        let dirs = inner
            .as_any()
            .downcast_ref::<PassthroughFs<()>>()
            .filter(|_| opts.single_file.is_none())
            .and_then(|fs| {
                HostDirs::new(fs)
                    .inspect_err(|e| tracing::debug!(error = %e, "READDIR falls back to lookups"))
                    .ok()
            });
        Guard {
            inner,
            opts,
            host_owner,
            dirs,
        }
    }

    /// A plain READDIR of a host directory: `d_ino` is the host's `st_ino` for entries on
    /// the directory's device and 0 for the others (mount points), never the library's
    /// node id. From `getdents64` when the directory can be re-opened safely, else from the
    /// library's READDIRPLUS (references dropped).
    #[allow(clippy::too_many_arguments)]
    fn host_readdir(
        &self,
        fs: &PassthroughFs<()>,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let (st, _) = self.inner.getattr(ctx, inode, None)?;
        if let Some(dirs) = &self.dirs {
            if dirs.list(fs, inode, &st, size, offset, add_entry)? == Listed::Done {
                return Ok(());
            }
        }
        let mut held = Vec::new();
        let res = self
            .inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |mut d, e| {
                d.ino = if e.inode != 0 && e.attr.st_dev == st.st_dev {
                    e.attr.st_ino
                } else {
                    0
                };
                let n = add_entry(d);
                // The library drops the reference of an entry that did not fit itself.
                if e.inode != 0 && !matches!(n, Ok(0)) {
                    held.push(e.inode);
                }
                n
            });
        for ino in held {
            self.inner.forget(ctx, ino, 1);
        }
        note_fd_pressure(res)
    }

    /// Applies the owner <-> root swap and the reported-ownership override to attributes
    /// going to the guest.
    fn present(&self, st: &mut stat64) {
        if let Some((uid, gid)) = self.host_owner {
            st.st_uid = swap_owner(st.st_uid, uid);
            st.st_gid = swap_owner(st.st_gid, gid);
        }
        if let Some(uid) = self.opts.owner_uid {
            st.st_uid = uid;
        }
        if let Some(gid) = self.opts.owner_gid {
            st.st_gid = gid;
        }
    }

    fn entry(&self, r: io::Result<Entry>) -> io::Result<Entry> {
        note_fd_pressure(r).map(|mut e| {
            self.present(&mut e.attr);
            e
        })
    }

    fn attr(&self, r: io::Result<(stat64, Duration)>) -> io::Result<(stat64, Duration)> {
        r.map(|(mut st, d)| {
            self.present(&mut st);
            (st, d)
        })
    }

    fn writable(&self) -> io::Result<()> {
        if self.opts.readonly {
            Err(err(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// Refuses the backend's root directory when only one of its entries is shared.
    fn reachable(&self, inode: Inode) -> io::Result<()> {
        if self.opts.single_file.is_some() && inode == ROOT_ID {
            Err(err(libc::EPERM))
        } else {
            Ok(())
        }
    }

    /// A write-path request on `inode` creating or changing the entry `name`.
    fn name_write(&self, inode: Inode, name: &CStr) -> io::Result<()> {
        self.reachable(inode)?;
        check_name(name)?;
        self.writable()
    }
}

impl BackendFileSystem for Guard {
    fn mount(&self) -> io::Result<(Entry, u64)> {
        let (mut entry, max) = match &self.opts.single_file {
            None => self.inner.mount()?,
            Some(name) => {
                // Import the backend's root, then hand out only the one entry.
                let _ = self.inner.mount()?;
                let entry = self.inner.lookup(&Context::default(), ROOT_ID, name)?;
                (entry, VFS_MAX_INO)
            }
        };
        self.present(&mut entry.attr);
        Ok((entry, max))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl FileSystem for Guard {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        self.reachable(parent)?;
        check_name(name)?;
        self.entry(self.inner.lookup(&owner(ctx), parent, name))
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        self.inner.forget(&owner(ctx), inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        self.inner.batch_forget(&owner(ctx), requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.reachable(inode)?;
        self.attr(self.inner.getattr(&owner(ctx), inode, handle))
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        mut attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.reachable(inode)?;
        self.writable()?;
        if valid.contains(SetattrValid::MODE) {
            attr.st_mode = strip_setid(attr.st_mode);
        }
        if let Some((uid, gid)) = self.host_owner {
            // The guest's chown names ids as it sees them.
            if valid.contains(SetattrValid::UID) {
                attr.st_uid = swap_owner(attr.st_uid, uid);
            }
            if valid.contains(SetattrValid::GID) {
                attr.st_gid = swap_owner(attr.st_gid, gid);
            }
        }
        self.attr(self.inner.setattr(&owner(ctx), inode, attr, handle, valid))
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.reachable(inode)?;
        self.inner.readlink(&owner(ctx), inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.name_write(parent, name)?;
        self.entry(self.inner.symlink(&owner(ctx), linkname, parent, name))
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.name_write(inode, name)?;
        let kind = mode & libc::S_IFMT;
        if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
            return Err(err(libc::EPERM));
        }
        self.entry(
            self.inner
                .mknod(&owner(ctx), inode, name, strip_setid(mode), rdev, umask),
        )
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.name_write(parent, name)?;
        self.entry(
            self.inner
                .mkdir(&owner(ctx), parent, name, strip_setid(mode), umask),
        )
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.name_write(parent, name)?;
        self.inner.unlink(&owner(ctx), parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.name_write(parent, name)?;
        self.inner.rmdir(&owner(ctx), parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.name_write(olddir, oldname)?;
        self.name_write(newdir, newname)?;
        self.inner
            .rename(&owner(ctx), olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.reachable(inode)?;
        self.name_write(newparent, newname)?;
        self.entry(self.inner.link(&owner(ctx), inode, newparent, newname))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        self.reachable(inode)?;
        if open_writes(flags) {
            self.writable()?;
        }
        note_fd_pressure(self.inner.open(&owner(ctx), inode, flags, fuse_flags))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        self.name_write(parent, name)?;
        let args = CreateIn {
            mode: strip_setid(args.mode),
            ..args
        };
        let (mut e, h, o, p) =
            note_fd_pressure(self.inner.create(&owner(ctx), parent, name, args))?;
        self.present(&mut e.attr);
        Ok((e, h, o, p))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.reachable(inode)?;
        self.inner.read(
            &owner(ctx),
            inode,
            handle,
            w,
            size,
            offset,
            lock_owner,
            flags,
        )
    }

    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.reachable(inode)?;
        self.writable()?;
        self.inner.write(
            &owner(ctx),
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(&owner(ctx), inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.reachable(inode)?;
        self.inner.fsync(&owner(ctx), inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.reachable(inode)?;
        self.writable()?;
        self.inner
            .fallocate(&owner(ctx), inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner.release(
            &owner(ctx),
            inode,
            flags,
            handle,
            flush,
            flock_release,
            lock_owner,
        )
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        self.inner.statfs(&owner(ctx), inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.reachable(inode)?;
        self.writable()?;
        self.inner.setxattr(&owner(ctx), inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.reachable(inode)?;
        self.inner.getxattr(&owner(ctx), inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        self.reachable(inode)?;
        self.inner.listxattr(&owner(ctx), inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: Inode, name: &CStr) -> io::Result<()> {
        self.reachable(inode)?;
        self.writable()?;
        self.inner.removexattr(&owner(ctx), inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions)> {
        self.reachable(inode)?;
        note_fd_pressure(self.inner.opendir(&owner(ctx), inode, flags))
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.reachable(inode)?;
        let ctx = owner(ctx);
        match self.inner.as_any().downcast_ref::<PassthroughFs<()>>() {
            Some(fs) => self.host_readdir(fs, &ctx, inode, handle, size, offset, add_entry),
            None => self
                .inner
                .readdir(&ctx, inode, handle, size, offset, add_entry),
        }
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.reachable(inode)?;
        let mut present = |d: DirEntry, mut e: Entry| {
            self.present(&mut e.attr);
            add_entry(d, e)
        };
        self.inner
            .readdirplus(&owner(ctx), inode, handle, size, offset, &mut present)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        self.reachable(inode)?;
        self.inner.fsyncdir(&owner(ctx), inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(&owner(ctx), inode, flags, handle)
    }

    fn setupmapping(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _handle: Handle,
        _foffset: u64,
        _len: u64,
        _flags: u64,
        _moffset: u64,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        // No DAX window is offered.
        Err(err(libc::ENOSYS))
    }

    fn removemapping(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _requests: Vec<RemovemappingOne>,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        Err(err(libc::ENOSYS))
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        self.reachable(inode)?;
        #[allow(clippy::cast_sign_loss)]
        if mask & (libc::W_OK as u32) != 0 {
            self.writable()?;
        }
        self.inner.access(&owner(ctx), inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.reachable(inode)?;
        self.inner.lseek(&owner(ctx), inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner_id: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.reachable(inode)?;
        self.inner
            .getlk(&owner(ctx), inode, handle, owner_id, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner_id: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.reachable(inode)?;
        self.inner
            .setlk(&owner(ctx), inode, handle, owner_id, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner_id: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.reachable(inode)?;
        self.inner
            .setlkw(&owner(ctx), inode, handle, owner_id, lock, flags)
    }

    fn ioctl(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _handle: Handle,
        _flags: u32,
        _cmd: u32,
        _data: IoctlData,
        _out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        // No ioctl reaches a host file.
        Err(err(libc::ENOTTY))
    }

    fn bmap(&self, _ctx: &Context, _inode: Inode, _block: u64, _blocksize: u32) -> io::Result<u64> {
        Err(err(libc::ENOSYS))
    }

    fn poll(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        khandle: Handle,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.reachable(inode)?;
        self.inner
            .poll(&owner(ctx), inode, handle, khandle, flags, events)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }
}

#[cfg(test)]
mod tests;
