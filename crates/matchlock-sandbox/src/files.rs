//! Host side of the guest's file sessions: write, read and list files inside the VM.
//!
//! # Design
//! Each call takes a fresh connection (to the guest's service port, or to an exec relay,
//! which forwards file sessions unchanged) and runs one session on it: `WriteFile` + `Data`
//! chunks + `DataEnd` answered by `Ok`; `ReadFile` answered by `FileInfo` + `Data` +
//! `DataEnd`; `ListFiles` answered by `FileList` batches then `FileListEnd`. The guest's
//! `Error` frame becomes [`FileError::Guest`]. Reads are bounded by [`MAX_READ_FILE`] on this
//! side as well, so a misbehaving guest cannot make the host buffer more than that; a listing
//! is bounded by [`MAX_LIST_ENTRIES`] entries and [`MAX_LIST_BYTES`] bytes of batches (the
//! connection is dropped past either), and sorted here, since the guest streams entries in
//! `readdir` order. Every frame the guest must accept or send arrives within
//! [`REPLY_TIMEOUT`], so a wedged agent is an error naming the step, never a hang.
//!
//! # Limitations
//! Whole-file transfers only (no offsets or streaming to a sink); that is what the RPC and
//! the SDKs need. Likewise a listing is returned whole, so a directory of more than
//! [`MAX_LIST_ENTRIES`] entries cannot be listed.

use matchlock_guest_proto::{
    FileEntry, FileInfo, FileList, Frame, FrameType, PathRequest, ProtoError, WriteFileRequest,
    CHUNK, MAX_READ_FILE,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::codec::{read_frame, write_frame, REPLY_TIMEOUT};

/// Most entries [`list_files`] accumulates; past it the listing fails and the connection is
/// dropped, so a hostile guest cannot grow host memory without bound.
pub const MAX_LIST_ENTRIES: usize = 1_000_000;
/// Most `FileList` payload bytes [`list_files`] accepts for one listing (names may be long,
/// so the entry count alone does not bound memory).
pub const MAX_LIST_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("send {what} to the guest")]
    Send {
        what: &'static str,
        #[source]
        source: ProtoError,
    },
    #[error("read the guest's reply")]
    Receive(#[source] ProtoError),
    #[error("the guest did not accept the {what} within {REPLY_TIMEOUT:?}")]
    SendTimeout { what: &'static str },
    #[error("the guest did not send the {what} within {REPLY_TIMEOUT:?}")]
    ReplyTimeout { what: &'static str },
    #[error("guest closed the connection before replying")]
    Closed,
    #[error("{0}")]
    Guest(String),
    #[error("unexpected {0:?} frame from the guest")]
    Unexpected(FrameType),
    #[error("guest sent more than {MAX_READ_FILE} bytes")]
    TooLarge,
    #[error("guest closed the connection before the end of the listing")]
    ListTruncated,
    #[error("guest listed more than {0} entries, the limit of a listing")]
    TooManyEntries(usize),
    #[error("guest sent more than {0} bytes of listing, the limit of a listing")]
    ListTooLarge(usize),
}

async fn send<S: AsyncWrite + Unpin>(
    s: &mut S,
    f: &Frame,
    what: &'static str,
) -> Result<(), FileError> {
    tokio::time::timeout(REPLY_TIMEOUT, write_frame(s, f))
        .await
        .map_err(|_| FileError::SendTimeout { what })?
        .map_err(|source| FileError::Send { what, source })
}

async fn recv<S: AsyncRead + Unpin>(s: &mut S, what: &'static str) -> Result<Frame, FileError> {
    let f = tokio::time::timeout(REPLY_TIMEOUT, read_frame(s))
        .await
        .map_err(|_| FileError::ReplyTimeout { what })?
        .map_err(FileError::Receive)?
        .ok_or(FileError::Closed)?;
    if f.kind == FrameType::Error {
        return Err(FileError::Guest(
            String::from_utf8_lossy(&f.payload).into_owned(),
        ));
    }
    Ok(f)
}

/// Writes `data` to `path` in the guest (parents created; mode 0 means 0644).
pub async fn write_file<S>(mut s: S, path: &str, data: &[u8], mode: u32) -> Result<(), FileError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = WriteFileRequest {
        path: path.to_string(),
        mode,
        user: String::new(),
    };
    let head = Frame::json(FrameType::WriteFile, &req).map_err(|source| FileError::Send {
        what: "write request",
        source,
    })?;
    send(&mut s, &head, "write request").await?;
    for chunk in data.chunks(CHUNK) {
        send(&mut s, &Frame::new(FrameType::Data, chunk.to_vec()), "data").await?;
    }
    send(&mut s, &Frame::empty(FrameType::DataEnd), "data end").await?;
    match recv(&mut s, "write reply").await? {
        f if f.kind == FrameType::Ok => Ok(()),
        f => Err(FileError::Unexpected(f.kind)),
    }
}

/// Reads a regular file (at most [`MAX_READ_FILE`] bytes).
pub async fn read_file<S>(mut s: S, path: &str) -> Result<Vec<u8>, FileError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = Frame::json(
        FrameType::ReadFile,
        &PathRequest {
            path: path.to_string(),
        },
    )
    .map_err(|source| FileError::Send {
        what: "read request",
        source,
    })?;
    send(&mut s, &req, "read request").await?;
    let info: FileInfo = recv(&mut s, "file info")
        .await?
        .expect(FrameType::FileInfo, "file info")
        .map_err(FileError::Receive)?;
    let cap = usize::try_from(info.size.min(MAX_READ_FILE)).unwrap_or(0);
    let mut data = Vec::with_capacity(cap);
    loop {
        let f = recv(&mut s, "file data").await?;
        match f.kind {
            FrameType::Data => {
                if (data.len() + f.payload.len()) as u64 > MAX_READ_FILE {
                    return Err(FileError::TooLarge);
                }
                data.extend_from_slice(&f.payload);
            }
            FrameType::DataEnd => return Ok(data),
            other => return Err(FileError::Unexpected(other)),
        }
    }
}

/// Lists a directory (not recursive), sorted by name; at most [`MAX_LIST_ENTRIES`] entries.
pub async fn list_files<S>(s: S, path: &str) -> Result<Vec<FileEntry>, FileError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    list_files_bounded(s, path, MAX_LIST_ENTRIES, MAX_LIST_BYTES).await
}

/// [`list_files`] with explicit bounds (the tests use small ones).
async fn list_files_bounded<S>(
    mut s: S,
    path: &str,
    max_entries: usize,
    max_bytes: usize,
) -> Result<Vec<FileEntry>, FileError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = Frame::json(
        FrameType::ListFiles,
        &PathRequest {
            path: path.to_string(),
        },
    )
    .map_err(|source| FileError::Send {
        what: "list request",
        source,
    })?;
    send(&mut s, &req, "list request").await?;
    let (mut files, mut bytes) = (Vec::new(), 0usize);
    loop {
        let f = match recv(&mut s, "file list").await {
            // Some batches arrived: the guest went away mid-listing.
            Err(FileError::Closed) if bytes > 0 => return Err(FileError::ListTruncated),
            r => r?,
        };
        match f.kind {
            FrameType::FileList => {
                bytes = bytes.saturating_add(f.payload.len());
                if bytes > max_bytes {
                    return Err(FileError::ListTooLarge(max_bytes));
                }
                let batch: FileList = f.parse("file list").map_err(FileError::Receive)?;
                if files.len().saturating_add(batch.files.len()) > max_entries {
                    return Err(FileError::TooManyEntries(max_entries));
                }
                files.extend(batch.files);
            }
            FrameType::FileListEnd => break,
            other => return Err(FileError::Unexpected(other)),
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted guest: checks the request framing and answers like the real agent.
    #[tokio::test]
    async fn write_read_list_against_scripted_guest() {
        let (host, mut guest) = tokio::net::UnixStream::pair().expect("pair");
        let g = tokio::spawn(async move {
            let f = read_frame(&mut guest).await.expect("r").expect("f");
            let req: WriteFileRequest = f.expect(FrameType::WriteFile, "w").expect("json");
            assert_eq!((req.path.as_str(), req.mode), ("/a", 0o600));
            let mut got = Vec::new();
            loop {
                let f = read_frame(&mut guest).await.expect("r").expect("f");
                match f.kind {
                    FrameType::Data => got.extend_from_slice(&f.payload),
                    FrameType::DataEnd => break,
                    k => panic!("unexpected {k:?}"),
                }
            }
            assert_eq!(got.len(), CHUNK + 10);
            write_frame(&mut guest, &Frame::empty(FrameType::Ok))
                .await
                .expect("w");
        });
        write_file(host, "/a", &vec![7u8; CHUNK + 10], 0o600)
            .await
            .expect("write");
        g.await.expect("guest");

        let (host, mut guest) = tokio::net::UnixStream::pair().expect("pair");
        let g = tokio::spawn(async move {
            read_frame(&mut guest).await.expect("r").expect("f");
            let info = FileInfo { size: 5, mode: 0 };
            for f in [
                Frame::json(FrameType::FileInfo, &info).expect("j"),
                Frame::new(FrameType::Data, b"he".to_vec()),
                Frame::new(FrameType::Data, b"llo".to_vec()),
                Frame::empty(FrameType::DataEnd),
            ] {
                write_frame(&mut guest, &f).await.expect("w");
            }
        });
        assert_eq!(read_file(host, "/b").await.expect("read"), b"hello");
        g.await.expect("guest");

        let (host, mut guest) = tokio::net::UnixStream::pair().expect("pair");
        tokio::spawn(async move {
            read_frame(&mut guest).await.expect("r").expect("f");
            let msg = b"list /nope: No such file or directory".to_vec();
            write_frame(&mut guest, &Frame::new(FrameType::Error, msg))
                .await
                .expect("w");
        });
        let e = list_files(host, "/nope").await.expect_err("guest error");
        assert!(e.to_string().contains("No such file"), "{e}");
    }

    /// A wedged agent that reads requests and never answers: each operation fails after
    /// REPLY_TIMEOUT with the step it was waiting for.
    #[tokio::test(start_paused = true)]
    async fn unanswered_requests_time_out() {
        async fn silent() -> tokio::net::UnixStream {
            let (host, mut guest) = tokio::net::UnixStream::pair().expect("pair");
            tokio::spawn(async move { while let Ok(Some(_)) = read_frame(&mut guest).await {} });
            host
        }
        let limit = REPLY_TIMEOUT * 6;
        let e = tokio::time::timeout(limit, read_file(silent().await, "/a"))
            .await
            .expect("read_file hung")
            .expect_err("no answer");
        assert_eq!(
            e.to_string(),
            "the guest did not send the file info within 10s"
        );
        let e = tokio::time::timeout(limit, list_files(silent().await, "/"))
            .await
            .expect("list_files hung")
            .expect_err("no answer");
        assert_eq!(
            e.to_string(),
            "the guest did not send the file list within 10s"
        );
        let e = tokio::time::timeout(limit, write_file(silent().await, "/a", b"x", 0))
            .await
            .expect("write_file hung")
            .expect_err("no answer");
        assert_eq!(
            e.to_string(),
            "the guest did not send the write reply within 10s"
        );
        // An agent that stops reading: the data it does not accept times out too.
        let (host, _guest) = tokio::net::UnixStream::pair().expect("pair");
        let big = vec![0u8; 8 << 20];
        let e = tokio::time::timeout(limit, write_file(host, "/a", &big, 0))
            .await
            .expect("write_file hung")
            .expect_err("not read");
        assert_eq!(
            e.to_string(),
            "the guest did not accept the data within 10s"
        );
    }

    fn entry(name: &str) -> FileEntry {
        FileEntry {
            name: name.into(),
            size: 1,
            mode: 0o100644,
            is_dir: false,
        }
    }

    fn batch(names: &[&str]) -> Frame {
        let files = names.iter().map(|n| entry(n)).collect();
        Frame::json(FrameType::FileList, &FileList { files }).expect("json")
    }

    /// A scripted guest answering a `ListFiles` request with `frames`.
    fn scripted(frames: Vec<Frame>) -> tokio::net::UnixStream {
        let (host, mut guest) = tokio::net::UnixStream::pair().expect("pair");
        tokio::spawn(async move {
            let f = read_frame(&mut guest).await.expect("r").expect("f");
            let req: PathRequest = f.expect(FrameType::ListFiles, "list").expect("json");
            assert_eq!(req.path, "/d");
            for f in frames {
                write_frame(&mut guest, &f).await.expect("w");
            }
        });
        host
    }

    #[tokio::test]
    async fn listing_in_several_batches_is_joined_and_sorted() {
        let host = scripted(vec![
            batch(&["c", "a"]),
            batch(&["e"]),
            batch(&["b", "d"]),
            Frame::empty(FrameType::FileListEnd),
        ]);
        let names: Vec<String> = list_files(host, "/d")
            .await
            .expect("list")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["a", "b", "c", "d", "e"]);

        let host = scripted(vec![Frame::empty(FrameType::FileListEnd)]);
        assert!(list_files(host, "/d").await.expect("empty").is_empty());
    }

    #[tokio::test]
    async fn incomplete_or_malformed_listings_fail() {
        // Closed after a batch, without the end frame: not a silently short listing.
        let host = scripted(vec![batch(&["a"])]);
        let e = list_files(host, "/d").await.expect_err("truncated");
        assert!(matches!(e, FileError::ListTruncated), "{e}");
        // An error after some batches wins.
        let msg = b"list /d: Input/output error".to_vec();
        let host = scripted(vec![batch(&["a"]), Frame::new(FrameType::Error, msg)]);
        let e = list_files(host, "/d").await.expect_err("guest error");
        assert!(e.to_string().contains("Input/output"), "{e}");
        let host = scripted(vec![batch(&["a"]), Frame::empty(FrameType::DataEnd)]);
        let e = list_files(host, "/d").await.expect_err("unexpected");
        assert!(
            matches!(e, FileError::Unexpected(FrameType::DataEnd)),
            "{e}"
        );
        let host = scripted(vec![Frame::new(FrameType::FileList, b"{".to_vec())]);
        let e = list_files(host, "/d").await.expect_err("bad json");
        assert!(matches!(e, FileError::Receive(_)), "{e}");
    }

    /// A guest that never ends its listing: the host stops at [`MAX_LIST_ENTRIES`] with an
    /// error naming the limit, and drops the connection (the guest's next write fails).
    #[tokio::test]
    async fn endless_listing_is_refused_at_the_entry_limit() {
        let (host, mut guest) = tokio::net::UnixStream::pair().expect("pair");
        // ~55 bytes per entry: a batch stays under the frame limit.
        const PER_FRAME: usize = 10_000;
        let names: Vec<String> = (0..PER_FRAME).map(|i| format!("{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let frame = batch(&refs);
        let g = tokio::spawn(async move {
            read_frame(&mut guest).await.expect("r").expect("f");
            let mut sent = 0usize;
            loop {
                if write_frame(&mut guest, &frame).await.is_err() {
                    return sent;
                }
                sent += PER_FRAME;
            }
        });
        let e = list_files(host, "/d").await.expect_err("over the limit");
        assert!(
            matches!(e, FileError::TooManyEntries(MAX_LIST_ENTRIES)),
            "{e}"
        );
        assert!(e.to_string().contains("1000000 entries"), "{e}");
        let sent = tokio::time::timeout(std::time::Duration::from_secs(30), g)
            .await
            .expect("the guest's writes fail once the host has dropped the connection")
            .expect("guest task");
        assert!(sent > MAX_LIST_ENTRIES, "{sent}");
    }

    #[tokio::test]
    async fn listing_bytes_are_bounded() {
        let long = "n".repeat(1000);
        let long = long.as_str();
        let host = scripted(vec![batch(&[long, long]), batch(&[long, long])]);
        let e = list_files_bounded(host, "/d", 10, 3000)
            .await
            .expect_err("over the byte limit");
        assert!(matches!(e, FileError::ListTooLarge(3000)), "{e}");
        assert!(e.to_string().contains("3000 bytes"), "{e}");
        // The same listing within the limits is accepted.
        let host = scripted(vec![
            batch(&[long, long]),
            batch(&[long, long]),
            Frame::empty(FrameType::FileListEnd),
        ]);
        let got = list_files_bounded(host, "/d", 4, 5000).await.expect("list");
        assert_eq!(got.len(), 4);
        let host = scripted(vec![batch(&["a", "b"]), batch(&["c", "d", "e"])]);
        let e = list_files_bounded(host, "/d", 4, 5000)
            .await
            .expect_err("over the entry limit");
        assert!(matches!(e, FileError::TooManyEntries(4)), "{e}");
    }
}
