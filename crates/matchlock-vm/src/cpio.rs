//! A writer for the newc ("070701") cpio format the kernel unpacks as an initramfs.
//!
//! # Design
//! The format is tiny (a 110-byte ASCII header, the NUL-terminated name, the data, each
//! padded to 4 bytes, then a `TRAILER!!!` entry), so it is written here rather than pulling a
//! crate in. Device nodes are just headers with `rdev` set, so building an archive with
//! `dev/console` needs no root. Entries carry uid/gid 0 and mtime 0, so the output depends only
//! on the inputs (reproducible, cacheable by content hash).
//!
//! # Limitations
//! No hard links, no symlinks, files are held in memory (the guest binary is a few MiB), and
//! the caller orders entries (parents before children).

use std::io::{self, Write};

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Vec<u8>),
    /// Character device with major and minor numbers.
    CharDev {
        major: u32,
        minor: u32,
    },
}

/// One archive member; `path` is relative (`dev/console`, `init`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    /// Permission bits (e.g. `0o755`); the file-type bits come from `kind`.
    pub perm: u32,
    pub kind: EntryKind,
}

impl Entry {
    pub fn dir(path: &str, perm: u32) -> Self {
        Entry {
            path: path.to_owned(),
            perm,
            kind: EntryKind::Dir,
        }
    }

    pub fn file(path: &str, perm: u32, data: Vec<u8>) -> Self {
        Entry {
            path: path.to_owned(),
            perm,
            kind: EntryKind::File(data),
        }
    }

    pub fn char_dev(path: &str, perm: u32, major: u32, minor: u32) -> Self {
        Entry {
            path: path.to_owned(),
            perm,
            kind: EntryKind::CharDev { major, minor },
        }
    }
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Writes `entries` and the trailer as a newc archive.
pub fn write_newc(entries: &[Entry], mut out: impl Write) -> io::Result<()> {
    let mut written = 0usize;
    for (i, e) in entries.iter().enumerate() {
        let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match &e.kind {
            EntryKind::Dir => (S_IFDIR, 2, &[], (0, 0)),
            EntryKind::File(d) => (S_IFREG, 1, d.as_slice(), (0, 0)),
            EntryKind::CharDev { major, minor } => (S_IFCHR, 1, &[], (*major, *minor)),
        };
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio member {} exceeds 4 GiB", e.path),
            )
        })?;
        let ino = u32::try_from(i + 1).unwrap_or(u32::MAX);
        written += write_member(
            &mut out,
            ino,
            mode | (e.perm & 0o7777),
            nlink,
            rdev,
            &e.path,
            data,
            size,
        )?;
    }
    written += write_member(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[], 0)?;
    // Pad the archive to a 512-byte multiple like cpio(1) does; harmless for the kernel.
    let pad = (512 - written % 512) % 512;
    out.write_all(&vec![0u8; pad])?;
    out.flush()
}

#[allow(clippy::too_many_arguments)]
fn write_member(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
    size: u32,
) -> io::Result<usize> {
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
         {dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        dmaj = 0,
        dmin = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        check = 0,
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    let head = header.len() + namesize;
    let head_pad = (4 - head % 4) % 4;
    out.write_all(&[0u8; 3][..head_pad])?;
    out.write_all(data)?;
    let data_pad = (4 - data.len() % 4) % 4;
    out.write_all(&[0u8; 3][..data_pad])?;
    Ok(head + head_pad + data.len() + data_pad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn cpio_lists_modes_and_devices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("a.cpio");
        let entries = vec![
            Entry::dir("dev", 0o755),
            Entry::char_dev("dev/console", 0o600, 5, 1),
            Entry::file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec()),
            Entry::file("odd", 0o644, b"x".to_vec()),
        ];
        let mut buf = Vec::new();
        write_newc(&entries, &mut buf).expect("write");
        assert_eq!(buf.len() % 512, 0);
        std::fs::write(&archive, &buf).expect("save");

        let out = Command::new("cpio")
            .args(["-itv", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .expect("run cpio");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 4, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" dev"));
        assert!(lines[1].starts_with("crw-------") && lines[1].contains("5,"));
        assert!(lines[1].ends_with(" dev/console"), "{}", lines[1]);
        assert!(lines[2].starts_with("-rwxr-xr-x") && lines[2].ends_with(" init"));
        assert!(lines[3].starts_with("-rw-r--r--") && lines[3].ends_with(" odd"));

        // Contents survive extraction byte for byte.
        let x = dir.path().join("x");
        std::fs::create_dir(&x).expect("mkdir");
        let st = Command::new("cpio")
            .args(["-id", "--quiet", "--no-absolute-filenames", "-F"])
            .arg(&archive)
            .arg("init")
            .arg("odd")
            .current_dir(&x)
            .status()
            .expect("extract");
        assert!(st.success());
        assert_eq!(
            std::fs::read(x.join("init")).expect("read"),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(std::fs::read(x.join("odd")).expect("read"), b"x");
    }
}
