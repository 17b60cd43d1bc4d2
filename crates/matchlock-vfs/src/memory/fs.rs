//! The `fuse_backend_rs` `FileSystem` face of the tree, shared by `MemFs` and `OverlayFs`.
//!
//! # Design
//! Both providers are a [`Tree`]; the macro [`tree_filesystem!`] implements `FileSystem` and
//! `BackendFileSystem` for a wrapper type by forwarding to its `tree` field, so the two public
//! types have their own constructors and docs but one implementation. Operations not listed
//! keep the library's defaults (`ENOSYS`, which the guest kernel remembers: no xattrs, locks
//! handled in the guest kernel).

use std::ffi::CStr;
use std::io;

use fuse_backend_rs::abi::fuse_abi::{stat64, CreateIn, FsOptions, OpenOptions};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};

use super::io::{read_payload, write_reply};
use super::tree::{errno, Tree, ROOT};

/// Bytes of a name as FUSE passes it.
fn bytes(name: &CStr) -> &[u8] {
    name.to_bytes()
}

/// The operations, written once against [`Tree`]; the macro forwards to these.
#[allow(clippy::too_many_arguments, missing_docs)]
impl Tree {
    pub fn fs_init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let wanted = FsOptions::ATOMIC_O_TRUNC | FsOptions::DO_READDIRPLUS;
        let got = capable & wanted;
        self.writeback.store(
            capable.contains(FsOptions::WRITEBACK_CACHE),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(got)
    }

    pub fn fs_mount(&self) -> io::Result<(Entry, u64)> {
        let st = self.lock();
        Ok((self.entry(&st, ROOT)?, fuse_backend_rs::api::VFS_MAX_INO))
    }

    pub fn fs_lookup(&self, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.lookup(parent, bytes(name))
    }

    pub fn fs_getattr(&self, ino: u64) -> io::Result<(stat64, std::time::Duration)> {
        Ok((self.getattr(ino)?, self.ttl))
    }

    pub fn fs_setattr(
        &self,
        ino: u64,
        attr: stat64,
        fh: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, std::time::Duration)> {
        Ok((self.setattr(ino, &attr, fh, valid)?, self.ttl))
    }

    pub fn fs_mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.mknod(ctx, parent, bytes(name), mode & !(umask & 0o777))
    }

    pub fn fs_mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.mkdir(ctx, parent, bytes(name), mode & !(umask & 0o777))
    }

    pub fn fs_create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let mode = args.mode & !(args.umask & 0o777);
        let (entry, fh) = self.create(ctx, parent, bytes(name), mode, args.flags)?;
        Ok((entry, Some(fh), OpenOptions::empty(), None))
    }

    pub fn fs_open(
        &self,
        ino: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        Ok((Some(self.open(ino, flags)?), OpenOptions::empty(), None))
    }

    pub fn fs_read(
        &self,
        ino: u64,
        fh: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        let data = self.read(ino, fh, size, offset)?;
        write_reply(w, &data)
    }

    pub fn fs_write(
        &self,
        ino: u64,
        fh: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        let data = read_payload(r, size)?;
        self.write(ino, fh, &data, offset)
    }

    pub fn fs_readdir(
        &self,
        ino: u64,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.readdir(ino, offset, &mut |d, _| add_entry(d), false)
    }

    pub fn fs_readdirplus(
        &self,
        ino: u64,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.readdir(
            ino,
            offset,
            &mut |d, e| match e {
                Some(e) => add_entry(d, e),
                None => Err(errno(libc::EIO)),
            },
            true,
        )
    }
}

/// Implements `FileSystem` and `BackendFileSystem` for `$ty` by forwarding to `self.tree`.
macro_rules! tree_filesystem {
    ($ty:ty) => {
        impl fuse_backend_rs::api::filesystem::FileSystem for $ty {
            type Inode = u64;
            type Handle = u64;

            fn init(
                &self,
                capable: fuse_backend_rs::abi::fuse_abi::FsOptions,
            ) -> std::io::Result<fuse_backend_rs::abi::fuse_abi::FsOptions> {
                self.tree.fs_init(capable)
            }

            fn lookup(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                parent: u64,
                name: &std::ffi::CStr,
            ) -> std::io::Result<fuse_backend_rs::api::filesystem::Entry> {
                self.tree.fs_lookup(parent, name)
            }

            fn forget(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                inode: u64,
                count: u64,
            ) {
                self.tree.forget(inode, count)
            }

            fn getattr(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                inode: u64,
                _handle: Option<u64>,
            ) -> std::io::Result<(fuse_backend_rs::abi::fuse_abi::stat64, std::time::Duration)>
            {
                self.tree.fs_getattr(inode)
            }

            fn setattr(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                inode: u64,
                attr: fuse_backend_rs::abi::fuse_abi::stat64,
                handle: Option<u64>,
                valid: fuse_backend_rs::api::filesystem::SetattrValid,
            ) -> std::io::Result<(fuse_backend_rs::abi::fuse_abi::stat64, std::time::Duration)>
            {
                self.tree.fs_setattr(inode, attr, handle, valid)
            }

            fn readlink(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                inode: u64,
            ) -> std::io::Result<Vec<u8>> {
                self.tree.readlink(inode)
            }

            fn symlink(
                &self,
                ctx: &fuse_backend_rs::api::filesystem::Context,
                linkname: &std::ffi::CStr,
                parent: u64,
                name: &std::ffi::CStr,
            ) -> std::io::Result<fuse_backend_rs::api::filesystem::Entry> {
                self.tree
                    .symlink(ctx, linkname.to_bytes(), parent, name.to_bytes())
            }

            fn mknod(
                &self,
                ctx: &fuse_backend_rs::api::filesystem::Context,
                parent: u64,
                name: &std::ffi::CStr,
                mode: u32,
                _rdev: u32,
                umask: u32,
            ) -> std::io::Result<fuse_backend_rs::api::filesystem::Entry> {
                self.tree.fs_mknod(ctx, parent, name, mode, umask)
            }

            fn mkdir(
                &self,
                ctx: &fuse_backend_rs::api::filesystem::Context,
                parent: u64,
                name: &std::ffi::CStr,
                mode: u32,
                umask: u32,
            ) -> std::io::Result<fuse_backend_rs::api::filesystem::Entry> {
                self.tree.fs_mkdir(ctx, parent, name, mode, umask)
            }

            fn unlink(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                parent: u64,
                name: &std::ffi::CStr,
            ) -> std::io::Result<()> {
                self.tree.unlink(parent, name.to_bytes())
            }

            fn rmdir(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                parent: u64,
                name: &std::ffi::CStr,
            ) -> std::io::Result<()> {
                self.tree.rmdir(parent, name.to_bytes())
            }

            fn rename(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                olddir: u64,
                oldname: &std::ffi::CStr,
                newdir: u64,
                newname: &std::ffi::CStr,
                flags: u32,
            ) -> std::io::Result<()> {
                self.tree.rename(
                    olddir,
                    oldname.to_bytes(),
                    newdir,
                    newname.to_bytes(),
                    flags,
                )
            }

            fn link(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                inode: u64,
                newparent: u64,
                newname: &std::ffi::CStr,
            ) -> std::io::Result<fuse_backend_rs::api::filesystem::Entry> {
                self.tree.link(inode, newparent, newname.to_bytes())
            }

            fn open(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                inode: u64,
                flags: u32,
                _fuse_flags: u32,
            ) -> std::io::Result<(
                Option<u64>,
                fuse_backend_rs::abi::fuse_abi::OpenOptions,
                Option<u32>,
            )> {
                self.tree.fs_open(inode, flags)
            }

            fn create(
                &self,
                ctx: &fuse_backend_rs::api::filesystem::Context,
                parent: u64,
                name: &std::ffi::CStr,
                args: fuse_backend_rs::abi::fuse_abi::CreateIn,
            ) -> std::io::Result<(
                fuse_backend_rs::api::filesystem::Entry,
                Option<u64>,
                fuse_backend_rs::abi::fuse_abi::OpenOptions,
                Option<u32>,
            )> {
                self.tree.fs_create(ctx, parent, name, args)
            }

            fn read(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                inode: u64,
                handle: u64,
                w: &mut dyn fuse_backend_rs::api::filesystem::ZeroCopyWriter,
                size: u32,
                offset: u64,
                _lock_owner: Option<u64>,
                _flags: u32,
            ) -> std::io::Result<usize> {
                self.tree.fs_read(inode, handle, w, size, offset)
            }

            fn write(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                inode: u64,
                handle: u64,
                r: &mut dyn fuse_backend_rs::api::filesystem::ZeroCopyReader,
                size: u32,
                offset: u64,
                _lock_owner: Option<u64>,
                _delayed_write: bool,
                _flags: u32,
                _fuse_flags: u32,
            ) -> std::io::Result<usize> {
                self.tree.fs_write(inode, handle, r, size, offset)
            }

            fn flush(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                _inode: u64,
                _handle: u64,
                _lock_owner: u64,
            ) -> std::io::Result<()> {
                Ok(())
            }

            fn fsync(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                _inode: u64,
                _datasync: bool,
                _handle: u64,
            ) -> std::io::Result<()> {
                Ok(())
            }

            fn fallocate(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                inode: u64,
                handle: u64,
                mode: u32,
                offset: u64,
                length: u64,
            ) -> std::io::Result<()> {
                self.tree.fallocate(inode, handle, mode, offset, length)
            }

            fn release(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                _inode: u64,
                _flags: u32,
                handle: u64,
                _flush: bool,
                _flock_release: bool,
                _lock_owner: Option<u64>,
            ) -> std::io::Result<()> {
                self.tree.release(handle);
                Ok(())
            }

            fn statfs(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                _inode: u64,
            ) -> std::io::Result<fuse_backend_rs::abi::fuse_abi::statvfs64> {
                self.tree.statfs()
            }

            fn opendir(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                inode: u64,
                _flags: u32,
            ) -> std::io::Result<(Option<u64>, fuse_backend_rs::abi::fuse_abi::OpenOptions)> {
                self.tree.opendir(inode)?;
                Ok((None, fuse_backend_rs::abi::fuse_abi::OpenOptions::empty()))
            }

            fn readdir(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                inode: u64,
                _handle: u64,
                _size: u32,
                offset: u64,
                add_entry: &mut dyn FnMut(
                    fuse_backend_rs::api::filesystem::DirEntry,
                ) -> std::io::Result<usize>,
            ) -> std::io::Result<()> {
                self.tree.fs_readdir(inode, offset, add_entry)
            }

            fn readdirplus(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                inode: u64,
                _handle: u64,
                _size: u32,
                offset: u64,
                add_entry: &mut dyn FnMut(
                    fuse_backend_rs::api::filesystem::DirEntry,
                    fuse_backend_rs::api::filesystem::Entry,
                ) -> std::io::Result<usize>,
            ) -> std::io::Result<()> {
                self.tree.fs_readdirplus(inode, offset, add_entry)
            }

            fn fsyncdir(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                _inode: u64,
                _datasync: bool,
                _handle: u64,
            ) -> std::io::Result<()> {
                Ok(())
            }

            fn releasedir(
                &self,
                _ctx: &fuse_backend_rs::api::filesystem::Context,
                _inode: u64,
                _flags: u32,
                _handle: u64,
            ) -> std::io::Result<()> {
                Ok(())
            }

            fn access(
                &self,
                ctx: &fuse_backend_rs::api::filesystem::Context,
                inode: u64,
                mask: u32,
            ) -> std::io::Result<()> {
                self.tree.access(ctx, inode, mask)
            }
        }

        impl fuse_backend_rs::api::BackendFileSystem for $ty {
            fn mount(&self) -> std::io::Result<(fuse_backend_rs::api::filesystem::Entry, u64)> {
                self.tree.fs_mount()
            }

            fn as_any(&self) -> &dyn std::any::Any {
                self
            }
        }
    };
}
pub(crate) use tree_filesystem;
