//! The mount tree's FUSE operations: each one decodes its inode numbers to a provider (or a
//! synthesised directory) and forwards, converting the inode numbers in what comes back.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::VfsOptions;
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::{errno, MountTree, Target, OWN_COOKIE, SYNTH_WRITE};

type Inode = u64;
type Handle = u64;

/// A provider operation's target: which mount, and the provider's inode number.
struct Real<'a> {
    mount: usize,
    fs: &'a fuse_backend_rs::api::BackFileSystem,
    ino: u64,
}

/// The options the tree offers the guest kernel: the library's defaults without
/// zero-message open/opendir (providers keep handles), writeback caching (host files are
/// shared with the host) and killpriv v2.
fn offered() -> FsOptions {
    let mut o = VfsOptions::default().out_opts;
    o.remove(
        FsOptions::ZERO_MESSAGE_OPEN
            | FsOptions::ZERO_MESSAGE_OPENDIR
            | FsOptions::WRITEBACK_CACHE
            | FsOptions::HANDLE_KILLPRIV_V2,
    );
    o
}

/// A zeroed `statvfs64` (the library's default `statfs`).
fn zeroed_statvfs() -> io::Result<statvfs64> {
    struct Defaults;
    impl FileSystem for Defaults {
        type Inode = u64;
        type Handle = u64;
    }
    Defaults.statfs(&Context::new(), 0)
}

impl MountTree {
    /// The provider serving `ino`; a synthesised directory answers `synth`.
    fn real(&self, ino: u64, synth: i32) -> io::Result<Real<'_>> {
        match self.decode(ino)? {
            Target::Synth(_) => Err(errno(synth)),
            Target::Backend { mount, ino } => Ok(Real {
                mount,
                fs: &self.mounts[mount].fs,
                ino,
            }),
        }
    }

    /// A request creating or changing the entry `name` of `parent`: synthesised directories
    /// are read-only, and a path-node child answers `special`.
    fn name_op(&self, parent: u64, name: &CStr, special: i32) -> io::Result<Real<'_>> {
        let r = self.real(parent, SYNTH_WRITE)?;
        if self.special_child(parent, name)?.is_some() {
            return Err(errno(special));
        }
        Ok(r)
    }

    fn entry(&self, mount: usize, e: io::Result<Entry>) -> io::Result<Entry> {
        self.convert(mount, e?)
    }

    /// Attributes of provider inode `ino` of `mount` with the inode number the guest sees.
    fn attr(
        &self,
        mount: usize,
        ino: u64,
        r: io::Result<(stat64, Duration)>,
    ) -> io::Result<(stat64, Duration)> {
        r.map(|(mut st, d)| {
            st.st_ino = self.shown_ino(mount, ino, &st);
            (st, d)
        })
    }

    /// Lists a synthesised directory: `.`, `..`, then its children (cookie = index + 1).
    fn list_synth(
        &self,
        ctx: &Context,
        ino: u64,
        node: usize,
        offset: u64,
        plus: bool,
        add: &mut dyn FnMut(DirEntry, Option<Entry>) -> io::Result<usize>,
    ) -> io::Result<()> {
        let parent = self.nodes[node]
            .parent_ino
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut all: Vec<(&[u8], Option<usize>)> = vec![(b".", None), (b"..", None)];
        for c in &self.nodes[node].children {
            all.push((&self.nodes[*c].name, Some(*c)));
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (name, child)) in all.into_iter().enumerate().skip(skip) {
            let (d_ino, entry) = match child {
                None if name == b"." => (MountTree::synth_shown(node), None),
                None => (self.shown_of(ctx, parent)?, None),
                Some(c) => {
                    let e = self.resolve(ctx, ino, c, plus)?;
                    (e.attr.st_ino, Some(e))
                }
            };
            let node_id = entry.as_ref().map(|e| e.inode);
            let d = DirEntry {
                ino: d_ino,
                offset: i as u64 + 1,
                type_: libc::DT_DIR.into(),
                name,
            };
            if add(d, entry.filter(|_| plus))? == 0 {
                if let Some(id) = node_id.filter(|_| plus) {
                    self.drop_refs(ctx, id, 1);
                }
                break;
            }
        }
        Ok(())
    }

    /// Lists a provider directory; for a path node, its special children first (cookies with
    /// [`OWN_COOKIE`]), then the provider's entries without them.
    #[allow(clippy::too_many_arguments)]
    fn list_real(
        &self,
        ctx: &Context,
        ino: u64,
        handle: u64,
        size: u32,
        offset: u64,
        plus: bool,
        add: &mut dyn FnMut(DirEntry, Option<Entry>) -> io::Result<usize>,
    ) -> io::Result<()> {
        let r = self.real(ino, libc::ENOTDIR)?;
        let node = self.node_of(ino)?;
        let children: &[usize] = node.map_or(&[], |n| &self.nodes[n].children);
        let mut backend_offset = offset;
        if !children.is_empty() && (offset == 0 || offset & OWN_COOKIE != 0) {
            let skip = usize::try_from(offset & !OWN_COOKIE).unwrap_or(usize::MAX);
            for (i, c) in children.iter().enumerate().skip(skip) {
                let e = self.resolve(ctx, ino, *c, plus)?;
                let d = DirEntry {
                    ino: e.attr.st_ino,
                    offset: OWN_COOKIE | (i as u64 + 1),
                    type_: (e.attr.st_mode & libc::S_IFMT) >> 12,
                    name: &self.nodes[*c].name,
                };
                let einode = e.inode;
                if add(d, plus.then_some(e))? == 0 {
                    if plus {
                        self.drop_refs(ctx, einode, 1);
                    }
                    return Ok(());
                }
            }
            backend_offset = 0;
        }
        self.list_backend(ctx, &r, ino, node, handle, size, backend_offset, plus, add)
    }

    /// Lists the provider's entries of directory `ino` (path node `node`, if it is one)
    /// from the provider's `offset`, without the names its path-node children hide.
    #[allow(clippy::too_many_arguments)]
    fn list_backend(
        &self,
        ctx: &Context,
        r: &Real<'_>,
        ino: u64,
        node: Option<usize>,
        handle: u64,
        size: u32,
        offset: u64,
        plus: bool,
        add: &mut dyn FnMut(DirEntry, Option<Entry>) -> io::Result<usize>,
    ) -> io::Result<()> {
        let children: &[usize] = node.map_or(&[], |n| &self.nodes[n].children);
        // `..` of a mount's root names the directory it is mounted in (the tree's root:
        // itself, as at a filesystem's root; the guest kernel resolves `..` above it).
        let root_parent = node
            .filter(|n| self.nodes[*n].mount.is_some())
            .map(|n| match n {
                0 => ino,
                n => self.nodes[n]
                    .parent_ino
                    .load(std::sync::atomic::Ordering::Relaxed),
            });
        // Worked out before the listing, and references dropped after it: a provider holds
        // its locks while it calls back.
        let mount = r.mount;
        if !plus && self.mounts[mount].host_inodes && self.on_host_dev(ctx, r)? {
            return self.list_host(
                ctx,
                r,
                handle,
                size,
                offset,
                &hidden_by(children, self),
                add,
            );
        }
        let dot = self.shown_of(ctx, ino)?;
        let dotdot = root_parent.map(|p| self.shown_of(ctx, p)).transpose()?;
        let mut drop_later = Vec::new();
        let hidden = hidden_by(children, self);
        let mut forward = |mut d: DirEntry, e: Option<Entry>| -> io::Result<usize> {
            let held = e.as_ref().map_or(0, |e| e.inode);
            if hidden(d.name) {
                drop_later.extend((held != 0).then_some(held));
                // Accepted (not shown): the listing goes on.
                return Ok(1);
            }
            // A plain READDIR served by READDIRPLUS (below) keeps no reference.
            let keep = plus || held == 0;
            if !keep {
                drop_later.push(held);
            }
            let e = e.map(|e| self.convert(mount, e)).transpose()?;
            d.ino = match (d.name, dotdot, &e) {
                (b".", _, _) => dot,
                (b"..", Some(p), _) => p,
                (_, _, Some(e)) if e.inode != 0 => e.attr.st_ino,
                _ if d.ino != 0 => MountTree::own_ino(mount, d.ino),
                _ => 0,
            };
            let n = add(d, e)?;
            if n == 0 && !keep {
                // The provider drops the reference of an entry that did not fit.
                drop_later.pop();
            }
            Ok(n)
        };
        // A plain READDIR of a host directory on another device than the tree's host
        // device shows own numbers, which need the provider's node ids: its READDIRPLUS
        // has them (its READDIR gives host numbers, see `list_host`).
        let res = if plus || self.mounts[mount].host_inodes {
            r.fs.readdirplus(ctx, r.ino, handle, size, offset, &mut |d, e| {
                forward(d, Some(e))
            })
        } else {
            r.fs.readdir(ctx, r.ino, handle, size, offset, &mut |d| forward(d, None))
        };
        for held in drop_later {
            r.fs.forget(ctx, held, 1);
        }
        res
    }
}

/// Whether a name is hidden by one of `children` (path-node children of the listed
/// directory, listed first by the tree).
fn hidden_by<'a>(children: &'a [usize], tree: &'a MountTree) -> impl Fn(&[u8]) -> bool + 'a {
    move |name| children.iter().any(|c| tree.nodes[*c].name == name)
}

impl MountTree {
    /// Whether host directory `r` is on the tree's host device (its entries there show the
    /// host's numbers).
    fn on_host_dev(&self, ctx: &Context, r: &Real<'_>) -> io::Result<bool> {
        let (st, _) = r.fs.getattr(ctx, r.ino, None)?;
        Ok(self.host_dev == Some(st.st_dev))
    }

    /// A plain READDIR of a host directory on the tree's host device: the provider's
    /// READDIR gives the host's `st_ino` as `d_ino` without looking entries up (see
    /// [`crate::hostdir`]), which is the number shown; an entry it cannot number (0: a
    /// mount point, or a number at or above [`super::HOST_INO_LIMIT`]) is looked up
    /// (and forgotten after the listing) for the number `stat` shows.
    #[allow(clippy::too_many_arguments)]
    fn list_host(
        &self,
        ctx: &Context,
        r: &Real<'_>,
        handle: u64,
        size: u32,
        offset: u64,
        hidden: &dyn Fn(&[u8]) -> bool,
        add: &mut dyn FnMut(DirEntry, Option<Entry>) -> io::Result<usize>,
    ) -> io::Result<()> {
        let mut drop_later = Vec::new();
        let res =
            r.fs.readdir(ctx, r.ino, handle, size, offset, &mut |mut d| {
                if hidden(d.name) {
                    return Ok(1);
                }
                if d.ino == 0 || d.ino >= super::HOST_INO_LIMIT {
                    let name = std::ffi::CString::new(d.name).map_err(|_| errno(libc::EIO))?;
                    let e = r.fs.lookup(ctx, r.ino, &name)?;
                    if e.inode != 0 {
                        drop_later.push(e.inode);
                    }
                    d.ino = self.convert(r.mount, e)?.attr.st_ino;
                }
                add(d, None)
            });
        for held in drop_later {
            r.fs.forget(ctx, held, 1);
        }
        res
    }
}

impl FileSystem for MountTree {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let out = offered() & capable;
        for m in &self.mounts {
            m.fs.init(out)?;
        }
        Ok(out)
    }

    fn destroy(&self) {
        for m in &self.mounts {
            m.fs.destroy();
        }
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        if let Some(c) = self.special_child(parent, name)? {
            return self.resolve(ctx, parent, c, true);
        }
        let r = self.real(parent, libc::ENOENT)?;
        self.entry(r.mount, r.fs.lookup(ctx, r.ino, name))
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        self.drop_refs(ctx, inode, count);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        for (inode, count) in requests {
            self.drop_refs(ctx, inode, count);
        }
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(stat64, Duration)> {
        match self.decode(inode)? {
            Target::Synth(n) => Ok((self.synth_attr(n), super::SYNTH_TTL)),
            Target::Backend { mount, ino } => {
                let fs = &self.mounts[mount].fs;
                self.attr(mount, ino, fs.getattr(ctx, ino, handle))
            }
        }
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let r = self.real(inode, SYNTH_WRITE)?;
        self.attr(
            r.mount,
            r.ino,
            r.fs.setattr(ctx, r.ino, attr, handle, valid),
        )
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        let r = self.real(inode, libc::EINVAL)?;
        r.fs.readlink(ctx, r.ino)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        let r = self.name_op(parent, name, libc::EEXIST)?;
        self.entry(r.mount, r.fs.symlink(ctx, linkname, r.ino, name))
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
        let r = self.name_op(inode, name, libc::EEXIST)?;
        self.entry(r.mount, r.fs.mknod(ctx, r.ino, name, mode, rdev, umask))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let r = self.name_op(parent, name, libc::EEXIST)?;
        self.entry(r.mount, r.fs.mkdir(ctx, r.ino, name, mode, umask))
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        let r = self.name_op(parent, name, libc::EBUSY)?;
        r.fs.unlink(ctx, r.ino, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        let r = self.name_op(parent, name, libc::EBUSY)?;
        r.fs.rmdir(ctx, r.ino, name)
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
        let old = self.name_op(olddir, oldname, libc::EBUSY)?;
        let new = self.name_op(newdir, newname, libc::EBUSY)?;
        if old.mount != new.mount {
            return Err(errno(libc::EXDEV));
        }
        old.fs
            .rename(ctx, old.ino, oldname, new.ino, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        let new = self.name_op(newparent, newname, libc::EEXIST)?;
        let old = self.real(inode, libc::EPERM)?;
        if old.mount != new.mount {
            return Err(errno(libc::EXDEV));
        }
        self.entry(new.mount, new.fs.link(ctx, old.ino, new.ino, newname))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        let r = self.real(inode, libc::EISDIR)?;
        r.fs.open(ctx, r.ino, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        let r = self.name_op(parent, name, libc::EEXIST)?;
        let (e, h, o, p) = r.fs.create(ctx, r.ino, name, args)?;
        Ok((self.convert(r.mount, e)?, h, o, p))
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
        let r = self.real(inode, libc::EISDIR)?;
        r.fs.read(ctx, r.ino, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        rd: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let r = self.real(inode, SYNTH_WRITE)?;
        r.fs.write(
            ctx,
            r.ino,
            handle,
            rd,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    /// `ENOSYS`, which makes the guest kernel stop sending FLUSH (one round trip per
    /// `close`): no provider needs it (see the module docs).
    fn flush(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _handle: Handle,
        _lock_owner: u64,
    ) -> io::Result<()> {
        Err(errno(libc::ENOSYS))
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        let r = self.real(inode, libc::EINVAL)?;
        r.fs.fsync(ctx, r.ino, datasync, handle)
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
        let r = self.real(inode, SYNTH_WRITE)?;
        r.fs.fallocate(ctx, r.ino, handle, mode, offset, length)
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
        match self.decode(inode)? {
            Target::Synth(_) => Ok(()),
            Target::Backend { mount, ino } => self.mounts[mount].fs.release(
                ctx,
                ino,
                flags,
                handle,
                flush,
                flock_release,
                lock_owner,
            ),
        }
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        match self.decode(inode)? {
            Target::Backend { mount, ino } => self.mounts[mount].fs.statfs(ctx, ino),
            Target::Synth(_) => match self.root_mount {
                Some(m) => self.mounts[m].fs.statfs(ctx, self.mounts[m].root),
                None => zeroed_statvfs(),
            },
        }
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        let r = self.real(inode, SYNTH_WRITE)?;
        r.fs.setxattr(ctx, r.ino, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let r = self.real(inode, libc::ENODATA)?;
        r.fs.getxattr(ctx, r.ino, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        match self.decode(inode)? {
            Target::Synth(_) => Ok(if size == 0 {
                ListxattrReply::Count(0)
            } else {
                ListxattrReply::Names(Vec::new())
            }),
            Target::Backend { mount, ino } => self.mounts[mount].fs.listxattr(ctx, ino, size),
        }
    }

    fn removexattr(&self, ctx: &Context, inode: Inode, name: &CStr) -> io::Result<()> {
        let r = self.real(inode, SYNTH_WRITE)?;
        r.fs.removexattr(ctx, r.ino, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions)> {
        match self.decode(inode)? {
            Target::Synth(_) => Ok((None, OpenOptions::empty())),
            Target::Backend { mount, ino } => self.mounts[mount].fs.opendir(ctx, ino, flags),
        }
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
        let mut add = |d: DirEntry, _e: Option<Entry>| add_entry(d);
        match self.decode(inode)? {
            Target::Synth(n) => self.list_synth(ctx, inode, n, offset, false, &mut add),
            Target::Backend { .. } => {
                self.list_real(ctx, inode, handle, size, offset, false, &mut add)
            }
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
        let mut add = |d: DirEntry, e: Option<Entry>| match e {
            Some(e) => add_entry(d, e),
            // `.` and `..` of a synthesised directory: attributes are not needed (the
            // kernel does not link them), an empty entry says so.
            None => add_entry(d, Entry::default()),
        };
        match self.decode(inode)? {
            Target::Synth(n) => self.list_synth(ctx, inode, n, offset, true, &mut add),
            Target::Backend { .. } => {
                self.list_real(ctx, inode, handle, size, offset, true, &mut add)
            }
        }
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        match self.decode(inode)? {
            Target::Synth(_) => Ok(()),
            Target::Backend { mount, ino } => {
                self.mounts[mount].fs.fsyncdir(ctx, ino, datasync, handle)
            }
        }
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
    ) -> io::Result<()> {
        match self.decode(inode)? {
            Target::Synth(_) => Ok(()),
            Target::Backend { mount, ino } => {
                self.mounts[mount].fs.releasedir(ctx, ino, flags, handle)
            }
        }
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
        Err(errno(libc::ENOSYS))
    }

    fn removemapping(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _requests: Vec<RemovemappingOne>,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        Err(errno(libc::ENOSYS))
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        match self.decode(inode)? {
            #[allow(clippy::cast_sign_loss)]
            Target::Synth(_) if mask & (libc::W_OK as u32) != 0 => Err(errno(SYNTH_WRITE)),
            Target::Synth(_) => Ok(()),
            Target::Backend { mount, ino } => self.mounts[mount].fs.access(ctx, ino, mask),
        }
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let r = self.real(inode, libc::EINVAL)?;
        r.fs.lseek(ctx, r.ino, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        let r = self.real(inode, libc::ENOSYS)?;
        r.fs.getlk(ctx, r.ino, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        let r = self.real(inode, libc::ENOSYS)?;
        r.fs.setlk(ctx, r.ino, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        let r = self.real(inode, libc::ENOSYS)?;
        r.fs.setlkw(ctx, r.ino, handle, owner, lock, flags)
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
        Err(errno(libc::ENOTTY))
    }

    fn bmap(&self, _ctx: &Context, _inode: Inode, _block: u64, _blocksize: u32) -> io::Result<u64> {
        Err(errno(libc::ENOSYS))
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
        let r = self.real(inode, libc::ENOSYS)?;
        r.fs.poll(ctx, r.ino, handle, khandle, flags, events)
    }
}
