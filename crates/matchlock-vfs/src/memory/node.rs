//! Inodes of the in-memory tree: attributes, directories with stable readdir cookies.
//!
//! # Design
//! A directory keeps its entries twice: by name (lookup) and by a per-directory sequence number
//! that never repeats (`readdir` cookies). Listing from cookie `c` is a range scan from `c + 1`,
//! so a full listing is O(n log n) however many `readdir` calls it takes, and entries added or
//! removed during a listing never make the cursor skip or repeat other entries.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuse_backend_rs::abi::fuse_abi::stat64;
use fuse_backend_rs::api::filesystem::Entry;

use super::data::SparseData;
use crate::overlay::store::HostFile;

/// Cookie of `.`; `..` is 2 and entries start at [`FIRST_SEQ`].
pub const DOT_SEQ: u64 = 1;
/// Cookie of `..`.
pub const DOTDOT_SEQ: u64 = 2;
/// First cookie handed to a real entry.
pub const FIRST_SEQ: u64 = 3;

/// A point in time as `stat` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Time {
    pub sec: i64,
    pub nsec: i64,
}

impl Time {
    pub fn now() -> Time {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Time {
            sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nsec: i64::from(d.subsec_nanos()),
        }
    }

    pub fn from_system(t: SystemTime) -> Time {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Time {
                sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nsec: i64::from(d.subsec_nanos()),
            },
            Err(_) => Time::default(),
        }
    }
}

/// Attributes shared by every kind of inode.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    /// File type and permission bits (`S_IFMT | 07777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Logical size: file length, symlink target length, 0 for directories.
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
}

impl Attr {
    pub fn new(mode: u32, uid: u32, gid: u32) -> Attr {
        let now = Time::now();
        Attr {
            mode,
            uid,
            gid,
            nlink: 1,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }

    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    pub fn is_dir(&self) -> bool {
        self.file_type() == libc::S_IFDIR
    }

    /// Marks a content change (write, truncate, entries added or removed).
    pub fn touch_modified(&mut self) {
        let now = Time::now();
        self.mtime = now;
        self.ctime = now;
    }
}

/// Where a regular file's bytes live.
#[derive(Debug)]
pub enum Content {
    /// In memory (the memory provider, and nothing else).
    Mem(SparseData),
    /// On the host (the overlay provider): the lower file until the first write, then a copy.
    Host(HostFile),
}

/// What an inode is.
#[derive(Debug)]
pub enum Kind {
    File(Content),
    Dir(Dir),
    Symlink(Vec<u8>),
    /// FIFOs and sockets: only a name and attributes; the guest kernel does the rest.
    Special,
}

/// One inode.
#[derive(Debug)]
pub struct Node {
    pub kind: Kind,
    pub attr: Attr,
    /// Lookup count held by the guest kernel (`forget` decrements it).
    pub lookups: u64,
    /// Open handles.
    pub opens: u64,
}

impl Node {
    pub fn dir(&self) -> Option<&Dir> {
        match &self.kind {
            Kind::Dir(d) => Some(d),
            _ => None,
        }
    }

    /// Overlay: closes the host descriptor of a file nobody has open.
    pub fn close_if_idle(&mut self) {
        if self.opens == 0 {
            if let Kind::File(Content::Host(f)) = &mut self.kind {
                f.close();
            }
        }
    }

    /// `stat` as FUSE reports it.
    pub fn stat(&self, ino: u64) -> stat64 {
        // `Entry::default()` is the library's zeroed `stat64`: it has private padding fields.
        let mut st = Entry::default().attr;
        let a = &self.attr;
        st.st_ino = ino;
        st.st_mode = a.mode;
        st.st_nlink = u64::from(a.nlink);
        st.st_uid = a.uid;
        st.st_gid = a.gid;
        st.st_size = i64::try_from(a.size).unwrap_or(i64::MAX);
        st.st_blksize = 4096;
        let stored = match &self.kind {
            Kind::File(Content::Mem(d)) => d.stored(),
            _ => a.size,
        };
        st.st_blocks = i64::try_from(stored.div_ceil(512)).unwrap_or(i64::MAX);
        st.st_atime = a.atime.sec;
        st.st_atime_nsec = a.atime.nsec;
        st.st_mtime = a.mtime.sec;
        st.st_mtime_nsec = a.mtime.nsec;
        st.st_ctime = a.ctime.sec;
        st.st_ctime_nsec = a.ctime.nsec;
        st
    }
}

/// A directory's entries.
#[derive(Debug)]
pub struct Dir {
    /// Inode of `..` (the root is its own parent).
    pub parent: u64,
    by_name: HashMap<Vec<u8>, u64>,
    by_seq: BTreeMap<u64, (Vec<u8>, u64)>,
    next_seq: u64,
    /// Overlay only: the lower directory (relative to the lower root) whose entries have not
    /// been read yet. `None` once populated, and always for the memory provider.
    pub unpopulated_lower: Option<PathBuf>,
}

impl Dir {
    pub fn new(parent: u64) -> Dir {
        Dir {
            parent,
            by_name: HashMap::new(),
            by_seq: BTreeMap::new(),
            next_seq: FIRST_SEQ,
            unpopulated_lower: None,
        }
    }

    pub fn get(&self, name: &[u8]) -> Option<u64> {
        let seq = self.by_name.get(name)?;
        self.by_seq.get(seq).map(|(_, ino)| *ino)
    }

    pub fn insert(&mut self, name: Vec<u8>, ino: u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(old) = self.by_name.insert(name.clone(), seq) {
            self.by_seq.remove(&old);
        }
        self.by_seq.insert(seq, (name, ino));
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<u64> {
        let seq = self.by_name.remove(name)?;
        self.by_seq.remove(&seq).map(|(_, ino)| ino)
    }

    /// Points an existing name at another inode, keeping its cookie (used by exchange).
    pub fn repoint(&mut self, name: &[u8], ino: u64) {
        if let Some(seq) = self.by_name.get(name) {
            if let Some(entry) = self.by_seq.get_mut(seq) {
                entry.1 = ino;
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }

    /// Entries with a cookie greater than `after`, in cookie order.
    pub fn after(&self, after: u64) -> impl Iterator<Item = (u64, &[u8], u64)> {
        self.by_seq
            .range(after.saturating_add(1)..)
            .map(|(seq, (name, ino))| (*seq, name.as_slice(), *ino))
    }
}
