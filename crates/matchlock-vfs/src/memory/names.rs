//! Namespace operations: lookup, create, remove, rename, links.
//!
//! # Design
//! Each operation is one critical section on the tree's lock, so a rename over an existing
//! name is atomic: no other request sees the target missing or both names present. Errors
//! follow Linux (`rename(2)`, `unlink(2)`, `rmdir(2)`, `link(2)`).

use std::io;

use fuse_backend_rs::api::filesystem::{Context, Entry};

use super::node::{Dir, Kind, Time};
use super::tree::{
    empty_content, errno, new_attr, new_name, State, Tree, MAX_LINKS, MAX_NAME, MAX_SYMLINK,
};

impl Tree {
    pub fn lookup(&self, parent: u64, name: &[u8]) -> io::Result<Entry> {
        if name.len() > MAX_NAME {
            return Err(errno(libc::ENAMETOOLONG));
        }
        let mut st = self.lock();
        let ino = match name {
            b"." => {
                st.dir(parent)?;
                parent
            }
            b".." => st.dir(parent)?.parent,
            _ => self
                .child(&mut st, parent, name)?
                .ok_or_else(|| errno(libc::ENOENT))?,
        };
        let node = st.node_mut(ino)?;
        node.lookups = node.lookups.saturating_add(1);
        self.entry(&st, ino)
    }

    pub fn forget(&self, ino: u64, count: u64) {
        let mut st = self.lock();
        if let Some(node) = st.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(count);
        }
        self.maybe_free(&mut st, ino);
    }

    /// Creates a directory, FIFO, socket or symlink (regular files go through `create`).
    pub fn make(
        &self,
        ctx: &Context,
        parent: u64,
        name: &[u8],
        mode: u32,
        kind: Kind,
    ) -> io::Result<Entry> {
        let name = new_name(name)?;
        let mut st = self.lock();
        let attr = new_attr(&st, ctx, parent, mode)?;
        let kind = match kind {
            Kind::Dir(_) => Kind::Dir(Dir::new(parent)),
            other => other,
        };
        let ino = self.add_node(&mut st, parent, name, kind, attr)?;
        let node = st.node_mut(ino)?;
        match &node.kind {
            Kind::Dir(_) => node.attr.nlink = 2,
            Kind::Symlink(t) => node.attr.size = t.len() as u64,
            _ => {}
        }
        self.entry(&st, ino)
    }

    pub fn mkdir(&self, ctx: &Context, parent: u64, name: &[u8], mode: u32) -> io::Result<Entry> {
        let mode = libc::S_IFDIR | (mode & 0o7777);
        self.make(ctx, parent, name, mode, Kind::Dir(Dir::new(parent)))
    }

    pub fn mknod(&self, ctx: &Context, parent: u64, name: &[u8], mode: u32) -> io::Result<Entry> {
        match mode & libc::S_IFMT {
            libc::S_IFREG => {
                let (entry, fh) = self.create(ctx, parent, name, mode, libc::O_EXCL as u32)?;
                self.release(fh);
                Ok(entry)
            }
            libc::S_IFIFO | libc::S_IFSOCK => self.make(ctx, parent, name, mode, Kind::Special),
            libc::S_IFCHR | libc::S_IFBLK => Err(errno(libc::EPERM)),
            _ => Err(errno(libc::EINVAL)),
        }
    }

    pub fn symlink(
        &self,
        ctx: &Context,
        target: &[u8],
        parent: u64,
        name: &[u8],
    ) -> io::Result<Entry> {
        if target.is_empty() {
            return Err(errno(libc::ENOENT));
        }
        if target.len() > MAX_SYMLINK {
            return Err(errno(libc::ENAMETOOLONG));
        }
        let mode = libc::S_IFLNK | 0o777;
        self.make(ctx, parent, name, mode, Kind::Symlink(target.to_vec()))
    }

    pub fn readlink(&self, ino: u64) -> io::Result<Vec<u8>> {
        let st = self.lock();
        match &st.node(ino)?.kind {
            Kind::Symlink(t) => Ok(t.clone()),
            _ => Err(errno(libc::EINVAL)),
        }
    }

    /// Creates and opens a regular file; an existing name opens it unless `O_EXCL`.
    pub fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: u32,
    ) -> io::Result<(Entry, u64)> {
        let name = new_name(name)?;
        let mut st = self.lock();
        let ino = match self.child(&mut st, parent, name)? {
            Some(_) if flags & libc::O_EXCL as u32 != 0 => return Err(errno(libc::EEXIST)),
            Some(ino) if st.node(ino)?.attr.is_dir() => return Err(errno(libc::EISDIR)),
            Some(ino) => {
                let node = st.node_mut(ino)?;
                node.lookups = node.lookups.saturating_add(1);
                ino
            }
            None => {
                let attr = new_attr(&st, ctx, parent, libc::S_IFREG | (mode & 0o7777))?;
                // Checked before the overlay creates an upper file, so that a refused create
                // leaves none behind (the overlay has no quota, the only later failure).
                Tree::check_live_dir(&st, parent)?;
                let content = empty_content(self)?;
                self.add_node(&mut st, parent, name, Kind::File(content), attr)?
            }
        };
        let opened = self.open_locked(&mut st, ino, flags);
        match opened {
            Ok(fh) => Ok((self.entry(&st, ino)?, fh)),
            Err(e) => {
                // Give back the reference the kernel will never get.
                if let Ok(node) = st.node_mut(ino) {
                    node.lookups = node.lookups.saturating_sub(1);
                }
                self.maybe_free(&mut st, ino);
                Err(e)
            }
        }
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        let ino = self
            .child(&mut st, parent, name)?
            .ok_or_else(|| errno(libc::ENOENT))?;
        if st.node(ino)?.attr.is_dir() {
            return Err(errno(libc::EISDIR));
        }
        self.remove_entry(&mut st, parent, name)?;
        self.maybe_free(&mut st, ino);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> io::Result<()> {
        if name == b"." {
            return Err(errno(libc::EINVAL));
        }
        if name == b".." {
            return Err(errno(libc::ENOTEMPTY));
        }
        let mut st = self.lock();
        let ino = self
            .child(&mut st, parent, name)?
            .ok_or_else(|| errno(libc::ENOENT))?;
        self.populate(&mut st, ino)?;
        if !st.dir(ino)?.is_empty() {
            return Err(errno(libc::ENOTEMPTY));
        }
        self.remove_entry(&mut st, parent, name)?;
        self.maybe_free(&mut st, ino);
        Ok(())
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> io::Result<Entry> {
        let newname = new_name(newname)?;
        let mut st = self.lock();
        let node = st.node(ino)?;
        if node.attr.is_dir() {
            return Err(errno(libc::EPERM));
        }
        if node.attr.nlink >= MAX_LINKS {
            return Err(errno(libc::EMLINK));
        }
        if self.child(&mut st, newparent, newname)?.is_some() {
            return Err(errno(libc::EEXIST));
        }
        Tree::check_live_dir(&st, newparent)?;
        st.charge(super::tree::ENTRY_COST + newname.len() as u64)?;
        st.dir_mut(newparent)?.insert(newname.to_vec(), ino);
        st.node_mut(newparent)?.attr.touch_modified();
        let node = st.node_mut(ino)?;
        node.attr.nlink += 1;
        node.attr.ctime = Time::now();
        node.lookups = node.lookups.saturating_add(1);
        self.entry(&st, ino)
    }

    pub fn rename(
        &self,
        olddir: u64,
        oldname: &[u8],
        newdir: u64,
        newname: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 || (noreplace && exchange)
        {
            return Err(errno(libc::EINVAL));
        }
        for n in [oldname, newname] {
            if n == b"." || n == b".." {
                return Err(errno(libc::EBUSY));
            }
        }
        let newname = new_name(newname)?;
        let mut st = self.lock();
        let src = self
            .child(&mut st, olddir, oldname)?
            .ok_or_else(|| errno(libc::ENOENT))?;
        let dst = self.child(&mut st, newdir, newname)?;
        Tree::check_live_dir(&st, newdir)?;
        if exchange {
            let dst = dst.ok_or_else(|| errno(libc::ENOENT))?;
            return self.exchange(&mut st, (olddir, oldname, src), (newdir, newname, dst));
        }
        if st.node(src)?.attr.is_dir() && Tree::is_within(&st, newdir, src)? {
            return Err(errno(libc::EINVAL));
        }
        if let Some(dst) = dst {
            if noreplace {
                return Err(errno(libc::EEXIST));
            }
            if dst == src {
                // Two names of one inode: rename(2) does nothing.
                return Ok(());
            }
            self.check_replace(&mut st, src, dst)?;
        }
        self.move_entry(&mut st, (olddir, oldname, src), (newdir, newname, dst))
    }

    /// Whether `src` may replace `dst` (types agree, a replaced directory is empty).
    fn check_replace(&self, st: &mut State, src: u64, dst: u64) -> io::Result<()> {
        let src_dir = st.node(src)?.attr.is_dir();
        let dst_dir = st.node(dst)?.attr.is_dir();
        match (src_dir, dst_dir) {
            (true, false) => Err(errno(libc::ENOTDIR)),
            (false, true) => Err(errno(libc::EISDIR)),
            (true, true) => {
                self.populate(st, dst)?;
                if st.dir(dst)?.is_empty() {
                    Ok(())
                } else {
                    Err(errno(libc::ENOTEMPTY))
                }
            }
            (false, false) => Ok(()),
        }
    }

    /// Moves `src` to its new name, replacing `dst` if present, in one step.
    fn move_entry(
        &self,
        st: &mut State,
        (olddir, oldname, src): (u64, &[u8], u64),
        (newdir, newname, dst): (u64, &[u8], Option<u64>),
    ) -> io::Result<()> {
        if let Some(dst) = dst {
            self.remove_entry(st, newdir, newname)?;
            self.maybe_free(st, dst);
        }
        st.dir_mut(olddir)?.remove(oldname);
        st.dir_mut(newdir)?.insert(newname.to_vec(), src);
        let grow = newname.len() as u64;
        let shrink = oldname.len() as u64;
        st.used = st.used.saturating_add(grow).saturating_sub(shrink);
        let is_dir = st.node(src)?.attr.is_dir();
        if is_dir {
            st.dir_mut(src)?.parent = newdir;
            if olddir != newdir {
                let o = st.node_mut(olddir)?;
                o.attr.nlink = o.attr.nlink.saturating_sub(1);
                let n = st.node_mut(newdir)?;
                n.attr.nlink = n.attr.nlink.saturating_add(1);
            }
        }
        st.node_mut(src)?.attr.ctime = Time::now();
        st.node_mut(olddir)?.attr.touch_modified();
        st.node_mut(newdir)?.attr.touch_modified();
        Ok(())
    }

    /// `RENAME_EXCHANGE`: swaps what two names refer to.
    fn exchange(
        &self,
        st: &mut State,
        (olddir, oldname, src): (u64, &[u8], u64),
        (newdir, newname, dst): (u64, &[u8], u64),
    ) -> io::Result<()> {
        if src == dst {
            return Ok(());
        }
        let src_dir = st.node(src)?.attr.is_dir();
        let dst_dir = st.node(dst)?.attr.is_dir();
        if (src_dir && Tree::is_within(st, newdir, src)?)
            || (dst_dir && Tree::is_within(st, olddir, dst)?)
        {
            return Err(errno(libc::EINVAL));
        }
        st.dir_mut(olddir)?.repoint(oldname, dst);
        st.dir_mut(newdir)?.repoint(newname, src);
        if src_dir {
            st.dir_mut(src)?.parent = newdir;
        }
        if dst_dir {
            st.dir_mut(dst)?.parent = olddir;
        }
        if olddir != newdir && src_dir != dst_dir {
            let (gains, loses) = if src_dir {
                (newdir, olddir)
            } else {
                (olddir, newdir)
            };
            let g = st.node_mut(gains)?;
            g.attr.nlink = g.attr.nlink.saturating_add(1);
            let l = st.node_mut(loses)?;
            l.attr.nlink = l.attr.nlink.saturating_sub(1);
        }
        let now = Time::now();
        for ino in [src, dst] {
            st.node_mut(ino)?.attr.ctime = now;
        }
        for ino in [olddir, newdir] {
            st.node_mut(ino)?.attr.touch_modified();
        }
        Ok(())
    }
}
