//! File sessions: `WriteFile`, `ReadFile`, `ListFiles`.
//!
//! # Design
//! Data is streamed straight to/from the file in [`CHUNK`]-sized frames, never buffered
//! whole. A write that fails part-way still consumes the host's `Data` frames up to
//! `DataEnd` before answering `Error`, so the host always gets a clean reply instead of a
//! reset connection. Modes are applied with `fchmod` after creation so the umask does not
//! interfere; ownership (`user`) uses the same resolver as exec.
//!
//! # Limitations
//! Writes are not atomic (the file is truncated, then filled); a failed write leaves a
//! partial file. Reads are buffered whole (at most [`MAX_READ_FILE`]) so the announced size
//! is exact even for procfs files.

#![forbid(unsafe_code)]

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use matchlock_guest_proto::{
    read_frame, FileEntry, FileInfo, FileList, Frame, FrameType, PathRequest, ProtoError,
    WriteFileRequest, CHUNK, MAX_READ_FILE,
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

fn list(path: &Path) -> io::Result<Vec<FileEntry>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = match entry.path().symlink_metadata() {
            Ok(m) => m,
            // Deleted between readdir and lstat.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        files.push(FileEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            size: meta.len(),
            mode: meta.mode(),
            is_dir: meta.is_dir(),
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Handles a `ListFiles` session.
pub fn list_files<W: Write>(conn: &mut W, req: &PathRequest) -> Result<(), FileError> {
    match list(&guest_path(&req.path)) {
        Ok(files) => {
            let frame =
                Frame::json(FrameType::FileList, &FileList { files }).map_err(|source| {
                    FileError::Send {
                        what: "file list",
                        source,
                    }
                })?;
            send(conn, &frame, "file list")
        }
        Err(e) => send_error(conn, &format!("list {}: {e}", req.path)),
    }
}
