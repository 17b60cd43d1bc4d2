//! Flattening stored layer tars into one tar stream (whiteouts and opaque dirs applied).
//!
//! # Design
//! - Pass 1 indexes every layer (headers only; file data is skipped with seeks) into one
//!   ordered map `path -> node`, applying layers base first: whiteouts and opaque markers of
//!   a layer delete from the lower layers, then the layer's entries are added (last writer
//!   wins; a directory over a directory merges metadata and keeps children, anything else
//!   replaces the whole subtree). A node remembers only where its data lives
//!   (layer, offset, size), so memory is proportional to the number of entries, not bytes.
//! - Pass 2 writes the map in path order as a PAX tar (exact path/link bytes, xattrs, large
//!   ids), copying file data from the layer files by offset. Hard links are resolved to the
//!   *content* they share when they are read, so they survive their original name being
//!   deleted by a later layer; each group is written as one file plus links to it.
//! - Memory is bounded by a cap on the entries read over all layers (`max_entries`, from
//!   [`crate::ImageLimits`]), checked as each entry is read, so a layer of millions of tiny
//!   entries fails with an error naming the limit before the index grows past it.
//! - Hostile input is rejected, never repaired: `..` components, hard links to missing,
//!   non-file or escaping targets, entries below a symlink or non-directory in the tree,
//!   extension headers over 1 MiB, unsupported entry types. Nothing here touches the host
//!   filesystem by entry path: the output is a byte stream.
//!
//! # Limitations
//! - Whiteouts in a layer only affect lower layers (as in Docker); a layer that both adds
//!   and whites out the same name keeps its own entry.
//! - Hard links to symlinks, devices or fifos are written as independent copies.
//! - The root directory's own entry is ignored (the squashfs root is 0755 root:root).
//! - Only `user.`, `trusted.` and `security.` xattrs are kept (squashfs stores no others,
//!   e.g. POSIX ACLs in `system.posix_acl_*`); dropped ones are logged at `warn`.
//! - mtimes are clamped to 0..=u32::MAX (squashfs stores 32-bit times).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::archive::SliceReader;
use crate::ENV_MAX_IMAGE_ENTRIES;

/// Extension headers (PAX, GNU long names) larger than this are rejected.
pub(crate) const MAX_EXT_HEADER: u64 = 1 << 20;
/// The xattr namespaces squashfs can store; others (e.g. `system.posix_acl_*`) are dropped.
const SQUASHFS_XATTR_PREFIXES: &[&str] = &["user.", "trusted.", "security."];
/// Longest accepted entry path or link target.
const MAX_PATH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    #[error("open layer {path}")]
    OpenLayer {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("read layer {layer} headers")]
    ReadLayer {
        layer: usize,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: extension header at offset {offset} is {size} bytes (limit {MAX_EXT_HEADER})")]
    ExtHeaderTooLarge {
        layer: usize,
        offset: u64,
        size: u64,
    },
    #[error("layer {layer}: corrupt tar header at offset {offset}")]
    CorruptHeader { layer: usize, offset: u64 },
    #[error("layer {layer}: entry {path:?} has a '..' component")]
    DotDot { layer: usize, path: String },
    #[error("layer {layer}: path or link target longer than {MAX_PATH} bytes")]
    PathTooLong { layer: usize },
    #[error("layer {layer}: entry {path:?} has unsupported type {kind:?}")]
    UnsupportedType {
        layer: usize,
        path: String,
        kind: char,
    },
    #[error("layer {layer}: entry {path:?} lies below {parent:?}, which is not a directory")]
    ParentNotDir {
        layer: usize,
        path: String,
        parent: String,
    },
    #[error("layer {layer}: hard link {path:?} points to missing {target:?}")]
    MissingLinkTarget {
        layer: usize,
        path: String,
        target: String,
    },
    #[error("layer {layer}: hard link {path:?} points to a directory {target:?}")]
    LinkToDir {
        layer: usize,
        path: String,
        target: String,
    },
    #[error("layer {layer}: hard link {path:?} target escapes the tree")]
    LinkEscapes { layer: usize, path: String },
    #[error("layer {layer}: entry {path:?}: bad header field")]
    BadField {
        layer: usize,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: pax value too large in {path:?}")]
    PaxValueTooLarge { layer: usize, path: String },
    #[error(
        "layer {layer}: image has more than {limit} tar entries; \
         raise {ENV_MAX_IMAGE_ENTRIES} if the image is genuine"
    )]
    TooManyEntries { layer: usize, limit: u64 },
    #[error("write flattened entry {path:?}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

#[derive(Clone, Debug)]
enum Kind {
    File {
        layer: usize,
        offset: u64,
        size: u64,
        inode: u64,
    },
    Dir,
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

#[derive(Clone, Debug)]
struct Node {
    kind: Kind,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// The flattened tree: normalised path (no leading/trailing `/`) -> node.
#[derive(Default)]
pub(crate) struct Tree {
    nodes: BTreeMap<Vec<u8>, Node>,
    next_inode: u64,
}

/// Normalises an entry path: strips `/` and `./` prefixes, drops `.` and empty components.
/// `None` if any component is `..`.
fn normalize(path: &[u8]) -> Option<Vec<u8>> {
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Some(out)
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Parses an octal or base-256 numeric tar field.
fn tar_number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(v);
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .filter(|b| *b != 0 && *b != b' ')
        .collect();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&s).ok()?, 8).ok()
}

/// Walks raw headers of a tar file and rejects oversized extension headers before the
/// `tar` crate would read them into memory.
fn prescan(file: &File, layer: usize) -> Result<(), FlattenError> {
    let len = file
        .metadata()
        .map_err(|source| FlattenError::ReadLayer { layer, source })?
        .len();
    let mut pos = 0u64;
    let mut block = [0u8; 512];
    while pos + 512 <= len {
        file.read_exact_at(&mut block, pos)
            .map_err(|source| FlattenError::ReadLayer { layer, source })?;
        if block.iter().all(|b| *b == 0) {
            break;
        }
        let size = tar_number(&block[124..136])
            .ok_or(FlattenError::CorruptHeader { layer, offset: pos })?;
        let ty = block[156];
        if matches!(ty, b'x' | b'g' | b'L' | b'K') && size > MAX_EXT_HEADER {
            return Err(FlattenError::ExtHeaderTooLarge {
                layer,
                offset: pos,
                size,
            });
        }
        let padded = size
            .checked_add(511)
            .ok_or(FlattenError::CorruptHeader { layer, offset: pos })?
            / 512
            * 512;
        pos = pos
            .checked_add(512)
            .and_then(|p| p.checked_add(padded))
            .ok_or(FlattenError::CorruptHeader { layer, offset: pos })?;
    }
    Ok(())
}

/// One entry of a layer, read in pass 1.
struct RawEntry {
    path: Vec<u8>,
    ty: tar::EntryType,
    link: Option<Vec<u8>>,
    node: Node,
}

/// Entries one image may still index, and the cap for errors.
struct EntryBudget {
    left: u64,
    limit: u64,
}

fn read_layer(
    file: &File,
    layer: usize,
    budget: &mut EntryBudget,
) -> Result<Vec<RawEntry>, FlattenError> {
    prescan(file, layer)?;
    let read_err = |source| FlattenError::ReadLayer { layer, source };
    let mut ar = tar::Archive::new(BufReader::with_capacity(1 << 16, file));
    let mut out = Vec::new();
    for entry in ar.entries_with_seek().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        budget.left = budget
            .left
            .checked_sub(1)
            .ok_or(FlattenError::TooManyEntries {
                layer,
                limit: budget.limit,
            })?;
        let raw_path = entry.path_bytes().into_owned();
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        if raw_path.len() > MAX_PATH || link.as_ref().is_some_and(|l| l.len() > MAX_PATH) {
            return Err(FlattenError::PathTooLong { layer });
        }
        let path = normalize(&raw_path).ok_or_else(|| FlattenError::DotDot {
            layer,
            path: lossy(&raw_path),
        })?;
        let h = entry.header();
        let field_err = |source| FlattenError::BadField {
            layer,
            path: lossy(&raw_path),
            source,
        };
        let ty = h.entry_type();
        let mut node = Node {
            kind: Kind::Dir,
            mode: h.mode().map_err(field_err)? & 0o7777,
            uid: h.uid().map_err(field_err)?,
            gid: h.gid().map_err(field_err)?,
            mtime: h.mtime().map_err(field_err)?,
            xattrs: Vec::new(),
        };
        let dev = || -> Result<(u32, u32), FlattenError> {
            Ok((
                h.device_major().map_err(field_err)?.unwrap_or(0),
                h.device_minor().map_err(field_err)?.unwrap_or(0),
            ))
        };
        node.kind = match ty {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Link => {
                Kind::File {
                    layer,
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                    inode: 0,
                }
            }
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink => Kind::Symlink(link.clone().unwrap_or_default()),
            tar::EntryType::Char => {
                let (a, b) = dev()?;
                Kind::Char(a, b)
            }
            tar::EntryType::Block => {
                let (a, b) = dev()?;
                Kind::Block(a, b)
            }
            tar::EntryType::Fifo => Kind::Fifo,
            tar::EntryType::XGlobalHeader => continue,
            other => {
                return Err(FlattenError::UnsupportedType {
                    layer,
                    path: lossy(&raw_path),
                    kind: char::from(other.as_byte()),
                })
            }
        };
        if let Some(exts) = entry.pax_extensions().map_err(read_err)? {
            for ext in exts {
                let ext = ext.map_err(read_err)?;
                if ext.value_bytes().len() as u64 > MAX_EXT_HEADER {
                    return Err(FlattenError::PaxValueTooLarge {
                        layer,
                        path: lossy(&raw_path),
                    });
                }
                let Ok(key) = ext.key() else { continue };
                let num = || {
                    ext.value()
                        .ok()
                        .and_then(|v| v.split('.').next()?.parse::<u64>().ok())
                };
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    node.xattrs
                        .push((name.to_owned(), ext.value_bytes().to_vec()));
                } else if key == "uid" {
                    node.uid = num().unwrap_or(node.uid);
                } else if key == "gid" {
                    node.gid = num().unwrap_or(node.gid);
                } else if key == "mtime" {
                    node.mtime = num().unwrap_or(node.mtime);
                }
            }
        }
        out.push(RawEntry {
            path,
            ty,
            link,
            node,
        });
    }
    Ok(out)
}

impl Tree {
    fn remove_subtree(&mut self, path: &[u8]) {
        self.nodes.remove(path);
        self.remove_children(path);
    }

    fn remove_children(&mut self, dir: &[u8]) {
        let keys: Vec<Vec<u8>> = if dir.is_empty() {
            self.nodes.keys().cloned().collect()
        } else {
            let lo = join(dir, b"");
            let mut hi = dir.to_vec();
            hi.push(b'/' + 1);
            self.nodes.range(lo..hi).map(|(k, _)| k.clone()).collect()
        };
        for k in keys {
            self.nodes.remove(&k);
        }
    }

    /// Checks every ancestor of `path` is a directory (or absent, then created).
    fn ensure_parents(&mut self, layer: usize, path: &[u8]) -> Result<(), FlattenError> {
        let mut i = 0;
        while let Some(off) = path[i..].iter().position(|b| *b == b'/') {
            let parent = &path[..i + off];
            match self.nodes.get(parent) {
                Some(Node {
                    kind: Kind::Dir, ..
                }) => {}
                Some(_) => {
                    return Err(FlattenError::ParentNotDir {
                        layer,
                        path: lossy(path),
                        parent: lossy(parent),
                    })
                }
                None => {
                    let dir = Node {
                        kind: Kind::Dir,
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                        mtime: 0,
                        xattrs: Vec::new(),
                    };
                    self.nodes.insert(parent.to_vec(), dir);
                }
            }
            i += off + 1;
        }
        Ok(())
    }

    /// Applies one layer's entries on top of the tree.
    fn apply_layer(&mut self, layer: usize, entries: Vec<RawEntry>) -> Result<(), FlattenError> {
        // Whiteouts and opaque markers first: they only affect lower layers.
        for e in &entries {
            let (dir, name) = split_last(&e.path);
            if name == b".wh..wh..opq" {
                self.remove_children(dir);
            } else if let Some(victim) = name.strip_prefix(b".wh.") {
                if !victim.starts_with(b".wh.") && !victim.is_empty() {
                    self.remove_subtree(&join(dir, victim));
                }
            }
        }
        for mut e in entries {
            let (_, name) = split_last(&e.path);
            if name.starts_with(b".wh.") || e.path.is_empty() {
                continue;
            }
            self.ensure_parents(layer, &e.path)?;
            if e.ty == tar::EntryType::Link {
                let raw = e.link.clone().unwrap_or_default();
                let target = normalize(&raw).ok_or_else(|| FlattenError::LinkEscapes {
                    layer,
                    path: lossy(&e.path),
                })?;
                let Some(t) = self.nodes.get(&target) else {
                    return Err(FlattenError::MissingLinkTarget {
                        layer,
                        path: lossy(&e.path),
                        target: lossy(&target),
                    });
                };
                if matches!(t.kind, Kind::Dir) {
                    return Err(FlattenError::LinkToDir {
                        layer,
                        path: lossy(&e.path),
                        target: lossy(&target),
                    });
                }
                e.node = t.clone();
            } else if let Kind::File { inode, .. } = &mut e.node.kind {
                self.next_inode += 1;
                *inode = self.next_inode;
            }
            match (self.nodes.get_mut(&e.path), &e.node.kind) {
                (Some(old), Kind::Dir) if matches!(old.kind, Kind::Dir) => *old = e.node,
                _ => {
                    self.remove_subtree(&e.path);
                    self.nodes.insert(e.path, e.node);
                }
            }
        }
        Ok(())
    }

    /// Builds the flattened tree from layer tars, base first, reading at most
    /// `max_entries` entries over all layers.
    pub(crate) fn build(layers: &[&Path], max_entries: u64) -> Result<Tree, FlattenError> {
        let mut tree = Tree::default();
        let mut budget = EntryBudget {
            left: max_entries,
            limit: max_entries,
        };
        for (i, p) in layers.iter().enumerate() {
            let f = File::open(p).map_err(|source| FlattenError::OpenLayer {
                path: p.display().to_string(),
                source,
            })?;
            let entries = read_layer(&f, i, &mut budget)?;
            tree.apply_layer(i, entries)?;
        }
        Ok(tree)
    }

    /// Number of entries in the flattened tree.
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Writes the tree as a tar stream, reading file data from `layers` (same order as built).
    pub(crate) fn write_tar(&self, layers: &[&Path], out: impl Write) -> Result<(), FlattenError> {
        let files = layers
            .iter()
            .map(|p| {
                File::open(p).map_err(|source| FlattenError::OpenLayer {
                    path: p.display().to_string(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut b = tar::Builder::new(out);
        let mut first_path: std::collections::HashMap<u64, &[u8]> =
            std::collections::HashMap::new();
        for (path, node) in &self.nodes {
            let werr = |source| FlattenError::Write {
                path: lossy(path),
                source,
            };
            let mut header = tar::Header::new_ustar();
            let mut pax: Vec<(String, Vec<u8>)> = vec![("path".to_owned(), path.clone())];
            let mut data: Option<SliceReader<'_>> = None;
            let mut size = 0;
            let ty = match &node.kind {
                Kind::File {
                    layer,
                    offset,
                    size: len,
                    inode,
                } => match first_path.get(inode) {
                    Some(first) => {
                        pax.push(("linkpath".to_owned(), first.to_vec()));
                        tar::EntryType::Link
                    }
                    None => {
                        first_path.insert(*inode, path);
                        let file = files
                            .get(*layer)
                            .ok_or_else(|| werr(io::Error::other("layer index")))?;
                        data = Some(SliceReader::new(file, *offset, *len));
                        size = *len;
                        tar::EntryType::Regular
                    }
                },
                Kind::Dir => tar::EntryType::Directory,
                Kind::Symlink(t) => {
                    pax.push(("linkpath".to_owned(), t.clone()));
                    tar::EntryType::Symlink
                }
                Kind::Char(..) => tar::EntryType::Char,
                Kind::Block(..) => tar::EntryType::Block,
                Kind::Fifo => tar::EntryType::Fifo,
            };
            if let Kind::Char(ma, mi) | Kind::Block(ma, mi) = node.kind {
                header.set_device_major(ma).map_err(werr)?;
                header.set_device_minor(mi).map_err(werr)?;
            }
            for (k, v) in &node.xattrs {
                if SQUASHFS_XATTR_PREFIXES.iter().any(|p| k.starts_with(p)) {
                    pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
                } else {
                    tracing::warn!(path = %lossy(path), xattr = %k, "dropping xattr squashfs cannot store");
                }
            }
            const USTAR_ID_MAX: u64 = 0o7777777;
            if node.uid > USTAR_ID_MAX {
                pax.push(("uid".to_owned(), node.uid.to_string().into_bytes()));
            }
            if node.gid > USTAR_ID_MAX {
                pax.push(("gid".to_owned(), node.gid.to_string().into_bytes()));
            }
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(werr)?;
            let short = &path[..path.len().min(99)];
            header.as_old_mut().name[..short.len()].copy_from_slice(short);
            header.set_entry_type(ty);
            header.set_mode(node.mode);
            header.set_uid(node.uid.min(USTAR_ID_MAX));
            header.set_gid(node.gid.min(USTAR_ID_MAX));
            header.set_mtime(node.mtime.min(u64::from(u32::MAX)));
            header.set_size(size);
            header.set_cksum();
            match data {
                Some(r) => b.append(&header, r).map_err(werr)?,
                None => b.append(&header, io::empty()).map_err(werr)?,
            }
        }
        b.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(|source| FlattenError::Write {
                path: "<end>".into(),
                source,
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchlock_test_support::{layer_tar, Entry};
    use std::io::Read;

    fn tree_of(
        layers: &[Vec<Entry>],
    ) -> Result<(Tree, tempfile::TempDir, Vec<std::path::PathBuf>), FlattenError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths: Vec<_> = layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let p = dir.path().join(format!("{i}.tar"));
                std::fs::write(&p, layer_tar(l)).expect("write layer");
                p
            })
            .collect();
        let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let t = Tree::build(&refs, u64::MAX)?;
        Ok((t, dir, paths))
    }

    fn names(t: &Tree) -> Vec<String> {
        t.nodes.keys().map(|k| lossy(k)).collect()
    }

    #[test]
    fn whiteouts_opaque_and_replacement() {
        let (t, _d, _) = tree_of(&[
            vec![
                Entry::dir("a"),
                Entry::file("a/x", "1"),
                Entry::dir("a/sub"),
                Entry::file("a/sub/y", "2"),
                Entry::dir("o"),
                Entry::file("o/old", "3"),
                Entry::file("./keep", "k"),
                Entry::dir("d"),
                Entry::file("d/child", "c"),
            ],
            vec![
                Entry::whiteout("a/sub"),
                Entry::opaque("o"),
                Entry::file("o/new", "4"),
                Entry::file("d", "now a file"),
            ],
        ])
        .expect("flatten");
        assert_eq!(names(&t), vec!["a", "a/x", "d", "keep", "o", "o/new"]);
    }

    #[test]
    fn hostile_entries_are_rejected() {
        let dotdot = tree_of(&[vec![Entry::file("a/../../etc/passwd", "x")]]);
        assert!(
            matches!(dotdot, Err(FlattenError::DotDot { .. })),
            "{:?}",
            dotdot.err()
        );
        let below_link = tree_of(&[vec![
            Entry::symlink("etc", "/host/etc"),
            Entry::file("etc/passwd", "x"),
        ]]);
        assert!(matches!(below_link, Err(FlattenError::ParentNotDir { .. })));
        let missing = tree_of(&[vec![Entry::hardlink("a", "nope")]]);
        assert!(matches!(
            missing,
            Err(FlattenError::MissingLinkTarget { .. })
        ));
        let escape = tree_of(&[vec![Entry::file("f", "x"), Entry::hardlink("a", "../f")]]);
        assert!(matches!(escape, Err(FlattenError::LinkEscapes { .. })));
    }

    #[test]
    fn hard_link_survives_whiteout_of_original() {
        let (t, _d, paths) = tree_of(&[
            vec![
                Entry::file("orig", "shared"),
                Entry::hardlink("link", "/orig"),
            ],
            vec![Entry::whiteout("orig")],
        ])
        .expect("flatten");
        assert_eq!(names(&t), vec!["link"]);
        let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let mut out = Vec::new();
        t.write_tar(&refs, &mut out).expect("write");
        let mut ar = tar::Archive::new(out.as_slice());
        let mut e = ar
            .entries()
            .expect("entries")
            .next()
            .expect("one")
            .expect("entry");
        assert_eq!(&*e.path_bytes(), b"link");
        let mut s = String::new();
        e.read_to_string(&mut s).expect("read");
        assert_eq!(s, "shared");
    }

    #[test]
    fn oversized_pax_header_rejected_before_reading() {
        let big = vec![b'v'; (MAX_EXT_HEADER + 10) as usize];
        let r = tree_of(&[vec![Entry::file("f", "x").xattr("user.big", &big)]]);
        assert!(
            matches!(r, Err(FlattenError::ExtHeaderTooLarge { .. })),
            "{:?}",
            r.err()
        );
    }
}
