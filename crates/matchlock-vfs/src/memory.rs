//! The `memory` provider: a POSIX tree held in the sandbox owner's memory, lost at stop.
//!
//! # Design
//! [`MemFs`] is a `fuse_backend_rs` backend (`FileSystem<Inode = u64, Handle = u64>`) the
//! router mounts at a guest path. It is built to be correct for toolchains, unlike the
//! reference's memory provider (spec §9.3, §15 item 38): `O_TRUNC`, `O_EXCL` and `O_APPEND`
//! are honoured, renaming a directory moves its subtree (entries belong to the directory
//! inode, not to path strings), rename supports `RENAME_NOREPLACE` and `RENAME_EXCHANGE`, and
//! there are symlinks, hard links, FIFOs and sockets (device nodes are refused with `EPERM`).
//!
//! - Inodes (`node`) carry mode, owner (the caller's uid/gid on create; set-group-ID
//!   directories pass on their group), nlink and nanosecond times; numbers are never reused.
//! - File data (`data`) is sparse: 64 KiB chunks that grow only as far as written, so a write
//!   at 5 GiB stores a few bytes and holes read as zeros.
//! - Directory listings use per-directory cookies that never repeat (`node::Dir`), so 100k
//!   entries list in O(n log n) overall and concurrent changes never make a listing skip.
//! - The quota counts stored file bytes plus a fixed charge per inode and per name (and the
//!   symlink target); exceeding it is `ENOSPC`; unlink, truncate and rmdir give it back.
//!   `statfs` reports it.
//! - Thread safety: one mutex over the table (`tree`); see there for the lock discipline.
//!
//! # Limitations
//! No extended attributes or POSIX ACLs (`ENOSYS`; the guest kernel then reports
//! `EOPNOTSUPP`); byte-range locks are left to the guest kernel (one guest, so that is
//! enough for `git`). `fallocate` only extends the size (holes, not reserved space).
//! Permission checks are the guest kernel's (virtio-fs mounts use `default_permissions`);
//! `access` answers from the mode bits for the rare caller that asks.

mod data;
pub(crate) mod fs;
mod io;
mod names;
pub(crate) mod node;
pub(crate) mod tree;

use tree::Tree;

/// The in-memory filesystem provider.
#[derive(Debug)]
pub struct MemFs {
    tree: Tree,
}

impl MemFs {
    /// An empty tree (root directory 0755, owned by root) that may hold `quota_bytes`.
    pub fn new(quota_bytes: u64) -> MemFs {
        MemFs {
            tree: Tree::new(quota_bytes, None, None),
        }
    }

    /// Quota bytes in use (data, inodes, names).
    pub fn used_bytes(&self) -> u64 {
        self.tree.lock().used
    }

    /// Inodes currently held (named, referenced by the kernel, or open).
    pub fn inode_count(&self) -> usize {
        self.tree.lock().nodes.len()
    }
}

fs::tree_filesystem!(MemFs);
