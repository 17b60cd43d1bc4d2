//! Inode → guest path, learned from the entries the filesystem hands the guest kernel.
//!
//! # Design
//! FUSE requests name inodes, rules name paths. Every entry the kernel receives (lookup,
//! create, mkdir, mknod, symlink, link, readdirplus) records `(parent, name)` for the inode and
//! counts one kernel reference, mirroring the FUSE lookup count; `forget` drops references
//! and the record with the last one, so the table is bounded by the guest kernel's own inode
//! cache. Paths are composed on demand by walking parents, so renaming a directory re-homes
//! its whole subtree with one update.
//!
//! # Limitations
//! A hard-linked inode is known by the last name it was reached through. An inode whose
//! chain cannot be walked (a parent already forgotten, which the kernel does not do while a
//! child is cached) yields `None`, and the caller fails closed.

use std::collections::HashMap;
use std::sync::Mutex;

/// The FUSE root inode.
pub const ROOT: u64 = 1;

/// Deepest chain walked when composing a path (guards against a corrupt table).
const MAX_DEPTH: usize = 4096;

#[derive(Debug)]
struct Node {
    parent: u64,
    name: Vec<u8>,
    refs: u64,
}

/// The inode table.
#[derive(Debug, Default)]
pub struct Paths {
    nodes: Mutex<HashMap<u64, Node>>,
}

impl Paths {
    /// Records one more kernel reference to `inode`, reached as `name` in `parent`.
    pub fn learn(&self, inode: u64, parent: u64, name: &[u8]) {
        if inode == ROOT {
            return;
        }
        let mut nodes = self.lock();
        let node = nodes.entry(inode).or_insert_with(|| Node {
            parent,
            name: Vec::new(),
            refs: 0,
        });
        node.parent = parent;
        name.clone_into(&mut node.name);
        node.refs = node.refs.saturating_add(1);
    }

    /// Moves `inode` to `name` in `parent` without changing its reference count.
    pub fn moved(&self, inode: u64, parent: u64, name: &[u8]) {
        if let Some(node) = self.lock().get_mut(&inode) {
            node.parent = parent;
            name.clone_into(&mut node.name);
        }
    }

    /// Drops `count` kernel references to `inode`.
    pub fn forget(&self, inode: u64, count: u64) {
        let mut nodes = self.lock();
        if let Some(node) = nodes.get_mut(&inode) {
            node.refs = node.refs.saturating_sub(count);
            if node.refs == 0 {
                nodes.remove(&inode);
            }
        }
    }

    /// Number of inodes tracked (tests, diagnostics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no inode is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The path of `inode` relative to the root, starting with `/` (`/` for the root).
    pub fn path(&self, inode: u64) -> Option<String> {
        let nodes = self.lock();
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = inode;
        while cur != ROOT {
            if parts.len() >= MAX_DEPTH {
                return None;
            }
            let node = nodes.get(&cur)?;
            parts.push(&node.name);
            cur = node.parent;
        }
        let mut out = String::new();
        for part in parts.iter().rev() {
            out.push('/');
            out.push_str(&String::from_utf8_lossy(part));
        }
        if out.is_empty() {
            out.push('/');
        }
        Some(out)
    }

    /// The path `name` would have inside directory `parent`.
    pub fn child(&self, parent: u64, name: &[u8]) -> Option<String> {
        let base = self.path(parent)?;
        let name = String::from_utf8_lossy(name);
        Some(if base == "/" {
            format!("/{name}")
        } else {
            format!("{base}/{name}")
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Node>> {
        // A panic while holding this lock cannot leave the map half-updated in a way that
        // matters (each update is a single field store), so a poisoned lock is still usable.
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composes_and_rehomes() {
        let p = Paths::default();
        p.learn(2, ROOT, b"dir");
        p.learn(3, 2, b"file");
        assert_eq!(p.path(ROOT).as_deref(), Some("/"));
        assert_eq!(p.path(3).as_deref(), Some("/dir/file"));
        p.learn(4, ROOT, b"other");
        p.moved(2, 4, b"moved");
        assert_eq!(p.path(3).as_deref(), Some("/other/moved/file"));
        assert_eq!(p.child(3, b"x").as_deref(), Some("/other/moved/file/x"));
        assert_eq!(p.child(ROOT, b"x").as_deref(), Some("/x"));
    }

    #[test]
    fn forget_counts_references() {
        let p = Paths::default();
        p.learn(2, ROOT, b"a");
        p.learn(2, ROOT, b"a");
        p.forget(2, 1);
        assert_eq!(p.path(2).as_deref(), Some("/a"));
        p.forget(2, 1);
        assert_eq!(p.path(2), None);
        assert!(p.is_empty());
    }

    #[test]
    fn cycles_do_not_hang() {
        let p = Paths::default();
        p.learn(2, 3, b"a");
        p.learn(3, 2, b"b");
        assert_eq!(p.path(2), None);
    }
}
