//! Host side of the guest's file sessions: write, read and list files inside the VM.
//!
//! # Design
//! Each call takes a fresh connection (to the guest's service port, or to an exec relay,
//! which forwards file sessions unchanged) and runs one session on it: `WriteFile` + `Data`
//! chunks + `DataEnd` answered by `Ok`; `ReadFile` answered by `FileInfo` + `Data` +
//! `DataEnd`; `ListFiles` answered by `FileList`. The guest's `Error` frame becomes
//! [`FileError::Guest`]. Reads are bounded by [`MAX_READ_FILE`] on this side as well, so a
//! misbehaving guest cannot make the host buffer more than that. Every frame the guest must
//! accept or send arrives within [`REPLY_TIMEOUT`], so a wedged agent is an error naming the
//! step, never a hang.
//!
//! # Limitations
//! Whole-file transfers only (no offsets or streaming to a sink); that is what the RPC and
//! the SDKs need.

use matchlock_guest_proto::{
    FileEntry, FileInfo, FileList, Frame, FrameType, PathRequest, ProtoError, WriteFileRequest,
    CHUNK, MAX_READ_FILE,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::codec::{read_frame, write_frame, REPLY_TIMEOUT};

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

/// Lists a directory (not recursive), sorted by name.
pub async fn list_files<S>(mut s: S, path: &str) -> Result<Vec<FileEntry>, FileError>
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
    let list: FileList = recv(&mut s, "file list")
        .await?
        .expect(FrameType::FileList, "file list")
        .map_err(FileError::Receive)?;
    Ok(list.files)
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
}
