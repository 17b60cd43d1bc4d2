//! Drives a `fuse_backend_rs` provider through the `FileSystem` trait, as the FUSE server
//! does: names as C strings, payloads through `ZeroCopyReader`/`ZeroCopyWriter`.
//!
//! The reader and writer here are in-memory byte buffers standing in for guest memory; the
//! providers only use their `io::Read`/`io::Write` side, which is what this implements.
#![allow(dead_code)]

use std::ffi::CString;
use std::io;

use fuse_backend_rs::abi::fuse_abi::{stat64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, Entry, FileSystem, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::file_traits::FileReadWriteVolatile;

pub const ROOT: u64 = 1;

pub struct Payload(io::Cursor<Vec<u8>>);

impl From<Vec<u8>> for Payload {
    fn from(data: Vec<u8>) -> Payload {
        Payload(io::Cursor::new(data))
    }
}

impl io::Read for Payload {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl ZeroCopyReader for Payload {
    fn read_to(
        &mut self,
        _f: &mut dyn FileReadWriteVolatile,
        _count: usize,
        _off: u64,
    ) -> io::Result<usize> {
        Err(io::Error::other("providers read payloads through io::Read"))
    }
}

pub struct Reply(pub Vec<u8>);

impl io::Write for Reply {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for Reply {
    fn write_from(
        &mut self,
        _f: &mut dyn FileReadWriteVolatile,
        _count: usize,
        _off: u64,
    ) -> io::Result<usize> {
        Err(io::Error::other(
            "providers write replies through io::Write",
        ))
    }
    fn available_bytes(&self) -> usize {
        usize::MAX
    }
}

pub fn ctx(uid: u32, gid: u32) -> Context {
    Context { uid, gid, pid: 1 }
}

pub fn root() -> Context {
    ctx(0, 0)
}

pub fn c(s: &str) -> CString {
    CString::new(s).expect("test names have no NUL")
}

pub fn errno<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
    r.expect_err("operation should fail")
        .raw_os_error()
        .expect("an errno")
}

pub type Fs = dyn FileSystem<Inode = u64, Handle = u64> + Sync;

pub fn lookup(fs: &Fs, parent: u64, name: &str) -> io::Result<Entry> {
    fs.lookup(&root(), parent, &c(name))
}

pub fn create(fs: &Fs, parent: u64, name: &str, mode: u32, flags: u32) -> io::Result<(Entry, u64)> {
    create_as(fs, &root(), parent, name, mode, flags)
}

pub fn create_as(
    fs: &Fs,
    cx: &Context,
    parent: u64,
    name: &str,
    mode: u32,
    flags: u32,
) -> io::Result<(Entry, u64)> {
    let args = CreateIn {
        flags,
        mode: libc::S_IFREG | mode,
        umask: 0o022,
        fuse_flags: 0,
    };
    let (entry, fh, _, _) = fs.create(cx, parent, &c(name), args)?;
    Ok((entry, fh.expect("providers return a handle")))
}

pub fn open(fs: &Fs, ino: u64, flags: u32) -> io::Result<u64> {
    let (fh, _, _) = fs.open(&root(), ino, flags, 0)?;
    Ok(fh.expect("providers return a handle"))
}

pub fn release(fs: &Fs, ino: u64, fh: u64) {
    fs.release(&root(), ino, 0, fh, false, false, None)
        .expect("release");
}

pub fn write(fs: &Fs, ino: u64, fh: u64, offset: u64, data: &[u8]) -> io::Result<usize> {
    let mut r = Payload(io::Cursor::new(data.to_vec()));
    let size = u32::try_from(data.len()).expect("small test writes");
    fs.write(&root(), ino, fh, &mut r, size, offset, None, false, 0, 0)
}

pub fn read(fs: &Fs, ino: u64, fh: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
    let mut w = Reply(Vec::new());
    let n = fs.read(&root(), ino, fh, &mut w, size, offset, None, 0)?;
    assert_eq!(n, w.0.len(), "read reports the bytes it wrote");
    Ok(w.0)
}

/// The whole file, read through a fresh read-only handle.
pub fn contents(fs: &Fs, ino: u64) -> Vec<u8> {
    let fh = open(fs, ino, libc::O_RDONLY as u32).expect("open for reading");
    let mut out = Vec::new();
    loop {
        let chunk = read(fs, ino, fh, out.len() as u64, 1 << 20).expect("read");
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    release(fs, ino, fh);
    out
}

pub fn mkdir(fs: &Fs, parent: u64, name: &str) -> io::Result<Entry> {
    fs.mkdir(&root(), parent, &c(name), libc::S_IFDIR | 0o755, 0o022)
}

pub fn getattr(fs: &Fs, ino: u64) -> stat64 {
    fs.getattr(&root(), ino, None).expect("getattr").0
}

pub fn set_size(fs: &Fs, ino: u64, size: u64) -> io::Result<stat64> {
    let mut attr = getattr(fs, ino);
    attr.st_size = i64::try_from(size).expect("test sizes fit");
    Ok(fs.setattr(&root(), ino, attr, None, SetattrValid::SIZE)?.0)
}

pub fn rename(fs: &Fs, od: u64, on: &str, nd: u64, nn: &str, flags: u32) -> io::Result<()> {
    fs.rename(&root(), od, &c(on), nd, &c(nn), flags)
}

/// Lists a directory with `readdir` calls of at most `batch` entries each, resuming from the
/// last offset like the kernel; returns `(name, ino, offset)` without `.` and `..`.
pub fn list(fs: &Fs, ino: u64, batch: usize) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let mut got = 0;
        fs.readdir(&root(), ino, 0, 4096, offset, &mut |d| {
            if got == batch {
                return Ok(0);
            }
            got += 1;
            offset = d.offset;
            let name = String::from_utf8_lossy(d.name).into_owned();
            if name != "." && name != ".." {
                out.push((name, d.ino, d.offset));
            }
            Ok(1)
        })
        .expect("readdir");
        if got == 0 {
            return out;
        }
    }
}

/// Names in a directory, sorted.
pub fn names(fs: &Fs, ino: u64) -> Vec<String> {
    let mut n: Vec<String> = list(fs, ino, 64).into_iter().map(|e| e.0).collect();
    n.sort();
    n
}
