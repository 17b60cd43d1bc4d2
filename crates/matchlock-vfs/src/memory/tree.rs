//! The inode table both the memory and the overlay provider are made of.
//!
//! # Design
//! One `Mutex<State>` guards the whole table (inodes, open handles, quota). Every operation
//! takes it once, does its work and releases it; no operation takes another lock while holding
//! it (the lock order is therefore trivial: `State`, then nothing), and the guest-memory copy of
//! a read happens after it is released. The overlay's host I/O (lower reads, copy-up) runs under
//! the lock: it keeps a copy-up atomic with respect to concurrent writers of the same file.
//!
//! Inode numbers are never reused (a counter from 2), so they are stable for the life of the
//! provider and the FUSE generation is always 0. An inode is freed when it has no name
//! (`nlink == 0`), no kernel reference (`lookups == 0`) and no open handle.
//!
//! # Limitations
//! All operations are serialised; parallel writers to different files do not run in parallel.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use fuse_backend_rs::api::filesystem::{Context, Entry};

use super::data::SparseData;
use super::node::{Attr, Content, Dir, Kind, Node};
use crate::overlay::store::{LowerKind, Store};

/// Quota charged per inode, on top of its data.
pub const INODE_COST: u64 = 256;
/// Quota charged per directory entry, on top of its name.
pub const ENTRY_COST: u64 = 64;
/// Longest name (bytes).
pub const MAX_NAME: usize = 255;
/// Longest symlink target (bytes).
pub const MAX_SYMLINK: usize = 4096;
/// Largest file size (the kernel's own limit for FUSE files).
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;
/// Most hard links one inode may have.
pub const MAX_LINKS: u32 = 65_000;
/// The root directory's inode.
pub const ROOT: u64 = 1;

pub fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// An open file.
#[derive(Debug, Clone, Copy)]
pub struct OpenFile {
    pub ino: u64,
    pub flags: u32,
}

/// Everything the lock guards.
#[derive(Debug)]
pub struct State {
    pub nodes: HashMap<u64, Node>,
    pub handles: HashMap<u64, OpenFile>,
    next_ino: u64,
    next_fh: u64,
    pub used: u64,
    pub quota: u64,
}

impl State {
    pub fn node(&self, ino: u64) -> io::Result<&Node> {
        self.nodes.get(&ino).ok_or_else(|| errno(libc::ENOENT))
    }

    pub fn node_mut(&mut self, ino: u64) -> io::Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or_else(|| errno(libc::ENOENT))
    }

    pub fn dir(&self, ino: u64) -> io::Result<&Dir> {
        self.node(ino)?.dir().ok_or_else(|| errno(libc::ENOTDIR))
    }

    pub fn dir_mut(&mut self, ino: u64) -> io::Result<&mut Dir> {
        match &mut self.node_mut(ino)?.kind {
            Kind::Dir(d) => Ok(d),
            _ => Err(errno(libc::ENOTDIR)),
        }
    }

    /// Reserves `bytes` of quota or fails with `ENOSPC`.
    pub fn charge(&mut self, bytes: u64) -> io::Result<()> {
        match self.used.checked_add(bytes) {
            Some(total) if total <= self.quota => {
                self.used = total;
                Ok(())
            }
            _ => Err(errno(libc::ENOSPC)),
        }
    }

    pub fn release_quota(&mut self, bytes: u64) {
        self.used = self.used.saturating_sub(bytes);
    }

    pub fn alloc_ino(&mut self) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    pub fn alloc_fh(&mut self, file: OpenFile) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, file);
        fh
    }

    pub fn handle(&self, fh: u64, ino: u64) -> io::Result<OpenFile> {
        match self.handles.get(&fh) {
            Some(h) if h.ino == ino => Ok(*h),
            _ => Err(errno(libc::EBADF)),
        }
    }
}

/// The inode table plus, for the overlay, its host store.
#[derive(Debug)]
pub struct Tree {
    state: Mutex<State>,
    pub store: Option<Store>,
    /// The kernel negotiated a writeback cache: it may read through write-only handles and
    /// computes `O_APPEND` offsets itself.
    pub writeback: AtomicBool,
    pub ttl: Duration,
}

impl Tree {
    /// A tree with an empty root directory owned by root, mode 0755.
    pub fn new(quota: u64, store: Option<Store>, root_attr: Option<Attr>) -> Tree {
        let mut attr = root_attr.unwrap_or_else(|| Attr::new(libc::S_IFDIR | 0o755, 0, 0));
        attr.nlink = 2;
        let mut dir = Dir::new(ROOT);
        if store.is_some() {
            dir.unpopulated_lower = Some(std::path::PathBuf::new());
        }
        let root = Node {
            kind: Kind::Dir(dir),
            attr,
            lookups: 1,
            opens: 0,
        };
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, root);
        Tree {
            state: Mutex::new(State {
                nodes,
                handles: HashMap::new(),
                next_ino: ROOT + 1,
                next_fh: 1,
                used: INODE_COST,
                quota,
            }),
            store,
            writeback: AtomicBool::new(false),
            ttl: Duration::from_secs(1),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock; if one ever did, the table is still
        // structurally valid (every mutation is a single map operation), so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    pub fn entry(&self, st: &State, ino: u64) -> io::Result<Entry> {
        let node = st.node(ino)?;
        Ok(Entry {
            inode: ino,
            generation: 0,
            attr: node.stat(ino),
            attr_flags: 0,
            attr_timeout: self.ttl,
            entry_timeout: self.ttl,
        })
    }

    /// Overlay: reads a lower directory's entries into the table the first time it is used.
    pub fn populate(&self, st: &mut State, ino: u64) -> io::Result<()> {
        let (Some(store), Some(rel)) = (&self.store, st.dir(ino)?.unpopulated_lower.clone()) else {
            return Ok(());
        };
        let entries = store.list(&rel)?;
        for lower in entries {
            let child = st.alloc_ino();
            let (kind, nlink) = match lower.kind {
                LowerKind::Dir(path) => {
                    let mut d = Dir::new(ino);
                    d.unpopulated_lower = Some(path);
                    (Kind::Dir(d), 2)
                }
                LowerKind::File(file) => (Kind::File(Content::Host(file)), 1),
                LowerKind::Symlink(target) => (Kind::Symlink(target), 1),
            };
            let is_dir = matches!(kind, Kind::Dir(_));
            let mut attr = lower.attr;
            attr.nlink = nlink;
            st.used = st
                .used
                .saturating_add(INODE_COST + ENTRY_COST + lower.name.len() as u64);
            st.nodes.insert(
                child,
                Node {
                    kind,
                    attr,
                    lookups: 0,
                    opens: 0,
                },
            );
            let parent = st.node_mut(ino)?;
            if is_dir {
                parent.attr.nlink = parent.attr.nlink.saturating_add(1);
            }
            if let Kind::Dir(d) = &mut parent.kind {
                d.insert(lower.name, child);
            }
        }
        st.dir_mut(ino)?.unpopulated_lower = None;
        Ok(())
    }

    /// The inode `name` names in directory `parent`, if any (populating an overlay directory).
    pub fn child(&self, st: &mut State, parent: u64, name: &[u8]) -> io::Result<Option<u64>> {
        self.populate(st, parent)?;
        Ok(st.dir(parent)?.get(name))
    }

    /// Adds a new inode named `name` in `parent`, charging the quota; the kernel gets one
    /// reference.
    pub fn add_node(
        &self,
        st: &mut State,
        parent: u64,
        name: &[u8],
        kind: Kind,
        attr: Attr,
    ) -> io::Result<u64> {
        if self.child(st, parent, name)?.is_some() {
            return Err(errno(libc::EEXIST));
        }
        Tree::check_live_dir(st, parent)?;
        let extra = match &kind {
            Kind::Symlink(t) => t.len() as u64,
            _ => 0,
        };
        st.charge(INODE_COST + ENTRY_COST + name.len() as u64 + extra)?;
        let ino = st.alloc_ino();
        let is_dir = matches!(kind, Kind::Dir(_));
        st.nodes.insert(
            ino,
            Node {
                kind,
                attr,
                lookups: 1,
                opens: 0,
            },
        );
        let p = st.node_mut(parent)?;
        p.attr.touch_modified();
        if is_dir {
            p.attr.nlink = p.attr.nlink.saturating_add(1);
        }
        st.dir_mut(parent)?.insert(name.to_vec(), ino);
        Ok(ino)
    }

    /// Frees `ino` if nothing refers to it any more.
    pub fn maybe_free(&self, st: &mut State, ino: u64) {
        let Some(node) = st.nodes.get(&ino) else {
            return;
        };
        if ino == ROOT || node.attr.nlink > 0 || node.lookups > 0 || node.opens > 0 {
            return;
        }
        let Some(node) = st.nodes.remove(&ino) else {
            return;
        };
        let mut freed = INODE_COST;
        match node.kind {
            Kind::File(Content::Mem(d)) => freed += d.stored(),
            Kind::File(Content::Host(f)) => {
                // An upper copy's bytes were charged by size (see `io::upper_growth`).
                if matches!(f.source(), crate::overlay::store::Source::Upper(_)) {
                    freed += node.attr.size;
                }
                if let Some(store) = &self.store {
                    store.discard(ino, f);
                }
            }
            Kind::Symlink(t) => freed += t.len() as u64,
            Kind::Dir(_) | Kind::Special => {}
        }
        st.release_quota(freed);
    }

    /// Removes the entry `name` from `parent` (the caller checked what it names).
    pub fn remove_entry(&self, st: &mut State, parent: u64, name: &[u8]) -> io::Result<u64> {
        let ino = st
            .dir_mut(parent)?
            .remove(name)
            .ok_or_else(|| errno(libc::ENOENT))?;
        st.release_quota(ENTRY_COST + name.len() as u64);
        st.node_mut(parent)?.attr.touch_modified();
        let node = st.node_mut(ino)?;
        node.attr.ctime = super::node::Time::now();
        if node.attr.is_dir() {
            node.attr.nlink = 0;
            let p = st.node_mut(parent)?;
            p.attr.nlink = p.attr.nlink.saturating_sub(1);
        } else {
            node.attr.nlink = node.attr.nlink.saturating_sub(1);
        }
        Ok(ino)
    }

    /// Refuses to add names to a directory that was removed (the kernel may still hold it).
    pub fn check_live_dir(st: &State, dir: u64) -> io::Result<()> {
        if st.node(dir)?.attr.nlink == 0 {
            return Err(errno(libc::ENOENT));
        }
        Ok(())
    }

    /// Whether `ino` is `ancestor` or lies below it.
    pub fn is_within(st: &State, mut ino: u64, ancestor: u64) -> io::Result<bool> {
        loop {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT {
                return Ok(false);
            }
            ino = st.dir(ino)?.parent;
        }
    }
}

/// Checks a name the guest wants to create.
pub fn new_name(name: &[u8]) -> io::Result<&[u8]> {
    if name.is_empty() {
        return Err(errno(libc::ENOENT));
    }
    if name.len() > MAX_NAME {
        return Err(errno(libc::ENAMETOOLONG));
    }
    if name.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    if name == b"." || name == b".." {
        return Err(errno(libc::EEXIST));
    }
    Ok(name)
}

/// Owner and mode of a new inode: the caller's uid, the caller's gid unless the parent
/// directory is set-group-ID (then its gid, and new directories inherit the bit).
pub fn new_attr(st: &State, ctx: &Context, parent: u64, mode: u32) -> io::Result<Attr> {
    let p = &st.node(parent)?.attr;
    let mut attr = Attr::new(mode, ctx.uid, ctx.gid);
    if p.mode & libc::S_ISGID != 0 {
        attr.gid = p.gid;
        if attr.is_dir() {
            attr.mode |= libc::S_ISGID;
        }
    }
    Ok(attr)
}

/// A fresh empty file's contents.
pub fn empty_content(tree: &Tree) -> io::Result<Content> {
    match &tree.store {
        None => Ok(Content::Mem(SparseData::default())),
        Some(store) => Ok(Content::Host(store.create_upper()?)),
    }
}
