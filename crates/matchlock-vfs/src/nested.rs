//! The mount tree: providers mounted at guest paths, nested ones included, served as one
//! filesystem (spec §9.3: the router resolves by the longest guest prefix).
//!
//! # Design
//! `fuse_backend_rs::api::Vfs` only crosses into a mount from its own pseudo directories, so
//! a mount inside another mount's tree (`/workspace` host_fs and `/workspace/sub` memory)
//! would be shadowed by the outer backend. [`MountTree`] replaces it with a small layer of
//! our own that knows the mount *paths*:
//! - Every mount path and every directory on the way to one is a *path node* (built once).
//!   A path node is served by whichever provider owns that path, or, when the owner has no
//!   directory of that name (or no provider owns it at all), by a *synthesised* directory:
//!   mode 0755, owned by root, and every write into or on it (create, mkdir, mknod,
//!   symlink, link, unlink, rmdir, rename, setattr, xattrs, `access(W_OK)`) is `EROFS`:
//!   nothing backs it, so there is nowhere to write to, whoever the caller is.
//! - LOOKUP of a path node's child name never reaches the plain backend path: a mount point
//!   answers with the inner provider's root (the outer's own entry of that name is hidden,
//!   as with a Linux mount); an intermediate name answers with the owner's real directory
//!   when it has one (shown, with the inner mount on top of its child) and with the
//!   synthesised directory otherwise (a non-directory of that name is hidden).
//! - Which backend directories are path nodes is learnt from those lookups and kept with the
//!   kernel's reference count (forget drops it), like the interception layer's path table.
//! - READDIR of a path node lists the mount points and intermediate names first (cookies
//!   with the top bit set, which no backend cookie has: they are `off_t` values), then the
//!   backend's own entries minus those names, so each shows once.
//! - FUSE node ids are `slot << 56 | backend inode` (slot 0: synthesised directories, slot
//!   k: the k-th mount), so they stay unique across providers, as in `Vfs`; a mount at the
//!   tree's root answers as the FUSE root inode.
//! - The inode numbers the guest *sees* (`st_ino`, `d_ino`) are not the node ids (the guest
//!   kernel keys its inodes by node id and shows `attr.ino`, as with virtiofsd). One host
//!   device per tree is *the host device*: the device of the workspace's own mount when
//!   that is a host mount (`host_fs`), else of the first host mount. An entry of a host
//!   mount on that device shows the host's `st_ino`, so an index the host's `git` wrote
//!   (it records `st_ino`) matches in the guest and the other way round; hard links share
//!   it and a rename keeps it, as on the host. Everything else (a host mount or a host
//!   submount on another device, `memory`, `overlay`, synthesised directories) shows a
//!   number of our own, `k << 56 | backend inode` for mount k (`0xff << 56 | n` for
//!   synthesised directory n), which is stable while the tree lives. Own numbers are at or
//!   above 2^56 and a host number is shown only below it, so the two never collide: the guest
//!   sees one `st_dev` for the whole share, and `(dev, ino)` is what `cp -a`, `tar`, `du` and
//!   `rsync -H` take for hard links and `find` for directory loops. A host number at or above
//!   2^56 (not made by ext4, xfs, btrfs or tmpfs in practice) is shown as an own number.
//!   Two host mounts of the same device show the host's numbers both; the same host file
//!   reached through both (overlapping shares) then shows one number, as with a bind mount.
//!   `overlay` keeps own numbers even for untouched lower files: two lower names of one host
//!   inode are separate files in its view, so the host's number would make them false hard
//!   links.
//! - Names that are path-node children cannot be created (`EEXIST`), removed or renamed
//!   (`EBUSY`, as for a mount point); rename and link between two providers are `EXDEV`.
//! - `..` is the guest kernel's: it walks its own dentry tree, so `..` from an inner mount's
//!   root is the outer directory; the `..` entry READDIR shows in an inner root or a
//!   synthesised directory names that directory too.
//!
//! - FLUSH (sent on every `close` of a file) is answered `ENOSYS`, so the guest kernel
//!   stops sending it after the first (`fc->no_flush`), as for a server without `flush`:
//!   one round trip less per `close` of a file.
//!   Nothing needs it: the guest kernel writes dirty data back before it would send FLUSH
//!   (and there is no writeback cache), POSIX locks stay in the guest kernel (no provider
//!   implements GETLK/SETLK, so the host descriptor holds none to release), and `memory`
//!   ignores it. What is lost is a host filesystem's error at `close` of a duplicate
//!   descriptor (NFS can report deferred write errors there): the guest sees them at
//!   `fsync` or never, as it would for any cached write.
//!
//! The interception layer sits above this one, so it learns full guest paths through the
//! same lookups whichever provider serves them.
//!
//! # Limitations
//! - A host process renaming or deleting a real intermediate directory on the host while the
//!   guest holds it keeps the old node attached to the mount until the guest forgets it.
//! - At most 254 mounts (8 bits of slot; slot 255 numbers synthesised directories in what
//!   the guest sees), each with inode numbers below 2^56.
//! - A plain READDIR of a host directory on the host device takes the host's numbers from
//!   `getdents64` (see [`crate::hostdir`]; mount points in it are looked up); one on
//!   another device is served from the provider's READDIRPLUS (own numbers need node ids),
//!   whose attributes are dropped. Either way `d_ino` and `st_ino` agree everywhere.
//! - `git` also compares uid/gid: see [`crate::guard`] (the owner/root swap).
//! - A mount nested under a single-file mount is refused (a file has no children).

mod ops;

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuse_backend_rs::abi::fuse_abi::stat64;
use fuse_backend_rs::api::filesystem::{Context, Entry, ROOT_ID};
use fuse_backend_rs::api::{BackFileSystem, VFS_MAX_INO};

/// Bits of an inode number below the slot.
const SLOT_SHIFT: u32 = 56;
/// Most mounts one tree holds (slot 255 is the synthesised directories' in shown numbers).
pub const MAX_MOUNTS: usize = 254;
/// Host inode numbers at or above this are not shown (our own numbers live there).
pub const HOST_INO_LIMIT: u64 = 1 << SLOT_SHIFT;
/// The slot of synthesised directories in the inode numbers the guest sees.
const SYNTH_SHOWN_SLOT: u64 = 0xff;
/// Marks a directory cookie as one of the tree's own entries.
const OWN_COOKIE: u64 = 1 << 63;
/// Mode of a synthesised directory: readable and searchable by all, owned by root.
pub const SYNTH_MODE: u32 = 0o755;
/// What a write into (or onto) a synthesised directory fails with: `EROFS`, because no
/// provider backs it, whoever asks (`EACCES` would suggest that another user could).
pub const SYNTH_WRITE: i32 = libc::EROFS;
/// How long the guest may cache a synthesised directory (the owner may later gain a real one).
const SYNTH_TTL: Duration = Duration::from_secs(1);

/// Why a mount tree could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    #[error("more than {MAX_MOUNTS} mounts")]
    TooMany,
    #[error("mount {path:?}: the provider failed to start")]
    Mount {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("mount {path:?}: the provider's inode numbers do not fit the router's")]
    InodeRange { path: String },
    #[error("mount {inner:?} is nested inside {outer:?}, which is a single file")]
    InsideFile { outer: String, inner: String },
    #[error("mount path {path:?} is not absolute or has an empty, '.' or '..' component")]
    BadPath { path: String },
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// One mounted provider.
struct Mount {
    fs: BackFileSystem,
    /// Whether its attributes are a host file's (`host_fs`): then they may show the host's
    /// `st_ino` (see the module docs).
    host_inodes: bool,
    /// The provider's root inode (its own number).
    root: u64,
    /// The path node it is mounted at.
    node: usize,
}

/// A mount path or a directory on the way to one.
struct PathNode {
    parent: usize,
    name: Vec<u8>,
    children: Vec<usize>,
    /// The mount (index into `mounts`) at exactly this path.
    mount: Option<usize>,
    /// The inode number the guest last reached this node's parent by (for `..`).
    parent_ino: AtomicU64,
}

/// What an inode number names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The synthesised directory of a path node.
    Synth(usize),
    /// A provider's inode.
    Backend { mount: usize, ino: u64 },
}

/// A backend directory that is a path node, with the references the guest holds to it.
struct Learnt {
    node: usize,
    refs: u64,
}

/// Providers mounted at paths, served as one filesystem (see the module docs).
pub struct MountTree {
    nodes: Vec<PathNode>,
    mounts: Vec<Mount>,
    /// The mount at the tree's root, if any.
    root_mount: Option<usize>,
    learnt: Mutex<HashMap<u64, Learnt>>,
    created: SystemTime,
    /// The host device whose inode numbers the guest sees (see the module docs).
    host_dev: Option<u64>,
}

/// One provider to mount: where, and whether it serves host files (`host_fs`), whose
/// inode numbers the guest may see.
pub struct TreeMount {
    /// Absolute path relative to the tree's root (`/` is the root itself).
    pub path: String,
    pub fs: BackFileSystem,
    pub host_inodes: bool,
}

/// The components of an absolute mount path (`/` has none).
fn components(path: &str) -> Result<Vec<&[u8]>, NestedError> {
    let bad = || NestedError::BadPath {
        path: path.to_string(),
    };
    let rest = path.strip_prefix('/').ok_or_else(bad)?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    rest.split('/')
        .map(|c| match c {
            "" | "." | ".." => Err(bad()),
            c => Ok(c.as_bytes()),
        })
        .collect()
}

impl MountTree {
    /// Mounts each provider at its path (absolute, relative to the tree's root; `/` is the
    /// root itself), none of them showing host inode numbers. Later duplicates of a path
    /// replace nothing: paths must be unique.
    pub fn new(mounts: Vec<(String, BackFileSystem)>) -> Result<MountTree, NestedError> {
        MountTree::with_mounts(
            mounts
                .into_iter()
                .map(|(path, fs)| TreeMount {
                    path,
                    fs,
                    host_inodes: false,
                })
                .collect(),
        )
    }

    /// [`MountTree::new`] with each mount saying whether it serves host files.
    pub fn with_mounts(mounts: Vec<TreeMount>) -> Result<MountTree, NestedError> {
        if mounts.len() > MAX_MOUNTS {
            return Err(NestedError::TooMany);
        }
        let mut tree = MountTree {
            nodes: vec![PathNode {
                parent: 0,
                name: Vec::new(),
                children: Vec::new(),
                mount: None,
                parent_ino: AtomicU64::new(ROOT_ID),
            }],
            mounts: Vec::new(),
            root_mount: None,
            learnt: Mutex::new(HashMap::new()),
            created: SystemTime::now(),
            host_dev: None,
        };
        for m in mounts {
            tree.add(&m.path, m.fs, m.host_inodes)?;
        }
        tree.check_dirs()?;
        tree.pick_host_dev()?;
        Ok(tree)
    }

    /// Chooses the host device whose inode numbers the guest sees: the root mount's when it
    /// serves host files, else the first host mount's.
    fn pick_host_dev(&mut self) -> Result<(), NestedError> {
        let first = self
            .root_mount
            .filter(|m| self.mounts[*m].host_inodes)
            .or_else(|| self.mounts.iter().position(|m| m.host_inodes));
        let Some(first) = first else {
            return Ok(());
        };
        let m = &self.mounts[first];
        let (st, _) =
            m.fs.getattr(&Context::default(), m.root, None)
                .map_err(|source| NestedError::Mount {
                    path: self.path_of(m.node),
                    source,
                })?;
        self.host_dev = Some(st.st_dev);
        tracing::debug!(dev = st.st_dev, "host inode numbers shown for this device");
        Ok(())
    }

    fn add(
        &mut self,
        path: &str,
        fs: BackFileSystem,
        host_inodes: bool,
    ) -> Result<(), NestedError> {
        let mut node = 0;
        for name in components(path)? {
            node = match self.child_named(node, name) {
                Some(c) => c,
                None => {
                    self.nodes.push(PathNode {
                        parent: node,
                        name: name.to_vec(),
                        children: Vec::new(),
                        mount: None,
                        parent_ino: AtomicU64::new(ROOT_ID),
                    });
                    let c = self.nodes.len() - 1;
                    self.nodes[node].children.push(c);
                    c
                }
            };
        }
        let (entry, max) = fs.mount().map_err(|source| NestedError::Mount {
            path: path.to_string(),
            source,
        })?;
        if max > VFS_MAX_INO || entry.inode > VFS_MAX_INO || entry.inode == 0 {
            return Err(NestedError::InodeRange {
                path: path.to_string(),
            });
        }
        let index = self.mounts.len();
        self.mounts.push(Mount {
            fs,
            host_inodes,
            root: entry.inode,
            node,
        });
        self.nodes[node].mount = Some(index);
        if node == 0 {
            self.root_mount = Some(index);
        }
        tracing::debug!(path, slot = index + 1, "mounted");
        Ok(())
    }

    /// Refuses a mount below a provider whose root is not a directory.
    fn check_dirs(&self) -> Result<(), NestedError> {
        for m in &self.mounts {
            if self.nodes[m.node].children.is_empty() {
                continue;
            }
            let (st, _) =
                m.fs.getattr(&Context::default(), m.root, None)
                    .map_err(|source| NestedError::Mount {
                        path: self.path_of(m.node),
                        source,
                    })?;
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                let inner = self.nodes[m.node].children[0];
                return Err(NestedError::InsideFile {
                    outer: self.path_of(m.node),
                    inner: self.path_of(inner),
                });
            }
        }
        Ok(())
    }

    /// A path node's path, for messages.
    fn path_of(&self, mut node: usize) -> String {
        let mut parts = Vec::new();
        while node != 0 {
            parts.push(String::from_utf8_lossy(&self.nodes[node].name).into_owned());
            node = self.nodes[node].parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    fn child_named(&self, node: usize, name: &[u8]) -> Option<usize> {
        self.nodes[node]
            .children
            .iter()
            .copied()
            .find(|c| self.nodes[*c].name == name)
    }

    /// The inode number of a provider's inode.
    fn encode(&self, mount: usize, ino: u64) -> io::Result<u64> {
        if self.root_mount == Some(mount) && ino == self.mounts[mount].root {
            return Ok(ROOT_ID);
        }
        if ino > VFS_MAX_INO {
            return Err(errno(libc::EIO));
        }
        Ok(((mount as u64 + 1) << SLOT_SHIFT) | ino)
    }

    fn synth_ino(node: usize) -> u64 {
        node as u64 + 1
    }

    /// The inode number the guest sees for synthesised directory `node`.
    fn synth_shown(node: usize) -> u64 {
        (SYNTH_SHOWN_SLOT << SLOT_SHIFT) | MountTree::synth_ino(node)
    }

    /// Our own number for provider inode `ino` of `mount` (as its node id, but also for a
    /// root mount's root, whose node id is the FUSE root's).
    fn own_ino(mount: usize, ino: u64) -> u64 {
        ((mount as u64 + 1) << SLOT_SHIFT) | (ino & VFS_MAX_INO)
    }

    /// The inode number the guest sees for provider inode `ino` of `mount` with the
    /// attributes `st` (see the module docs).
    fn shown_ino(&self, mount: usize, ino: u64, st: &stat64) -> u64 {
        let host = self.mounts[mount].host_inodes
            && self.host_dev == Some(st.st_dev)
            && st.st_ino != 0
            && st.st_ino < HOST_INO_LIMIT;
        if host {
            st.st_ino
        } else {
            MountTree::own_ino(mount, ino)
        }
    }

    /// The inode number the guest sees for the tree's node id `node_id` (one `getattr` of
    /// a provider inode).
    fn shown_of(&self, ctx: &Context, node_id: u64) -> io::Result<u64> {
        match self.decode(node_id)? {
            Target::Synth(n) => Ok(MountTree::synth_shown(n)),
            Target::Backend { mount, ino } => {
                let (st, _) = self.mounts[mount].fs.getattr(ctx, ino, None)?;
                Ok(self.shown_ino(mount, ino, &st))
            }
        }
    }

    fn decode(&self, ino: u64) -> io::Result<Target> {
        if ino == ROOT_ID {
            if let Some(m) = self.root_mount {
                return Ok(Target::Backend {
                    mount: m,
                    ino: self.mounts[m].root,
                });
            }
        }
        let slot = usize::try_from(ino >> SLOT_SHIFT).map_err(|_| errno(libc::ENOENT))?;
        let low = ino & VFS_MAX_INO;
        if slot == 0 {
            let node = usize::try_from(low.wrapping_sub(1)).map_err(|_| errno(libc::ENOENT))?;
            return if node < self.nodes.len() {
                Ok(Target::Synth(node))
            } else {
                Err(errno(libc::ENOENT))
            };
        }
        if slot > self.mounts.len() {
            return Err(errno(libc::ENOENT));
        }
        Ok(Target::Backend {
            mount: slot - 1,
            ino: low,
        })
    }

    /// The path node an inode number stands for, if it is one.
    fn node_of(&self, ino: u64) -> io::Result<Option<usize>> {
        Ok(match self.decode(ino)? {
            Target::Synth(n) => Some(n),
            Target::Backend { mount, ino: b } if b == self.mounts[mount].root => {
                Some(self.mounts[mount].node)
            }
            Target::Backend { .. } => self.lock().get(&ino).map(|l| l.node),
        })
    }

    /// The path-node child `name` of the directory `parent`, if it is one.
    fn special_child(&self, parent: u64, name: &CStr) -> io::Result<Option<usize>> {
        Ok(self
            .node_of(parent)?
            .and_then(|n| self.child_named(n, name.to_bytes())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Learnt>> {
        // Every mutation is one map operation: a poisoned table is still consistent.
        self.learnt.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn learn(&self, ino: u64, node: usize) {
        let mut learnt = self.lock();
        let l = learnt.entry(ino).or_insert(Learnt { node, refs: 0 });
        l.node = node;
        l.refs = l.refs.saturating_add(1);
    }

    fn unlearn(&self, ino: u64, count: u64) {
        let mut learnt = self.lock();
        if let Some(l) = learnt.get_mut(&ino) {
            l.refs = l.refs.saturating_sub(count);
            if l.refs == 0 {
                learnt.remove(&ino);
            }
        }
    }

    /// A provider's entry with the tree's inode number.
    fn convert(&self, mount: usize, mut e: Entry) -> io::Result<Entry> {
        if e.inode == 0 {
            return Ok(e);
        }
        e.attr.st_ino = self.shown_ino(mount, e.inode, &e.attr);
        e.inode = self.encode(mount, e.inode)?;
        Ok(e)
    }

    fn synth_attr(&self, node: usize) -> stat64 {
        // `Entry::default()` is the library's zeroed `stat64` (it has private padding).
        let mut st: stat64 = Entry::default().attr;
        let t = self
            .created
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
        st.st_ino = MountTree::synth_shown(node);
        st.st_mode = libc::S_IFDIR | SYNTH_MODE;
        st.st_nlink = 2 + self.nodes[node].children.len() as u64;
        st.st_uid = 0;
        st.st_gid = 0;
        st.st_size = 4096;
        st.st_blksize = 4096;
        st.st_atime = secs;
        st.st_mtime = secs;
        st.st_ctime = secs;
        st
    }

    fn synth_entry(&self, node: usize) -> Entry {
        Entry {
            inode: MountTree::synth_ino(node),
            generation: 0,
            attr: self.synth_attr(node),
            attr_flags: 0,
            attr_timeout: SYNTH_TTL,
            entry_timeout: SYNTH_TTL,
        }
    }

    /// The entry of a mount's root (no provider reference is taken: its forget is ignored).
    fn mount_root(&self, ctx: &Context, mount: usize) -> io::Result<Entry> {
        let m = &self.mounts[mount];
        let (attr, ttl) = m.fs.getattr(ctx, m.root, None)?;
        self.convert(
            mount,
            Entry {
                inode: m.root,
                generation: 0,
                attr,
                attr_flags: 0,
                attr_timeout: ttl,
                entry_timeout: ttl,
            },
        )
    }

    /// The entry of path node `child`, reached from the directory `parent`; with `take_ref`
    /// the guest kernel holds a reference to it afterwards.
    fn resolve(
        &self,
        ctx: &Context,
        parent: u64,
        child: usize,
        take_ref: bool,
    ) -> io::Result<Entry> {
        self.nodes[child]
            .parent_ino
            .store(parent, Ordering::Relaxed);
        if let Some(m) = self.nodes[child].mount {
            return self.mount_root(ctx, m);
        }
        let Target::Backend { mount, ino } = self.decode(parent)? else {
            return Ok(self.synth_entry(child));
        };
        let fs = &self.mounts[mount].fs;
        let name = std::ffi::CString::new(self.nodes[child].name.clone())
            .map_err(|_| errno(libc::EINVAL))?;
        match fs.lookup(ctx, ino, &name) {
            Ok(e) if e.inode != 0 && e.attr.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                let own = e.inode;
                match self.convert(mount, e) {
                    Ok(e) if take_ref => {
                        self.learn(e.inode, child);
                        Ok(e)
                    }
                    other => {
                        fs.forget(ctx, own, 1);
                        other
                    }
                }
            }
            Ok(e) => {
                if e.inode != 0 {
                    fs.forget(ctx, e.inode, 1);
                }
                Ok(self.synth_entry(child))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(self.synth_entry(child)),
            Err(e) => Err(e),
        }
    }

    /// Drops `count` guest references to `ino`.
    fn drop_refs(&self, ctx: &Context, ino: u64, count: u64) {
        match self.decode(ino) {
            Ok(Target::Backend { mount, ino: b }) if b != self.mounts[mount].root => {
                self.unlearn(ino, count);
                self.mounts[mount].fs.forget(ctx, b, count);
            }
            // Synthesised directories and mount roots take no provider reference.
            _ => {}
        }
    }
}
