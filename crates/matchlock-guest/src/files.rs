//! File sessions: `WriteFile`, `ReadFile`, `ListFiles`.
//!
//! # Design
//! Data is streamed straight to/from the file in [`CHUNK`]-sized frames, never buffered
//! whole. A write that fails part-way still consumes the host's `Data` frames up to
//! `DataEnd` before answering `Error`, so the host always gets a clean reply instead of a
//! reset connection. Modes are applied with `fchmod` after creation so the umask does not
//! interfere; ownership (`user`) uses the same resolver as exec.
//!
//! A listing is streamed as `readdir` returns entries: they are batched into `FileList`
//! frames of at most [`LIST_CHUNK`] payload bytes, and `FileListEnd` closes a complete
//! listing, so a directory of any size is listed with a bounded buffer here (the host sorts
//! and bounds what it accumulates).
//!
//! # Limitations
//! Writes are not atomic (the file is truncated, then filled); a failed write leaves a
//! partial file. Reads are buffered whole (at most [`MAX_READ_FILE`]) so the announced size
//! is exact even for procfs files. A directory that changes while it is listed may list an
//! entry twice or miss one (as `readdir` does); entries removed before their `lstat` are
//! skipped.

#![forbid(unsafe_code)]

use std::fs::{DirBuilder, DirEntry, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use matchlock_guest_proto::{
    read_frame, FileEntry, FileInfo, FileList, Frame, FrameType, PathRequest, ProtoError,
    WriteFileRequest, CHUNK, LIST_CHUNK, MAX_READ_FILE,
};

use crate::user;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("sending {what} frame")]
    Send {
        what: &'static str,
        #[source]
        source: ProtoError,
    },
    #[error("reading the write-file data")]
    ReadData(#[source] ProtoError),
    #[error("host closed the connection before DataEnd")]
    Truncated,
    #[error("encoding a listing entry")]
    EncodeEntry(#[source] serde_json::Error),
}

fn send<W: Write>(w: &mut W, frame: &Frame, what: &'static str) -> Result<(), FileError> {
    matchlock_guest_proto::write_frame(w, frame).map_err(|source| FileError::Send { what, source })
}

fn send_error<W: Write>(w: &mut W, msg: &str) -> Result<(), FileError> {
    send(
        w,
        &Frame::new(FrameType::Error, msg.as_bytes().to_vec()),
        "error",
    )
}

/// Guest paths are absolute; a relative one is taken relative to `/`.
fn guest_path(p: &str) -> PathBuf {
    Path::new("/").join(p)
}

fn open_for_write(req: &WriteFileRequest, root: &Path) -> Result<File, String> {
    let path = guest_path(&req.path);
    let owner = if req.user.is_empty() {
        None
    } else {
        Some(user::resolve_in(&req.user, root).map_err(|e| format!("write {}: {e}", req.path))?)
    };
    if let Some(parent) = path.parent() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
    }
    let mode = if req.mode == 0 {
        0o644
    } else {
        req.mode & 0o7777
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .map_err(|e| format!("open {}: {e}", req.path))?;
    if let Some(id) = owner {
        std::os::unix::fs::fchown(&file, Some(id.uid), Some(id.gid))
            .map_err(|e| format!("chown {}: {e}", req.path))?;
    }
    // After chown: chown clears set-id bits.
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", req.path))?;
    Ok(file)
}

/// Handles a `WriteFile` session whose header frame carried `req`.
pub fn write_file<C: Read + Write>(
    conn: &mut C,
    req: &WriteFileRequest,
    root: &Path,
) -> Result<(), FileError> {
    let (mut file, mut failure) = match open_for_write(req, root) {
        Ok(f) => (Some(f), None),
        Err(msg) => (None, Some(msg)),
    };
    loop {
        let frame = read_frame(conn)
            .map_err(FileError::ReadData)?
            .ok_or(FileError::Truncated)?;
        match frame.kind {
            FrameType::Data => {
                if let Some(f) = &mut file {
                    if let Err(e) = f.write_all(&frame.payload) {
                        failure = Some(format!("write {}: {e}", req.path));
                        file = None;
                    }
                }
            }
            FrameType::DataEnd => break,
            other => {
                return send_error(
                    conn,
                    &format!("write {}: unexpected {other:?} frame", req.path),
                )
            }
        }
    }
    drop(file);
    match failure {
        Some(msg) => send_error(conn, &msg),
        None => send(conn, &Frame::empty(FrameType::Ok), "ok"),
    }
}

/// Handles a `ReadFile` session.
pub fn read_file<W: Write>(conn: &mut W, req: &PathRequest) -> Result<(), FileError> {
    let path = guest_path(&req.path);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) => return send_error(conn, &format!("read {}: {e}", req.path)),
    };
    if !meta.is_file() {
        return send_error(conn, &format!("read {}: not a regular file", req.path));
    }
    if meta.len() > MAX_READ_FILE {
        return send_error(conn, &too_large(&req.path, meta.len()));
    }
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => return send_error(conn, &format!("open {}: {e}", req.path)),
    };
    // Read it whole (bounded) before announcing the size: procfs/sysfs files report size 0
    // and other files may change between stat and read.
    let mut data = Vec::new();
    if let Err(e) = file.take(MAX_READ_FILE + 1).read_to_end(&mut data) {
        return send_error(conn, &format!("read {}: {e}", req.path));
    }
    if data.len() as u64 > MAX_READ_FILE {
        return send_error(conn, &too_large(&req.path, data.len() as u64));
    }
    let info = FileInfo {
        size: data.len() as u64,
        mode: meta.mode(),
    };
    let frame = Frame::json(FrameType::FileInfo, &info).map_err(|source| FileError::Send {
        what: "file info",
        source,
    })?;
    send(conn, &frame, "file info")?;
    for chunk in data.chunks(CHUNK) {
        send(conn, &Frame::new(FrameType::Data, chunk.to_vec()), "data")?;
    }
    send(conn, &Frame::empty(FrameType::DataEnd), "data end")
}

fn too_large(path: &str, size: u64) -> String {
    format!("read {path}: file is {size} bytes, over the limit of {MAX_READ_FILE}")
}

/// The listing entry of `entry`; `None` if it was deleted before its `lstat`.
fn entry_info(entry: &DirEntry) -> io::Result<Option<FileEntry>> {
    // `DirEntry::metadata` is an `fstatat` without following symlinks (lstat).
    let meta = match entry.metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some(FileEntry {
        name: entry.file_name().to_string_lossy().into_owned(),
        size: meta.len(),
        mode: meta.mode(),
        is_dir: meta.is_dir(),
    }))
}

/// Payload bytes of a `FileList` besides its entries: `{"files":[]}`.
const LIST_OVERHEAD: usize = 12;

/// Entries waiting to be sent as one `FileList` frame of at most [`LIST_CHUNK`] bytes.
#[derive(Default)]
struct Batch {
    files: Vec<FileEntry>,
    /// Encoded size of `files`, one separator counted per entry.
    bytes: usize,
}

impl Batch {
    /// Adds `entry`, first sending the batch if the entry would not fit in it.
    fn add<W: Write>(&mut self, conn: &mut W, entry: FileEntry) -> Result<(), FileError> {
        let len = serde_json::to_vec(&entry)
            .map_err(FileError::EncodeEntry)?
            .len()
            + 1;
        if !self.files.is_empty() && LIST_OVERHEAD + self.bytes + len > LIST_CHUNK {
            self.flush(conn)?;
        }
        self.bytes += len;
        self.files.push(entry);
        Ok(())
    }

    /// Sends the pending entries, if any.
    fn flush<W: Write>(&mut self, conn: &mut W) -> Result<(), FileError> {
        if self.files.is_empty() {
            return Ok(());
        }
        let list = FileList {
            files: std::mem::take(&mut self.files),
        };
        self.bytes = 0;
        let frame = Frame::json(FrameType::FileList, &list).map_err(|source| FileError::Send {
            what: "file list",
            source,
        })?;
        send(conn, &frame, "file list")
    }
}

/// Handles a `ListFiles` session: streams the entries in batches as they are read, then
/// `FileListEnd`; a failure at any point is answered by `Error` (the host drops the batches
/// it got).
pub fn list_files<W: Write>(conn: &mut W, req: &PathRequest) -> Result<(), FileError> {
    let dir = match std::fs::read_dir(guest_path(&req.path)) {
        Ok(d) => d,
        Err(e) => return send_error(conn, &format!("list {}: {e}", req.path)),
    };
    let mut batch = Batch::default();
    for entry in dir {
        match entry.and_then(|e| entry_info(&e)) {
            Ok(Some(info)) => batch.add(conn, info)?,
            Ok(None) => {}
            Err(e) => return send_error(conn, &format!("list {}: {e}", req.path)),
        }
    }
    batch.flush(conn)?;
    send(conn, &Frame::empty(FrameType::FileListEnd), "file list end")
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchlock_guest_proto::MAX_PAYLOAD;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mlg-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    fn request(dir: &Path) -> PathRequest {
        PathRequest {
            path: dir.to_string_lossy().into_owned(),
        }
    }

    /// A listing several times larger than a batch arrives as several bounded `FileList`
    /// frames then `FileListEnd`, each entry exactly once.
    #[test]
    fn large_listing_is_streamed_in_bounded_batches() {
        let dir = tmpdir("many");
        let prefix = "x".repeat(200);
        let mut expected = Vec::new();
        for i in 0..5000 {
            let name = format!("{prefix}{i}");
            std::fs::write(dir.join(&name), b"ab").expect("create");
            expected.push(name);
        }
        std::fs::create_dir(dir.join("sub")).expect("mkdir");
        expected.push("sub".into());
        expected.sort();

        let mut wire = Vec::new();
        list_files(&mut wire, &request(&dir)).expect("list");
        let mut r = wire.as_slice();
        let (mut frames, mut names) = (0, Vec::new());
        loop {
            let f = read_frame(&mut r).expect("frame").expect("not eof");
            if f.kind == FrameType::FileListEnd {
                break;
            }
            assert!(f.payload.len() <= LIST_CHUNK, "{} bytes", f.payload.len());
            let list: FileList = f.expect(FrameType::FileList, "list").expect("json");
            assert!(!list.files.is_empty());
            for e in list.files {
                assert_eq!(e.is_dir, e.name == "sub");
                if !e.is_dir {
                    assert_eq!((e.size, e.mode & 0o170000), (2, 0o100000));
                }
                names.push(e.name);
            }
            frames += 1;
        }
        assert!(
            read_frame(&mut r).expect("eof").is_none(),
            "nothing after the end"
        );
        // ~270 bytes of JSON per entry: far over one batch, and over one whole frame.
        assert!(wire.len() > MAX_PAYLOAD as usize);
        assert!(frames > 10, "{frames} frames");
        names.sort();
        assert_eq!(names, expected);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn empty_and_missing_directories() {
        let dir = tmpdir("empty");
        let mut wire = Vec::new();
        list_files(&mut wire, &request(&dir)).expect("list");
        let f = read_frame(&mut wire.as_slice())
            .expect("frame")
            .expect("frame");
        assert_eq!((f.kind, wire.len()), (FrameType::FileListEnd, 5));

        let mut wire = Vec::new();
        list_files(&mut wire, &request(&dir.join("missing"))).expect("list");
        let f = read_frame(&mut wire.as_slice())
            .expect("frame")
            .expect("frame");
        assert_eq!(f.kind, FrameType::Error);
        assert!(String::from_utf8_lossy(&f.payload).contains("No such file"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
